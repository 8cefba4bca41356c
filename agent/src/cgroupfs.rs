//! Figures read straight from a cgroup v2 directory. A file that is missing (its
//! controller is not enabled for this cgroup) gives `None`, never an error: stats are
//! best effort, and a host-mode agent on a host whose controllers sit in v1 hierarchies
//! has only the core files.

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_protocol::ContainerStats;

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// A single-number file; "max" reads as `None`.
fn number(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file)?.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.events).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Sum of `rbytes=` / `wbytes=` over every device line of io.stat.
fn io_bytes(text: &str) -> (u64, u64) {
    let mut r = 0u64;
    let mut w = 0u64;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            r = r.saturating_add(v.parse().unwrap_or(0));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            w = w.saturating_add(v.parse().unwrap_or(0));
        }
    }
    (r, w)
}

pub fn stats(dir: &Path) -> ContainerStats {
    let cpu = read(dir, "cpu.stat").unwrap_or_default();
    let io = read(dir, "io.stat").map(|t| io_bytes(&t));
    ContainerStats {
        cpu_usage_usec: keyed(&cpu, "usage_usec"),
        cpu_user_usec: keyed(&cpu, "user_usec"),
        cpu_system_usec: keyed(&cpu, "system_usec"),
        memory_current: number(dir, "memory.current"),
        memory_limit: number(dir, "memory.max"),
        memory_oom_kills: oom_kills(dir),
        pids_current: number(dir, "pids.current"),
        pids_limit: number(dir, "pids.max"),
        io_read_bytes: io.map(|x| x.0),
        io_write_bytes: io.map(|x| x.1),
    }
}

pub fn oom_kills(dir: &Path) -> Option<u64> {
    keyed(&read(dir, "memory.events")?, "oom_kill")
}

/// Whether any process is left in the cgroup (or below it). A cgroup that is gone is
/// empty.
pub fn populated(dir: &Path) -> bool {
    match read(dir, "cgroup.events") {
        Some(t) => keyed(&t, "populated") != Some(0),
        None => dir.exists(),
    }
}

/// SIGKILLs everything in the cgroup (frozen tasks die too) and waits until it is
/// empty, so that removing the directory cannot fail on a slow guest. Returns whether
/// it emptied within `timeout`.
pub fn kill_all(dir: &Path, timeout: Duration) -> bool {
    if !populated(dir) {
        return true;
    }
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill.
        for pid in read(dir, "cgroup.procs").unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let deadline = Instant::now() + timeout;
    while populated(dir) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_files() {
        let dir = std::env::temp_dir().join(format!("bh-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("io.stat"),
            "254:0 rbytes=100 wbytes=20 rios=1 wios=1\n254:16 rbytes=1 wbytes=2 rios=1 wios=1\n",
        )
        .unwrap();
        let s = stats(&dir);
        assert_eq!(s.cpu_usage_usec, Some(1500));
        assert_eq!(s.cpu_system_usec, Some(500));
        assert_eq!(s.memory_current, Some(4096));
        assert_eq!(s.memory_limit, None);
        assert_eq!(s.memory_oom_kills, Some(2));
        assert_eq!(s.pids_current, None);
        assert_eq!((s.io_read_bytes, s.io_write_bytes), (Some(101), Some(22)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn populated_follows_cgroup_events() {
        let dir = std::env::temp_dir().join(format!("bh-cg-ev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(populated(&dir));
        // Nothing to kill in a fake cgroup: the wait gives up at its deadline.
        assert!(!kill_all(&dir, Duration::from_millis(30)));
        std::fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(!populated(&dir));
        assert!(kill_all(&dir, Duration::from_secs(5)));
        std::fs::remove_dir_all(&dir).unwrap();
        // A cgroup that is gone is empty.
        assert!(!populated(&dir));
    }
}
