//! Per-thread seccomp filters: allow lists from the reviewed policy in
//! `seccomp/x86_64.json`, compiled to BPF at build time (build.rs). Each thread installs
//! its class's filter itself, before it handles anything the guest controls: a vCPU
//! before its first KVM_RUN, the main thread before its event loop, a worker at its
//! start. They stack on the jailer's baseline.

use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::sock_filter;

/// The programs: (mode, class, BPF as 8-byte little-endian instructions).
const PROGRAMS: &[(&str, &str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));

/// The thread classes of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The main thread once set-up is done: the event loop.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// A short-lived worker (a vhost-user back end's handshake).
    Worker,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Main => "main",
            Class::Vcpu => "vcpu",
            Class::Worker => "worker",
        }
    }
}

/// What a call outside the allow list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Kill the process (the default).
    #[default]
    Kill,
    /// Let it through and have the kernel log it (audit type 1326, with the thread's
    /// name): for finding what a new code path needs.
    Log,
    /// No filter (the jail's baseline still applies when jailed).
    Off,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("seccomp mode {s:?}: want kill, log or off")),
        }
    }
}

/// The compiled program for `class` in `mode` (`None` for [`Mode::Off`]).
pub fn program(class: Class, mode: Mode) -> Option<Vec<sock_filter>> {
    let mode = match mode {
        Mode::Kill => "kill",
        Mode::Log => "log",
        Mode::Off => return None,
    };
    let (_, _, bytes) = PROGRAMS
        .iter()
        .find(|(m, c, _)| *m == mode && *c == class.name())?;
    Some(
        bytes
            .chunks_exact(8)
            .map(|i| sock_filter {
                code: u16::from_le_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect(),
    )
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
    let Some(prog) = program(class, mode) else {
        return Ok(());
    };
    seccompiler::apply_filter(&prog).map_err(|e| format!("seccomp filter {}: {e}", class.name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn every_class_has_a_program_in_both_modes() {
        for c in [Class::Main, Class::Vcpu, Class::Worker] {
            for m in [Mode::Kill, Mode::Log] {
                let p = program(c, m).unwrap_or_else(|| panic!("{c:?} {m:?}"));
                assert!(p.len() > 10, "{c:?} {m:?}: {} instructions", p.len());
            }
            assert!(program(c, Mode::Off).is_none());
        }
    }

    /// Run as a child by `the_policy_kills_what_it_does_not_allow`: install CLASS's
    /// filter, make the call named by CALL, and exit 0 if it returned.
    #[test]
    fn filtered_child() {
        let (Ok(class), Ok(call)) = (std::env::var("CLASS"), std::env::var("CALL")) else {
            return;
        };
        let class = match class.as_str() {
            "main" => Class::Main,
            "vcpu" => Class::Vcpu,
            _ => Class::Worker,
        };
        install(class, Mode::Kill).unwrap();
        // SAFETY: each call is harmless if it were allowed: execve of a path that does
        // not exist, an open read-only, a socket closed at exit, PTRACE_TRACEME.
        unsafe {
            match call.as_str() {
                "getpid" => {
                    libc::getpid();
                }
                "execve" => {
                    let argv = [std::ptr::null()];
                    libc::execve(c"/nonexistent".as_ptr(), argv.as_ptr(), argv.as_ptr());
                }
                "openat" => {
                    libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY);
                }
                "socket" => {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                }
                "ptrace" => {
                    libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                }
                other => panic!("unknown call {other}"),
            }
        }
        std::process::exit(0);
    }

    fn run(class: &str, call: &str) -> std::process::ExitStatus {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::filtered_child",
                "--test-threads=1",
            ])
            .env("CLASS", class)
            .env("CALL", call)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    }

    #[test]
    fn the_policy_kills_what_it_does_not_allow() {
        for class in ["main", "vcpu", "worker"] {
            assert!(
                run(class, "getpid").success(),
                "{class}: the child must run"
            );
            for call in ["execve", "openat", "ptrace"] {
                assert_eq!(
                    run(class, call).signal(),
                    Some(libc::SIGSYS),
                    "{class} let {call} through"
                );
            }
        }
        // No thread but the main one opens sockets (vsock's host side connects).
        for class in ["vcpu", "worker"] {
            assert_eq!(run(class, "socket").signal(), Some(libc::SIGSYS), "{class}");
        }
    }
}
