//! One connection's request loop.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bulkhead_protocol::{
    decode, encode, read_frame, write_frame, AgentError, FrameError, HealthInfo, Hello, HelloReply,
    Request, Response, MAX_READ, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::containers::Runtime;
use crate::sys;

#[derive(Clone)]
pub struct AgentState(Arc<Inner>);

struct Inner {
    boot: Instant,
    modules: sys::ModuleReport,
    /// Running as PID 1 in a guest: shutdown powers the machine off.
    pid1: bool,
    runtime: Arc<Runtime>,
}

impl AgentState {
    pub fn new(
        boot: Instant,
        modules: sys::ModuleReport,
        pid1: bool,
        runtime: Arc<Runtime>,
    ) -> Self {
        AgentState(Arc::new(Inner {
            boot,
            modules,
            pid1,
            runtime,
        }))
    }
}

/// A connection the agent serves: a unix stream (host mode) or a vsock stream.
pub trait Conn: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
}

impl Conn for std::fs::File {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::fs::File::try_clone(self)
    }
}

/// Host connections served at once unless the kernel command line sets
/// `bulkhead.agent_max_connections`. Every exec's and container's stdio stream is one,
/// so this is far above what a pod uses; it bounds the threads and descriptors a host
/// (or anything else that reaches the agent's port) can make the agent hold.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Counts the connections being served; one over the cap is refused at once.
pub struct ConnectionCap {
    open: AtomicUsize,
    max: usize,
}

/// A served connection's place under the cap, given back when it ends.
pub struct ConnectionSlot(Arc<ConnectionCap>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionCap {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionCap {
            open: AtomicUsize::new(0),
            max: max.max(1),
        })
    }

    /// A slot, or `None` when `max` connections are already being served.
    pub fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// Serve `conn` on a thread of its own if the cap allows; otherwise answer its
/// handshake with a refusal that says why (written at once: the socket's buffer is
/// empty) and close it, without a thread.
pub fn serve_capped<S: Conn>(mut conn: S, state: &AgentState, cap: &Arc<ConnectionCap>) {
    let Some(slot) = cap.admit() else {
        let reason = format!(
            "the agent is serving {} connections (its limit is {}); try again when one closes",
            cap.open(),
            cap.max
        );
        let _ = send(&mut conn, &HelloReply::Refused { reason });
        return;
    };
    let st = state.clone();
    crate::spawn("conn", move || {
        let _slot = slot;
        serve_connection(conn, &st);
    });
}

