//! bulkhead-agent: PID 1 inside a bulkhead guest.
//!
//! As PID 1 it mounts the pseudo file systems, loads the kernel modules the image builder
//! listed (in dependency order), reaps orphans and serves the agent protocol on vsock.
//! Outside a VM (`--listen-unix PATH`) it serves the same protocol on a unix socket.
//!
//! A panic in PID 1 is a kernel panic, so nothing on the request path unwraps input;
//! every request failure is a typed [`AgentError`] and the agent keeps serving.

mod cgroupfs;
mod containers;
mod network;
mod reaper;
mod serve;
mod stdio;
mod sys;
mod threads;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bulkhead_protocol::{AGENT_READY_VSOCK_PORT, AGENT_VSOCK_PORT};

/// Log a line. As PID 1 the kernel log is the one channel that always works (it reaches
/// the console even before user space has a usable tty); otherwise stderr. Never fails:
/// `eprintln!` panics on a write error, which in PID 1 is a kernel panic.
pub fn log(msg: &str) {
    use std::io::Write;
    let line = format!("bulkhead-agent: {msg}\n");
    if std::process::id() == 1 {
        if let Ok(mut k) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            if k.write_all(line.as_bytes()).is_ok() {
                return;
            }
        }
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Run `f` on a thread of its own ([`threads::spawn`]). `std::thread::spawn` panics when
/// the system cannot make a thread, and in PID 1 a panic is a kernel panic: here the work
/// is dropped and logged.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = threads::spawn(name, f) {
        log(&format!("cannot start {name} thread: {e}"));
    }
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// Start the reaper and the container runtime; a failure here leaves nothing to serve.
fn runtime(state_dir: PathBuf, in_guest: bool) -> Arc<containers::Runtime> {
    loop {
        match reaper::Reaper::start() {
            Ok(r) => return containers::Runtime::new(state_dir, in_guest, r),
            Err(e) => {
                log(&format!("cannot start the reaper: {e}; retrying"));
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--ns-holder") {
        sys::ns_holder(
            args.iter().any(|a| a == "--pid"),
            arg_value(&args, "--hostname"),
        );
    }
    sys::process_defaults();
    if args.iter().any(|a| a == "--listen-unix") {
        let Some(path) = arg_value(&args, "--listen-unix") else {
            log("--listen-unix needs a path");
            std::process::exit(2);
        };
        let state_dir =
            PathBuf::from(arg_value(&args, "--state-dir").unwrap_or("/run/bulkhead/agent"));
        // Orphans of our containers come back to us, as they would to PID 1 in a guest.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let _ = std::fs::remove_file(path);
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) => {
                log(&format!("cannot listen on {path}: {e}"));
                std::process::exit(1);
            }
        };
        let rt = runtime(state_dir, false);
        let state = serve::AgentState::new(Instant::now(), sys::ModuleReport::default(), false, rt);
        let cap = serve::ConnectionCap::new(
            arg_value(&args, "--max-connections")
                .and_then(|n| n.parse().ok())
                .unwrap_or(serve::DEFAULT_MAX_CONNECTIONS),
        );
        for conn in listener.incoming().flatten() {
            serve::serve_capped(conn, &state, &cap);
        }
        return;
    }

    let boot = Instant::now();
    let pid1 = std::process::id() == 1;
    if pid1 {
        sys::signal_boot_timer();
        if let Err(e) = sys::remount_root_for_pivot() {
            log(&format!(
                "cannot remount the root: {e}; containers cannot pivot_root"
            ));
        }
        sys::early_mounts();
        sys::enable_cgroup_controllers();
        // A panic must at least say where it happened before the kernel panics.
        std::panic::set_hook(Box::new(|info| log(&format!("panic: {info}"))));
    }
    let modules = sys::load_modules("/etc/bulkhead/modules");
    log(&format!(
        "loaded {} modules ({} failed) in {} ms",
        modules.loaded,
        modules.failed,
        boot.elapsed().as_millis()
    ));
    let port = sys::cmdline_param("bulkhead.agent_port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(AGENT_VSOCK_PORT);
    let rt = runtime(PathBuf::from("/run/bulkhead/agent"), pid1);
    let state = serve::AgentState::new(boot, modules, pid1, rt);
    let cap = serve::ConnectionCap::new(
        sys::cmdline_param("bulkhead.agent_max_connections")
            .and_then(|n| n.parse().ok())
            .unwrap_or(serve::DEFAULT_MAX_CONNECTIONS),
    );
    loop {
        match sys::VsockListener::bind(port) {
            Ok(l) => {
                log(&format!("listening on vsock port {port}"));
                // Tell the host it may connect now (see AGENT_READY_VSOCK_PORT). A host
                // without a listener there refuses; it then finds the agent by polling.
                spawn("ready", || {
                    if let Err(e) = sys::vsock_hello(AGENT_READY_VSOCK_PORT, b"ready\n") {
                        log(&format!("no host listener for the ready word: {e}"));
                    }
                });
                loop {
                    match l.accept() {
                        Ok(conn) => serve::serve_capped(conn, &state, &cap),
                        Err(e) => {
                            log(&format!("accept failed: {e}"));
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                    }
                }
            }
            Err(e) => {
                // Never exit as PID 1: retry (the vsock module may still be settling).
                log(&format!(
                    "cannot listen on vsock port {port}: {e}; retrying"
                ));
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
    }
}
