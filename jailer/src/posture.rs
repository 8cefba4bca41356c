//! What a jailed component runs with: the jailer's [`Report`] of what it enforced, and
//! [`Live`], read from `/proc` for a running process and each of its threads, which is
//! what an operator (`bulkhead inspect`) and the tests trust.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockReport {
    /// The kernel's landlock ABI (0: none).
    pub kernel_abi: i32,
    /// "fully enforced", "partially enforced" or "not enforced".
    pub status: String,
}

/// Written by the jailer after every step and before exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub sandbox: String,
    pub component: String,
    pub uid: u32,
    pub gid: u32,
    /// Capabilities held after exec (empty for most components); inside its own user
    /// namespace when `userns` is set.
    pub capabilities: Vec<String>,
    /// The component's own user namespace, as `inside:host:count` for uids and gids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns: Option<String>,
    pub landlock: LandlockReport,
    /// The filter installed before exec.
    pub seccomp: String,
    /// "new" (empty namespace), "host", or the joined namespace's path.
    pub net: String,
    /// The cgroups joined, "v1:<dir>" / "v2:<dir>".
    pub cgroups: Vec<String>,
    /// The host directory that is the component's `/`.
    pub root: PathBuf,
    /// "pivot_root", or "move" on a host running from its initramfs.
    pub root_change: String,
}

/// One thread's view in `/proc/<pid>/task/<tid>/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadPosture {
    pub tid: u32,
    pub name: String,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    pub no_new_privs: bool,
    pub cap_eff: u64,
}

/// A live process's posture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    pub pid: u32,
    /// Real, effective, saved, file-system.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    pub threads: Vec<ThreadPosture>,
    /// What the process sees at `/`.
    pub root_entries: Vec<String>,
    /// Namespaces shared with the reader (bulkheadd, on the host side): `net`, `mnt`,
    /// `pid`, ... (`user` and `cgroup` are, as jails use neither).
    pub host_namespaces: Vec<String>,
}

impl Live {
    /// Every thread under a seccomp filter.
    pub fn all_filtered(&self) -> bool {
        !self.threads.is_empty() && self.threads.iter().all(|t| t.seccomp == 2)
    }

    /// No capability in any set.
    pub fn no_caps(&self) -> bool {
        self.cap_inh == 0
            && self.cap_prm == 0
            && self.cap_eff == 0
            && self.cap_bnd == 0
            && self.cap_amb == 0
    }
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
}

fn hex(status: &str, key: &str) -> u64 {
    field(status, key)
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0)
}

fn ids(status: &str, key: &str) -> [u32; 4] {
    let mut out = [u32::MAX; 4];
    if let Some(v) = field(status, key) {
        for (o, n) in out.iter_mut().zip(v.split_whitespace()) {
            *o = n.parse().unwrap_or(u32::MAX);
        }
    }
    out
}

/// Read `pid`'s posture from `/proc`.
pub fn live(pid: u32) -> std::io::Result<Live> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(base.join("status"))?;
    let mut threads = vec![];
    for t in std::fs::read_dir(base.join("task"))?
        .flatten()
        .take(MAX_THREADS)
    {
        let Ok(s) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread ended
        };
        threads.push(ThreadPosture {
            tid: t.file_name().to_string_lossy().parse().unwrap_or(0),
            name: field(&s, "Name").unwrap_or("").into(),
            seccomp: field(&s, "Seccomp")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            no_new_privs: field(&s, "NoNewPrivs") == Some("1"),
            cap_eff: hex(&s, "CapEff"),
        });
    }
    threads.sort_by_key(|t| t.tid);
    // What the process sees at `/`: a jail's few entries. virtiofsd's `/` is the shared
    // directory, so the listing is bounded whatever is there.
    let mut root_entries: Vec<String> = std::fs::read_dir(base.join("root"))
        .map(|d| {
            d.flatten()
                .take(MAX_ROOT_ENTRIES)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    root_entries.sort();
    let host_namespaces = ["mnt", "pid", "net", "ipc", "uts", "user", "cgroup"]
        .into_iter()
        .filter(|ns| {
            let a = std::fs::read_link(base.join("ns").join(ns));
            let b = std::fs::read_link(format!("/proc/self/ns/{ns}"));
            matches!((a, b), (Ok(a), Ok(b)) if a == b)
        })
        .map(String::from)
        .collect();
    Ok(Live {
        pid,
        uids: ids(&status, "Uid"),
        gids: ids(&status, "Gid"),
        cap_inh: hex(&status, "CapInh"),
        cap_prm: hex(&status, "CapPrm"),
        cap_eff: hex(&status, "CapEff"),
        cap_bnd: hex(&status, "CapBnd"),
        cap_amb: hex(&status, "CapAmb"),
        no_new_privs: field(&status, "NoNewPrivs") == Some("1"),
        threads,
        root_entries,
        host_namespaces,
    })
}

/// The component a jailer process started: its only child.
pub fn jailed_child(jailer_pid: u32) -> Option<u32> {
    let kids =
        std::fs::read_to_string(format!("/proc/{jailer_pid}/task/{jailer_pid}/children")).ok()?;
    kids.split_whitespace().next()?.parse().ok()
}

/// The names of the capabilities in a `/proc` capability mask (`CAP_...`, or the bit
/// number for one this build does not name).
pub fn cap_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            caps::all()
                .into_iter()
                .find(|c| c.index() as u64 == b)
                .map(|c| c.to_string())
                .unwrap_or_else(|| format!("cap{b}"))
        })
        .collect()
}

/// Most threads of a process that [`live`] reads.
pub const MAX_THREADS: usize = 1024;

/// Most entries of a process's `/` that [`live`] lists.
pub const MAX_ROOT_ENTRIES: usize = 64;

pub use bulkhead_proctree::descendants;

/// Is `pid` running the jailer (rather than a component started without one)?
pub fn is_jailer(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.file_name().is_some_and(|n| n == "bulkhead-jailer"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = live(std::process::id()).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(me.uids[0], ids(&status, "Uid")[0]);
        assert_eq!(me.cap_bnd, hex(&status, "CapBnd"));
        assert!(me.threads.iter().any(|t| t.tid == std::process::id()));
        assert!(!me.root_entries.is_empty());
    }

    #[test]
    fn parses_status_fields() {
        let s = "Name:\tx\nUid:\t1\t2\t3\t4\nCapEff:\t0000000000000400\nSeccomp:\t2\n";
        assert_eq!(ids(s, "Uid"), [1, 2, 3, 4]);
        assert_eq!(hex(s, "CapEff"), 0x400);
        assert_eq!(field(s, "Seccomp"), Some("2"));
        assert_eq!(field(s, "Missing"), None);
        assert_eq!(cap_names(0x400 | 1), ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]);
        assert!(cap_names(0).is_empty());
    }
}
