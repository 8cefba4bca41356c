//! Host-side client for the agent, over a hybrid vsock unix socket (the VMM's vsock
//! socket: connect, send `CONNECT <port>\n`, read `OK <hostport>\n`).
//!
//! Everything read from the agent is untrusted: frames are bounded by [`MAX_FRAME`] and
//! decoding failures are errors, never panics.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::net::{self, NetInterface, NetRoute};
use crate::{
    decode, encode, read_frame, write_frame, AgentError, ContainerInfo, ContainerStats,
    CreateContainer, ExecProcess, ExitStatus, FrameError, Hello, HelloReply, Request, Response,
    SandboxConfig, StdioStream, MIN_PROTOCOL_VERSION,
};

/// Most pids a [`Response::Processes`] answer may carry before the host calls it hostile.
pub const MAX_PIDS: usize = 65_536;

/// Where the agent listens, as seen from the host.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The agent's own unix socket (host mode, no VM).
    Unix(std::path::PathBuf),
    /// A guest port behind the VMM's hybrid vsock unix socket.
    HybridVsock {
        socket: std::path::PathBuf,
        port: u32,
    },
}

impl Endpoint {
    /// Open a raw stream to the agent (no handshake yet).
    pub fn connect(&self, timeout: Duration) -> Result<UnixStream, ClientError> {
        match self {
            Endpoint::Unix(path) => {
                connect_unix(path, timeout).map_err(|source| ClientError::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
            Endpoint::HybridVsock { socket, port } => {
                let s = connect_hybrid_vsock(socket, *port, timeout)?;
                // Waits (Wait, WaitOom) may be long: no read timeout once connected.
                s.set_read_timeout(None)
                    .map_err(|e| ClientError::Handshake(e.to_string()))?;
                Ok(s)
            }
        }
    }

    /// Connect and run the handshake. The handshake is bounded by `timeout` (a guest
    /// that accepts and never answers must not hang the caller); the read timeout is
    /// lifted only once the agent has answered, since waits may then be long.
    pub fn client(&self, timeout: Duration) -> Result<AgentClient<UnixStream>, ClientError> {
        let s = self.connect(timeout)?;
        s.set_read_timeout(Some(timeout))
            .and_then(|()| s.set_write_timeout(Some(timeout)))
            .map_err(|e| ClientError::Handshake(e.to_string()))?;
        let c = AgentClient::handshake(s)?;
        c.stream
            .set_read_timeout(None)
            .and_then(|()| c.stream.set_write_timeout(None))
            .map_err(|e| ClientError::Handshake(e.to_string()))?;
        Ok(c)
    }

    /// Open a connection carrying one stdio stream of a process.
    pub fn attach(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
        timeout: Duration,
    ) -> Result<UnixStream, ClientError> {
        let mut c = self.client(timeout)?;
        c.expect_ok(&Request::AttachStdio {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
            stream,
        })?;
        Ok(c.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("vsock handshake failed: {0}")]
    Handshake(String),
    #[error("agent refused the connection: {0}")]
    Refused(String),
    #[error("agent speaks protocol {0}, oldest supported is {MIN_PROTOCOL_VERSION}")]
    Version(u32),
    #[error("agent error: {0}")]
    Agent(#[from] AgentError),
    #[error("unexpected response: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Connect to the unix socket at `path`, giving up at `timeout`. A blocking connect
/// waits for as long as the listener's backlog stays full, which is as long as the
/// process behind it (a VMM's vsock back end a guest stalled) does not accept: here
/// the socket is non-blocking, and a full backlog (EAGAIN) is tried again until the
/// deadline.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        match s.connect(&addr) {
            Ok(()) => {
                s.set_nonblocking(false)?;
                return Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("its listener accepted nothing for {timeout:?} (backlog full)"),
                    ));
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Open a stream to `port` in the guest through the VMM's hybrid vsock socket, the
/// whole of it (the connect, the `CONNECT` line, its answer) within `timeout`.
pub fn connect_hybrid_vsock(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut s = connect_unix(socket, timeout).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    // What is left of the time (a zero timeout would mean none at all).
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))
        .and_then(|_| s.set_write_timeout(Some(left)))
        .map_err(|e| ClientError::Handshake(e.to_string()))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| ClientError::Handshake(e.to_string()))?;
    // Read the reply a byte at a time so nothing after the newline is consumed.
    let mut line = Vec::with_capacity(32);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {
                return Err(ClientError::Handshake(format!(
                    "connection closed (no listener on guest port {port}?)"
                )))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= 32 => {
                return Err(ClientError::Handshake("reply line too long".into()))
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Handshake(e.to_string())),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(ClientError::Handshake(format!("unexpected reply {line:?}")));
    }
    Ok(s)
}

impl AgentClient<UnixStream> {
    /// Bound every later read (a call whose answer should be quick, such as Health).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(t)
            .map_err(|e| ClientError::Handshake(e.to_string()))
    }
}

