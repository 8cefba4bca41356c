//! Starting a process through libcontainer with fresh stdio: pipes, or a terminal whose
//! master end libcontainer sends back over a console socket.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bulkhead_protocol::AgentError;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

use super::{io_err, runtime_err, Runtime};
use crate::stdio::{ChildIo, ProcIo};

impl Runtime {
    /// Run a libcontainer build with fresh stdio (pipes, or a terminal received over a
    /// console socket). Returns the agent's stdio ends and the new process's pid.
    pub(super) fn spawn_with_stdio(
        &self,
        id: &str,
        terminal: bool,
        stdin: bool,
        build: impl FnOnce(ContainerBuilder) -> Result<i32, AgentError>,
    ) -> Result<(Arc<ProcIo>, i32), AgentError> {
        let base = ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(self.lc_root())
            .map_err(runtime_err)?;
        if !terminal {
            let (io, child) = ProcIo::pipes(stdin)?;
            let ChildIo {
                stdin,
                stdout,
                stderr,
            } = child;
            let mut b = base;
            if let Some(f) = stdin {
                b = b.with_stdin(f);
            }
            if let Some(f) = stdout {
                b = b.with_stdout(f);
            }
            if let Some(f) = stderr {
                b = b.with_stderr(f);
            }
            let pid = crate::threads::clone_section(|| build(b))?;
            return Ok((Arc::new(io), pid));
        }
        let dir = self.state.join("console");
        std::fs::create_dir_all(&dir).map_err(io_err("console dir"))?;
        // Builds run one at a time (the lc lock), so a counter keeps names apart.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let sock = dir.join(format!("{}.sock", SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io_err("console socket"))?;
        let (send_master, received) = std::sync::mpsc::channel();
        crate::threads::spawn("console-recv", move || {
            let _ = send_master.send(receive_master(listener));
        })
        .map_err(io_err("console receiver thread"))?;
        // The clone waits for the receiver's thread, if it is a new one, to have started
        // (crate::threads says why).
        let built = crate::threads::clone_section(|| build(base.with_console_socket(Some(&sock))));
        if built.is_err() {
            // Unblock the receiver if libcontainer never connected.
            let _ = std::os::unix::net::UnixStream::connect(&sock);
        }
        let master = received
            .recv()
            .map_err(|_| AgentError::Io("console receiver ended without an answer".into()))?;
        let _ = std::fs::remove_file(&sock);
        let pid = built?;
        let master = master?;
        Ok((Arc::new(ProcIo::terminal(master)?), pid))
    }
}

/// Accept libcontainer's connection on the console socket and take the terminal master
/// it sends.
fn receive_master(listener: UnixListener) -> Result<File, AgentError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (conn, _) = listener.accept().map_err(io_err("console accept"))?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| AgentError::Io(format!("console recvmsg: {e}")))?;
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| AgentError::Io(format!("console cmsgs: {e}")))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = c {
            let mut it = fds.into_iter();
            if let Some(fd) = it.next() {
                for extra in it {
                    // SAFETY: received descriptors are ours to close.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: the descriptor was just received and is owned by nobody else.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(AgentError::Runtime(
        "no terminal received on the console socket".into(),
    ))
}
