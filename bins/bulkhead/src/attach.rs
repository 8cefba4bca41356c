//! Following one process in a sandbox from this terminal: its stdio and its exit status
//! arrive as file descriptors from the manager (`Sandbox1.Attach`), connected straight
//! to the guest, so the manager can restart meanwhile without losing a byte.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bulkhead_dbus::Sandbox1Proxy;
use bulkhead_protocol::{decode, read_frame, ExitStatus, Response};

use crate::client::explain;
use crate::stdio;

/// The wait stream closed without an exit status: the sandbox's VM went away. The
/// container is as good as killed; callers report 137 (128 + SIGKILL).
#[derive(Debug)]
pub struct SandboxLost(pub String);

impl std::fmt::Display for SandboxLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lost the container: its sandbox went away ({})", self.0)
    }
}

impl std::error::Error for SandboxLost {}

pub struct Attached {
    outputs: Vec<JoinHandle<u64>>,
    wait: UnixStream,
}

async fn stream(
    sb: &Sandbox1Proxy<'_>,
    id: &str,
    exec_id: &str,
    which: &str,
) -> Result<UnixStream> {
    let fd = sb.attach(id, exec_id, which).await.map_err(explain)?;
    Ok(UnixStream::from(OwnedFd::from(fd)))
}

/// Attach to a created container's init (`exec_id` empty) or an exec'd process.
/// `stdin`: copy this process's stdin to it. `tty`: the process has a terminal, whose
/// output comes on the stdout stream alone.
pub async fn attach(
    sb: &Sandbox1Proxy<'_>,
    id: &str,
    exec_id: &str,
    stdin: bool,
    tty: bool,
) -> Result<Attached> {
    let wait = stream(sb, id, exec_id, "wait").await?;
    let mut outputs = vec![stdio::pump(
        stream(sb, id, exec_id, "stdout").await?,
        std::io::stdout(),
    )];
    if !tty {
        outputs.push(stdio::pump(
            stream(sb, id, exec_id, "stderr").await?,
            std::io::stderr(),
        ));
    }
    if stdin {
        // Not joined: a blocked read of our stdin must not keep us alive.
        stdio::pump_stdin(stream(sb, id, exec_id, "stdin").await?);
    }
    Ok(Attached { outputs, wait })
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
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for h in self.outputs {
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        Ok(status)
    }
}
