//! The jailer binary on real processes: what a jailed program can see and do, its exit
//! status and signals, and the baseline seccomp filter. Needs root (namespaces, mounts,
//! uids), as the jailer does in production.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use jailer::posture::{self, Report};
use jailer::Jail;

const JAILER: &str = env!("CARGO_BIN_EXE_bulkhead-jailer");
const UID: u32 = 1_999_000_123;

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the jailer tests need root (as the jailer does)"
    );
}

/// A scratch directory with an empty jail root and a writable directory owned by UID.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("bh-jail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::create_dir_all(dir.join("rw")).unwrap();
        std::os::unix::fs::chown(dir.join("rw"), Some(UID), Some(UID)).unwrap();
        Scratch { dir }
    }

    fn jail(&self, name: &str, program: &Path, args: &[&str]) -> Jail {
        let mut j = Jail::new("test", name, self.dir.join("root"), program.into());
        j.uid = UID;
        j.gid = UID;
        // The shell and its tools, beside what every program needs.
        j.read_only = jailer::system_paths();
        j.read_only.extend(
            ["/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.symlink_metadata().is_ok()),
        );
        j.read_write = vec![self.dir.join("rw")];
        j.report = Some(self.dir.join("report.json"));
        j.args = args.iter().map(Into::into).collect();
        j
    }

    fn report(&self) -> Report {
        serde_json::from_slice(&std::fs::read(self.dir.join("report.json")).unwrap()).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(j: &Jail) -> Output {
    Command::new(JAILER)
        .args(j.to_args())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn sh(s: &Scratch, script: &str) -> (Output, String) {
    let o = run(&s.jail("sh", Path::new("/bin/sh"), &["-c", script]));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    (o, text)
}

#[test]
fn a_jailed_program_sees_only_its_root_with_no_privilege() {
    need_root();
    let s = Scratch::new("view");
    let rw = s.dir.join("rw");
    let script = format!(
        "id -u; id -g; grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status; \
         ls / 2>&1 | head -1; cat /etc/passwd 2>&1 | head -1; \
         echo written > {rw}/f && echo rw-ok; touch /usr/lib/x 2>&1; touch /new 2>&1; \
         env; echo pid=$$",
        rw = rw.display()
    );
    let mut j = s.jail("sh", Path::new("/bin/sh"), &["-c", &script]);
    j.env = vec![("ONLY".into(), "this".into())];
    let o = run(&j);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], UID.to_string());
    assert_eq!(lines[1], UID.to_string());
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            out.contains(&format!("{set}:\t0000000000000000")),
            "{set} not empty: {out}"
        );
    }
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // `/` exists in its mount namespace, but landlock does not let it list it.
    assert!(
        out.contains("ls: cannot open directory '/': Permission denied"),
        "{out}"
    );
    assert!(
        out.contains("/etc/passwd") && out.contains("No such file"),
        "{out}"
    );
    assert!(out.contains("rw-ok"), "{out}");
    assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "written\n");
    assert!(
        out.contains("/usr/lib/x") && out.contains("Read-only"),
        "{out}"
    );
    assert!(out.contains("/new"), "{out}");
    assert!(!rw.parent().unwrap().join("root/new").exists());
    // The environment is exactly what was given (sh adds PWD).
    let env: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains('=') && !l.starts_with("pid="))
        .copied()
        .collect();
    assert!(env.contains(&"ONLY=this"), "{env:?}");
    assert!(
        env.iter()
            .all(|l| l.starts_with("ONLY=") || l.starts_with("PWD=")),
        "{env:?}"
    );
    // PID 1 of its own namespace.
    assert!(out.contains("pid=1"), "{out}");

    let r = s.report();
    assert_eq!((r.uid, r.gid), (UID, UID));
    assert!(r.capabilities.is_empty());
    assert_eq!(r.net, "new");
    if r.landlock.kernel_abi >= 1 {
        assert_ne!(r.landlock.status, "not enforced", "{r:?}");
    }
    assert!(r.seccomp.starts_with("baseline"), "{r:?}");
}

