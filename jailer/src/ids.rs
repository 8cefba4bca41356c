//! Step 7: resource limits, then the component's own uid and gid (or its own user
//! namespace's root) with every capability dropped from every set (unless it has a
//! stated need), then no_new_privs.

use std::collections::HashSet;

use caps::{CapSet, Capability};
use std::io::{Read, Write};

use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{setgroups, setresgid, setresuid, ForkResult, Gid, Uid};

use crate::JailError;

pub fn set_rlimits(max_files: u64) -> Result<(), JailError> {
    // Never above what the kernel allows a process at all.
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let want = max_files.min(nr_open);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        // Raising the hard limit needs CAP_SYS_RESOURCE, which some hosts (containers)
        // withhold: settle for the hard limit we have.
        let (_, hard) =
            getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| JailError::sys("RLIMIT_NOFILE", e))?;
        let n = want.min(hard);
        setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(|e| JailError::sys("RLIMIT_NOFILE", e))?;
    }
    // No core dumps: a VMM's core holds guest memory.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| JailError::sys("RLIMIT_CORE", e))
}

/// Enter a new user namespace whose ids `0..n` are the host's `uid..uid+n` and
/// `gid..gid+n`. Its maps must be written by a process that holds CAP_SETUID and
/// CAP_SETGID where the namespace's parent is, which this one no longer does once it has
/// moved in: a helper forked first, still the host's root, writes them and exits.
pub fn enter_user_namespace(uid: u32, gid: u32, n: u32) -> Result<(), JailError> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| JailError::sys("user namespace pipe", e))?;
    // SAFETY: the jailer is single-threaded, so the helper may run any code.
    match unsafe { nix::unistd::fork() }.map_err(|e| JailError::sys("fork", e))? {
        ForkResult::Child => {
            drop(wr);
            let ok = write_maps(std::fs::File::from(rd), uid, gid, n);
            // SAFETY: _exit ends the helper without running the jailer's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            drop(rd);
            let entered = unshare(CloneFlags::CLONE_NEWUSER);
            let mut wr = std::fs::File::from(wr);
            if entered.is_ok() {
                let _ = wr.write_all(&[1]);
            }
            drop(wr); // without the byte, the helper writes nothing
            let status = waitpid(child, None);
            entered.map_err(|e| JailError::sys("new user namespace", e))?;
            match status {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                other => Err(JailError::Invalid(format!(
                    "user namespace: the id maps 0:{uid}:{n} and 0:{gid}:{n} were not \
                     written ({other:?})"
                ))),
            }
        }
    }
}

/// The helper's half: once the parent has moved (one byte), write its maps.
fn write_maps(mut moved: std::fs::File, uid: u32, gid: u32, n: u32) -> bool {
    let mut b = [0u8];
    if moved.read_exact(&mut b).is_err() {
        return false;
    }
    // SAFETY: getppid cannot fail.
    crate::idmap::write_maps(unsafe { libc::getppid() }, uid, gid, n).is_ok()
}

fn parse_caps(names: &[String]) -> Result<HashSet<Capability>, JailError> {
    names
        .iter()
        .map(|n| {
            n.to_uppercase()
                .parse::<Capability>()
                .map_err(|_| JailError::Invalid(format!("unknown capability {n:?}")))
        })
        .collect()
}

/// Drop to `uid`/`gid` with only `keep` (empty for almost every component). Returns the
/// names of the capabilities the component will hold after exec.
pub fn drop_privileges(uid: u32, gid: u32, keep: &[String]) -> Result<Vec<String>, JailError> {
    let keep = parse_caps(keep)?;
    // The bounding set first, while CAP_SETPCAP is still effective. Every number the
    // kernel knows, not only those this build names.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for n in 0..=last {
        if keep.iter().any(|c| c.index() as u32 == n) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number; EINVAL for one the kernel
        // does not know is harmless.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, n as libc::c_ulong, 0, 0, 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::sys(
                format!("drop capability {n} from the bounding set"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    let caps_err = |what: &str| {
        let what = what.to_string();
        move |e: caps::errors::CapsError| JailError::Invalid(format!("{what}: {e}"))
    };
    if uid != 0 && !keep.is_empty() {
        // Keep the permitted set across setuid; the kept ones go to ambient below.
        // SAFETY: PR_SET_KEEPCAPS with 1 only changes this thread's securebits.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    }
    setgroups(&[]).map_err(|e| JailError::sys("setgroups", e))?;
    let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
    setresgid(g, g, g).map_err(|e| JailError::sys(format!("setresgid {gid}"), e))?;
    setresuid(u, u, u).map_err(|e| JailError::sys(format!("setresuid {uid}"), e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("permitted set"))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(caps_err("inheritable set"))?;
    if uid != 0 {
        // A non-root exec keeps only ambient capabilities.
        caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient set"))?;
        for c in &keep {
            caps::raise(None, CapSet::Ambient, *c).map_err(caps_err("ambient set"))?;
        }
    }
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}

pub fn set_no_new_privs() -> Result<(), JailError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS with 1 only sets a flag on this thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::sys(
            "no_new_privs",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
