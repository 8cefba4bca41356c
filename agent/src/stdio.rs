//! A process's stdio: pipes (or a terminal) the agent holds from creation on, and the
//! copy loops that join them to the host's stream connections.
//!
//! Nothing is buffered in the agent beyond one copy chunk: output nobody reads stays in
//! the pipe and, once the pipe is full, blocks the writer. That is backpressure, and it
//! keeps a process that floods stdout from growing the agent's memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use bulkhead_protocol::{AgentError, StdioStream};

/// The agent's ends of one process's stdio.
pub struct ProcIo {
    stdin: Mutex<Option<File>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    /// Terminal master, kept for resizes.
    pty: Option<File>,
}

/// The process's ends, handed to libcontainer.
pub struct ChildIo {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn pipe() -> Result<(File, File), AgentError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(AgentError::Io(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe {
        use std::os::fd::FromRawFd;
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    })
}

impl ProcIo {
    /// Pipes for a non-terminal process. Without `stdin`, the process's stdin is
    /// /dev/null.
    pub fn pipes(stdin: bool) -> Result<(ProcIo, ChildIo), AgentError> {
        let (in_r, in_w) = if stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            let null =
                File::open("/dev/null").map_err(|e| AgentError::Io(format!("/dev/null: {e}")))?;
            (null, None)
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok((
            ProcIo {
                stdin: Mutex::new(in_w),
                stdout: Mutex::new(Some(out_r)),
                stderr: Mutex::new(Some(err_r)),
                pty: None,
            },
            ChildIo {
                stdin: Some(in_r.into()),
                stdout: Some(out_w.into()),
                stderr: Some(err_w.into()),
            },
        ))
    }

    /// A terminal process: the master carries stdin and stdout.
    pub fn terminal(master: File) -> Result<ProcIo, AgentError> {
        let dup = |f: &File| {
            f.try_clone()
                .map_err(|e| AgentError::Io(format!("dup terminal: {e}")))
        };
        Ok(ProcIo {
            stdin: Mutex::new(Some(dup(&master)?)),
            stdout: Mutex::new(Some(dup(&master)?)),
            stderr: Mutex::new(None),
            pty: Some(master),
        })
    }

    pub fn is_terminal(&self) -> bool {
        self.pty.is_some()
    }

    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let Some(pty) = &self.pty else {
            return Err(AgentError::FailedPrecondition(
                "process has no terminal".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the fd is a pty master.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(AgentError::Io(format!(
                "resize: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Join `conn` to one stream on a thread of its own. Each output stream can be
    /// attached once; stdin closes when its connection ends. `ready` runs once the
    /// stream is known to be available and before any byte is copied (it answers the
    /// attach request on `conn`).
    pub fn attach<C>(
        self: &std::sync::Arc<Self>,
        stream: StdioStream,
        mut conn: C,
        ready: impl FnOnce(&mut C) -> std::io::Result<()>,
    ) -> Result<(), AgentError>
    where
        C: Read + Write + Send + 'static,
    {
        match stream {
            StdioStream::Stdout | StdioStream::Stderr => {
                let slot = if stream == StdioStream::Stdout {
                    &self.stdout
                } else {
                    &self.stderr
                };
                let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                let mut src = match taken {
                    Some(f) => f,
                    // Terminal stderr: nothing will ever come; end the stream at once.
                    None if self.is_terminal() && stream == StdioStream::Stderr => {
                        return ready(&mut conn).map_err(|e| AgentError::Io(e.to_string()))
                    }
                    None => {
                        return Err(AgentError::FailedPrecondition(format!(
                            "{stream:?} already attached"
                        )))
                    }
                };
                ready(&mut conn).map_err(|e| AgentError::Io(e.to_string()))?;
                crate::spawn("stdio-out", move || {
                    // Ends at EOF (every writer gone), a terminal's EIO, or a closed peer.
                    let _ = std::io::copy(&mut src, &mut conn);
                });
            }
            StdioStream::Stdin => {
                if self
                    .stdin
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none()
                {
                    return Err(AgentError::FailedPrecondition(
                        "stdin is closed or was not requested".into(),
                    ));
                }
                ready(&mut conn).map_err(|e| AgentError::Io(e.to_string()))?;
                let me = self.clone();
                crate::spawn("stdio-in", move || {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        let n = match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut g = me.stdin.lock().unwrap_or_else(|p| p.into_inner());
                        let Some(w) = g.as_mut() else { return };
                        if w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    // The host closed its side: the process sees end-of-file (on a
                    // terminal, the master stays open for output).
                    if !me.is_terminal() {
                        me.close_stdin();
                    }
                });
            }
        }
        Ok(())
    }
}
