//! A component's seccomp policy: a reviewed JSON file (seccompiler's format, one allow
//! list per thread class) compiled to BPF by the component's build script
//! ([`build::compile`], feature `build`), included in the binary, and installed by the
//! thread that needs it ([`Programs::install`]).
//!
//! Each class comes in two modes: `kill` as reviewed, and `log`, where a call outside
//! the list goes through and the kernel logs it (audit type 1326, with the thread's
//! name), for finding what a new code path needs.

use std::str::FromStr;

pub use seccompiler::sock_filter;

/// What a call outside the allow list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Kill the process (the default).
    #[default]
    Kill,
    /// Let it through and have the kernel log it.
    Log,
    /// No filter (a jailed component still has the jail's baseline).
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Kill => "kill",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

impl Mode {
    /// The mode named by environment variable `var`; the default when it is unset or
    /// empty.
    pub fn from_env(var: &str) -> Result<Mode, String> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(Mode::default()),
        }
    }
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

/// The compiled programs of one policy: (mode, class, BPF as 8-byte little-endian
/// instructions), as the build script's listing includes them.
pub struct Programs(pub &'static [(&'static str, &'static str, &'static [u8])]);

impl Programs {
    /// The program of `class` in `mode` (`None` for [`Mode::Off`] or an unknown class).
    pub fn program(&self, class: &str, mode: Mode) -> Option<Vec<sock_filter>> {
        let (_, _, bytes) = self
            .0
            .iter()
            .find(|(m, c, _)| *m == mode.as_str() && *c == class)?;
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

    /// Install `class`'s program on the calling thread (`all_threads`: on every thread
    /// of the process, for a component whose threads share one list).
    pub fn install(&self, class: &str, mode: Mode, all_threads: bool) -> Result<(), String> {
        if mode == Mode::Off {
            return Ok(());
        }
        let prog = self
            .program(class, mode)
            .ok_or_else(|| format!("no seccomp program for {class:?}"))?;
        let r = if all_threads {
            seccompiler::apply_filter_all_threads(&prog)
        } else {
            seccompiler::apply_filter(&prog)
        };
        r.map_err(|e| format!("seccomp filter {class}: {e}"))
    }
}

/// For tests of a component's policy.
#[cfg(feature = "testing")]
pub mod testing {
    use super::{Mode, Programs};

    /// A system call a test makes under a filter.
    #[derive(Debug, Clone, Copy)]
    pub enum Call {
        Getpid,
        /// execve of a path that does not exist.
        Execve,
        /// openat of a host file, read-only.
        OpenHostPath,
        /// An IPv4 TCP socket.
        Socket,
        /// PTRACE_TRACEME.
        Ptrace,
        /// ioctl with this request on a descriptor that is not open (the filter looks
        /// at the request, the kernel then answers EBADF).
        Ioctl(u32),
        /// mmap of anonymous memory with this protection (`PROT_*`).
        Map(i32),
        /// mprotect of a page the child maps first (read and write) to this protection.
        Protect(i32),
    }

    /// `class` maps and protects memory for data, and never makes memory executable: a
    /// thread taken over cannot map code of its own.
    pub fn assert_no_new_code(programs: &Programs, class: &str) {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        for call in [Call::Map(rw), Call::Protect(libc::PROT_READ)] {
            assert_eq!(killed_by(programs, class, call), None, "{class}: {call:?}");
        }
        for call in [
            Call::Map(libc::PROT_READ | libc::PROT_EXEC),
            Call::Map(rw | libc::PROT_EXEC),
            Call::Protect(libc::PROT_READ | libc::PROT_EXEC),
        ] {
            assert_eq!(
                killed_by(programs, class, call),
                Some(libc::SIGSYS),
                "{class} let {call:?} through"
            );
        }
    }

    /// ioctl requests the host processes' lists name.
    pub const FIONBIO: u32 = 0x5421;
    pub const TCGETS: u32 = 0x5401;
    pub const TUNSETIFF: u32 = 0x4004_54ca;
    pub const TUNSETPERSIST: u32 = 0x4004_54cb;
    pub const TUNSETOFFLOAD: u32 = 0x4004_54d0;
    pub const TUNSETVNETHDRSZ: u32 = 0x4004_54d8;
    /// Requests no host process of ours makes: pushing input into a terminal, running
    /// a vCPU, and the tap requests (each checked unless `allowed` names it).
    const NEVER: [u32; 6] = [
        0x5412, // TIOCSTI
        0xae80, // KVM_RUN
        TUNSETIFF,
        TUNSETPERSIST,
        TUNSETOFFLOAD,
        TUNSETVNETHDRSZ,
    ];

    /// `class` may make exactly the ioctl requests in `allowed` among those checked:
    /// each of them goes through, every other one in `NEVER` kills.
    pub fn assert_ioctls(programs: &Programs, class: &str, allowed: &[u32]) {
        for &req in allowed {
            assert_eq!(
                killed_by(programs, class, Call::Ioctl(req)),
                None,
                "{class} refused ioctl {req:#x}"
            );
        }
        for req in NEVER.into_iter().filter(|r| !allowed.contains(r)) {
            assert_eq!(
                killed_by(programs, class, Call::Ioctl(req)),
                Some(libc::SIGSYS),
                "{class} let ioctl {req:#x} through"
            );
        }
    }

