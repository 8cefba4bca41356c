//! `org.bulkhead.Net1`: a network back end's (`bulkhead-net`'s) state and counters, served
//! on a peer-to-peer connection over the back end's own socket (`<run>/net<N>.dbus`),
//! never on the bus. bulkheadd reads it for `Sandbox1.NetworkStats`.

/// Where the object lives on the peer connection.
pub const NET_PATH: &str = "/org/bulkhead/Net1";

/// The counters, in the order [`NetCounters`] lists them.
pub const COUNTER_NAMES: [&str; 7] = [
    "rx_frames",
    "rx_bytes",
    "rx_dropped",
    "tx_frames",
    "tx_bytes",
    "tx_malformed",
    "tx_errors",
];

#[zbus::proxy(interface = "org.bulkhead.Net1", default_path = "/org/bulkhead/Net1")]
pub trait Net1 {
    /// Frames and bytes moved, and what was dropped and why, since this back end started
    /// (names: [`COUNTER_NAMES`]).
    fn counters(&self) -> zbus::Result<std::collections::HashMap<String, u64>>;
    /// A front end (the VMM) is connected.
    #[zbus(property)]
    fn connected(&self) -> zbus::Result<bool>;
    /// Seconds since this back end started.
    #[zbus(property)]
    fn uptime_s(&self) -> zbus::Result<u64>;
}
