//! Step 7, very last before exec: a baseline seccomp filter every jailed component gets.
//! It kills the process on system calls no component of a sandbox has any use for and
//! that widen what an escaped guest could reach: debugging other processes, loading
//! kernel code, mounting, new namespaces, keyrings, BPF, clocks; and io_uring (which bypasses
//! seccomp, and is refused rather than fatal, as programs probe for it). Components
//! then narrow it with allow lists of their own, per thread.
//! Filters stack, so a component cannot widen it.
//!
//! A program that brings no filter of its own gets an allow list from the jailer on
//! top of the baseline (`seccomp/x86_64.json`, compiled at build time):
//! [`install_allow_list`].

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::JailError;

static ALLOW_LISTS: bulkhead_seccomp::Programs =
    bulkhead_seccomp::Programs(include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs")));

/// Whether `name` is an allow list this jailer was built with.
pub fn allow_list_known(name: &str) -> bool {
    ALLOW_LISTS
        .program(name, bulkhead_seccomp::Mode::Kill)
        .is_some()
}

/// Install the allow list `name` on this thread, on top of the baseline: from here on
/// (the start gate, the report, the exec, and the program with every thread it starts)
/// any other call kills the process.
pub fn install_allow_list(name: &str) -> Result<(), JailError> {
    ALLOW_LISTS
        .install(name, bulkhead_seccomp::Mode::Kill, false)
        .map_err(|e| JailError::Invalid(format!("seccomp: {e}")))
}

/// The system calls the baseline kills on, with why each is on the list.
pub const DENIED: &[(&str, i64)] = &[
    // Reading or changing another process.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    // Kernel code and kernel state.
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("syslog", libc::SYS_syslog),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    // The file system tree and namespaces.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    // Keyrings.
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    // Clocks.
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("vhangup", libc::SYS_vhangup),
    ("uselib", libc::SYS_uselib),
    ("personality", libc::SYS_personality),
];

/// `clone` flags that make a namespace: killed like `unshare`. A new user namespace
/// above all hands its maker every capability inside it, and with them kernel code
/// (netfilter, mounts of its own) that an escaped guest should never reach.
pub const NAMESPACE_CLONE_FLAGS: &[(&str, i32)] = &[
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER),
    ("CLONE_NEWNS", libc::CLONE_NEWNS),
    ("CLONE_NEWPID", libc::CLONE_NEWPID),
    ("CLONE_NEWNET", libc::CLONE_NEWNET),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP),
];

/// Refused with ENOSYS instead: programs probe for them at start (QEMU asks for
/// io_uring) and carry on without. io_uring would run system calls the filter never
/// sees; userfaultfd makes kernel races easy to win. `clone3` passes its flags in
/// memory, where a filter cannot look: refused, C libraries fall back to `clone`, whose
/// flags the baseline checks.
pub const UNAVAILABLE: &[(&str, i64)] = &[
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("clone3", libc::SYS_clone3),
];

fn program(
    list: &[(&str, i64)],
    action: SeccompAction,
    also: Option<(i64, Vec<SeccompRule>)>,
) -> Result<BpfProgram, JailError> {
    let err = |e: String| JailError::Invalid(format!("seccomp: {e}"));
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        list.iter().map(|(_, nr)| (*nr, vec![])).collect();
    rules.extend(also);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch)
        .map_err(|e| err(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))
}

/// The baseline as BPF programs for this machine's architecture: the killing one and
/// the refusing one.
pub fn baseline() -> Result<[BpfProgram; 2], JailError> {
    Ok([
        program(DENIED, SeccompAction::KillProcess, Some(clone_rules()?))?,
        program(UNAVAILABLE, SeccompAction::Errno(libc::ENOSYS as u32), None)?,
    ])
}

