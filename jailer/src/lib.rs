//! `bulkhead-jailer`: start one host component of a sandbox (a VMM, a vhost-user back end)
//! with only what it needs, then stay beside it as a small parent that forwards signals
//! and hands its exit status to bulkheadd.
//!
//! [`Jail::run`] is the whole sequence, in order; each step is a function of its own
//! module. A [`Jail`] travels from bulkheadd to the jailer as command-line arguments
//! ([`Jail::to_args`], [`Jail::parse`]), so what a component ran with is visible in `ps`.

mod args;
pub use args::USAGE;
mod cgroup;
mod fds;
pub mod idmap;
mod ids;
mod landlock_rules;
mod namespaces;
pub mod posture;
mod root;
pub mod seccomp;
mod supervise;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cgroup::remove as remove_cgroup;
pub use landlock_rules::kernel_abi as landlock_abi;

/// The paths every dynamically linked program needs read-only: the system libraries and
/// the loader's cache (a symlink is bound as a symlink, so merged-/usr hosts get
/// `/lib -> usr/lib`).
const SYSTEM_PATHS: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
];

/// [`SYSTEM_PATHS`] that exist on this host.
pub fn system_paths() -> Vec<PathBuf> {
    SYSTEM_PATHS
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// What `program` needs from the host to be loaded: [`system_paths`] when it is
/// dynamically linked (or cannot be read as ELF), nothing when it is static (our own
/// components are: their roots then hold no host library at all).
pub fn loader_paths(program: &std::path::Path) -> Vec<PathBuf> {
    match elf_has_interpreter(program) {
        Ok(false) => Vec::new(),
        Ok(true) | Err(_) => system_paths(),
    }
}

/// Whether the ELF file at `path` names a program interpreter (`PT_INTERP`): a dynamic
/// loader, which a static or static-pie executable has not.
fn elf_has_interpreter(path: &std::path::Path) -> std::io::Result<bool> {
    use std::io::{Error, ErrorKind, Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, format!("not a 64-bit ELF: {what}"));
    let mut f = std::fs::File::open(path)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    // Magic, ELFCLASS64, little-endian: the only executables this host runs.
    if eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Err(bad("header"));
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]);
    let phnum = u16::from_le_bytes([eh[56], eh[57]]);
    // An ELF64 program header is 56 bytes; a real executable has a dozen or so.
    if phentsize != 56 || phnum > 512 {
        return Err(bad("program headers"));
    }
    let mut table = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut table)?;
    Ok(table
        .chunks_exact(usize::from(phentsize))
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP))
}

#[cfg(test)]
mod loader_tests {
    use super::*;

    /// A minimal ELF64 header with `types` as its program headers' p_type.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    fn write(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bh-elf-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_static_program_needs_no_host_library() {
        // PT_LOAD, PT_DYNAMIC (a static-pie has one), PT_GNU_STACK: no PT_INTERP.
        let p = write("static", &elf(&[1, 2, 0x6474e551]));
        assert!(!elf_has_interpreter(&p).unwrap());
        assert!(loader_paths(&p).is_empty());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_dynamic_program_gets_the_system_libraries() {
        let p = write("dynamic", &elf(&[6, 3, 1]));
        assert!(elf_has_interpreter(&p).unwrap());
        assert_eq!(loader_paths(&p), system_paths());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn what_is_not_elf_or_is_cut_short_gets_them_too() {
        let script = write("script", b"#!/bin/sh\nexit 0\n");
        let mut cut = elf(&[1, 3]);
        cut.truncate(64 + 20);
        let cut = write("cut", &cut);
        for p in [script, cut] {
            assert!(elf_has_interpreter(&p).is_err());
            assert_eq!(loader_paths(&p), system_paths());
            std::fs::remove_file(p).unwrap();
        }
        assert_eq!(
            loader_paths(std::path::Path::new("/nonexistent/x")),
            system_paths()
        );
    }

    #[test]
    fn this_test_binary_is_read_as_it_was_linked() {
        // Built with the workspace's static glibc, or without it: either way the answer
        // must match what the binary says of itself.
        let exe = std::env::current_exe().unwrap();
        let dynamic = cfg!(not(target_feature = "crt-static"));
        assert_eq!(elf_has_interpreter(&exe).unwrap(), dynamic);
    }
}

/// Mount points at or below `dir` in this mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Undo `/proc/*/mountinfo`'s octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|t| u8::from_str_radix(t, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the component's network comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Net {
    /// A new, empty network namespace: the component talks only over the unix sockets
    /// and descriptors it was given.
    None,
    /// Join this network namespace (a bind-mounted nsfs path).
    Join(PathBuf),
    /// Stay in the host's namespace.
    Host,
}

