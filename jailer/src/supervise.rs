//! The fork that makes the component (PID 1 of its namespace), the parent that stays
//! beside it, and the exec.
//!
//! The parent keeps no descriptor the component was handed. Once it has written the
//! child's report (or its setup error) it takes `no_new_privs`, empties its bounding
//! set but CAP_KILL and, where the component runs as a host uid other than root, takes
//! that uid with no capability at all; a root component's parent stays root with
//! CAP_KILL alone. Last, a seccomp allow list ([`crate::seccomp::supervisor`]) leaves it
//! waiting, reading the child's status, signalling that child only, and exiting. Then
//! it only forwards signals and exits with the component's status.
//! The child dies with the parent (PDEATHSIG), so a SIGKILL to the jailer from bulkheadd
//! takes the component with it.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::cgroup::Placement;
use crate::posture::Report;
use crate::{Jail, JailError};

const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn blocked() -> SigSet {
    let mut s = SigSet::empty();
    for sig in FORWARDED {
        s.add(sig);
    }
    s.add(Signal::SIGCHLD);
    s
}

/// Fork, into the v2 cgroup step 3 opened. The parent never returns from here; the
/// child gets the write end of the report pipe (closed on exec).
pub fn fork(j: &Jail, cgroup: &mut Placement) -> Result<OwnedFd, JailError> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| JailError::sys("report pipe", e))?;
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked()), Some(&mut old))
        .map_err(|e| JailError::sys("block signals", e))?;
    let forked = match cgroup.v2_fd().map(clone_into_cgroup) {
        Some(Err(Errno::ENOSYS | Errno::EINVAL | Errno::E2BIG)) => {
            // A kernel before 5.7: no clone3, or no CLONE_INTO_CGROUP.
            cgroup.join_v2_now();
            plain_fork()
        }
        Some(r) => r.map_err(|e| JailError::sys("clone3 into the sandbox's cgroup", e)),
        None => plain_fork(),
    };
    // Neither side needs the cgroup open any longer.
    cgroup.close();
    match forked? {
        ForkResult::Parent { child } => {
            drop(wr);
            let code = parent_loop(j, child, rd);
            std::process::exit(code)
        }
        ForkResult::Child => {
            drop(rd);
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)
                .map_err(|e| JailError::sys("restore the signal mask", e))?;
            die_with_parent(&wr)?;
            Ok(wr)
        }
    }
}

fn plain_fork() -> Result<ForkResult, JailError> {
    // SAFETY: the jailer is single-threaded, so the child may run any code.
    unsafe { nix::unistd::fork() }.map_err(|e| JailError::sys("fork", e))
}

/// Not in the libc crate yet (linux/sched.h).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// fork(2) whose child starts in the v2 cgroup `dir` (clone3, Linux 5.7): no migration,
/// so no wait for the cgroup threadgroup lock's grace period.
pub(crate) fn clone_into_cgroup(dir: BorrowedFd<'_>) -> Result<ForkResult, Errno> {
    // SAFETY: clone_args is plain integers; all zero is "no flags, no stack", as fork.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = dir.as_raw_fd() as u64;
    // SAFETY: with no stack given and no CLONE_VM, clone3 returns twice like fork, the
    // child on a copy of this stack. The jailer is single-threaded, so no lock is held
    // by a thread the child lacks. glibc's cached thread id in the child is the
    // parent's (glibc did not make this child); the child only calls plain system
    // calls and execs, and an abort there still ends it (raise fails, abort goes on).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match r {
        -1 => Err(Errno::last()),
        0 => Ok(ForkResult::Child),
        pid => Ok(ForkResult::Parent {
            child: Pid::from_raw(pid as i32),
        }),
    }
}

/// SIGKILL this process when the jailer's parent process dies; an error if it already
/// has. The parent is outside our PID namespace (its pid reads as 0 either way), so the
/// report pipe tells: with the parent gone, nobody holds its read end.
pub fn die_with_parent(report: &OwnedFd) -> Result<(), JailError> {
    // SAFETY: PR_SET_PDEATHSIG with a signal number only sets a flag.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let mut p = [PollFd::new(report.as_fd(), PollFlags::POLLOUT)];
    let _ = poll(&mut p, PollTimeout::ZERO);
    if p[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLERR))
    {
        return Err(JailError::Invalid(
            "the jailer's parent process is gone".into(),
        ));
    }
    Ok(())
}

