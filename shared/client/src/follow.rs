//! Following one process in a sandbox: its stdio and its exit status arrive as file
//! descriptors from the manager (`Sandbox1.Attach`), connected straight to the guest, so
//! the manager can restart meanwhile without losing a byte.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bulkhead_dbus::Sandbox1Proxy;
use bulkhead_protocol::{decode, read_frame, ExitStatus, Response};

use crate::explain;

/// The wait stream closed without an exit status: the sandbox's VM went away. The
/// process is as good as killed; callers report 137 (128 + SIGKILL).
#[derive(Debug)]
pub struct SandboxLost(pub String);

impl std::fmt::Display for SandboxLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lost the container: its sandbox went away ({})", self.0)
    }
}

impl std::error::Error for SandboxLost {}

/// One stream of a process (`stdin`, `stdout`, `stderr` or `wait`).
pub async fn stream(
    sb: &Sandbox1Proxy<'_>,
    id: &str,
    exec_id: &str,
    which: &str,
) -> Result<UnixStream> {
    let fd = sb.attach(id, exec_id, which).await.map_err(explain)?;
    Ok(UnixStream::from(OwnedFd::from(fd)))
}

/// A process's output pumps and its wait stream.
pub struct Attached {
    outputs: Vec<JoinHandle<u64>>,
    wait: UnixStream,
}

impl Attached {
    /// Output pumps already running, and a wait stream with its request sent.
    pub fn new(outputs: Vec<JoinHandle<u64>>, wait: UnixStream) -> Attached {
        Attached { outputs, wait }
    }

    /// Block until the process exits, then until its output has drained (bounded: a
    /// guest that never closes the streams cannot hold us forever).
    pub fn finish(mut self) -> Result<ExitStatus> {
        let status = match read_frame(&mut self.wait) {
            Ok(frame) => match decode::<Response>(&frame) {
                Ok(Response::Exited(s)) => s,
                Ok(Response::Error(e)) => bail!("{e}"),
                Ok(other) => bail!("unexpected answer to wait: {other:?}"),
                Err(e) => bail!("malformed answer to wait: {e}"),
            },
            Err(e) => return Err(anyhow!(SandboxLost(e.to_string()))),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for h in self.outputs {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        Ok(status)
    }
}

/// Copy `from` to `to` until end of file, flushing as bytes arrive; returns the count.
pub fn pump<R, W>(mut from: R, mut to: W) -> JoinHandle<u64>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    if to.write_all(&buf[..k]).and_then(|_| to.flush()).is_err() {
                        break;
                    }
                    n += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        n
    })
}
