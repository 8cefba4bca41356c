//! Calls to a sandbox's guest agent, over the hybrid vsock socket. The agent client is
//! blocking; each call runs on tokio's blocking pool on a connection of its own, so a
//! slow guest holds up only its own call. Everything the guest answers is bounded by
//! the protocol crate (frame limits, typed decoding).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_dbus::Error;
use bulkhead_protocol::client::{AgentClient, ClientError, Endpoint};
use bulkhead_protocol::{
    encode, write_frame, AgentError, Request, AGENT_READY_VSOCK_PORT, AGENT_VSOCK_PORT,
};

/// How long to wait for the vsock connection and handshake on a live guest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Agent {
    endpoint: Endpoint,
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
    pub fn new(vsock_socket: PathBuf) -> Agent {
        Agent {
            endpoint: Endpoint::HybridVsock {
                socket: vsock_socket,
                port: AGENT_VSOCK_PORT,
            },
        }
    }

    /// Run `f` on a fresh handshaken connection, on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut AgentClient<UnixStream>) -> Result<T, ClientError> + Send + 'static,
    {
        let ep = self.endpoint.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = ep.client(CONNECT_TIMEOUT)?;
            f(&mut c)
        })
        .await
        .map_err(|e| Error::Failed(format!("agent call task: {e}")))?
        .map_err(to_dbus)
    }

    pub async fn request(&self, req: Request) -> Result<(), Error> {
        self.call(move |c| c.expect_ok(&req)).await
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
        self.call(move |c| {
            let req = Request::Wait { id, exec_id };
            let mut s = c
                .get_ref()
                .try_clone()
                .map_err(|e| ClientError::Handshake(e.to_string()))?;
            write_frame(&mut s, &encode(&req)?)?;
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
        let agent = Agent::new(vsock.clone());
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