/// In a user namespace of its own the component is that namespace's root, acts as any
/// of its 65536 ids (host ids from UID up), and its capabilities stop at what the
/// namespace owns: a host root's file is out of reach.
#[test]
fn a_user_namespace_root_acts_only_within_its_range() {
    need_root();
    let s = Scratch::new("userns");
    let rw = s.dir.join("rw");
    std::fs::write(rw.join("hosts"), "host root's\n").unwrap();
    std::os::unix::fs::chown(rw.join("hosts"), Some(0), Some(0)).unwrap();
    let script = format!(
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; \
         touch {rw}/a && chown 1000:1001 {rw}/a && echo chown-ok; \
         chown 5 {rw}/hosts 2>&1; {{ echo x >> {rw}/hosts; }} 2>&1; \
         chown 70000 {rw}/a 2>&1; echo end",
        rw = rw.display()
    );
    let mut j = s.jail("sh", Path::new("/bin/sh"), &["-c", &script]);
    j.userns = Some(65536);
    j.keep_caps = vec![
        "CAP_CHOWN".into(),
        "CAP_DAC_OVERRIDE".into(),
        "CAP_FOWNER".into(),
    ];
    let o = run(&j);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    let maps: Vec<Vec<&str>> = out
        .lines()
        .take(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want = vec!["0".to_string(), UID.to_string(), "65536".into()];
    assert_eq!(maps, vec![want.clone(), want], "{out}");
    assert_eq!(out.lines().nth(2), Some("0"), "{out}");
    assert!(out.contains("chown-ok"), "{out}");
    let meta = std::fs::metadata(rw.join("a")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (UID + 1000, UID + 1001));
    // The host root's file: CAP_CHOWN and CAP_DAC_OVERRIDE do not reach it.
    assert!(
        out.contains("hosts") && out.contains("Operation not permitted"),
        "{out}"
    );
    assert!(out.contains("Permission denied"), "{out}");
    assert_eq!(
        std::fs::read_to_string(rw.join("hosts")).unwrap(),
        "host root's\n"
    );
    // An id outside the range does not exist there.
    assert!(
        out.contains("'/tmp") && out.contains("/rw/a': Invalid argument"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(rw.join("a")).unwrap().uid(), UID + 1000);
    let r = s.report();
    assert_eq!(
        r.userns.as_deref(),
        Some(format!("0:{UID}:65536 uids, 0:{UID}:65536 gids").as_str())
    );
    assert_eq!(r.capabilities.len(), 3, "{r:?}");
}

/// `mount(2)` with plain strings, for the test's own host mounts.
fn host_mount(src: &str, dst: &Path, fstype: &str, flags: libc::c_ulong) {
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (s, d, t) = (c(src), c(dst.to_str().unwrap()), c(fstype));
    // SAFETY: NUL-terminated strings living across the call; no data.
    let rc = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), flags, std::ptr::null()) };
    assert_eq!(
        rc,
        0,
        "mount {src} on {}: {}",
        dst.display(),
        std::io::Error::last_os_error()
    );
}

/// A mount below a bound path (a container's rootfs below the shared directory) is
/// `nosuid,nodev` in the jail like the bound path itself, and a bound path the host made
/// read-only stays read-only in a read-write bind, while a mount below it stays writable.
#[test]
fn binds_restrict_every_mount_below_and_never_widen_the_host() {
    need_root();
    let s = Scratch::new("submounts");
    let (rw, below) = (s.dir.join("rw"), s.dir.join("rw/below"));
    std::fs::create_dir_all(&below).unwrap();
    // The host's view: rw is a read-only mount, with a writable tmpfs (suid and devices
    // allowed) below it.
    host_mount(rw.to_str().unwrap(), &rw, "", libc::MS_BIND);
    host_mount(
        "",
        &rw,
        "",
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
    );
    host_mount("tmpfs", &below, "tmpfs", 0);
    std::fs::set_permissions(&below, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let script = format!(
        "grep -E ' {rw} | {below} ' /proc/self/mountinfo; \
         touch {rw}/top 2>/dev/null && echo top=written; \
         touch {below}/f && echo below=written",
        rw = rw.display(),
        below = below.display()
    );
    let (o, text) = sh(&s, &script);
    let c = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    for p in [&below, &rw] {
        // SAFETY: NUL-terminated path.
        unsafe { libc::umount2(c(p).as_ptr(), libc::MNT_DETACH) };
    }
    assert!(o.status.success(), "{o:?}");
    let opts = |at: &Path| -> Vec<String> {
        text.lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&at.to_str().unwrap()))
            .map(|f| f[5].split(',').map(String::from).collect())
            .unwrap_or_else(|| panic!("{} not mounted in the jail: {text}", at.display()))
    };
    for at in [&rw, &below] {
        let o = opts(at);
        assert!(
            o.contains(&"nosuid".into()) && o.contains(&"nodev".into()),
            "{}: {o:?}",
            at.display()
        );
    }
    assert!(
        opts(&rw).contains(&"ro".into()),
        "the host's read-only top was widened: {text}"
    );
    assert!(!text.contains("top=written"), "{text}");
    assert!(
        text.contains("below=written"),
        "the mount below lost its writes: {text}"
    );
}

