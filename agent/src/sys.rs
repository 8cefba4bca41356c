//! The few system calls the agent makes as PID 1.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use bulkhead_protocol::AgentError;

#[derive(Debug, Default, Clone, Copy)]
pub struct ModuleReport {
    pub loaded: u32,
    pub failed: u32,
}

pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (src, target, fstype, data) = (c(src)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mount /proc, /sys, /dev, /run and /tmp. Failures are logged, not fatal.
extern "C" fn ignore_sigpipe(_: libc::c_int) {}

/// What every process the agent starts should inherit, set once at start.
///
/// SIGPIPE: Rust ignores it (writes to a closed pipe return EPIPE), and an *ignored*
/// signal stays ignored across exec, so containers would start with SIGPIPE ignored
/// (`yes | head` never ends). A handler that does nothing keeps EPIPE for the agent and
/// is reset to the default by exec.
///
/// Open files: PID 1 starts with 1024; the agent holds several descriptors per process
/// it follows, so it raises its own limit to the most the kernel allows.
pub fn process_defaults() {
    // SAFETY: a zeroed sigaction is valid; the handler is an async-signal-safe no-op and
    // sigaction only reads the struct we pass.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_sigpipe as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGPIPE, &sa, std::ptr::null_mut());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    let want = libc::rlimit {
        rlim_cur: nr_open,
        rlim_max: nr_open,
    };
    // SAFETY: setrlimit/getrlimit read and write only the structs passed.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            // Not allowed to raise the hard limit: take the soft limit up to it.
            let mut cur: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) == 0 {
                cur.rlim_cur = cur.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
            }
        }
    }
}

pub fn early_mounts() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (src, target, fstype, flags, data) in [
        ("proc", "/proc", "proc", nosuid, ""),
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "",
        ),
        // Containers: the cgroup v2 tree (the only hierarchy: every controller is in it),
        // terminals, POSIX shared memory.
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "nsdelegate"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(src, target, fstype, flags, data) {
            if e.raw_os_error() != Some(libc::EBUSY) {
                crate::log(&format!("mount {target}: {e}"));
            }
        }
    }
}

/// Hand the cgroup controllers down to the agent's container cgroups.
pub fn enable_cgroup_controllers() {
    for c in ["cpu", "memory", "pids", "io", "cpuset"] {
        if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", format!("+{c}")) {
            crate::log(&format!("cgroup controller {c}: {e}"));
        }
    }
}

/// The initramfs root cannot be `pivot_root`ed away from (the kernel refuses a root
/// mount with no parent), and every container start pivots. So PID 1 bind-mounts the
/// initramfs root onto a directory of its own, moves that mount over `/` and chroots
/// into it: the root is then a mount with a parent, with the same files in the same
/// memory. Nothing is copied and nothing re-executed (switch_root's copy of the 5 MB
/// agent into a fresh tmpfs and the re-exec from there took about 0.1 s of a TCG
/// guest's boot). On failure the agent carries on where it is, and container creation
/// reports the pivot_root error.
pub fn remount_root_for_pivot() -> io::Result<()> {
    const NEW: &str = "/.bulkhead-root";
    std::fs::create_dir_all(NEW)?;
    mount("/", NEW, "", libc::MS_BIND, "")?;
    std::env::set_current_dir(NEW)?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = CString::new(".").map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    // The mount point, seen from the moved root, is a plain empty directory again.
    let _ = std::fs::remove_dir(NEW);
    Ok(())
}

/// Load the modules `list` names (one path per line), in order; a missing list loads
/// nothing. A module the kernel took is deleted from the initramfs: its file would
/// otherwise hold guest memory for the VM's whole life (the kernel keeps its own copy).
/// One that failed stays, for a look from a debug shell.
pub fn load_modules(list: &str) -> ModuleReport {
    load_modules_with(list, finit_module)
}

fn load_modules_with(list: &str, load: impl Fn(&str) -> io::Result<()>) -> ModuleReport {
    let mut rep = ModuleReport::default();
    let Ok(text) = std::fs::read_to_string(list) else {
        return rep;
    };
    for path in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match load(path) {
            Ok(()) => rep.loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => rep.loaded += 1,
            Err(e) => {
                rep.failed += 1;
                crate::log(&format!("module {path}: {e}"));
                continue;
            }
        }
        let _ = std::fs::remove_file(path);
    }
    rep
}

