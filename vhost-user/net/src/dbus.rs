//! `org.bulkhead.Net1` on peer-to-peer connections: bulkheadd connects to the socket
//! given with `--dbus-socket` and reads the counters. Served from a small thread of its
//! own ([`bulkhead_dbus::p2p`]), so the data path never waits on it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bulkhead_dbus::net::{COUNTER_NAMES, NET_PATH};

use crate::Counters;

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

/// Serve `Net1` to every peer that connects to `socket`, until the process ends.
pub fn serve(socket: &Path, iface: impl Fn() -> Net1 + Send + 'static) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    bulkhead_dbus::p2p::serve(listener, "dbus", NET_PATH, iface, || Ok(()))?;
    Ok(())
}
