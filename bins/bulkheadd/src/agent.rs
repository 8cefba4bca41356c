//! Calls to a sandbox's guest agent, over the hybrid vsock socket. The agent client is
//! blocking; each call runs on tokio's blocking pool on a connection of its own, so a
//! slow guest holds up only its own call. Everything the guest answers is bounded by
//! the protocol crate (frame limits, typed decoding).
//!
//! A guest may also answer nothing. Every call but the waits for an exit has a deadline
//! by its [`Call`] kind (`agent.*_timeout_s` in the configuration): at the deadline its
//! connection is shut, which frees the thread, and the sandbox is marked unhealthy
//! ([`Agent::health`]) until the agent answers again. At most `agent.max_in_flight`
//! calls wait on one sandbox's agent; the next is refused at once. Once the sandbox is
//! unhealthy, one call at a time tries the agent, and the others are refused at once
//! until it answers: a guest that stopped answering while callers keep polling it
//! (kubelet's stats, an exporter, any local user) holds one of bulkheadd's threads,
//! not `max_in_flight`, so even hundreds of such guests leave the pool to the others.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_dbus::Error;
use bulkhead_host::config::AgentConfig;
use bulkhead_protocol::client::{AgentClient, ClientError, Endpoint};
use bulkhead_protocol::{
    encode, write_frame, AgentError, Request, AGENT_READY_VSOCK_PORT, AGENT_VSOCK_PORT,
};

/// How long to wait for the vsock connection and handshake on a live guest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a call does, which sets its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// A read or a signal, answered at once by a live agent.
    Read,
    /// A change to a container (create, start, exec, update, pause, delete).
    Change,
}

#[derive(Debug, Clone)]
pub struct Agent {
    endpoint: Endpoint,
    limits: AgentConfig,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The one call that may try an unhealthy agent.
    probe: Arc<tokio::sync::Semaphore>,
    health: Arc<tokio::sync::watch::Sender<bool>>,
}

pub fn to_dbus(e: ClientError) -> Error {
    match e {
        ClientError::Agent(a) => match a {
            AgentError::NotFound(m) => Error::NotFound(m),
            AgentError::AlreadyExists(m) => Error::AlreadyExists(m),
            AgentError::InvalidArgument(m) | AgentError::Malformed(m) => Error::InvalidArgument(m),
            AgentError::FailedPrecondition(m) => Error::FailedPrecondition(m),
            other => Error::Agent(other.to_string()),
        },
        other => Error::Agent(format!("guest agent unreachable: {other}")),
    }
}

impl Agent {
    pub fn new(vsock_socket: PathBuf, limits: AgentConfig) -> Agent {
        Agent::on(
            Endpoint::HybridVsock {
                socket: vsock_socket,
                port: AGENT_VSOCK_PORT,
            },
            limits,
        )
    }

