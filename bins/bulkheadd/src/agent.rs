//! Calls to a sandbox's guest agent, over the hybrid vsock socket. The agent client is
//! blocking; each call runs on tokio's blocking pool on a connection of its own, so a
//! slow guest holds up only its own call. Everything the guest answers is bounded by
//! the protocol crate (frame limits, typed decoding).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_dbus::Error;
use bulkhead_protocol::client::{AgentClient, ClientError, Endpoint};
use bulkhead_protocol::{encode, write_frame, AgentError, Request, AGENT_VSOCK_PORT};

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

    /// Poll until the agent answers a health request, `gone()` says the VM died, or
    /// `timeout` passes.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        gone: impl Fn() -> Option<String>,
    ) -> Result<(), Error> {
        let start = Instant::now();
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
