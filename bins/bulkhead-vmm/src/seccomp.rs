//! Per-thread seccomp filters: allow lists from the reviewed policy in
//! `seccomp/x86_64.json`, compiled to BPF at build time (build.rs). Each thread installs
//! its class's filter itself, before it handles anything the guest controls: a vCPU
//! before its first KVM_RUN, the main thread before its event loop, a worker at its
//! start. They stack on the jailer's baseline.

use std::sync::OnceLock;

use bulkhead_seccomp::sock_filter;
pub use bulkhead_seccomp::Mode;
use bulkhead_seccomp::Programs;

/// The policy's programs, compiled by build.rs.
static PROGRAMS: Programs = Programs(include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs")));

/// The thread classes of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The main thread once set-up is done: the event loop.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// A short-lived worker (a vhost-user back end's handshake).
    Worker,
    /// The control interface's thread (`org.bulkhead.Vmm1`).
    Api,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Main => "main",
            Class::Vcpu => "vcpu",
            Class::Worker => "worker",
            Class::Api => "api",
        }
    }
}

/// The compiled program for `class` in `mode` (`None` for [`Mode::Off`]).
pub fn program(class: Class, mode: Mode) -> Option<Vec<sock_filter>> {
    PROGRAMS.program(class.name(), mode)
}

/// The process's mode, set once from the configuration before any thread installs.
static MODE: OnceLock<Mode> = OnceLock::new();

pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
}

/// Install `class`'s filter on the calling thread, in the process's mode (kill when
/// none was set).
pub fn install_for(class: Class) -> Result<(), String> {
    install(class, MODE.get().copied().unwrap_or_default())
}

/// Install `class`'s filter on the calling thread.
pub fn install(class: Class, mode: Mode) -> Result<(), String> {
    PROGRAMS.install(class.name(), mode, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_a_program_in_both_modes() {
        for c in [Class::Main, Class::Vcpu, Class::Worker, Class::Api] {
            for m in [Mode::Kill, Mode::Log] {
                let p = program(c, m).unwrap_or_else(|| panic!("{c:?} {m:?}"));
                assert!(p.len() > 10, "{c:?} {m:?}: {} instructions", p.len());
            }
            assert!(program(c, Mode::Off).is_none());
        }
    }

    #[test]
    fn the_policy_kills_what_it_does_not_allow() {
        use bulkhead_seccomp::testing::{killed_by, Call};
        for class in ["main", "vcpu", "worker", "api"] {
            assert_eq!(killed_by(&PROGRAMS, class, Call::Getpid), None, "{class}");
            bulkhead_seccomp::testing::assert_no_new_code(&PROGRAMS, class);
            for call in [Call::Execve, Call::OpenHostPath, Call::Ptrace] {
                assert_eq!(
                    killed_by(&PROGRAMS, class, call),
                    Some(libc::SIGSYS),
                    "{class} let {call:?} through"
                );
            }
        }
        // ioctl by request: a vCPU thread only runs its vCPU and reads its state; the
        // others only make sockets non-blocking. Nothing after set-up may create,
        // map or reconfigure anything through KVM.
        const KVM_RUN: u32 = 0xae80;
        const KVM_GET_REGS: u32 = 0x8090_ae81;
        const KVM_SET_REGS: u32 = 0x4090_ae82;
        const KVM_CREATE_VCPU: u32 = 0xae41;
        const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_ae46;
        const FIONBIO: u32 = 0x5421;
        const TIOCSTI: u32 = 0x5412;
        for req in [KVM_RUN, KVM_GET_REGS] {
            assert_eq!(
                killed_by(&PROGRAMS, "vcpu", Call::Ioctl(req)),
                None,
                "{req:#x}"
            );
        }
        for req in [
            KVM_SET_REGS,
            KVM_CREATE_VCPU,
            KVM_SET_USER_MEMORY_REGION,
            FIONBIO,
        ] {
            assert_eq!(
                killed_by(&PROGRAMS, "vcpu", Call::Ioctl(req)),
                Some(libc::SIGSYS),
                "vcpu let ioctl {req:#x} through"
            );
        }
        for class in ["main", "worker", "api"] {
            assert_eq!(killed_by(&PROGRAMS, class, Call::Ioctl(FIONBIO)), None);
            for req in [KVM_RUN, KVM_SET_USER_MEMORY_REGION, TIOCSTI] {
                assert_eq!(
                    killed_by(&PROGRAMS, class, Call::Ioctl(req)),
                    Some(libc::SIGSYS),
                    "{class} let ioctl {req:#x} through"
                );
            }
        }
        // No thread but the main one opens sockets (vsock's host side connects).
        for class in ["vcpu", "worker", "api"] {
            assert_eq!(
                killed_by(&PROGRAMS, class, Call::Socket),
                Some(libc::SIGSYS),
                "{class}"
            );
        }
    }
}
