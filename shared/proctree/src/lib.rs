//! A host process and the processes below it, from `/proc`: who they are and what they
//! use. What `bulkhead ls`, bulkhead-metrics and bulkheadd's `Security()` read; readable
//! by any user, bounded (at most 256 processes below one).

/// Every process below `pid` (children, their children...), parents first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
                if !out.contains(&k) && out.len() < 256 {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
    }
    out
}

/// CPU time and resident memory of a process and every process below it (a jailed
/// component runs as its jailer's child): what `bulkhead ls` and bulkhead-metrics show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// User plus system time, in milliseconds.
    pub cpu_ms: u64,
    /// Resident set, in KiB.
    pub rss_kib: u64,
}

/// [`Usage`] of `pid`'s whole tree; zero for a process that is gone.
pub fn tree_usage(pid: u32) -> Usage {
    std::iter::once(pid)
        .chain(descendants(pid))
        .map(process_usage)
        .fold(Usage::default(), |a, b| Usage {
            cpu_ms: a.cpu_ms + b.cpu_ms,
            rss_kib: a.rss_kib + b.rss_kib,
        })
}

/// [`Usage`] of one process, from /proc/PID/stat (utime, stime, rss), which any user
/// may read.
pub fn process_usage(pid: u32) -> Usage {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Usage::default();
    };
    parse_stat_usage(&stat)
}

fn parse_stat_usage(stat: &str) -> Usage {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Usage::default();
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1) // state
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // After the state: ppid(0) ... utime(10) stime(11) ... rss(20), counting from ppid.
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    Usage {
        cpu_ms: (field(10) + field(11)) * 1000 / hz.max(1) as u64,
        rss_kib: field(20) * page.max(1) as u64 / 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_this_process_and_of_a_stat_line() {
        let me = tree_usage(std::process::id());
        assert!(me.rss_kib > 0, "{me:?}");
        assert_eq!(tree_usage(u32::MAX), Usage::default());
        // A name with spaces and ')' in it; utime 150, stime 50 ticks; rss 10 pages.
        // SAFETY: sysconf has no memory-safety preconditions.
        let (hz, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let (hz, page) = (hz as u64, page as u64);
        let line = "42 (a b) c) S 1 42 42 0 -1 0 0 0 0 0 150 50 0 0 20 0 1 0 9 4096 10 0";
        let u = parse_stat_usage(line);
        assert_eq!(u.cpu_ms, 200 * 1000 / hz);
        assert_eq!(u.rss_kib, 10 * page / 1024);
        assert_eq!(parse_stat_usage("garbage"), Usage::default());
    }
}