fn finit_module(path: &str) -> io::Result<()> {
    let f = File::open(path)?;
    let params = c"";
    // SAFETY: finit_module takes a valid fd and a NUL-terminated parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Value of `key=value` on the kernel command line.
pub fn cmdline_param(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cmdline").ok()?;
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn guest_details() -> bulkhead_protocol::GuestDetails {
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(0) as u32;
    let mem_total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    bulkhead_protocol::GuestDetails {
        kernel_release: kernel_release(),
        cpus_online: cpus,
        mem_total_kib,
    }
}

pub fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// PID 1 inherits every orphan; reap them so they never pile up as zombies.
/// Detach a mount (lazily: a straggling process keeps it alive, not the agent).
pub fn umount(target: &std::path::Path) {
    let Ok(c) = CString::new(target.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

pub fn mount_virtiofs(tag: &str, target: &str) -> Result<(), AgentError> {
    if tag.is_empty() || tag.len() > 36 || !target.starts_with('/') || target.contains('\0') {
        return Err(AgentError::InvalidArgument(format!(
            "tag {tag:?} / target {target:?}"
        )));
    }
    std::fs::create_dir_all(target).map_err(|e| AgentError::Io(format!("{target}: {e}")))?;
    mount(tag, target, "virtiofs", 0, "")
        .map_err(|e| AgentError::Io(format!("mount virtiofs {tag} on {target}: {e}")))
}

pub fn power_off() {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
}

/// A new AF_VSOCK stream socket and the address of `cid`:`port`, handed to `f`
/// (bind or connect) with the address's length.
fn vsock_socket(
    cid: u32,
    port: u32,
    f: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zeroed is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    // SAFETY: `f` is bind(2) or connect(2); addr is a valid sockaddr_vm and the length
    // matches it.
    let rc = unsafe {
        f(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A listening AF_VSOCK stream socket.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = vsock_socket(libc::VMADDR_CID_ANY, port, libc::bind)?;
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener(fd))
    }

    pub fn accept(&self) -> io::Result<File> {
        // SAFETY: accept4 with null address pointers is allowed.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: accept4 returned a new fd that we now own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Connect to `port` of the host (CID 2) and say `hello`; the connection is closed
/// on return.
pub fn vsock_hello(port: u32, hello: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let fd = vsock_socket(libc::VMADDR_CID_HOST, port, libc::connect)?;
    File::from(fd).write_all(hello)
}

/// The sandbox's namespace holder (`bulkhead-agent --ns-holder`), started by the agent
/// with its IPC, UTS (and PID) namespaces already unshared. It sets the hostname, makes
/// the PID namespace's init when asked to, prints that init's pid (or 0) and sleeps
/// until it is killed. It dies with the agent.
pub fn ns_holder(pid_ns: bool, hostname: Option<&str>) -> ! {
    use std::io::Write;
    // No PR_SET_PDEATHSIG here: it fires when the *thread* that spawned us exits, and the
    // agent serves each connection on a thread of its own, so the holder would die with
    // the connection that created the sandbox. DestroySandbox kills the holder.
    if let Some(h) = hostname {
        // SAFETY: the pointer and length describe a live byte slice.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            crate::log(&format!("sethostname: {}", io::Error::last_os_error()));
            std::process::exit(1);
        }
    }
    let mut init = 0;
    if pid_ns {
        // SAFETY: this process has one thread (it was just exec'd), so the child may run
        // arbitrary code after fork.
        init = unsafe { libc::fork() };
        if init < 0 {
            crate::log(&format!("fork: {}", io::Error::last_os_error()));
            std::process::exit(1);
        }
        if init == 0 {
            // PID 1 of the pod's PID namespace: reap whatever is orphaned into it.
            // SAFETY: prctl with integer arguments; waitpid with a valid pointer.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            loop {
                let mut st = 0;
                // SAFETY: as above.
                if unsafe { libc::waitpid(-1, &mut st, 0) } < 0 {
                    // SAFETY: pause takes no arguments.
                    unsafe { libc::pause() };
                }
            }
        }
    }
    let mut out = io::stdout();
    let _ = writeln!(out, "{init}");
    let _ = out.flush();
    loop {
        // SAFETY: pause takes no arguments.
        unsafe { libc::pause() };
    }
}

/// Tell the VMM that init has started, through its boot-timer port (see
/// [`bulkhead_protocol::BOOT_TIMER_PORT`]). Best effort: without the port (another VMM,
/// a kernel without ioperm) nothing happens. Never on bare metal: the CPU must report a
/// hypervisor, so a port write cannot reach real hardware.
pub fn signal_boot_timer() {
    #[cfg(target_arch = "x86_64")]
    {
        use bulkhead_protocol::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
        // CPUID leaf 1, ECX bit 31: running under a hypervisor.
        if std::arch::x86_64::__cpuid(1).ecx & (1 << 31) == 0 {
            return;
        }
        let port = libc::c_ulong::from(BOOT_TIMER_PORT);
        // SAFETY: ioperm with integer arguments; it grants this process one port.
        if unsafe { libc::ioperm(port, 1, 1) } != 0 {
            return;
        }
        // SAFETY: a one-byte write to the port ioperm just granted; it touches no memory.
        // Only bulkhead-vmm's boot timer claims it; other VMMs drop the write.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") BOOT_TIMER_PORT, in("al") BOOT_TIMER_MAGIC,
                options(nomem, nostack, preserves_flags));
        }
        // SAFETY: as above; gives the port back.
        unsafe { libc::ioperm(port, 1, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_modules_leave_the_initramfs_failed_ones_stay() {
        let dir = std::env::temp_dir().join(format!("bh-mods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let [a, b, c] = ["a.ko", "b.ko", "c.ko"].map(|n| dir.join(n));
        for f in [&a, &b, &c] {
            std::fs::write(f, b"\x7fELF").unwrap();
        }
        let list = dir.join("modules");
        let names = [&a, &b, &c].map(|p| p.display().to_string());
        std::fs::write(&list, names.join("\n") + "\n").unwrap();
        // a loads, b is already there (built in or loaded), c fails.
        let rep = load_modules_with(list.to_str().unwrap(), |p| {
            if p.ends_with("a.ko") {
                Ok(())
            } else if p.ends_with("b.ko") {
                Err(io::Error::from_raw_os_error(libc::EEXIST))
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOEXEC))
            }
        });
        assert_eq!((rep.loaded, rep.failed), (2, 1));
        assert!(!a.exists() && !b.exists());
        assert!(c.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
