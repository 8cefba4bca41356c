//! The spawner: a small process bulkheadd forks first thing, before any thread and
//! before its seccomp filter goes on, which starts components when bulkheadd asks.
//!
//! A seccomp filter is inherited across fork and exec. bulkheadd's own allow list has no
//! `execve`, no `ptrace` and no module or namespace calls; if bulkheadd started the
//! jailer itself, every component (QEMU and virtiofsd included) would run under that
//! list too. So bulkheadd hands each start to the spawner, which holds no filter and
//! does one thing: start a program from a list fixed when it was forked (the binaries the
//! configuration names), with the descriptors bulkheadd passes (`SCM_RIGHTS`) at the
//! numbers it asks for, in a new session, output to a log file. It reaps what it
//! started and tells bulkheadd each exit status, since it, not bulkheadd, is the parent.
//!
//! The two talk over a seqpacket socket pair, one JSON message per packet. When bulkheadd
//! goes away the spawner sees the end of the socket and exits; the components it started carry on, as they do when bulkheadd restarts.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

/// The spawner's process name (`comm`), so tools and tests tell it from bulkheadd, whose
/// command line it shares.
pub const SPAWNER_NAME: &std::ffi::CStr = c"bulkhead-spawn";
/// The largest message either side sends or reads.
const MAX_MESSAGE: usize = 64 << 10;
/// The most descriptors one start hands on.
const MAX_FDS: usize = 16;
/// Exit statuses kept for a watcher that has not asked yet.
const MAX_UNCLAIMED_EXITS: usize = 1024;
/// How long bulkheadd waits for the spawner to answer a start.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One start, as bulkheadd asks for it.
#[derive(Debug, Serialize, Deserialize)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    /// Changes to the environment the spawner has (bulkheadd's at its start): a value,
    /// or `None` to remove the variable.
    env: Vec<(String, Option<String>)>,
    cwd: Option<PathBuf>,
    /// stdout and stderr go here (appended); stdin is /dev/null.
    log: PathBuf,
    /// The number each passed descriptor gets in the child, in the order passed.
    fd_numbers: Vec<i32>,
    /// Instead of a program: an idle child holding a new user namespace with these
    /// maps (inside, host, count), for bulkheadd, which may not fork or unshare.
    #[serde(default)]
    userns: Vec<(u32, u32, u32)>,
}

/// What the spawner says.
#[derive(Debug, Serialize, Deserialize)]
enum Said {
    Started { pid: u32 },
    Failed { error: String },
    Exited { pid: u32, status: i32 },
}

/// bulkheadd's end.
pub struct Spawner {
    sock: Mutex<OwnedFd>,
    replies: Mutex<mpsc::Receiver<Result<u32, String>>>,
    exits: Mutex<HashMap<u32, i32>>,
    exited: Condvar,
}

static SPAWNER: OnceLock<Spawner> = OnceLock::new();

/// The spawner, once [`start`] has run in this process.
pub fn get() -> Option<&'static Spawner> {
    SPAWNER.get()
}

/// Fork the spawner. Call it while the process has one thread: before the runtime,
/// before anything that starts a thread. `allowed` is every program it may start.
pub fn start(allowed: Vec<PathBuf>) -> std::io::Result<u32> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the caller promises a single-threaded process, so the child may allocate
    // and run ordinary Rust: no lock can be held by a thread that does not exist there.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(ours);
        // Gone with bulkheadd even before it reads the end of the socket (the fork is
        // from bulkheadd's main thread, which lives as long as bulkheadd).
        // SAFETY: PR_SET_PDEATHSIG with a signal number only sets a flag.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        // SAFETY: getppid cannot fail.
        if unsafe { libc::getppid() } != parent {
            std::process::exit(0);
        }
        serve(theirs, &allowed);
    }
    drop(theirs);
    let (tx, rx) = mpsc::channel();
    let reader = ours.try_clone()?;
    let sp = Spawner {
        sock: Mutex::new(ours),
        replies: Mutex::new(rx),
        exits: Mutex::default(),
        exited: Condvar::new(),
    };
    if SPAWNER.set(sp).is_err() {
        return Err(std::io::Error::other("the spawner is already running"));
    }
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || listen(reader, tx))?;
    Ok(pid as u32)
}

/// Read what the spawner says: start replies to the waiting caller, exit statuses into
/// the table.
fn listen(sock: OwnedFd, replies: mpsc::Sender<Result<u32, String>>) {
    let sp = SPAWNER.get().expect("set before the thread starts");
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) | Err(_) => {
                tracing::error!("the spawner is gone: no component can be started");
                return;
            }
            Ok(n) => n,
        };
        match serde_json::from_slice::<Said>(&buf[..n]) {
            Ok(Said::Started { pid }) => {
                let _ = replies.send(Ok(pid));
            }
            Ok(Said::Failed { error }) => {
                let _ = replies.send(Err(error));
            }
            Ok(Said::Exited { pid, status }) => {
                let mut exits = sp.exits.lock().expect("exits lock");
                // A status nobody asks for (a component that died before it was
                // watched) is dropped once the table is full.
                if exits.len() >= MAX_UNCLAIMED_EXITS {
                    exits.clear();
                }
                exits.insert(pid, status);
                drop(exits);
                sp.exited.notify_all();
            }
            Err(e) => tracing::warn!("the spawner said something unreadable: {e}"),
        }
    }
}