#[test]
fn only_the_descriptors_handed_on_stay_open() {
    need_root();
    let s = Scratch::new("fds");
    // High numbers, so the descriptor `ls` opens for the listing cannot be taken for one.
    let null = std::fs::File::open("/dev/null").unwrap();
    let (fa, fb) = (40, 41);
    for fd in [fa, fb] {
        // SAFETY: dup2 onto numbers this test owns; the copies are inheritable (no
        // FD_CLOEXEC) and closed when the test process ends.
        assert_eq!(
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) },
            fd
        );
    }
    let mut j = s.jail("sh", Path::new("/bin/sh"), &["-c", "ls /proc/self/fd"]);
    j.keep_fds = vec![fb];
    let o = run(&j);
    let fds: Vec<i32> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(fds.contains(&fb), "kept {fb} missing: {fds:?}");
    assert!(!fds.contains(&fa), "{fa} leaked: {fds:?}");
}

/// A pipe whose read end is inheritable at `fd` in children of this process.
fn gate_pipe(fd: i32) -> std::fs::File {
    use std::os::fd::FromRawFd;
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array on success.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: dup2 onto a number this test owns (the copy is inheritable; the caller
    // closes it), then the original read end, which nothing else uses, is closed.
    unsafe {
        assert_eq!(libc::dup2(p[0], fd), fd);
        libc::close(p[0]);
    }
    // SAFETY: the write end is new and owned by nobody else.
    unsafe { std::fs::File::from_raw_fd(p[1]) }
}

#[test]
fn the_start_gate_holds_the_exec_until_a_byte_arrives() {
    use std::io::Write;
    need_root();
    let s = Scratch::new("gate");
    let gate = 50;
    let mut wr = gate_pipe(gate);
    let mark = s.dir.join("rw").join("ran");
    let mut j = s.jail(
        "sh",
        Path::new("/bin/sh"),
        &["-c", &format!("touch {}; ls /proc/self/fd", mark.display())],
    );
    j.start_gate = Some(gate);
    let c = Command::new(JAILER)
        .args(j.to_args())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // SAFETY: closing this process's copy; the child holds its own.
    unsafe { libc::close(gate) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!mark.exists(), "the program ran before the gate opened");
    wr.write_all(&[1]).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(mark.exists());
    let fds: Vec<i32> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!fds.contains(&gate), "the gate was handed on: {fds:?}");
}

#[test]
fn a_start_gate_closed_unopened_means_no_exec() {
    need_root();
    let s = Scratch::new("gate-eof");
    let gate = 51;
    let wr = gate_pipe(gate);
    let mark = s.dir.join("rw").join("ran");
    let mut j = s.jail(
        "sh",
        Path::new("/bin/sh"),
        &["-c", &format!("touch {}", mark.display())],
    );
    j.start_gate = Some(gate);
    let c = Command::new(JAILER)
        .args(j.to_args())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // SAFETY: closing this process's copy; the child holds its own.
    unsafe { libc::close(gate) };
    drop(wr);
    let o = c.wait_with_output().unwrap();
    assert!(!o.status.success(), "{o:?}");
    assert!(
        !mark.exists(),
        "the program ran though the gate never opened"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("start gate"), "{err}");
}

#[test]
fn exit_status_and_signals_pass_through_the_jailer() {
    need_root();
    let s = Scratch::new("sig");
    let (o, _) = sh(&s, "exit 7");
    assert_eq!(o.status.code(), Some(7));

    // A program without a handler is PID 1 of its namespace, where SIGTERM would be
    // dropped: the jailer turns it into SIGKILL.
    let j = s.jail("sleep", Path::new("/bin/sleep"), &["100"]);
    let mut c = Command::new(JAILER).args(j.to_args()).spawn().unwrap();
    let child = wait_child(c.id());
    // SAFETY: kill on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGKILL), "{st:?}");
    assert!(!Path::new(&format!("/proc/{child}")).exists());

    // One with a handler gets the signal itself.
    let j = s.jail(
        "sh",
        Path::new("/bin/sh"),
        &["-c", "trap 'exit 3' TERM; while :; do sleep 0.05; done"],
    );
    let mut c = Command::new(JAILER).args(j.to_args()).spawn().unwrap();
    wait_child(c.id());
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    assert_eq!(c.wait().unwrap().code(), Some(3));
}

