//! OOM kills in containers' cgroups, queued for the host to collect one at a time.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::Runtime;

/// OOM kills queued for [`Runtime::wait_oom`] before the oldest are dropped.
const MAX_OOM_QUEUE: usize = 256;

#[derive(Default)]
pub(super) struct OomQueue {
    ids: Mutex<VecDeque<String>>,
    cv: Condvar,
}

impl Runtime {
    fn poll_oom(&self) {
        // Read the cgroup files without the tables lock: every call takes that lock.
        let ids: Vec<String> = self.tables().containers.keys().cloned().collect();
        let counts: Vec<(String, u64)> = ids
            .into_iter()
            .filter_map(|id| crate::cgroupfs::oom_kills(&Self::cgroup_dir(&id)).map(|n| (id, n)))
            .collect();
        let mut hits = Vec::new();
        {
            let mut t = self.tables();
            for (id, n) in counts {
                // A container deleted meanwhile is simply not found.
                if let Some(c) = t.containers.get_mut(&id) {
                    // One event per kill: a counter that moved by three is three kills.
                    if n > c.oom_kills {
                        let kills = (n - c.oom_kills).min(MAX_OOM_QUEUE as u64);
                        c.oom_kills = n;
                        hits.extend(std::iter::repeat_n(id, kills as usize));
                    }
                }
            }
        }
        if hits.is_empty() {
            return;
        }
        let mut q = self.oom.ids.lock().unwrap_or_else(|p| p.into_inner());
        for id in hits {
            if q.len() >= MAX_OOM_QUEUE {
                q.pop_front();
            }
            q.push_back(id);
        }
        self.oom.cv.notify_one();
    }

    /// The containers' `memory.events` files, to watch for changes.
    fn memory_events_files(&self) -> Vec<(String, PathBuf)> {
        self.tables()
            .containers
            .keys()
            .map(|id| (id.clone(), Self::cgroup_dir(id).join("memory.events")))
            .collect()
    }

    pub fn wait_oom(&self) -> String {
        let mut q = self.oom.ids.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.oom.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Follow OOM kills: every container's `memory.events` is watched with inotify (the
/// cgroup v2 file changes when its counters do), and every change is read at once. The
/// watches are brought in line with the container table on every wake-up, and at least
/// once a second, so a container created meanwhile is covered; counts are compared with
/// what was last seen, so a kill that came before its watch is still counted.
pub(super) fn oom_watch(rt: std::sync::Weak<Runtime>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
    use std::os::fd::AsFd;

    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok();
    let mut watched: HashMap<String, WatchDescriptor> = HashMap::new();
    loop {
        let Some(runtime) = rt.upgrade() else { return };
        if let Some(ino) = &inotify {
            let files = runtime.memory_events_files();
            watched.retain(|id, wd| {
                let keep = files.iter().any(|(f, _)| f == id);
                if !keep {
                    let _ = ino.rm_watch(*wd);
                }
                keep
            });
            for (id, path) in files {
                if let std::collections::hash_map::Entry::Vacant(slot) = watched.entry(id) {
                    if let Ok(wd) = ino.add_watch(&path, AddWatchFlags::IN_MODIFY) {
                        slot.insert(wd);
                    }
                }
            }
        }
        runtime.poll_oom();
        drop(runtime);
        match &inotify {
            Some(ino) => {
                let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(1000u16));
                // Drain: what changed is read from the files themselves.
                while let Ok(ev) = ino.read_events() {
                    if ev.is_empty() {
                        break;
                    }
                }
            }
            // No inotify: fall back to reading the counters five times a second.
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
