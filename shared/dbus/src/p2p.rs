//! Peer-to-peer D-Bus for jailed components: each serves its own interface on a socket
//! of its own (`org.bulkhead.Vmm1`, `org.bulkhead.Net1`), and bulkheadd connects to it.
//! Nothing goes through a bus, so a jailed process never needs the system bus, and a
//! bulkheadd started again after a crash reconnects the same way it first did.

use std::os::unix::net::UnixListener;

/// Peer connections kept open at once by [`serve`]; the oldest goes first.
pub const MAX_PEERS: usize = 16;

/// A peer's stream whose credentials are read without its pid. bulkheadd runs outside
/// the jail's PID namespace, where the kernel reports its pid as 0, which zbus's own
/// credentials reader cannot take; the handshake needs only the uid.
#[derive(Debug)]
pub struct PeerStream(pub tokio::net::UnixStream);

#[derive(Debug)]
pub struct PeerRead(tokio::net::unix::OwnedReadHalf);

impl zbus::connection::Socket for PeerStream {
    type ReadHalf = PeerRead;
    type WriteHalf = tokio::net::unix::OwnedWriteHalf;

    fn split(self) -> zbus::connection::socket::Split<PeerRead, Self::WriteHalf> {
        let (r, w) = self.0.into_split();
        zbus::connection::socket::Split::new(PeerRead(r), w)
    }
}

#[async_trait::async_trait]
impl zbus::connection::socket::ReadHalf for PeerRead {
    async fn recvmsg(
        &mut self,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
        zbus::connection::socket::ReadHalf::recvmsg(&mut self.0, buf).await
    }

    fn can_pass_unix_fd(&self) -> bool {
        false
    }

    async fn peer_credentials(&mut self) -> std::io::Result<zbus::fdo::ConnectionCredentials> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        use std::os::fd::AsRawFd;
        // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which lives for
        // the call; the descriptor is the connected socket this half reads.
        let rc = unsafe {
            libc::getsockopt(
                self.0.as_ref().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(zbus::fdo::ConnectionCredentials::default().set_unix_user_id(cred.uid))
    }
}

/// `Hello` as a bus would answer it: sd-bus clients (`busctl --address=...`) say hello
/// first, even to a peer. The peer has no other names to give.
struct BusHello;

#[zbus::interface(name = "org.freedesktop.DBus")]
impl BusHello {
    fn hello(&self) -> String {
        ":1.1".into()
    }
}

/// Serve the interface `iface()` builds at `path` to every peer that connects to
/// `listener`, on a thread of its own named `thread`, until the process ends. `setup`
/// runs first on that thread (a component installs the thread's seccomp filter there);
/// its error ends the thread before anything is served. A peer that fails the handshake
/// is dropped; at most [`MAX_PEERS`] connections stay open.
pub fn serve<I, F, S>(
    listener: UnixListener,
    thread: &str,
    path: &'static str,
    iface: F,
    setup: S,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    I: zbus::object_server::Interface,
    F: Fn() -> I + Send + 'static,
    S: FnOnce() -> Result<(), String> + Send + 'static,
{
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name(thread.into())
        // Under 2 MiB, like the VMM's own threads (bulkhead-vmm's `threads`): a 2 MiB
        // stack can be backed by a transparent huge page.
        .stack_size(1 << 20)
        .spawn(move || {
            if let Err(e) = setup() {
                return tracing::error!("no D-Bus interface: {e}");
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("no D-Bus interface: {e}"),
            };
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("no D-Bus interface: {e}"),
                };
                let mut conns = Vec::new();
                loop {
                    let stream = match listener.accept().await {
                        Ok((s, _)) => s,
                        // Out of descriptors, or a peer gone before accept: try again
                        // shortly rather than end the interface.
                        Err(e) => {
                            tracing::debug!("D-Bus accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let built = async {
                        zbus::connection::Builder::socket(PeerStream(stream))
                            .server(zbus::Guid::generate())?
                            .p2p()
                            .serve_at(path, iface())?
                            .serve_at("/org/freedesktop/DBus", BusHello)?
                            .build()
                            .await
                    };
                    match tokio::time::timeout(std::time::Duration::from_secs(2), built).await {
                        Ok(Ok(c)) => conns.push(c),
                        Ok(Err(e)) => tracing::debug!("D-Bus peer: {e}"),
                        Err(_) => tracing::debug!("D-Bus peer: no handshake in 2 s"),
                    }
                    if conns.len() > MAX_PEERS {
                        drop(conns.remove(0));
                    }
                }
            });
        })
}

/// Connect to a component's peer socket as a client, within `timeout`.
pub async fn connect(
    socket: &std::path::Path,
    timeout: std::time::Duration,
) -> zbus::Result<zbus::Connection> {
    let go = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        zbus::connection::Builder::unix_stream(stream)
            .p2p()
            .build()
            .await
    };
    tokio::time::timeout(timeout, go).await.map_err(|_| {
        zbus::Error::Failure(format!("{}: no answer in {timeout:?}", socket.display()))
    })?
}