/// Device nodes a jail may get, made afresh in its `/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Device {
    Kvm,
    Null,
    Zero,
    Urandom,
    Random,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Kvm => "kvm",
            Device::Null => "null",
            Device::Zero => "zero",
            Device::Urandom => "urandom",
            Device::Random => "random",
        }
    }

    /// (major, minor) of the character device.
    fn number(self) -> (u64, u64) {
        match self {
            Device::Kvm => (10, 232),
            Device::Null => (1, 3),
            Device::Zero => (1, 5),
            Device::Urandom => (1, 9),
            Device::Random => (1, 8),
        }
    }

    fn parse(s: &str) -> Option<Device> {
        [
            Device::Kvm,
            Device::Null,
            Device::Zero,
            Device::Urandom,
            Device::Random,
        ]
        .into_iter()
        .find(|d| d.name() == s)
    }
}

/// Everything about one jailed start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The sandbox and component, for logs and the report.
    pub sandbox: String,
    pub name: String,
    /// An empty directory on the host that becomes the component's `/` (a tmpfs is
    /// mounted on it in the component's own mount namespace).
    pub root: PathBuf,
    /// The component's ids; 0 only for a component with a stated need for root.
    pub uid: u32,
    pub gid: u32,
    /// Host paths bound into the root at the same path, read-only / read-write.
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub devices: Vec<Device>,
    pub net: Net,
    /// A cgroup path relative to the jailer's own cgroup in each hierarchy.
    pub cgroup: Option<String>,
    /// Descriptors handed on, besides 0-2; every other one is closed.
    pub keep_fds: Vec<i32>,
    /// A descriptor to wait on, with the jail set up, until one byte arrives (the
    /// manager's word that what the component connects to is there); EOF means give up.
    /// Closed before the exec.
    pub start_gate: Option<i32>,
    /// Capabilities kept (names as in `CAP_NET_ADMIN`); none by default.
    pub keep_caps: Vec<String>,
    /// Run as root of a user namespace of its own, whose ids `0..n` are the host's
    /// `uid..uid+n` (and `gid..gid+n`): a component that must act as many owners
    /// (virtiofsd) does so with host ids of its sandbox's range, and its kept
    /// capabilities hold only over what that namespace owns.
    pub userns: Option<u32>,
    /// RLIMIT_NOFILE.
    pub max_files: u64,
    /// Apply the landlock ruleset and the baseline seccomp filter. Off only for a
    /// component that builds a sandbox of its own with mount(2) and pivot_root(2), which
    /// both forbid, and then installs its own filter (virtiofsd).
    pub landlock: bool,
    /// An allow list of the jailer's to install on top of the baseline
    /// ([`seccomp::install_allow_list`]), for a program that brings no filter of its own.
    pub allow_list: Option<String>,
    /// The whole environment the component gets.
    pub env: Vec<(String, String)>,
    /// Where the parent writes what was enforced (a [`posture::Report`] as JSON).
    pub report: Option<PathBuf>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl Jail {
    /// A jail for `program` with nothing granted yet.
    pub fn new(sandbox: &str, name: &str, root: PathBuf, program: PathBuf) -> Jail {
        Jail {
            sandbox: sandbox.into(),
            name: name.into(),
            root,
            uid: 65534,
            gid: 65534,
            read_only: vec![],
            read_write: vec![],
            devices: vec![Device::Null, Device::Zero, Device::Urandom, Device::Random],
            net: Net::None,
            cgroup: None,
            keep_fds: vec![],
            start_gate: None,
            keep_caps: vec![],
            userns: None,
            max_files: 4096,
            landlock: true,
            allow_list: None,
            env: vec![],
            report: None,
            program,
            args: vec![],
        }
    }

    /// The sequence, top to bottom. Returns only on failure: on success the calling
    /// process becomes the component's parent and exits with its status.
    pub fn run(self) -> Result<std::convert::Infallible, JailError> {
        // 1. Nothing inherited by accident: only stdio and the descriptors handed on.
        let kept: Vec<i32> = self
            .keep_fds
            .iter()
            .copied()
            .chain(self.start_gate)
            .collect();
        fds::close_all_but(&kept)?;
        // 2. The environment is rebuilt from `env` at exec; nothing else is passed.
        // 3. Resource accounting: the sandbox's cgroup, in every hierarchy (v1 joined
        //    now, v2 opened for the fork in step 5 to start the component in).
        let mut cgroups = cgroup::join(self.cgroup.as_deref());
        // 4. The network it must have, opened while host paths are still visible.
        namespaces::enter_net(&self.net)?;
        // 5. New PID, IPC and UTS namespaces; the PID namespace takes effect in the
        //    child, which becomes its init, born in the v2 cgroup. The parent stays
        //    to supervise.
        namespaces::unshare_pid_ipc_uts()?;
        let report_pipe = supervise::fork(&self, &mut cgroups)?;
        // From here on: the child, PID 1 of its namespace.
        // 6. A mount namespace and a root holding only the bound paths, the devices and
        //    a private /proc.
        namespaces::unshare_mount()?;
        root::build(&self)?;
        let root_change = root::pivot(&self.root)?;
        // 7. Limits, then ids (in a user namespace of its own, if it has one) and
        //    capabilities, then no_new_privs and landlock.
        ids::set_rlimits(self.max_files)?;
        let caps = match self.userns {
            Some(n) => {
                ids::enter_user_namespace(self.uid, self.gid, n)?;
                ids::drop_privileges(0, 0, &self.keep_caps)?
            }
            None => ids::drop_privileges(self.uid, self.gid, &self.keep_caps)?,
        };
        // A change of credentials clears the parent-death signal: set it again.
        supervise::die_with_parent(&report_pipe)?;
        ids::set_no_new_privs()?;
        let landlock = if self.landlock {
            landlock_rules::restrict(&self)?
        } else {
            posture::LandlockReport {
                kernel_abi: landlock_rules::kernel_abi(),
                status: "off (own sandbox)".into(),
            }
        };
        // 8. The baseline seccomp filter and the program's allow list (if the jailer
        //    has one for it), then wait at the start gate (if any), say what was
        //    enforced and become the component.
        if self.landlock {
            seccomp::install()?;
        }
        if let Some(name) = &self.allow_list {
            seccomp::install_allow_list(name)?;
        }
        if let Some(fd) = self.start_gate {
            fds::wait_gate(fd)?;
        }
        let report = posture::Report {
            sandbox: self.sandbox.clone(),
            component: self.name.clone(),
            uid: self.uid,
            gid: self.gid,
            capabilities: caps,
            userns: self
                .userns
                .map(|n| format!("0:{}:{n} uids, 0:{}:{n} gids", self.uid, self.gid)),
            landlock,
            seccomp: if self.landlock {
                let allow = self
                    .allow_list
                    .as_ref()
                    .map(|n| format!("; allow list {n}: any other call kills"))
                    .unwrap_or_default();
                format!(
                    "baseline: {} system calls kill, {} are refused{allow}",
                    seccomp::DENIED.len(),
                    seccomp::UNAVAILABLE.len()
                )
            } else {
                "the component's own".into()
            },
            net: match &self.net {
                Net::None => "new".into(),
                Net::Join(p) => p.display().to_string(),
                Net::Host => "host".into(),
            },
            cgroups: cgroups.joined,
            root: self.root.clone(),
            root_change: root_change.into(),
        };
        supervise::send_report(report_pipe, &report);
        Err(supervise::exec(&self))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{step}: {source}")]
    Sys {
        step: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl JailError {
    fn sys(step: impl Into<String>, e: impl Into<std::io::Error>) -> JailError {
        JailError::Sys {
            step: step.into(),
            source: e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), "/end\\");
    }
}
