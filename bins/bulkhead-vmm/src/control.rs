//! The VMM's control socket: newline-delimited JSON requests (state, info, memory, start,
//! balloon, pause, resume, shutdown) from bulkheadd, served from the event loop.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::VmConfig;
use crate::cpu::{self, RunState, VcpuControl};
use crate::exit::{ExitHandle, ExitReason};

/// Longest request line accepted; a longer one closes the connection.
const API_LINE_MAX: usize = 4096;

/// What a request may act on.
pub struct Target<'a> {
    pub control: &'a VcpuControl,
    pub vcpus: &'a [libc::pthread_t],
    pub exit: &'a ExitHandle,
    pub cfg: &'a VmConfig,
    pub memory: &'a crate::memory::MemoryReport,
    pub timeline: &'a crate::startup::Timeline,
    pub balloon: Option<&'a crate::virtio::balloon::BalloonControl>,
}

/// The listening socket and its open connections, each registered in the event loop's
/// epoll under its own token (all tokens are at or above `first_conn_token`).
pub struct ControlApi {
    listener: UnixListener,
    conns: HashMap<u32, (UnixStream, Vec<u8>)>,
    first_conn_token: u32,
    next_token: u32,
}

impl ControlApi {
    /// Bind `path` (replacing a stale socket) and register it in `epoll` as `token`.
    pub fn listen(
        path: &Path,
        epoll: &Epoll,
        token: u32,
        first_conn_token: u32,
    ) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(token)),
        )?;
        Ok(Self {
            listener,
            conns: HashMap::new(),
            first_conn_token,
            next_token: first_conn_token,
        })
    }

    /// Accept every pending connection.
    pub fn accept(&mut self, epoll: &Epoll) {
        while let Ok((s, _)) = self.listener.accept() {
            let tok = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(self.first_conn_token);
            if s.set_nonblocking(true).is_ok()
                && epoll
                    .ctl(
                        ControlOperation::Add,
                        s.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, u64::from(tok)),
                    )
                    .is_ok()
            {
                self.conns.insert(tok, (s, Vec::new()));
            }
        }
    }

    /// Serve what arrived on connection `tok`, closing it when the peer is done.
    pub fn readable(&mut self, tok: u32, epoll: &Arc<Epoll>, target: &Target<'_>) {
        let done = match self.conns.get_mut(&tok) {
            Some((s, buf)) => serve(s, buf, target),
            None => true,
        };
        if done {
            if let Some((s, _)) = self.conns.remove(&tok) {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    s.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }
}

/// Handle readable data on a control connection. Returns true when it should be closed.
fn serve(s: &mut UnixStream, buf: &mut Vec<u8>, target: &Target<'_>) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
        if buf.len() > API_LINE_MAX {
            let _ = s.write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n");
            return true;
        }
    }
    while let Some(end) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        let reply = request(&line, target);
        if s.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return true;
        }
    }
    false
}

fn request(line: &[u8], target: &Target<'_>) -> serde_json::Value {
    use serde_json::json;
    let (control, vcpus, exit, cfg) = (target.control, target.vcpus, target.exit, target.cfg);
    let req: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let state = |c: &VcpuControl| match c.state() {
        RunState::Running => "running",
        RunState::Paused => "paused",
    };
    match req.get("op").and_then(|o| o.as_str()) {
        Some("state") => json!({"ok": true, "state": state(control)}),
        Some("info") => {
            json!({"ok": true, "state": state(control), "cpus": cfg.cpus, "memory_mib": cfg.memory_mib,
                   "memory": target.memory})
        }
        Some("memory") => json!({"ok": true, "memory": target.memory}),
        Some("start") => json!({"ok": true, "phases": target.timeline.phases()}),
        Some("balloon") => match (target.balloon, req.get("target_mib")) {
            (None, _) => json!({"ok": false, "error": "this VM has no balloon (--balloon)"}),
            (Some(b), None) => json!({"ok": true, "balloon": b.status()}),
            (Some(b), Some(t)) => match t
                .as_u64()
                .ok_or_else(|| "target_mib: want a number of MiB".to_string())
                .and_then(|m| b.set_target(m))
            {
                Ok(()) => json!({"ok": true, "balloon": b.status()}),
                Err(e) => json!({"ok": false, "error": e}),
            },
        },
        Some("pause") => {
            if control.state() == RunState::Paused {
                return json!({"ok": true, "state": "paused"});
            }
            control.set(RunState::Paused);
            for t in vcpus {
                // SAFETY: t is a live vCPU thread (they run until process exit).
                unsafe { libc::pthread_kill(*t, cpu::kick_signal()) };
            }
            if control.wait_parked(vcpus.len(), Duration::from_secs(2)) {
                json!({"ok": true, "state": "paused"})
            } else {
                control.set(RunState::Running);
                json!({"ok": false, "error": "vCPUs did not stop within 2 s; still running"})
            }
        }
        Some("resume") => {
            control.set(RunState::Running);
            json!({"ok": true, "state": "running"})
        }
        Some("shutdown") => {
            exit.request(ExitReason::Stopped);
            json!({"ok": true, "state": "stopping"})
        }
        Some(other) => json!({"ok": false, "error": format!("unknown op {other:?}")}),
        None => json!({"ok": false, "error": "missing \"op\""}),
    }
}