/// The agent's answer in `frame`; an [`Response::Error`] becomes [`ClientError::Agent`].
pub fn answer(frame: &[u8]) -> Result<Response, ClientError> {
    match decode(frame)? {
        Response::Error(e) => Err(ClientError::Agent(e.map_text(bounded_text))),
        r => Ok(r),
    }
}

/// The answer to a `Wait` (a process's exit), from its frame: for a caller that reads
/// the frame itself, without holding a thread while the process runs.
pub fn exit_of(frame: &[u8]) -> Result<ExitStatus, ClientError> {
    match answer(frame)? {
        Response::Exited(s) => Ok(s),
        other => Err(unexpected(&other)),
    }
}

/// The answer to a `WaitOom` (the container whose process the guest's OOM killer
/// killed), from its frame.
pub fn oom_of(frame: &[u8]) -> Result<String, ClientError> {
    match answer(frame)? {
        Response::Oom { id } if id.len() <= crate::MAX_ID_LEN => Ok(id),
        other => Err(unexpected(&other)),
    }
}

/// At most this much of an unexpected answer goes into an error message.
const SHOWN: usize = 200;

/// At most this much text from the guest (an error's message, a refusal's reason) is
/// kept in a [`ClientError`]: room for a container runtime's error, and no more of a
/// 1 MiB one that a hostile guest sends to fill the host's logs and D-Bus replies.
pub const GUEST_TEXT_MAX: usize = 4096;

/// `s` cut to [`GUEST_TEXT_MAX`] bytes (on a character boundary), saying how much went.
pub fn bounded_text(mut s: String) -> String {
    if s.len() <= GUEST_TEXT_MAX {
        return s;
    }
    let mut cut = GUEST_TEXT_MAX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!(" [{more} more bytes from the guest not shown]"));
    s
}

/// An error naming an answer the caller did not expect, shown in at most [`SHOWN`]
/// characters: the answer is the guest's, and a 1 MiB one must not become megabytes of
/// text in a log.
fn unexpected(r: &Response) -> ClientError {
    struct Bounded(String);
    impl std::fmt::Write for Bounded {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = SHOWN.saturating_sub(self.0.len());
            let cut = s.char_indices().nth(room).map_or(s.len(), |(i, _)| i);
            self.0.push_str(&s[..cut]);
            if cut < s.len() {
                return Err(std::fmt::Error);
            }
            Ok(())
        }
    }
    let mut b = Bounded(String::new());
    if std::fmt::Write::write_fmt(&mut b, format_args!("{r:?}")).is_err() {
        b.0.push_str("...");
    }
    ClientError::Unexpected(b.0)
}

/// One handshaken connection to the agent.
pub struct AgentClient<S: Read + Write> {
    stream: S,
    pub version: u32,
    pub agent_version: String,
}