#[test]
fn the_component_dies_with_its_jailer() {
    need_root();
    let s = Scratch::new("pdeath");
    let j = s.jail("sleep", Path::new("/bin/sleep"), &["100"]);
    let mut c = Command::new(JAILER).args(j.to_args()).spawn().unwrap();
    let child = wait_child(c.id());
    c.kill().unwrap();
    assert_eq!(c.wait().unwrap().signal(), Some(libc::SIGKILL));
    let t = Instant::now();
    while Path::new(&format!("/proc/{child}")).exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !Path::new(&format!("/proc/{child}/status")).exists()
            || std::fs::read_to_string(format!("/proc/{child}/status"))
                .unwrap_or_default()
                .contains("zombie"),
        "pid {child} outlived its jailer"
    );
}

/// The jailer that stays beside the component holds nothing it does not need: the
/// component's uid, no capability, no new privileges, a bounding set of CAP_KILL alone;
/// and it still passes a signal on and the exit status back.
#[test]
fn the_supervising_jailer_keeps_only_the_components_uid() {
    need_root();
    let s = Scratch::new("supervisor");
    let j = s.jail("sleep", Path::new("/bin/sleep"), &["100"]);
    let mut c = Command::new(JAILER).args(j.to_args()).spawn().unwrap();
    let child = wait_child(c.id());
    // The parent drops once the child's report is written: wait for that.
    let t = Instant::now();
    let field = |k: &str| -> String {
        std::fs::read_to_string(format!("/proc/{}/status", c.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{k}:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    // Its last step is its seccomp filter (2 in Seccomp).
    while field("Seccomp") != "2" && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let ids = |k: &str| -> Vec<u32> {
        field(k)
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    assert_eq!(ids("Uid"), vec![UID; 4], "uids");
    assert_eq!(ids("Gid"), vec![UID; 4], "gids");
    assert_eq!(field("Groups"), "", "supplementary groups");
    assert_eq!(field("NoNewPrivs"), "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&field(set), 16), Ok(0), "{set}");
    }
    assert_eq!(
        u64::from_str_radix(&field("CapBnd"), 16),
        Ok(1 << 5), // CAP_KILL
        "CapBnd"
    );
    // Its own allow list: 2 is a seccomp filter (its parent, this test, has none).
    assert_eq!(
        field("Seccomp"),
        "2",
        "the supervisor has no seccomp filter"
    );
    // Under it, it still forwards, reaps and exits with the component's status.
    // SAFETY: a pid we started and a valid signal.
    assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGTERM) }, 0);
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGKILL), "{st:?}");
    assert!(
        !Path::new(&format!("/proc/{child}/cmdline")).exists() || {
            std::fs::read_to_string(format!("/proc/{child}/status"))
                .unwrap_or_default()
                .contains("zombie")
        }
    );
}

/// The jailed program's pid, once it runs (the jailer's only child).
fn wait_child(jailer: u32) -> u32 {
    let t = Instant::now();
    loop {
        if let Some(c) = posture::jailed_child(jailer) {
            let exe = std::fs::read_link(format!("/proc/{c}/exe")).unwrap_or_default();
            if !exe.ends_with("bulkhead-jailer") {
                return c;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no jailed child");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run inside a jail by `seccomp_kills_what_the_baseline_forbids`: make the call named
/// by PROBE and exit 0 if it succeeded, or with the errno that refused it.
#[test]
fn probe() {
    let Ok(what) = std::env::var("PROBE") else {
        return;
    };
    // SAFETY: each call is made with arguments that change nothing even if allowed.
    let r = unsafe {
        match what.as_str() {
            "getpid" => libc::getpid() as i64,
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            "mount" => libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT,
                std::ptr::null(),
            ) as i64,
            "unshare" => libc::unshare(libc::CLONE_NEWUSER) as i64,
            "keyctl" => libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0),
            "bpf" => libc::syscall(libc::SYS_bpf, 0, 0, 0),
            "io_uring_setup" => libc::syscall(libc::SYS_io_uring_setup, 1, 0),
            "socket_inet" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
            // A child in a new user namespace (it would exit at once, like the parent).
            "clone_newuser" => libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                0,
                0,
                0,
                0,
            ),
            // Flags in memory a filter cannot read: refused outright (EINVAL if let
            // through, for these arguments).
            "clone3" => libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize),
            // Threads still start: the C library falls back from clone3 to clone.
            "thread" => std::thread::spawn(|| 7).join().map_or(-1, |v| v - 7),
            other => panic!("unknown probe {other}"),
        }
    };
    // Returned: 0, or the errno it was refused with.
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    std::process::exit(if r == -1 { errno } else { 0 });
}