    /// The shape of a service's list (bulkheadd, the shim, the exporter): it opens files
    /// and makes sockets, and never execs or traces.
    pub fn assert_files_and_sockets_but_no_exec(programs: &Programs, class: &str) {
        for call in [Call::Execve, Call::Ptrace] {
            assert_eq!(
                killed_by(programs, class, call),
                Some(libc::SIGSYS),
                "{class} let {call:?} through"
            );
        }
        for call in [Call::Getpid, Call::OpenHostPath, Call::Socket] {
            assert_eq!(killed_by(programs, class, call), None, "{class}: {call:?}");
        }
    }

    /// Make `call` in a forked child under `class`'s kill program: `None` if the child
    /// came back from it, else the signal that ended it.
    pub fn killed_by(programs: &Programs, class: &str, call: Call) -> Option<i32> {
        let prog = programs
            .program(class, Mode::Kill)
            .unwrap_or_else(|| panic!("no program {class}"));
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the child makes only raw system calls (no allocation, no locks) and
        // ends with _exit; the program lives in the parent's memory, copied by fork.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if libc::syscall(libc::SYS_seccomp, 1, 0, &fprog) != 0 {
                    libc::_exit(99);
                }
                let null: [*const libc::c_char; 1] = [std::ptr::null()];
                match call {
                    Call::Getpid => {
                        libc::syscall(libc::SYS_getpid);
                    }
                    Call::Execve => {
                        libc::syscall(
                            libc::SYS_execve,
                            c"/nonexistent".as_ptr(),
                            null.as_ptr(),
                            null.as_ptr(),
                        );
                    }
                    Call::OpenHostPath => {
                        libc::syscall(
                            libc::SYS_openat,
                            libc::AT_FDCWD,
                            c"/etc/passwd".as_ptr(),
                            libc::O_RDONLY,
                        );
                    }
                    Call::Socket => {
                        libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
                    }
                    Call::Ptrace => {
                        libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
                    }
                    Call::Ioctl(request) => {
                        libc::syscall(libc::SYS_ioctl, -1, libc::c_ulong::from(request), 0);
                    }
                    Call::Map(prot) => {
                        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                        libc::syscall(libc::SYS_mmap, 0, 4096, prot, flags, -1, 0);
                    }
                    Call::Protect(prot) => {
                        // Mapped before the filter goes on, so only mprotect is tested.
                        libc::syscall(libc::SYS_mprotect, page, 4096, prot);
                    }
                }
                libc::syscall(libc::SYS_exit_group, 0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(
                !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 99),
                "the filter did not install"
            );
            libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
        }
    }
}

#[cfg(feature = "build")]
pub mod build {
    //! For build scripts.

    use std::io::Write;
    use std::path::PathBuf;

    /// Compile `policy` (a path relative to the package) for the target architecture:
    /// for each class, a `kill` and a `log` program in OUT_DIR, and a listing,
    /// `seccomp_programs.rs`, to pass to [`super::Programs`] with
    /// `include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"))`.
    pub fn compile(policy: &str, classes: &[&str]) {
        println!("cargo:rerun-if-changed={policy}");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let text = std::fs::read_to_string(policy).expect("read the seccomp policy");
        let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
        let mut listing = String::new();
        for (mode, action) in [("kill", "\"kill_process\""), ("log", "\"log\"")] {
            let policy_text = text.replace("\"kill_process\"", action);
            let target = arch.as_str().try_into().expect("a seccompiler target");
            let map = seccompiler::compile_from_json(policy_text.as_bytes(), target)
                .unwrap_or_else(|e| panic!("{policy}: {e}"));
            for class in classes {
                let prog = map
                    .get(*class)
                    .unwrap_or_else(|| panic!("{policy} has no filter {class:?}"));
                let mut bytes = Vec::with_capacity(prog.len() * 8);
                for i in prog {
                    bytes.extend(i.code.to_le_bytes());
                    bytes.push(i.jt);
                    bytes.push(i.jf);
                    bytes.extend(i.k.to_le_bytes());
                }
                let file = out.join(format!("seccomp-{mode}-{class}.bpf"));
                std::fs::write(&file, bytes).expect("write a BPF program");
                listing.push_str(&format!(
                    "(\"{mode}\", \"{class}\", include_bytes!({:?})),\n",
                    file.display().to_string()
                ));
            }
        }
        let mut f = std::fs::File::create(out.join("seccomp_programs.rs")).expect("create");
        writeln!(f, "&[\n{listing}]").expect("write");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::Kill, Mode::Log, Mode::Off] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
        }
        assert!("strict".parse::<Mode>().is_err());
    }

    #[test]
    fn programs_decode_and_unknown_classes_are_none() {
        // One instruction: RET ALLOW (0x06, k = 0x7fff0000).
        static P: Programs = Programs(&[("kill", "x", &[0x06, 0, 0, 0, 0, 0, 0xff, 0x7f])]);
        let p = P.program("x", Mode::Kill).unwrap();
        assert_eq!((p[0].code, p[0].k), (0x06, 0x7fff_0000));
        assert!(P.program("y", Mode::Kill).is_none());
        assert!(P.program("x", Mode::Off).is_none());
    }
}
