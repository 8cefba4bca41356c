//! `org.bulkhead.Net1` on peer-to-peer connections: bulkheadd connects to the socket
//! given with `--dbus-socket` and reads the counters. Served from a small thread of its
//! own, so the data path never waits on it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bulkhead_dbus::net::{COUNTER_NAMES, NET_PATH};

use crate::Counters;

/// Peer connections kept open at once.
const MAX_PEERS: usize = 16;

pub struct Net1 {
    pub counters: Arc<Counters>,
    pub connected: Arc<AtomicBool>,
    pub started: Instant,
}

#[zbus::interface(name = "org.bulkhead.Net1")]
impl Net1 {
    fn counters(&self) -> HashMap<String, u64> {
        let v = self.counters.values();
        let values = [
            v.rx_frames,
            v.rx_bytes,
            v.rx_dropped,
            v.tx_frames,
            v.tx_bytes,
            v.tx_malformed,
            v.tx_errors,
        ];
        COUNTER_NAMES
            .iter()
            .zip(values)
            .map(|(n, v)| (n.to_string(), v))
            .collect()
    }

    #[zbus(property)]
    fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    #[zbus(property)]
    fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

/// A peer's stream whose credentials are read without its pid. bulkheadd runs outside
/// the jail's PID namespace, where the kernel reports its pid as 0, which zbus's own
/// credentials reader cannot take; the handshake needs only the uid.
#[derive(Debug)]
struct PeerStream(tokio::net::UnixStream);

#[derive(Debug)]
struct PeerRead(tokio::net::unix::OwnedReadHalf);

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
        use std::os::fd::AsFd;
        let cred = nix::sys::socket::getsockopt(
            &self.0.as_ref().as_fd(),
            nix::sys::socket::sockopt::PeerCredentials,
        )?;
        Ok(zbus::fdo::ConnectionCredentials::default().set_unix_user_id(cred.uid()))
    }
}

/// Serve `Net1` to every peer that connects to `socket`, until the process ends.
pub fn serve(socket: &Path, iface: impl Fn() -> Net1 + Send + 'static) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("dbus".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::warn!("no D-Bus interface: {e}"),
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                    return;
                };
                let mut conns = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let built = async {
                        zbus::connection::Builder::socket(PeerStream(stream))
                            .server(zbus::Guid::generate())?
                            .p2p()
                            .serve_at(NET_PATH, iface())?
                            .build()
                            .await
                    }
                    .await;
                    match built {
                        // Kept so the connection lives; bulkheadd opens one per read, so
                        // only the latest few are kept.
                        Ok(c) => conns.push(c),
                        Err(e) => tracing::debug!("D-Bus peer: {e}"),
                    }
                    if conns.len() > MAX_PEERS {
                        drop(conns.remove(0));
                    }
                }
            });
        })?;
    Ok(())
}