/// `clone` with any of [`NAMESPACE_CLONE_FLAGS`] in its flags (argument 0): one rule
/// per flag, any of which matching kills.
fn clone_rules() -> Result<(i64, Vec<SeccompRule>), JailError> {
    let err = |e: seccompiler::BackendError| JailError::Invalid(format!("seccomp: {e}"));
    let rules = NAMESPACE_CLONE_FLAGS
        .iter()
        .map(|(_, flag)| {
            let f = u64::from(*flag as u32);
            let c = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)
                .map_err(err)?;
            SeccompRule::new(vec![c]).map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((libc::SYS_clone, rules))
}

/// Install the baseline on this thread (the jailer is single-threaded; the component's
/// threads inherit it).
pub fn install() -> Result<(), JailError> {
    for prog in baseline()? {
        seccompiler::apply_filter(&prog)
            .map_err(|e| JailError::Invalid(format!("seccomp: {e}")))?;
    }
    Ok(())
}

/// What the supervisor (the jailer's half that stays beside the component) may still
/// call once it has dropped its privileges: wait for signals and its child, read the
/// child's status file it opened before, signal that one child, say a last word on
/// stderr and exit. Anything else kills it, and with it (PDEATHSIG) the component.
pub const SUPERVISOR: &[(&str, i64)] = &[
    ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    ("wait4", libc::SYS_wait4),
    ("pread64", libc::SYS_pread64),
    ("write", libc::SYS_write),
    ("exit_group", libc::SYS_exit_group),
    ("exit", libc::SYS_exit),
    // The C library and Rust's runtime on the way out (the main thread's signal stack).
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("munmap", libc::SYS_munmap),
];

/// The supervisor's allow list as a BPF program: [`SUPERVISOR`], and `kill` with `child`
/// as its first argument only.
pub fn supervisor(child: i32) -> Result<BpfProgram, JailError> {
    let err = |e: seccompiler::BackendError| JailError::Invalid(format!("seccomp: {e}"));
    let arch: TargetArch = std::env::consts::ARCH.try_into().map_err(err)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        SUPERVISOR.iter().map(|(_, nr)| (*nr, vec![])).collect();
    let only_child = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(child as u32),
    )
    .map_err(err)?;
    rules.insert(
        libc::SYS_kill,
        vec![SeccompRule::new(vec![only_child]).map_err(err)?],
    );
    SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

/// Install [`supervisor`] on this (the only) thread; `no_new_privs` must be set.
pub fn install_supervisor(child: i32) -> Result<(), JailError> {
    seccompiler::apply_filter(&supervisor(child)?)
        .map_err(|e| JailError::Invalid(format!("seccomp: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_seccomp::testing::{assert_ioctls, killed_by, Call, FIONBIO, TCGETS};

    /// Run `f` in a forked child under the supervisor's filter for `target`: `None` if
    /// it exited on its own, else the signal that ended it. The program is built before
    /// the fork: the child of a threaded test may not allocate.
    fn under_supervisor_filter(target: i32, f: impl FnOnce()) -> Option<i32> {
        let prog = supervisor(target).unwrap();
        // SAFETY: the child only makes plain system calls and exits.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: prctl with integer arguments only sets a flag.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                if seccompiler::apply_filter(&prog).is_err() {
                    // SAFETY: leaving the forked child at once.
                    unsafe { libc::_exit(3) };
                }
                f();
                // SAFETY: as above.
                unsafe { libc::_exit(0) }
            }
            pid => {
                let mut st = 0;
                // SAFETY: waiting for the child forked above.
                unsafe { libc::waitpid(pid, &mut st, 0) };
                assert!(
                    !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 3),
                    "the filter did not install"
                );
                libc::WIFSIGNALED(st).then(|| libc::WTERMSIG(st))
            }
        }
    }

    #[test]
    fn the_supervisor_signals_its_child_and_nothing_else() {
        // The one process it may signal: here the test's own.
        // SAFETY (all below): getpid/kill/open/fork with plain arguments.
        let target = unsafe { libc::getpid() };
        let ok = under_supervisor_filter(target, || {
            unsafe { libc::kill(target, 0) };
        });
        assert_eq!(ok, None);
        // Any other process (itself, here) kills the supervisor.
        let other = under_supervisor_filter(target, || {
            unsafe { libc::kill(libc::getpid(), 0) };
        });
        assert_eq!(other, Some(libc::SIGSYS));
        // So does opening a file, or making a process.
        let open = under_supervisor_filter(target, || {
            unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        });
        assert_eq!(open, Some(libc::SIGSYS));
        let fork = under_supervisor_filter(target, || {
            unsafe { libc::fork() };
        });
        assert_eq!(fork, Some(libc::SIGSYS));
    }

    #[test]
    fn vhost_device_vsock_list_allows_its_work_and_kills_the_rest() {
        let class = "vhost-device-vsock";
        assert!(allow_list_known(class));
        assert!(!allow_list_known("no-such-program"));
        // Its work: files in its root (landlock bounds where), AF_UNIX sockets.
        assert_eq!(killed_by(&ALLOW_LISTS, class, Call::Getpid), None);
        assert_eq!(killed_by(&ALLOW_LISTS, class, Call::OpenHostPath), None);
        // An IPv4 socket and ptrace: killed.
        for call in [Call::Socket, Call::Ptrace] {
            assert_eq!(
                killed_by(&ALLOW_LISTS, class, call),
                Some(libc::SIGSYS),
                "{call:?}"
            );
        }
        assert_ioctls(&ALLOW_LISTS, class, &[FIONBIO, TCGETS]);
    }
}