/// The child's last word before exec: the report, one JSON line.
pub fn send_report(pipe: OwnedFd, r: &Report) {
    let mut f = std::fs::File::from(pipe);
    let _ = writeln!(f, "{}", serde_json::to_string(r).unwrap_or_default());
    // Kept open (close-on-exec): EOF tells the parent the exec happened.
    std::mem::forget(f);
}

/// Replace the process with the component, its environment exactly `j.env`.
pub fn exec(j: &Jail) -> JailError {
    let c = |b: &[u8]| CString::new(b).unwrap_or_default();
    let prog = c(j.program.as_os_str().as_bytes());
    let mut argv = vec![prog.clone()];
    argv.extend(j.args.iter().map(|a| c(a.as_bytes())));
    let envp: Vec<CString> = j
        .env
        .iter()
        .map(|(k, v)| c(format!("{k}={v}").as_bytes()))
        .collect();
    let e = nix::unistd::execve(&prog, &argv, &envp).unwrap_err();
    JailError::sys(format!("exec {}", j.program.display()), e)
}

fn parent_loop(j: &Jail, child: Pid, report: OwnedFd) -> i32 {
    // Nothing the component was handed stays open here.
    for fd in j.keep_fds.iter().chain(&j.start_gate) {
        // SAFETY: closing a descriptor this process owns and no longer uses.
        unsafe { libc::close(*fd) };
    }
    let mut text = String::new();
    let _ = std::fs::File::from(report).read_to_string(&mut text);
    match serde_json::from_str::<Report>(text.trim()) {
        Ok(r) => {
            if let Some(path) = &j.report {
                let _ = std::fs::write(path, serde_json::to_vec_pretty(&r).unwrap_or_default());
            }
        }
        Err(_) => eprintln!(
            "bulkhead-jailer: {}: the jail was not set up (see above)",
            j.name
        ),
    }
    // Opened now: the allow list below has no open. Never closed (no close either,
    // nor the descriptor check Rust's debug builds make on drop): the process ends with
    // the loop.
    let status =
        std::mem::ManuallyDrop::new(std::fs::File::open(format!("/proc/{child}/status")).ok());
    drop_to_supervisor(j);
    if let Err(e) = crate::seccomp::install_supervisor(child.as_raw()) {
        eprintln!("bulkhead-jailer: {}: supervisor: {e}; stopping", j.name);
        let _ = kill(child, Signal::SIGKILL);
    }
    let set = blocked();
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig == Signal::SIGCHLD {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
                Err(_) => return 255,
                _ => continue,
            }
        }
        // The component is its namespace's init: a signal it has no handler for would
        // be dropped, so a termination request becomes SIGKILL.
        let to_send = if status.as_ref().is_some_and(|f| handles(f, sig)) || !terminates(sig) {
            sig
        } else {
            Signal::SIGKILL
        };
        let _ = kill(child, to_send);
    }
}

fn terminates(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP | Signal::SIGQUIT
    )
}

/// Does the process whose `/proc/<pid>/status` is open as `status` catch `sig` (its
/// SigCgt)? Read into the stack: the supervisor's allow list has no memory calls.
fn handles(status: &std::fs::File, sig: Signal) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 8192];
    let n = status.read_at(&mut buf, 0).unwrap_or(0);
    std::str::from_utf8(&buf[..n])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1u64 << (sig as i32 - 1)) != 0)
}

/// The parent only ever waits for and signals its child: it keeps nothing else.
fn drop_to_supervisor(j: &Jail) {
    // SAFETY: prctl with integer arguments only sets a flag.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    for cap in caps::all() {
        if cap != caps::Capability::CAP_KILL {
            let _ = caps::drop(None, caps::CapSet::Bounding, cap);
        }
    }
    // The component's host uid: its own, or the first of its user namespace's range.
    if j.uid != 0 {
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(j.uid),
            nix::unistd::Gid::from_raw(j.gid),
        );
        let _ = nix::unistd::setgroups(&[]);
        // Leaving uid 0 clears the permitted and effective sets: none is needed to
        // signal a process of one's own uid.
        if nix::unistd::setresgid(gid, gid, gid).is_ok()
            && nix::unistd::setresuid(uid, uid, uid).is_ok()
        {
            let _ = caps::clear(None, caps::CapSet::Inheritable);
            let _ = caps::clear(None, caps::CapSet::Ambient);
            return;
        }
    }
    keep_only_kill();
}

/// A root component's parent keeps CAP_KILL alone.
fn keep_only_kill() {
    let only: std::collections::HashSet<caps::Capability> =
        [caps::Capability::CAP_KILL].into_iter().collect();
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        let _ = caps::set(None, set, &only);
    }
    let _ = caps::clear(None, caps::CapSet::Inheritable);
}
