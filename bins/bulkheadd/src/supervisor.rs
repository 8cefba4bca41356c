//! The embedded supervisor: starts component processes, watches them through pidfds
//! (which work for processes we did not start, so adopted components are watched the
//! same way), and signals them without ever hitting a reused pid.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::store::Component;

/// Start time of `pid` in clock ticks since boot, or `None` if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is this exact process (pid and start time) still alive (zombies count as gone)?
pub fn alive(c: &Component) -> bool {
    start_time(c.pid) == Some(c.start_time) && !is_zombie(c.pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

/// Start a component in its own session, stdio to `log`, each of `fds` at its number.
/// It must outlive bulkheadd. Through the spawner when bulkheadd has one (it always
/// does as a daemon; see `spawner.rs`), else from this process.
pub fn spawn(
    name: &str,
    cmd: &mut Command,
    fds: &[(OwnedFd, i32)],
    log: &Path,
) -> io::Result<Component> {
    let moves: Vec<(RawFd, i32)> = fds.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();
    let pid = match crate::spawner::get() {
        Some(s) => s.launch(cmd, &moves, log)?,
        None => spawn_here(cmd, moves, log)?,
    };
    let start_time = start_time(pid).ok_or_else(|| {
        io::Error::other(format!("{name} (pid {pid}) exited as soon as it started"))
    })?;
    Ok(Component {
        name: name.into(),
        pid,
        start_time,
    })
}

fn spawn_here(cmd: &mut Command, moves: Vec<(RawFd, i32)>, log: &Path) -> io::Result<u32> {
    prepare(cmd, moves, log)?;
    let child = cmd.spawn()?;
    // The child is reaped by `watch` (or by init after a manager restart).
    Ok(child.id())
}

/// Set `cmd` up as a component starts (here or in the spawner): stdin /dev/null,
/// output appended to `log`, its own session, each descriptor moved to its number.
pub fn prepare(cmd: &mut Command, moves: Vec<(RawFd, i32)>, log: &Path) -> io::Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid, dup2 and fcntl are async-signal-safe. A new session keeps the
    // component out of the manager's process group, so a signal to bulkheadd's group
    // does not reach it. Each source descriptor stays open in the caller until the
    // child has started.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            move_fds(&moves)
        })
    };
    Ok(())
}

/// In a child between fork and exec: put each descriptor at its number (clearing
/// close-on-exec where it is already there).
fn move_fds(moves: &[(RawFd, i32)]) -> io::Result<()> {
    for &(from, to) in moves {
        // SAFETY: dup2 and fcntl on descriptors the caller holds open.
        let r = unsafe {
            if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            }
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A pidfd for exactly this component, or `None` if it is gone.
pub fn pidfd(c: &Component) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, c.pid as libc::c_int, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after opening: if the start time still matches, the pidfd is this process.
    alive(c).then_some(fd)
}

/// Send `sig` to this exact component; a process already gone is not an error.
pub fn signal(c: &Component, sig: i32) {
    if let Some(fd) = pidfd(c) {
        // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Wait until the component exits (immediately if it is already gone), reaping it if it
/// is our child. Returns its exit status when we could read it.
pub async fn watch(c: Component) -> Option<i32> {
    let Some(fd) = pidfd(&c) else {
        return reap_blocking(c.pid).await;
    };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and names the
    // same pidfd for the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // No reactor registration possible: poll.
            while alive(&c) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    reap_blocking(c.pid).await
}

async fn reap_blocking(pid: u32) -> Option<i32> {
    tokio::task::spawn_blocking(move || reap(pid, Duration::from_millis(500)))
        .await
        .ok()
        .flatten()
}

/// Reap `pid` if it is ours and has exited; its status if known. With the spawner as
/// the parent, wait up to `wait` for it to report (it may be a moment behind the
/// pidfd); an adopted component (from before a manager restart) has none to report.
fn reap(pid: u32, wait: Duration) -> Option<i32> {
    if let Some(s) = crate::spawner::get() {
        return s.exit_status(pid, wait);
    }
    let mut status = 0;
    // SAFETY: waitpid on one pid, non-blocking; ECHILD when it is not our child.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    if r == pid as i32 {
        if libc::WIFEXITED(status) {
            return Some(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            return Some(128 + libc::WTERMSIG(status));
        }
    }
    None
}

/// SIGTERM, then SIGKILL after `grace`; returns when every component is gone.
pub async fn stop_all(components: &[Component], grace: Duration) {
    for c in components {
        signal(c, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while components.iter().any(alive) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in components.iter().filter(|c| alive(c)) {
        signal(c, libc::SIGKILL);
    }
    for _ in 0..250 {
        for c in components {
            reap(c.pid, Duration::ZERO);
        }
        if !components.iter().any(alive) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("components still alive after SIGKILL: {components:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn spawn_watch_and_stop() {
        let dir = std::env::temp_dir().join(format!("bh-sup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let c = spawn("sleeper", Command::new("sleep").arg("30"), &[], &log).unwrap();
        assert!(alive(&c));
        let stale = Component {
            start_time: c.start_time + 1,
            ..c.clone()
        };
        assert!(!alive(&stale), "a different start time is another process");
        signal(&stale, libc::SIGKILL);
        assert!(
            alive(&c),
            "a signal to a stale record must not reach the live pid"
        );
        let w = tokio::spawn(watch(c.clone()));
        stop_all(std::slice::from_ref(&c), Duration::from_secs(2)).await;
        assert!(!alive(&c));
        let _ = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap();

        let quick = spawn(
            "quick",
            Command::new("sh").args(["-c", "sleep 0.2; exit 7"]),
            &[],
            &log,
        )
        .unwrap();
        assert_eq!(watch(quick).await, Some(7));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
