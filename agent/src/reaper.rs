//! The one place that reaps children.
//!
//! The agent is PID 1 in a guest (and a child subreaper in host mode), so every orphan in
//! the guest ends up as its child, beside the container processes whose exit codes the
//! host waits for. One thread calls `waitpid(-1)` on every SIGCHLD and hands each status
//! to whoever registered that pid; statuses nobody registered yet are kept a short while
//! (a process can exit between its creation and its registration), bounded in number.
//!
//! libcontainer waits for its own intermediate process during a create; if this thread
//! reaps that one first, libcontainer sees ECHILD and carries on (it learns the outcome
//! over its pipes, not from the exit status).

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulkhead_protocol::ExitStatus;

/// Most unclaimed exit statuses kept (orphans nobody waits for land here too).
const MAX_UNCLAIMED: usize = 1024;

/// One process's exit, set once, waited on by any number of callers.
#[derive(Default)]
pub struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    cv: Condvar,
}

impl ExitCell {
    pub fn set(&self, s: ExitStatus) {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(s);
            self.cv.notify_all();
        }
    }

    pub fn get(&self) -> Option<ExitStatus> {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exit, waiting at most `timeout` for it.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<ExitStatus> {
        let g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    pub fn wait(&self) -> ExitStatus {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = *g {
                return s;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Default)]
struct Tables {
    watched: HashMap<i32, Arc<ExitCell>>,
    unclaimed: VecDeque<(i32, ExitStatus, Instant)>,
}

#[derive(Default)]
pub struct Reaper {
    tables: Mutex<Tables>,
}

/// Translate a raw wait status.
pub fn exit_status(raw: i32) -> Option<ExitStatus> {
    if libc::WIFEXITED(raw) {
        Some(ExitStatus {
            code: libc::WEXITSTATUS(raw),
            signal: None,
        })
    } else if libc::WIFSIGNALED(raw) {
        let sig = libc::WTERMSIG(raw);
        Some(ExitStatus {
            code: 128 + sig,
            signal: Some(sig),
        })
    } else {
        None
    }
}

impl Reaper {
    /// Start the reaping thread.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let (mut rx, tx) = UnixStream::pair()?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGCHLD, tx)?;
        // A missed wakeup costs at most this long.
        rx.set_read_timeout(Some(Duration::from_secs(1)))?;
        let r = Arc::new(Reaper::default());
        let me = r.clone();
        crate::threads::spawn("reaper", move || {
            let mut buf = [0u8; 64];
            loop {
                let _ = rx.read(&mut buf);
                me.reap_all();
            }
        })?;
        Ok(r)
    }

    fn reap_all(&self) {
        loop {
            let mut raw = 0;
            // SAFETY: waitpid with a valid status pointer; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let Some(status) = exit_status(raw) else {
                continue;
            };
            let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(cell) = t.watched.remove(&pid) {
                cell.set(status);
            } else {
                if t.unclaimed.len() >= MAX_UNCLAIMED {
                    t.unclaimed.pop_front();
                }
                t.unclaimed.push_back((pid, status, Instant::now()));
            }
        }
    }

    /// Register interest in `pid`, created at or after `since`. An exit already reaped
    /// after `since` is claimed at once; older unclaimed entries for a reused pid are
    /// ignored.
    pub fn watch(&self, pid: i32, since: Instant) -> Arc<ExitCell> {
        let cell = Arc::new(ExitCell::default());
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = t
            .unclaimed
            .iter()
            .rposition(|(p, _, at)| *p == pid && *at >= since)
        {
            if let Some((_, s, _)) = t.unclaimed.remove(i) {
                cell.set(s);
                return cell;
            }
        }
        t.watched.insert(pid, cell.clone());
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_translate() {
        assert_eq!(
            exit_status(3 << 8),
            Some(ExitStatus {
                code: 3,
                signal: None
            })
        );
        assert_eq!(
            exit_status(libc::SIGKILL),
            Some(ExitStatus {
                code: 137,
                signal: Some(9)
            })
        );
    }

    #[test]
    fn wait_timeout_returns_the_exit_or_gives_up() {
        let cell = Arc::new(ExitCell::default());
        assert_eq!(cell.wait_timeout(Duration::from_millis(20)), None);
        let setter = cell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            setter.set(ExitStatus {
                code: 137,
                signal: Some(9),
            });
        });
        let got = cell.wait_timeout(Duration::from_secs(10));
        t.join().unwrap();
        assert_eq!(got.map(|s| s.code), Some(137));
    }

    #[test]
    fn exit_before_watch_is_claimed_and_stale_one_is_not() {
        let r = Reaper::default();
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        {
            let mut t = r.tables.lock().unwrap();
            t.unclaimed.push_back((
                42,
                ExitStatus {
                    code: 1,
                    signal: None,
                },
                before,
            ));
        }
        let since = Instant::now();
        // Recorded before `since`: a reused pid, not ours.
        assert!(r.watch(42, since).get().is_none());
        r.tables.lock().unwrap().unclaimed.push_back((
            43,
            ExitStatus {
                code: 7,
                signal: None,
            },
            Instant::now(),
        ));
        assert_eq!(r.watch(43, since).get().map(|s| s.code), Some(7));
    }
}