impl Spawner {
    /// Start `cmd` (program, arguments, environment changes and directory are taken
    /// from it) with `fds` at the given numbers; returns its pid.
    pub fn launch(&self, cmd: &Command, fds: &[(RawFd, i32)], log: &Path) -> std::io::Result<u32> {
        let text = |s: &OsStr| {
            s.to_str().map(str::to_owned).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{s:?} is not UTF-8"),
                )
            })
        };
        let launch = Launch {
            program: cmd.get_program().into(),
            args: cmd.get_args().map(text).collect::<Result<_, _>>()?,
            env: cmd
                .get_envs()
                .map(|(k, v)| Ok((text(k)?, v.map(text).transpose()?)))
                .collect::<std::io::Result<_>>()?,
            cwd: cmd.get_current_dir().map(Into::into),
            log: log.into(),
            fd_numbers: fds.iter().map(|&(_, n)| n).collect(),
            userns: Vec::new(),
        };
        self.ask(&launch, fds)
    }

    /// A user namespace with these maps (inside, host, count), opened and checked; the
    /// idle child the spawner made to hold it is killed once it is open.
    pub fn userns(&self, extents: &[(u32, u32, u32)]) -> std::io::Result<OwnedFd> {
        let launch = Launch {
            program: PathBuf::new(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            log: PathBuf::new(),
            fd_numbers: Vec::new(),
            userns: extents.to_vec(),
        };
        let pid = self.ask(&launch, &[])?;
        let ns = bulkhead_jail::idmap::userns_of_extents(pid, extents);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.exit_status(pid, Duration::from_secs(1));
        ns
    }

    fn ask(&self, launch: &Launch, fds: &[(RawFd, i32)]) -> std::io::Result<u32> {
        let body = serde_json::to_vec(&launch).map_err(std::io::Error::other)?;
        if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(std::io::Error::other("start request too large"));
        }
        let raw: Vec<RawFd> = fds.iter().map(|&(f, _)| f).collect();
        // One start at a time: the reply that comes next is this one's.
        let sock = self.sock.lock().expect("spawner lock");
        let replies = self.replies.lock().expect("replies lock");
        while replies.try_recv().is_ok() {} // a reply whose caller timed out
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&body)],
            if raw.is_empty() { &[] } else { &cmsg },
            MsgFlags::empty(),
            None,
        )?;
        match replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(pid)) => Ok(pid),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::other("the spawner did not answer")),
        }
    }

    /// The exit status of a process the spawner started, waiting up to `wait` for the
    /// spawner to report it (the process may have been seen gone a moment before).
    pub fn exit_status(&self, pid: u32, wait: Duration) -> Option<i32> {
        let exits = self.exits.lock().expect("exits lock");
        let (mut exits, _) = self
            .exited
            .wait_timeout_while(exits, wait, |e| !e.contains_key(&pid))
            .expect("exits lock");
        exits.remove(&pid)
    }
}

/// The spawner's whole life: answer starts, report exits, end with bulkheadd.
fn serve(sock: OwnedFd, allowed: &[PathBuf]) -> ! {
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, SPAWNER_NAME.as_ptr()) };
    // SIGCHLD arrives on a signalfd, so a child's exit wakes the same poll as a request.
    // SAFETY: plain signal-mask and signalfd calls on this (only) thread.
    let sigfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if sigfd < 0 {
        std::process::exit(1);
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two valid descriptors held for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            let mut info = [0u8; 128];
            // SAFETY: reading signalfd records into a buffer of the record size.
            while unsafe { libc::read(sigfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
            reap(&sock);
        }
        if fds[0].revents != 0 {
            match receive(&sock, &mut buf) {
                Ok(Some((launch, passed))) => {
                    let said = match run(launch, passed, allowed) {
                        Ok(pid) => Said::Started { pid },
                        Err(error) => Said::Failed { error },
                    };
                    tell(&sock, &said);
                }
                Ok(None) => std::process::exit(0),
                Err(error) => tell(&sock, &Said::Failed { error }),
            }
        }
    }
}

fn tell(sock: &OwnedFd, said: &Said) {
    let body = serde_json::to_vec(said).expect("serializable");
    let _ = nix::sys::socket::send(sock.as_raw_fd(), &body, MsgFlags::empty());
}

/// Reap every exited child and report each.
fn reap(sock: &OwnedFd) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid for any child, non-blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let status = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        tell(
            sock,
            &Said::Exited {
                pid: pid as u32,
                status,
            },
        );
    }
}

/// One request and its descriptors; `None` when bulkheadd has gone.
fn receive(sock: &OwnedFd, buf: &mut [u8]) -> Result<Option<(Launch, Vec<OwnedFd>)>, String> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| e.to_string())?;
    let mut passed = Vec::new();
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: descriptors the kernel just installed in this process for us.
            passed.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Ok(None);
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let launch: Launch = serde_json::from_slice(&iov[0][..n]).map_err(|e| e.to_string())?;
    if truncated || passed.len() != launch.fd_numbers.len() {
        return Err("a start request arrived cut short".into());
    }
    Ok(Some((launch, passed)))
}