    fn on(endpoint: Endpoint, limits: AgentConfig) -> Agent {
        Agent {
            endpoint,
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight as usize)),
            probe: Arc::new(tokio::sync::Semaphore::new(1)),
            limits,
            health: Arc::new(tokio::sync::watch::channel(true).0),
        }
    }

    /// Whether the agent answered its last call in time; changes are sent as they happen.
    pub fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.subscribe()
    }

    fn deadline(&self, kind: Call) -> Duration {
        Duration::from_secs(match kind {
            Call::Read => self.limits.read_timeout_s,
            Call::Change => self.limits.change_timeout_s,
        })
    }

    /// Run `f` on a fresh handshaken connection, on the blocking pool, within the
    /// deadline of `kind`.
    pub async fn call<T, F>(&self, kind: Call, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut AgentClient<UnixStream>) -> Result<T, ClientError> + Send + 'static,
    {
        let probe = if *self.health.borrow() {
            None
        } else {
            Some(self.probe.clone().try_acquire_owned().map_err(|_| {
                Error::Agent(
                    "the guest agent missed its last deadline (the sandbox is unhealthy): \
                     one call at a time tries it until it answers, and one is under way"
                        .into(),
                )
            })?)
        };
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Error::Agent(format!(
                "the guest agent has {} calls in flight (agent.max_in_flight): it is slow \
                 or not answering",
                self.limits.max_in_flight
            ))
        })?;
        let d = self.deadline(kind);
        let ep = self.endpoint.clone();
        // The call's connection, kept here so that a call past its deadline can be shut
        // from outside, which ends the blocked read and frees the thread.
        let conn: Arc<std::sync::Mutex<Option<UnixStream>>> = Arc::default();
        let slot = conn.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permits = (permit, probe);
            let mut c = ep.client(d.min(CONNECT_TIMEOUT))?;
            // A backstop a second past the deadline: the deadline below is what ends the
            // call (and says so), this only bounds the thread should that fail.
            let backstop = d + Duration::from_secs(1);
            c.set_read_timeout(Some(backstop))?;
            c.get_ref()
                .set_write_timeout(Some(backstop))
                .map_err(|e| ClientError::Handshake(e.to_string()))?;
            if let Ok(s) = c.get_ref().try_clone() {
                *slot.lock().expect("conn lock") = Some(s);
            }
            f(&mut c)
        });
        let joined = match tokio::time::timeout(d, task).await {
            Ok(j) => j,
            Err(_) => {
                if let Some(s) = conn.lock().expect("conn lock").take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                self.health
                    .send_if_modified(|h| std::mem::replace(h, false));
                return Err(Error::Agent(format!(
                    "the guest agent did not answer within {d:?} (agent.{}_timeout_s); the \
                     sandbox is marked unhealthy",
                    if kind == Call::Read { "read" } else { "change" }
                )));
            }
        };
        let r = joined.map_err(|e| Error::Failed(format!("agent call task: {e}")))?;
        // An answer, even a refusal, is a live agent; no answer (a socket timeout, a
        // connection that broke or never came) is not.
        let answered = match &r {
            Ok(_) => true,
            Err(
                ClientError::Connect { .. } | ClientError::Handshake(_) | ClientError::Frame(_),
            ) => false,
            Err(_) => true,
        };
        self.health
            .send_if_modified(|h| std::mem::replace(h, answered) != answered);
        r.map_err(to_dbus)
    }

    /// Send `req` on a connection of its own and await its one answer, however long the
    /// process it waits for runs, without holding a thread: the connection and its
    /// handshake on the blocking pool (bounded by the connect timeout), the answer read
    /// on the runtime. For waits, which have no deadline and are not counted against
    /// `agent.max_in_flight` (bulkheadd makes one per container and one per sandbox).
    async fn wait_frame(&self, req: Request) -> Result<Vec<u8>, ClientError> {
        use tokio::io::AsyncReadExt;
        let ep = self.endpoint.clone();
        let std_stream = tokio::task::spawn_blocking(move || {
            let c = ep.client(CONNECT_TIMEOUT)?;
            let mut s = c
                .get_ref()
                .try_clone()
                .map_err(|e| ClientError::Handshake(e.to_string()))?;
            write_frame(&mut s, &encode(&req)?)?;
            Ok::<_, ClientError>(c.into_inner())
        })
        .await
        .map_err(|e| ClientError::Handshake(format!("agent call task: {e}")))??;
        let io = |e: std::io::Error| ClientError::Frame(e.into());
        std_stream.set_nonblocking(true).map_err(io)?;
        let mut s = tokio::net::UnixStream::from_std(std_stream).map_err(io)?;
        let mut prefix = [0u8; 4];
        s.read_exact(&mut prefix).await.map_err(io)?;
        let mut frame = vec![0u8; bulkhead_protocol::payload_len(prefix)?];
        s.read_exact(&mut frame).await.map_err(io)?;
        Ok(frame)
    }

    /// The exit of a container's init or of an exec'd process, when it comes.
    pub async fn wait_exit(
        &self,
        id: String,
        exec_id: Option<String>,
    ) -> Result<bulkhead_protocol::ExitStatus, Error> {
        let frame = self
            .wait_frame(Request::Wait { id, exec_id })
            .await
            .map_err(to_dbus)?;
        bulkhead_protocol::client::exit_of(&frame).map_err(to_dbus)
    }

    /// The next container whose process the guest's OOM killer killed.
    pub async fn wait_oom(&self) -> Result<String, Error> {
        let frame = self.wait_frame(Request::WaitOom).await.map_err(to_dbus)?;
        bulkhead_protocol::client::oom_of(&frame).map_err(to_dbus)
    }

    pub async fn request(&self, kind: Call, req: Request) -> Result<(), Error> {
        self.call(kind, move |c| c.expect_ok(&req)).await
    }

    /// Wait for the agent's ready word on `ready` (see [`ready_listener`]), then poll
    /// until it answers a health request; an error when `gone()` says the VM died or
    /// `timeout` passes. Without a ready word within half the timeout (a guest image
    /// whose agent predates it), polling starts anyway.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        ready: Option<ReadyListener>,
        gone: impl Fn() -> Option<String>,
    ) -> Result<(), Error> {
        let start = Instant::now();
        if let Some(l) = ready {
            loop {
                tokio::select! {
                    r = l.listener.accept() => if r.is_ok() { break },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if let Some(why) = gone() {
                    return Err(Error::Backend(why));
                }
                if start.elapsed() > timeout / 2 {
                    tracing::warn!(
                        "no ready word from the guest agent in {:?}: polling for it",
                        timeout / 2
                    );
                    break;
                }
            }
        }
        loop {
            let ep = self.endpoint.clone();
            let r = tokio::task::spawn_blocking(move || {
                // Bounded throughout: a guest that accepts and never answers is tried
                // again, not waited on forever.
                let t = Duration::from_secs(2);
                ep.client(t).and_then(|mut c| {
                    c.set_read_timeout(Some(t))?;
                    c.health()
                })
            })
            .await;
            match r {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if start.elapsed() > timeout => {
                    return Err(Error::Backend(format!(
                        "the guest agent did not answer within {timeout:?}: {e}"
                    )))
                }
                _ => {}
            }
            if let Some(why) = gone() {
                return Err(Error::Backend(why));
            }
            // Each try costs a connection and a thread hop: 20 ms keeps the manager's CPU
            // per sandbox low, at most 20 ms later than the agent could have answered.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connection turned into one stdio stream of a process.
    pub async fn attach_stdio(
        &self,
        id: String,
        exec_id: Option<String>,
        stream: bulkhead_protocol::StdioStream,
    ) -> Result<UnixStream, Error> {
        let ep = self.endpoint.clone();
        tokio::task::spawn_blocking(move || {
            ep.attach(&id, exec_id.as_deref(), stream, CONNECT_TIMEOUT)
        })
        .await
        .map_err(|e| Error::Failed(format!("agent call task: {e}")))?
        .map_err(to_dbus)
    }

    /// A connection with a `Wait` request sent and its answer not yet read: whoever holds
    /// it reads one frame when the process exits.
    pub async fn wait_stream(
        &self,
        id: String,
        exec_id: Option<String>,
    ) -> Result<UnixStream, Error> {
        self.call(Call::Read, move |c| {
            let req = Request::Wait { id, exec_id };
            let mut s = c
                .get_ref()
                .try_clone()
                .map_err(|e| ClientError::Handshake(e.to_string()))?;
            write_frame(&mut s, &encode(&req)?)?;
            // The answer comes when the process exits: no deadline on the stream handed
            // out (its socket is the call's, which has one).
            s.set_read_timeout(None)
                .and_then(|()| s.set_write_timeout(None))
                .map_err(|e| ClientError::Handshake(e.to_string()))?;
            Ok(s)
        })
        .await
    }
}

/// Where the agent's ready word arrives; the socket file goes when this is dropped.
pub struct ReadyListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen where the agent's ready word arrives: `<vsock socket>_<port>`, the hybrid
/// vsock path of host port [`AGENT_READY_VSOCK_PORT`], owned by the sandbox's jail uid so
/// the jailed VMM or vhost-device-vsock may connect to it.
pub fn ready_listener(
    vsock_socket: &Path,
    jail_uid: Option<u32>,
) -> std::io::Result<ReadyListener> {
    let path = PathBuf::from(format!(
        "{}_{AGENT_READY_VSOCK_PORT}",
        vsock_socket.display()
    ));
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path)?;
    if let Some(uid) = jail_uid {
        std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
    }
    l.set_nonblocking(true)?;
    Ok(ReadyListener {
        listener: tokio::net::UnixListener::from_std(l)?,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's side of the handshake: read the Hello, accept it.
    fn accept_hello(s: &mut UnixStream) {
        use bulkhead_protocol::{read_frame, HelloReply, PROTOCOL_VERSION};
        let _ = read_frame(s);
        let reply = HelloReply::Accepted {
            version: PROTOCOL_VERSION,
            agent_version: "test".into(),
        };
        let _ = write_frame(s, &encode(&reply).unwrap());
    }

    /// An agent that answers the handshake of every connection and then nothing: the
    /// guest of a hostile or wedged VM. Returns how many connections it took.
    fn silent_agent(path: &Path) -> Arc<std::sync::atomic::AtomicUsize> {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = taken.clone();
        std::thread::spawn(move || {
            let mut held = vec![];
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                accept_hello(&mut s);
                held.push(s);
            }
        });
        taken
    }

    /// An agent that answers every request but the waits with an error (an answer all
    /// the same) at once, and never answers a wait: processes that run for ever.
    fn agent_of_long_runners(path: &Path) {
        use bulkhead_protocol::{decode, read_frame, Response};
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    accept_hello(&mut s);
                    while let Ok(f) = read_frame(&mut s) {
                        match decode::<Request>(&f) {
                            Ok(Request::Wait { .. } | Request::WaitOom) => {
                                // Held until the test ends.
                                std::thread::sleep(Duration::from_secs(3600));
                            }
                            _ => {
                                let no = Response::Error(AgentError::NotFound("no such".into()));
                                let _ = write_frame(&mut s, &encode(&no).unwrap());
                            }
                        }
                    }
                });
            }
        });
    }

    /// Waits for exits hold no thread of the blocking pool while the processes run: with
    /// a pool of 4 threads and 16 waits pending, a call still gets a thread and its
    /// answer at once.
    #[test]
    fn waits_hold_no_thread_while_they_wait() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(4)
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("agent.sock");
            agent_of_long_runners(&sock);
            let agent = Agent::on(Endpoint::Unix(sock), limits(4));
            let waits: Vec<_> = (0..16)
                .map(|i| {
                    let a = agent.clone();
                    tokio::spawn(async move { a.wait_exit(format!("c{i}"), None).await })
                })
                .collect();
            // Let every wait connect and send its request.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t0 = Instant::now();
            let e = agent
                .call(Call::Read, |c| c.stats("c1"))
                .await
                .expect_err("the fake agent answers with an error");
            assert!(
                e.to_string().contains("no such"),
                "the call got no answer beside 16 waits: {e}"
            );
            // Had the waits held the pool's threads, the call would have had none and
            // failed at its 1 s deadline instead of getting the agent's answer.
            assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
            assert!(waits.iter().all(|w| !w.is_finished()));
            for w in waits {
                w.abort();
            }
        });
    }

    fn limits(max_in_flight: u32) -> AgentConfig {
        AgentConfig {
            read_timeout_s: 1,
            change_timeout_s: 2,
            max_in_flight,
        }
    }

    /// A guest that answers Hello and then never answers a read: the call fails at its
    /// deadline, its thread is freed, and the sandbox is unhealthy until an answer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_agent_fails_calls_at_their_deadline_and_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        silent_agent(&sock);
        let agent = Agent::on(Endpoint::Unix(sock), limits(4));
        let health = agent.health();
        assert!(*health.borrow());
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            agent.call(Call::Read, |c| c.stats("c1")),
        )
        .await
        .expect("a read call to a silent agent must end at its deadline, not hang");
        let took = t0.elapsed();
        let e = r.expect_err("a silent agent answered?");
        assert!(e.to_string().contains("did not answer within"), "{e}");
        assert!(took < Duration::from_secs(5), "ended after {took:?}");
        assert!(!*health.borrow(), "not marked unhealthy");
        // Its thread is freed (its connection was shut) and its permit comes back with
        // it: four calls may wait at once again.
        let freed = Instant::now();
        while agent.in_flight.available_permits() < 4 {
            assert!(
                freed.elapsed() < Duration::from_millis(900),
                "the late call still holds its thread"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Unhealthy, it gets one call at a time: of four at once, one tries it (and
        // ends at its deadline), three are refused at once.
        let t1 = Instant::now();
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let a = agent.clone();
                tokio::spawn(async move {
                    let r = a.call(Call::Read, |c| c.stats("c1")).await;
                    (r, t1.elapsed())
                })
            })
            .collect();
        let mut late = 0;
        for c in calls {
            let (r, took) = c.await.unwrap();
            let e = r.unwrap_err().to_string();
            if e.contains("did not answer within") {
                late += 1;
            } else {
                assert!(e.contains("one call at a time"), "{e}");
                assert!(took < Duration::from_millis(500), "refused after {took:?}");
            }
        }
        assert_eq!(late, 1, "calls that tried the unhealthy agent");
    }

    /// An agent that is silent on its first connection and answers every later one (with
    /// an error: an answer all the same).
    fn agent_silent_once(path: &Path) {
        use bulkhead_protocol::{read_frame, Response};
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut held = vec![];
            for (n, s) in l.incoming().enumerate() {
                let Ok(mut s) = s else { return };
                accept_hello(&mut s);
                if n == 0 {
                    held.push(s);
                    continue;
                }
                if read_frame(&mut s).is_ok() {
                    let no = Response::Error(AgentError::NotFound("no such".into()));
                    let _ = write_frame(&mut s, &encode(&no).unwrap());
                }
            }
        });
    }

    /// A sandbox marked unhealthy is healthy again at its agent's next answer, and the
    /// change is sent to whoever watches.
    #[tokio::test(flavor = "current_thread")]
    async fn an_agent_that_answers_again_is_healthy_again() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        agent_silent_once(&sock);
        let agent = Agent::on(Endpoint::Unix(sock), limits(4));
        let mut health = agent.health();
        let e = agent.call(Call::Read, |c| c.stats("c1")).await.unwrap_err();
        assert!(e.to_string().contains("did not answer within"), "{e}");
        assert!(health.has_changed().unwrap());
        assert!(!*health.borrow_and_update());
        let e = agent.call(Call::Read, |c| c.stats("c1")).await.unwrap_err();
        assert!(e.to_string().contains("no such"), "{e}");
        assert!(health.has_changed().unwrap());
        assert!(*health.borrow_and_update());
    }

    /// Calls beyond `max_in_flight` to one sandbox are refused at once, not queued.
    #[tokio::test(flavor = "current_thread")]
    async fn calls_beyond_the_cap_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let taken = silent_agent(&sock);
        let agent = Agent::on(Endpoint::Unix(sock), limits(3));
        let mut pending = vec![];
        for _ in 0..3 {
            let a = agent.clone();
            pending.push(tokio::spawn(async move {
                a.call(Call::Change, |c| c.stats("c1")).await
            }));
        }
        // Let the three take their permits.
        while taken.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        for _ in 0..100 {
            let e = agent
                .call(Call::Read, |c| c.stats("c1"))
                .await
                .expect_err("a call beyond the cap went through");
            assert!(e.to_string().contains("calls in flight"), "{e}");
        }
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "refusals waited"
        );
        for p in pending {
            assert!(p.await.unwrap().is_err());
        }
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    /// No connection reaches the agent's socket before the guest's ready word: one made
    /// while vhost-device-vsock is being started can stop its worker for good.
    #[tokio::test(flavor = "current_thread")]
    async fn no_connection_before_the_ready_word() {
        let dir = std::env::temp_dir().join(format!("bh-ready-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let vsock = dir.join("vsock.sock");
        // The agent's side of hybrid vsock: counts connections, answers none.
        let agent_side = std::os::unix::net::UnixListener::bind(&vsock).unwrap();
        agent_side.set_nonblocking(true).unwrap();
        let ready = ready_listener(&vsock, None).unwrap();
        let ready_path = format!("{}_{AGENT_READY_VSOCK_PORT}", vsock.display());
        let t0 = Instant::now();
        let word_at = Duration::from_millis(600);
        let rp = ready_path.clone();
        let guest = std::thread::spawn(move || {
            std::thread::sleep(word_at);
            let mut s = UnixStream::connect(&rp).unwrap();
            // The manager takes the connection itself as the word and may close it
            // before this write lands (EPIPE), as it may the agent's.
            let _ = std::io::Write::write_all(&mut s, b"ready\n");
        });
        let first = std::sync::Arc::new(std::sync::Mutex::new(None::<Duration>));
        let f = first.clone();
        let watcher = std::thread::spawn(move || {
            while t0.elapsed() < Duration::from_secs(5) {
                if agent_side.accept().is_ok() {
                    *f.lock().unwrap() = Some(t0.elapsed());
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let agent = Agent::new(vsock.clone(), AgentConfig::default());
        // `gone` ends the wait once a connection came in (or after 5 s).
        let seen = first.clone();
        let r = agent
            .wait_ready(Duration::from_secs(30), Some(ready), move || {
                (seen.lock().unwrap().is_some() || t0.elapsed() > Duration::from_secs(5))
                    .then(|| "done".to_string())
            })
            .await;
        guest.join().unwrap();
        watcher.join().unwrap();
        assert!(r.is_err());
        let at = first
            .lock()
            .unwrap()
            .expect("no connection after the ready word");
        assert!(
            at >= word_at,
            "connected {at:?} in, before the ready word at {word_at:?}"
        );
        assert!(
            !Path::new(&ready_path).exists(),
            "the ready socket was left behind"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