/// Serve one connection until the peer closes it, breaks framing, or turns it into a
/// stdio stream.
pub fn serve_connection<S: Conn>(mut conn: S, state: &AgentState) {
    // Handshake first; anything else closes the connection.
    let hello = match read_frame(&mut conn).and_then(|p| decode::<Hello>(&p)) {
        Ok(h) => h,
        Err(_) => return,
    };
    let reply = if hello.magic != Hello::MAGIC {
        HelloReply::Refused {
            reason: "bad magic".into(),
        }
    } else if hello.version < MIN_PROTOCOL_VERSION {
        HelloReply::Refused {
            reason: format!(
                "protocol {} is older than the oldest supported ({MIN_PROTOCOL_VERSION})",
                hello.version
            ),
        }
    } else {
        HelloReply::Accepted {
            version: hello.version.min(PROTOCOL_VERSION),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    };
    let refused = matches!(reply, HelloReply::Refused { .. });
    if send(&mut conn, &reply).is_err() || refused {
        return;
    }

    loop {
        let payload = match read_frame(&mut conn) {
            Ok(p) => p,
            // Oversized frame: the stream position is lost; say why and drop the connection.
            Err(FrameError::TooLarge(n)) => {
                let _ = send(
                    &mut conn,
                    &Response::Error(AgentError::Malformed(format!("frame of {n} bytes"))),
                );
                return;
            }
            Err(_) => return,
        };
        let req = match decode::<Request>(&payload) {
            Ok(req) => req,
            Err(e) => {
                if send(
                    &mut conn,
                    &Response::Error(AgentError::Malformed(e.to_string())),
                )
                .is_err()
                {
                    return;
                }
                continue;
            }
        };
        if let Request::AttachStdio {
            id,
            exec_id,
            stream,
        } = &req
        {
            // The connection becomes the stream: answer Ok on it, then copy bytes.
            let attached = conn
                .try_clone()
                .map_err(|e| AgentError::Io(e.to_string()))
                .and_then(|c| {
                    state
                        .0
                        .runtime
                        .attach(id, exec_id.as_deref(), *stream, c, |c| {
                            send(c, &Response::Ok).map_err(|e| std::io::Error::other(e.to_string()))
                        })
                });
            match attached {
                Ok(()) => return,
                Err(e) => {
                    if send(&mut conn, &Response::Error(e)).is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        let (resp, then_power_off) = handle(req, state);
        if send(&mut conn, &resp).is_err() {
            return;
        }
        if then_power_off {
            sys::power_off();
        }
    }
}

fn send<S: Write, T: serde::Serialize>(conn: &mut S, msg: &T) -> Result<(), FrameError> {
    write_frame(conn, &encode(msg)?)
}

fn handle(req: Request, state: &AgentState) -> (Response, bool) {
    let r = match req {
        Request::Health => Ok(Response::Health(HealthInfo {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            kernel_release: sys::kernel_release(),
            uptime_ms: sys::uptime_ms().unwrap_or(state.0.boot.elapsed().as_millis() as u64),
            modules_loaded: state.0.modules.loaded,
            modules_failed: state.0.modules.failed,
        })),
        Request::MountVirtiofs { tag, target } => {
            sys::mount_virtiofs(&tag, &target).map(|_| Response::Ok)
        }
        Request::ReadFile { path, offset, len } => {
            read_file(&path, offset, len).map(Response::Data)
        }
        Request::Shutdown => return (Response::Ok, state.0.pid1),
        Request::GuestDetails => Ok(Response::GuestDetails(sys::guest_details())),
        req => handle_container(req, &state.0.runtime),
    };
    (r.unwrap_or_else(Response::Error), false)
}

fn handle_container(req: Request, rt: &Runtime) -> Result<Response, AgentError> {
    let ok = |r: Result<(), AgentError>| r.map(|_| Response::Ok);
    match req {
        Request::CreateSandbox(cfg) => ok(rt.create_sandbox(cfg)),
        Request::DestroySandbox => ok(rt.destroy_sandbox()),
        Request::CreateContainer(c) => rt.create(c).map(|pid| Response::Created { pid }),
        Request::StartContainer { id } => ok(rt.start(&id)),
        Request::Exec(e) => rt.exec(e).map(|pid| Response::Created { pid }),
        Request::Signal {
            id,
            exec_id,
            signal,
            all,
        } => ok(rt.signal(&id, exec_id.as_deref(), signal, all)),
        Request::Wait { id, exec_id } => rt.wait(&id, exec_id.as_deref()).map(Response::Exited),
        Request::DeleteContainer { id, force } => ok(rt.delete(&id, force)),
        Request::Pause { id } => ok(rt.pause(&id)),
        Request::Resume { id } => ok(rt.resume(&id)),
        Request::Update { id, resources_json } => ok(rt.update(&id, &resources_json)),
        Request::ListProcesses { id } => rt.processes(&id).map(Response::Processes),
        Request::Stats { id } => rt.stats(&id).map(Response::Stats),
        Request::WaitOom => Ok(Response::Oom { id: rt.wait_oom() }),
        Request::ResizePty {
            id,
            exec_id,
            rows,
            cols,
        } => ok(rt.resize(&id, exec_id.as_deref(), rows, cols)),
        Request::CloseStdin { id, exec_id } => ok(rt.close_stdin(&id, exec_id.as_deref())),
        Request::SetTime { unix_nanos } => ok(rt.set_time(unix_nanos)),
        Request::ListContainers => Ok(Response::Containers(rt.list())),
        Request::UpdateNetwork { interfaces, routes } => {
            ok(crate::network::update(rt.in_guest(), &interfaces, &routes))
        }
        Request::ListInterfaces => crate::network::interfaces().map(Response::Interfaces),
        Request::ListRoutes => crate::network::routes().map(Response::Routes),
        // Handled by the caller.
        Request::Health
        | Request::MountVirtiofs { .. }
        | Request::ReadFile { .. }
        | Request::Shutdown
        | Request::GuestDetails
        | Request::AttachStdio { .. } => Err(AgentError::Malformed("misrouted request".into())),
    }
}

fn read_file(path: &str, offset: u64, len: u32) -> Result<Vec<u8>, AgentError> {
    if len > MAX_READ {
        return Err(AgentError::InvalidArgument(format!(
            "len {len} exceeds {MAX_READ}"
        )));
    }
    let mut f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AgentError::NotFound(path.into()),
        _ => AgentError::Io(format!("{path}: {e}")),
    })?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| AgentError::Io(format!("{path}: {e}")))?;
    let mut buf = Vec::with_capacity(len as usize);
    f.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(|e| AgentError::Io(format!("{path}: {e}")))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::client::AgentClient;
    use std::os::unix::net::UnixStream;

    fn agent() -> (UnixStream, std::thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let dir = std::env::temp_dir().join(format!("bh-agent-state-{}", std::process::id()));
        let reaper = std::sync::Arc::new(crate::reaper::Reaper::default());
        let rt = Runtime::new(dir, false, reaper);
        let st = AgentState::new(Instant::now(), sys::ModuleReport::default(), false, rt);
        let t = std::thread::spawn(move || serve_connection(b, &st));
        (a, t)
    }

    #[test]
    fn connections_past_the_cap_are_refused_with_a_reason_until_one_closes() {
        use bulkhead_protocol::client::ClientError;
        let dir = std::env::temp_dir().join(format!("bh-agent-cap-{}", std::process::id()));
        let reaper = std::sync::Arc::new(crate::reaper::Reaper::default());
        let st = AgentState::new(
            Instant::now(),
            sys::ModuleReport::default(),
            false,
            Runtime::new(dir, false, reaper),
        );
        let cap = ConnectionCap::new(2);
        let connect = || {
            let (a, b) = UnixStream::pair().unwrap();
            serve_capped(b, &st, &cap);
            AgentClient::handshake(a)
        };
        let mut first = connect().unwrap();
        let mut second = connect().unwrap();
        match connect() {
            Err(ClientError::Refused(reason)) => assert!(reason.contains("limit"), "{reason}"),
            other => panic!(
                "a third connection was served: {:?}",
                other.map(|c| c.version)
            ),
        }
        // The two admitted ones are still served.
        first.health().unwrap();
        second.health().unwrap();
        assert_eq!(cap.open(), 2);
        drop(first);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while cap.open() > 1 {
            assert!(
                Instant::now() < deadline,
                "the closed connection kept its slot"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        connect().unwrap().health().unwrap();
    }

    #[test]
    fn handshake_health_read_and_errors() {
        let (a, t) = agent();
        let mut c = AgentClient::handshake(a).unwrap();
        assert_eq!(c.version, PROTOCOL_VERSION);
        let h = c.health().unwrap();
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        assert!(!h.kernel_release.is_empty());

        let dir = std::env::temp_dir().join(format!("bh-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(c.read_file(f.to_str().unwrap(), 3, 4).unwrap(), b"3456");
        assert_eq!(c.read_file(f.to_str().unwrap(), 100, 4).unwrap(), b"");
        let e = c.read_file("/nonexistent/bulkhead", 0, 4).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let e = c
            .read_file(f.to_str().unwrap(), 0, MAX_READ + 1)
            .unwrap_err();
        assert!(e.to_string().contains("invalid argument"), "{e}");
        let d = c.guest_details().unwrap();
        assert!(d.cpus_online >= 1 && d.mem_total_kib > 0);
        // Shutdown outside PID 1 answers Ok and powers nothing off.
        c.expect_ok(&Request::Shutdown).unwrap();
        // Still serving afterwards.
        c.health().unwrap();
        drop(c);
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_frame_gets_typed_error_and_connection_lives() {
        let (mut a, t) = agent();
        write_frame(&mut a, &encode(&Hello::current()).unwrap()).unwrap();
        let _: HelloReply = decode(&read_frame(&mut a).unwrap()).unwrap();
        write_frame(&mut a, &[0xff, 0xff, 0xff]).unwrap();
        let r: Response = decode(&read_frame(&mut a).unwrap()).unwrap();
        assert!(matches!(r, Response::Error(AgentError::Malformed(_))));
        write_frame(&mut a, &encode(&Request::Health).unwrap()).unwrap();
        let r: Response = decode(&read_frame(&mut a).unwrap()).unwrap();
        assert!(matches!(r, Response::Health(_)));
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn oversized_frame_is_refused_and_connection_closed() {
        let (mut a, t) = agent();
        write_frame(&mut a, &encode(&Hello::current()).unwrap()).unwrap();
        let _: HelloReply = decode(&read_frame(&mut a).unwrap()).unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let r: Response = decode(&read_frame(&mut a).unwrap()).unwrap();
        assert!(matches!(r, Response::Error(AgentError::Malformed(_))));
        assert!(matches!(read_frame(&mut a), Err(FrameError::Closed)));
        t.join().unwrap();
    }

    #[test]
    fn bad_magic_and_old_version_are_refused() {
        for hello in [
            Hello {
                magic: *b"XXXX",
                version: PROTOCOL_VERSION,
            },
            Hello {
                magic: Hello::MAGIC,
                version: 0,
            },
        ] {
            let (mut a, t) = agent();
            write_frame(&mut a, &encode(&hello).unwrap()).unwrap();
            let r: HelloReply = decode(&read_frame(&mut a).unwrap()).unwrap();
            assert!(matches!(r, HelloReply::Refused { .. }));
            assert!(matches!(read_frame(&mut a), Err(FrameError::Closed)));
            t.join().unwrap();
        }
    }

    #[test]
    fn request_before_handshake_closes() {
        let (mut a, t) = agent();
        write_frame(&mut a, &encode(&Request::Health).unwrap()).unwrap();
        assert!(matches!(read_frame(&mut a), Err(FrameError::Closed)));
        t.join().unwrap();
    }
}
