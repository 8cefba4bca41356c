//! The monitor: one small process per container (or detached exec) that lives as long as
//! the process in the guest does. The OCI CLI exits after every command, but its callers
//! (conmon, containerd's runc shim) expect a host process whose stdio is the container's
//! and whose exit status is the container's: `create` starts a monitor, writes its pid as
//! the container's, and returns. The monitor
//! - holds the stdio it inherited (conmon's pipes), or a host pty whose master it sent to
//!   the `--console-socket`, and copies between it and the streams `Sandbox1.Attach`
//!   hands over (connected to the guest, so bulkheadd may restart meanwhile),
//! - waits for the exit status on its wait stream, lets the output drain, and exits with
//!   that status (128 + signal for a killed process, as runc's callers read it).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::client::{explain, Client};
use crate::stdio;

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    #[arg(long)]
    pub sandbox: String,
    #[arg(long)]
    pub container: String,
    /// Follow this exec'd process instead of the container's init.
    #[arg(long, default_value = "")]
    pub exec_id: String,
    /// The process has a terminal: send a pty master to this socket (runc's protocol).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// The process has a terminal (with or without a console socket).
    #[arg(long)]
    pub tty: bool,
    /// Append the output here instead of our stdout/stderr (the process has no stdin).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Write the exit status here when the process exits.
    #[arg(long)]
    pub exit_file: Option<PathBuf>,
    /// Write "ok\n" (or "error: ...\n") to this inherited fd once attached.
    #[arg(long)]
    pub ready_fd: Option<i32>,
}

fn ready_pipe(fd: Option<i32>) -> Option<std::fs::File> {
    // SAFETY: the fd was handed to us open, for us alone, by the parent that spawned us.
    fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Send `fd` over the unix socket at `path` (SCM_RIGHTS), as runc does for a console.
fn send_fd(path: &std::path::Path, fd: &OwnedFd) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let s = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to the console socket {}", path.display()))?;
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"/dev/ptmx")];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("cannot send the pty to the console socket")?;
    Ok(())
}

pub async fn monitor(a: MonitorArgs) -> Result<i32> {
    let mut ready = ready_pipe(a.ready_fd);
    match follow(&a, &mut ready).await {
        Ok(code) => Ok(code),
        Err(e) => {
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "error: {e:#}");
            }
            Err(e)
        }
    }
}

async fn follow(a: &MonitorArgs, ready: &mut Option<std::fs::File>) -> Result<i32> {
    let client = Client::connect().await?;
    let sb = client.sandbox(&a.sandbox).await?;
    let (id, eid) = (a.container.as_str(), a.exec_id.as_str());
    let stream = |which: &'static str| {
        let sb = sb.clone();
        async move {
            let fd = sb.attach(id, eid, which).await.map_err(explain)?;
            Ok::<_, anyhow::Error>(UnixStream::from(OwnedFd::from(fd)))
        }
    };
    let wait = stream("wait").await?;
    let out = stream("stdout").await?;
    let mut pumps = vec![];
    let tty = a.tty || a.console_socket.is_some();
    let mut pty_slave: Option<std::fs::File> = None;
    if let Some(sock) = &a.console_socket {
        let pty = nix::pty::openpty(None, None).context("openpty")?;
        {
            use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
            // The guest's terminal does the line discipline; ours only carries bytes.
            let mut t = tcgetattr(pty.slave.as_fd()).context("tcgetattr")?;
            cfmakeraw(&mut t);
            tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &t).context("tcsetattr")?;
        }
        let input = stream("stdin").await?;
        send_fd(sock, &pty.master)?;
        drop(pty.master);
        let slave = std::fs::File::from(pty.slave);
        pumps.push(stdio::pump(out, slave.try_clone()?));
        pump_into(slave.try_clone()?, input);
        pty_slave = Some(slave);
    } else {
        match &a.log {
            Some(log) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .with_context(|| format!("cannot open {}", log.display()))?;
                pumps.push(stdio::pump(out, f.try_clone()?));
                if !tty {
                    pumps.push(stdio::pump(stream("stderr").await?, f));
                }
            }
            None => {
                pumps.push(stdio::pump(out, std::io::stdout()));
                if !tty {
                    pumps.push(stdio::pump(stream("stderr").await?, std::io::stderr()));
                }
                stdio::pump_stdin(stream("stdin").await?);
            }
        }
    }
    if let Some(mut r) = ready.take() {
        r.write_all(b"ok\n")?;
    }
    if let Some(slave) = pty_slave {
        watch_window(sb.clone(), id.to_string(), eid.to_string(), slave);
    }
    let attached = crate::attach::Attached::new(pumps, wait);
    let code = match tokio::task::spawn_blocking(move || attached.finish()).await? {
        Ok(status) => status.code,
        // The sandbox went away under the process: as good as killed.
        Err(e) if e.downcast_ref::<crate::attach::SandboxLost>().is_some() => 137,
        Err(e) => return Err(e),
    };
    if let Some(f) = &a.exit_file {
        let _ = std::fs::write(f, format!("{code}\n"));
    }
    Ok(code)
}

/// Copy a pty's input to the process's stdin stream.
fn pump_into(mut from: std::fs::File, to: UnixStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut w = &to;
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Whoever holds the pty master (conmon) resizes it; carry each new size to the guest.
fn watch_window(
    sb: bulkhead_dbus::Sandbox1Proxy<'static>,
    id: String,
    eid: String,
    slave: std::fs::File,
) {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let now = stdio::window_size(slave.as_fd());
            if now.is_some() && now != last {
                if let Some((rows, cols)) = now {
                    let _ = sb.resize_pty(&id, &eid, rows, cols).await;
                }
                last = now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Start a monitor for a process and wait until it is attached; returns its pid.
/// `inherit_stdio`: the monitor holds our stdio as the container's (the OCI CLI under
/// conmon or a shim); otherwise it gets /dev/null, so that nobody waiting for our
/// output to end waits for the container.
pub fn spawn(args: &[String], inherit_stdio: bool) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let (r, w) = nix::unistd::pipe().context("pipe")?;
    let wfd = w.as_raw_fd();
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__monitor")
        .args(args)
        .arg("--ready-fd")
        .arg(wfd.to_string());
    if !inherit_stdio {
        use std::process::Stdio;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    // SAFETY: only async-signal-safe calls between fork and exec: clear close-on-exec on
    // the ready pipe's write end and start a new session (the monitor must not get the
    // caller's terminal signals).
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(wfd, libc::F_GETFD);
            libc::fcntl(wfd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            libc::setsid();
            Ok(())
        })
    };
    let child = cmd.spawn().context("cannot start the monitor")?;
    drop(w);
    let mut answer = String::new();
    std::fs::File::from(r).read_to_string(&mut answer)?;
    let pid = child.id();
    // Not waited for: the monitor outlives us and is reaped by our caller (conmon,
    // containerd's shim: subreapers) or by init.
    drop(child);
    match answer.lines().next() {
        Some("ok") => Ok(pid),
        Some(err) => bail!("{}", err.trim_start_matches("error: ")),
        None => bail!("the monitor exited before it was ready"),
    }
}