/// Start one component: only a program on the list, in its own session, the passed
/// descriptors at their numbers, output to its log.
fn run(launch: Launch, passed: Vec<OwnedFd>, allowed: &[PathBuf]) -> Result<u32, String> {
    if !launch.userns.is_empty() {
        return bulkhead_jail::idmap::hold_userns(&launch.userns).map_err(|e| e.to_string());
    }
    if !allowed.contains(&launch.program) {
        return Err(format!(
            "{} is not one of the programs bulkheadd starts",
            launch.program.display()
        ));
    }
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args);
    for (k, v) in &launch.env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(d) = &launch.cwd {
        cmd.current_dir(d);
    }
    let moves: Vec<(RawFd, i32)> = passed
        .iter()
        .map(AsRawFd::as_raw_fd)
        .zip(launch.fd_numbers.iter().copied())
        .collect();
    crate::supervisor::prepare(&mut cmd, moves, &launch.log)
        .map_err(|e| format!("{}: {e}", launch.log.display()))?;
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    // Reaped by `reap` when SIGCHLD comes.
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A request as bulkheadd sends it, read by the spawner's side: the listed program
    /// starts with the passed pipe at fd 5 and exits with what it reads there; one not
    /// on the list is refused.
    #[test]
    fn a_request_and_its_descriptors_start_only_a_listed_program() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (rd, wr) = std::io::pipe().unwrap();
        let rd: OwnedFd = rd.into();
        let dir = std::env::temp_dir().join(format!("bh-spawner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let send = |program: &str| {
            let l = Launch {
                program: program.into(),
                args: vec![
                    "-c".into(),
                    "read x <&5; echo \"$GREETING\"; exit $x".into(),
                ],
                env: vec![("GREETING".into(), Some("hello".into()))],
                cwd: Some(dir.clone()),
                log: dir.join("log"),
                fd_numbers: vec![5],
                userns: vec![],
            };
            let body = serde_json::to_vec(&l).unwrap();
            let fds = [rd.as_raw_fd()];
            sendmsg::<()>(
                a.as_raw_fd(),
                &[IoSlice::new(&body)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        };
        let mut buf = vec![0u8; MAX_MESSAGE];
        let allowed = [PathBuf::from("/bin/sh")];

        send("/bin/bash");
        let (l, passed) = receive(&b, &mut buf).unwrap().unwrap();
        let e = run(l, passed, &allowed).unwrap_err();
        assert!(e.contains("not one of the programs"), "{e}");

        send("/bin/sh");
        let (l, passed) = receive(&b, &mut buf).unwrap().unwrap();
        assert_eq!(passed.len(), 1);
        let pid = run(l, passed, &allowed).unwrap();
        (&wr).write_all(b"7\n").unwrap();
        let mut status = 0;
        // SAFETY: waitpid on the child just started.
        assert_eq!(
            unsafe { libc::waitpid(pid as i32, &mut status, 0) },
            pid as i32
        );
        assert_eq!(libc::WEXITSTATUS(status), 7);
        assert_eq!(std::fs::read_to_string(dir.join("log")).unwrap(), "hello\n");

        // bulkheadd gone: the end of the socket.
        drop(a);
        assert!(receive(&b, &mut buf).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn messages_round_trip_and_stay_small() {
        let l = Launch {
            program: "/usr/bin/x".into(),
            args: vec!["--a".into(); 200],
            env: vec![("K".into(), Some("v".into())), ("R".into(), None)],
            cwd: None,
            log: "/tmp/l".into(),
            fd_numbers: vec![3, 4],
            userns: vec![],
        };
        let body = serde_json::to_vec(&l).unwrap();
        assert!(body.len() < MAX_MESSAGE);
        let back: Launch = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.args.len(), 200);
        assert_eq!(back.env[1], ("R".into(), None));
    }

    /// A request for a user namespace gets an idle holder with exactly those maps,
    /// whatever program it names, and the namespace is gone for nobody once it is open.
    #[test]
    fn a_userns_request_gets_a_holder_with_those_maps() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to write maps");
            return;
        }
        let extents = bulkhead_jail::idmap::layer_extents(1_999_300_000, 65536);
        let l = Launch {
            program: "/bin/not-allowed".into(),
            args: vec![],
            env: vec![],
            cwd: None,
            log: PathBuf::new(),
            fd_numbers: vec![],
            userns: extents.to_vec(),
        };
        let pid = run(l, Vec::new(), &[]).unwrap();
        let ns = bulkhead_jail::idmap::userns_of_extents(pid, &extents);
        let other = bulkhead_jail::idmap::userns_of(pid, 1_999_300_000, 65536);
        bulkhead_jail::idmap::release_holder(pid);
        assert!(ns.is_ok(), "{ns:?}");
        assert!(other.is_err(), "the layer's maps are not the plain range");
    }
}