impl<S: Read + Write> AgentClient<S> {
    /// Run the version handshake on an open stream.
    pub fn handshake(mut stream: S) -> Result<Self, ClientError> {
        // An agent at its connection limit answers before it reads and closes: our
        // Hello may then meet a closed socket, but its refusal is still there to read.
        let sent = write_frame(&mut stream, &encode(&Hello::current())?);
        let reply: HelloReply = match (sent, read_frame(&mut stream)) {
            (_, Ok(frame)) => decode(&frame)?,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e.into()),
        };
        match reply {
            HelloReply::Accepted {
                version,
                agent_version,
            } => {
                if version < MIN_PROTOCOL_VERSION {
                    return Err(ClientError::Version(version));
                }
                Ok(AgentClient {
                    stream,
                    version,
                    agent_version,
                })
            }
            HelloReply::Refused { reason } => Err(ClientError::Refused(bounded_text(reason))),
        }
    }

    /// Send a request and wait for its response. An [`Response::Error`] becomes
    /// [`ClientError::Agent`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        write_frame(&mut self.stream, &encode(req)?)?;
        answer(&read_frame(&mut self.stream)?)
    }

    pub fn health(&mut self) -> Result<crate::HealthInfo, ClientError> {
        match self.call(&Request::Health)? {
            Response::Health(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    pub fn guest_details(&mut self) -> Result<crate::GuestDetails, ClientError> {
        match self.call(&Request::GuestDetails)? {
            Response::GuestDetails(d) => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    pub fn read_file(&mut self, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::ReadFile {
            path: path.into(),
            offset,
            len,
        })? {
            Response::Data(d) if d.len() <= len as usize => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    pub fn expect_ok(&mut self, req: &Request) -> Result<(), ClientError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The underlying stream (to set a timeout on it, say).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream, for a connection that has become a stdio stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    pub fn create_sandbox(&mut self, cfg: SandboxConfig) -> Result<(), ClientError> {
        self.expect_ok(&Request::CreateSandbox(cfg))
    }

    /// Create a container; returns its init's guest pid.
    pub fn create_container(&mut self, c: CreateContainer) -> Result<u32, ClientError> {
        self.expect_created(&Request::CreateContainer(c))
    }

    pub fn start(&mut self, id: &str) -> Result<(), ClientError> {
        self.expect_ok(&Request::StartContainer { id: id.into() })
    }

    /// Start an extra process; returns its guest pid.
    pub fn exec(&mut self, e: ExecProcess) -> Result<u32, ClientError> {
        self.expect_created(&Request::Exec(e))
    }

    pub fn signal(
        &mut self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        self.expect_ok(&Request::Signal {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
            signal,
            all,
        })
    }

    /// Block until the process exits.
    pub fn wait(&mut self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus, ClientError> {
        write_frame(
            &mut self.stream,
            &encode(&Request::Wait {
                id: id.into(),
                exec_id: exec_id.map(Into::into),
            })?,
        )?;
        exit_of(&read_frame(&mut self.stream)?)
    }

    pub fn delete(&mut self, id: &str, force: bool) -> Result<(), ClientError> {
        self.expect_ok(&Request::DeleteContainer {
            id: id.into(),
            force,
        })
    }

    pub fn processes(&mut self, id: &str) -> Result<Vec<u32>, ClientError> {
        match self.call(&Request::ListProcesses { id: id.into() })? {
            Response::Processes(p) if p.len() <= MAX_PIDS => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    pub fn stats(&mut self, id: &str) -> Result<ContainerStats, ClientError> {
        match self.call(&Request::Stats { id: id.into() })? {
            Response::Stats(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Block until some container has an OOM kill; returns its id.
    pub fn wait_oom(&mut self) -> Result<String, ClientError> {
        write_frame(&mut self.stream, &encode(&Request::WaitOom)?)?;
        oom_of(&read_frame(&mut self.stream)?)
    }

    pub fn containers(&mut self) -> Result<Vec<ContainerInfo>, ClientError> {
        match self.call(&Request::ListContainers)? {
            Response::Containers(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Set the guest's interfaces and routes up (see [`Request::UpdateNetwork`]).
    pub fn update_network(
        &mut self,
        interfaces: Vec<NetInterface>,
        routes: Vec<NetRoute>,
    ) -> Result<(), ClientError> {
        self.expect_ok(&Request::UpdateNetwork { interfaces, routes })
    }

    /// The guest's interfaces. A guest answering with more than the protocol allows is
    /// refused rather than believed.
    pub fn interfaces(&mut self) -> Result<Vec<NetInterface>, ClientError> {
        match self.call(&Request::ListInterfaces)? {
            Response::Interfaces(v)
                if v.len() <= net::MAX_INTERFACES * 4
                    && v.iter()
                        .all(|i| i.addresses.len() <= net::MAX_ADDRESSES * 4) =>
            {
                Ok(v)
            }
            other => Err(unexpected(&other)),
        }
    }

    pub fn routes(&mut self) -> Result<Vec<NetRoute>, ClientError> {
        match self.call(&Request::ListRoutes)? {
            Response::Routes(v) if v.len() <= net::MAX_ROUTES * 4 => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    fn expect_created(&mut self, req: &Request) -> Result<u32, ClientError> {
        match self.call(req)? {
            Response::Created { pid } if pid > 0 => Ok(pid),
            other => Err(unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn a_listener_that_never_accepts_cannot_hang_the_connect() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = std::env::temp_dir().join(format!("bh-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        // A back end that stopped: it listens, with a backlog of one, and never accepts.
        let l = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        l.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        l.listen(1).unwrap();
        // Fill the backlog (a blocking connect would now wait for an accept).
        let mut held = vec![];
        for _ in 0..16 {
            let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            if s.connect(&SockAddr::unix(&path).unwrap()).is_err() {
                break;
            }
            held.push(s);
        }
        assert!(held.len() < 16, "the backlog never filled");
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = connect_hybrid_vsock(&p, 1024, Duration::from_millis(300));
            let _ = tx.send((r.map(|_| ()), t.elapsed()));
        });
        let (r, took) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("connect still blocked 10 s on a listener that never accepts");
        let e = r.expect_err("connected to a full backlog");
        assert!(e.to_string().contains("backlog full"), "{e}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_silent_agent_cannot_hang_the_handshake() {
        let dir = std::env::temp_dir().join(format!("bh-silent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Accepts, then says nothing.
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let (tx, rx) = std::sync::mpsc::channel();
        let ep = Endpoint::Unix(path);
        std::thread::spawn(move || {
            let _ = tx.send(ep.client(Duration::from_millis(200)).map(|_| ()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the handshake with a silent agent did not time out");
        assert!(r.is_err());
        drop(held.join());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_huge_unexpected_answer_makes_a_short_error() {
        let e = unexpected(&Response::Data(vec![7; 1 << 20]));
        let text = e.to_string();
        assert!(text.len() < SHOWN + 64, "{} bytes", text.len());
        assert!(
            text.starts_with("unexpected response: Data([7, 7"),
            "{text}"
        );
        assert!(text.ends_with("..."));
        let small = unexpected(&Response::Ok).to_string();
        assert_eq!(small, "unexpected response: Ok");
    }
    use std::os::unix::net::UnixListener;

    #[test]
    fn hybrid_handshake_and_refusal() {
        let dir = std::env::temp_dir().join(format!("bh-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            // First connection: accept. Second: garbage reply.
            let (s, _) = l.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            (&s).write_all(b"OK 1073741824\n").unwrap();
            let (mut s2, _) = l.accept().unwrap();
            s2.write_all(b"NOPE\n").unwrap();
        });
        connect_hybrid_vsock(&sock, 1024, Duration::from_secs(5)).unwrap();
        let e = connect_hybrid_vsock(&sock, 5, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ClientError::Handshake(_)), "{e}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