/// Run the `probe` test jailed, making the call `what`, under the allow list
/// `allow_list` if one is named; its exit status.
fn probe_status(s: &Scratch, what: &str, allow_list: Option<&str>) -> std::process::ExitStatus {
    let me = std::env::current_exe().unwrap();
    let mut j = s.jail(
        "probe",
        &me,
        &["--exact", "probe", "--nocapture", "--test-threads=1"],
    );
    j.read_only.push(me.clone());
    j.env = vec![("PROBE".into(), what.into())];
    j.allow_list = allow_list.map(Into::into);
    run(&j).status
}

#[test]
fn seccomp_kills_what_the_baseline_forbids() {
    need_root();
    let s = Scratch::new("seccomp");
    let status = |what: &str| probe_status(&s, what, None);
    assert_eq!(
        status("getpid").code(),
        Some(0),
        "the probe itself must run"
    );
    assert_eq!(status("thread").code(), Some(0), "threads must start");
    for what in [
        "ptrace",
        "mount",
        "unshare",
        "keyctl",
        "bpf",
        "clone_newuser",
    ] {
        assert_eq!(
            status(what).code(),
            Some(128 + libc::SIGSYS),
            "{what} was not killed"
        );
    }
    // Probed for by programs at start: refused, not fatal.
    assert_eq!(status("io_uring_setup").code(), Some(libc::ENOSYS));
    assert_eq!(status("clone3").code(), Some(libc::ENOSYS));
}

/// The QEMU backend's vsock back end, where scripts/install-deps.sh puts it.
const VHOST_DEVICE_VSOCK: &str = "/opt/vhost-device-vsock/bin/vhost-device-vsock";

#[test]
fn an_allow_list_holds_from_the_exec_on() {
    need_root();
    let s = Scratch::new("allow");
    let status = |what: &str| probe_status(&s, what, Some("vhost-device-vsock"));
    assert_eq!(
        status("getpid").code(),
        Some(0),
        "the probe itself must run"
    );
    assert_eq!(status("thread").code(), Some(0), "threads must start");
    // Not on the list, though the baseline allows it.
    assert_eq!(
        status("socket_inet").code(),
        Some(128 + libc::SIGSYS),
        "an IPv4 socket was not killed"
    );
    assert!(s.report().seccomp.contains("allow list vhost-device-vsock"));
}

#[test]
fn vhost_device_vsock_starts_and_listens_under_its_allow_list() {
    need_root();
    let program = Path::new(VHOST_DEVICE_VSOCK);
    assert!(
        program.exists(),
        "{VHOST_DEVICE_VSOCK} is missing: scripts/install-deps.sh installs it"
    );
    let s = Scratch::new("vdv");
    let rw = s.dir.join("rw");
    let vm = format!(
        "guest-cid=3,socket={},uds-path={}",
        rw.join("vu.sock").display(),
        rw.join("vsock.sock").display()
    );
    let mut j = s.jail("vhost-device-vsock", program, &["--vm", &vm]);
    j.read_only = jailer::loader_paths(program);
    j.read_only.push(program.into());
    j.allow_list = Some("vhost-device-vsock".into());
    let mut child = Command::new(JAILER)
        .args(j.to_args())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rw.join("vu.sock").exists() && Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("vhost-device-vsock ended before listening: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rw.join("vu.sock").exists(), "no vhost-user socket");
    // A front end that connects and goes away: it takes the connection and listens
    // again, still alive under the list.
    drop(std::os::unix::net::UnixStream::connect(rw.join("vu.sock")).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "it died after a connection"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_jail_that_cannot_be_built_is_an_error_not_a_half_jail() {
    need_root();
    let s = Scratch::new("bad");
    let mut j = s.jail("sh", Path::new("/bin/sh"), &["-c", "exit 0"]);
    j.read_only.push("/no/such/path".into());
    let o = run(&j);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/path"));
    assert!(!s.dir.join("report.json").exists());

    let o = Command::new(JAILER)
        .args(["--name", "x", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn joins_and_leaves_its_cgroup() {
    need_root();
    let s = Scratch::new("cg");
    let rel = format!("bulkhead-test/cg{}", std::process::id());
    let mut j = s.jail("sh", Path::new("/bin/sh"), &["-c", "cat /proc/self/cgroup"]);
    j.cgroup = Some(rel.clone());
    let o = run(&j);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        out.lines().all(|l| l.ends_with(&rel)),
        "not in {rel} everywhere: {out}"
    );
    let r = s.report();
    assert!(!r.cgroups.is_empty());
    jailer::remove_cgroup(&rel);
    for c in &r.cgroups {
        let dir = c.split_once(':').unwrap().1;
        assert!(!Path::new(dir).exists(), "{dir} left behind");
    }
    jailer::remove_cgroup("bulkhead-test");
}
