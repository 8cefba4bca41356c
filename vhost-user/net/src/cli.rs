//! The `bulkhead-net` command line: serve the tap on descriptor `--tap-fd` to the
//! front end listening on `--socket` (QEMU or bulkhead-vmm), connecting as the client so
//! that a restarted back end is back as soon as it starts.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::NetBackend;
use crate::Counters;

const USAGE: &str = "usage: bulkhead-net --socket PATH --tap-fd N [--dbus-socket PATH] \
                     [--connect-timeout-ms MS] [--seccomp kill|log|off]";

/// bulkhead-net's seccomp policy (seccomp/x86_64.json), compiled by build.rs: one list
/// for every thread, installed on all of them once set-up is done.
static SECCOMP: bulkhead_seccomp::Programs =
    bulkhead_seccomp::Programs(include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs")));

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    dbus_socket: Option<PathBuf>,
    tap_fd: i32,
    connect_timeout: Duration,
    seccomp: bulkhead_seccomp::Mode,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut socket, mut tap_fd, mut timeout) = (None, None, Duration::from_secs(30));
    let mut dbus_socket = None;
    let mut seccomp = bulkhead_seccomp::Mode::default();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--dbus-socket" => dbus_socket = Some(PathBuf::from(val()?)),
            "--tap-fd" => {
                let v = val()?;
                let fd: i32 = v.parse().map_err(|_| format!("--tap-fd {v:?}"))?;
                if fd < 3 {
                    return Err(format!("--tap-fd {fd}: want a descriptor above stdio"));
                }
                tap_fd = Some(fd);
            }
            "--connect-timeout-ms" => {
                let v = val()?;
                timeout = Duration::from_millis(
                    v.parse()
                        .map_err(|_| format!("--connect-timeout-ms {v:?}"))?,
                );
            }
            "--seccomp" => seccomp = val()?.parse()?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        socket: socket.ok_or_else(|| format!("--socket is required\n{USAGE}"))?,
        dbus_socket,
        tap_fd: tap_fd.ok_or_else(|| format!("--tap-fd is required\n{USAGE}"))?,
        connect_timeout: timeout,
        seccomp,
    })
}

pub fn main() -> ExitCode {
    bulkhead_host::logging::component_main("bulkhead-net", "info", parse, run)
}

fn run(args: Args) -> anyhow::Result<()> {
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
    if unsafe { libc::fcntl(args.tap_fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("--tap-fd {}: not an open descriptor", args.tap_fd);
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process to own.
    let tap = unsafe { File::from_raw_fd(args.tap_fd) };
    let counters = Arc::new(Counters::default());
    let connected = Arc::new(AtomicBool::new(false));
    if let Some(p) = &args.dbus_socket {
        let (counters, connected, started) = (counters.clone(), connected.clone(), Instant::now());
        crate::dbus::serve(p, move || crate::dbus::Net1 {
            counters: counters.clone(),
            connected: connected.clone(),
            started,
        })?;
    }
    let backend = NetBackend::new(tap, counters.clone())?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("bulkhead-net".into(), backend.clone(), mem)
        .map_err(|e| anyhow::anyhow!("vhost-user daemon: {e}"))?;
    let handler = daemon
        .get_epoll_handlers()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no worker thread"))?;
    backend.set_handler(handler);
    let t0 = Instant::now();
    let front = loop {
        match UnixStream::connect(&args.socket) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() < args.connect_timeout => {
                tracing::trace!("connect {}: {e}", args.socket.display());
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => anyhow::bail!("cannot connect to {}: {e}", args.socket.display()),
        }
    };
    tracing::info!(
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "connected to the front end at {}",
        args.socket.display()
    );
    // The daemon talks to the relay over a private abstract socket; the relay talks to
    // the front end (see `relay`).
    let name = format!("bulkhead-net.{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let back = UnixStream::connect_addr(&addr)?;
    daemon
        .start(&mut Listener::from(listener))
        .map_err(|e| anyhow::anyhow!("vhost-user daemon: {e}"))?;
    connected.store(true, Ordering::Relaxed);
    let relay = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || crate::relay::run(front, back))?;
    // Every thread is up (D-Bus, the daemon's, the relay): from here the allow list
    // holds for all of them, before a frame from the guest is read.
    SECCOMP
        .install("net", args.seccomp, true)
        .map_err(|e| anyhow::anyhow!(e))?;
    // Runs until the front end hangs up (the VM is gone or is shutting down).
    let end = daemon.wait();
    connected.store(false, Ordering::Relaxed);
    crate::backend::request_exit(&backend);
    let relayed = relay.join();
    tracing::info!(counters = ?counters.values(), "front end gone: {end:?} / relay: {relayed:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_kills_what_a_net_back_end_never_does() {
        use bulkhead_seccomp::testing::{killed_by, Call};
        assert_eq!(killed_by(&SECCOMP, "net", Call::Getpid), None);
        for call in [Call::Execve, Call::OpenHostPath, Call::Socket, Call::Ptrace] {
            assert_eq!(
                killed_by(&SECCOMP, "net", call),
                Some(libc::SIGSYS),
                "{call:?} got through"
            );
        }
        // It serves a tap it was handed: offloads only, never a new tap.
        use bulkhead_seccomp::testing::{assert_ioctls, FIONBIO, TUNSETOFFLOAD};
        assert_ioctls(&SECCOMP, "net", &[FIONBIO, TUNSETOFFLOAD]);
        bulkhead_seccomp::testing::assert_no_new_code(&SECCOMP, "net");
    }

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let a = args(&["--socket", "/run/x.sock", "--tap-fd", "3"]).unwrap();
        assert_eq!(a.seccomp, bulkhead_seccomp::Mode::Kill);
        assert!(args(&["--socket", "/x", "--tap-fd", "3", "--seccomp", "no"]).is_err());
        assert_eq!((a.socket.to_str(), a.tap_fd), (Some("/run/x.sock"), 3));
        assert!(args(&["--socket", "/x"]).unwrap_err().contains("--tap-fd"));
        assert!(args(&["--socket", "/x", "--tap-fd", "1"]).is_err());
        assert!(args(&["--socket", "/x", "--tap-fd", "x"]).is_err());
        assert!(args(&["--bogus"]).unwrap_err().contains("unknown"));
        assert!(args(&["--tap-fd"]).unwrap_err().contains("needs a value"));
        let a = args(&["--socket", "/s", "--tap-fd", "4", "--dbus-socket", "/d"]).unwrap();
        assert_eq!(a.dbus_socket.as_deref(), Some(std::path::Path::new("/d")));
    }
}
