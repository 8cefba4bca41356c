//! bulkhead's vhost-user-net back end.
//!
//! The guest's virtio-net queues are served from a tap that bulkheadd opened in the pod's
//! network namespace and handed over as a descriptor: this process needs no capability.
//! Frames carry the 12-byte virtio-net header both ways, and the tap is opened with the
//! same header, so checksum and segmentation offloads pass between the guest and the host
//! kernel untouched (no copy into a different layout, no software segmentation here).
//!
//! - [`header`]: what a guest may put in a frame's header, checked before a byte reaches
//!   the tap.
//! - [`queues`]: moving frames between the tap and the guest's descriptor chains, with
//!   every hostile chain dropped and counted. Tested over mock guest memory.
//! - [`backend`]: the `vhost-user-backend` glue: features, memory, events.

pub mod backend;
pub mod cli;
pub mod dbus;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod queues;
pub mod relay;

use std::sync::atomic::{AtomicU64, Ordering};

/// What the back end has moved and dropped since it started.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the tap that could not be delivered (a guest buffer too small or
    /// hostile).
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the guest refused before the tap saw them (bad header, size or chain).
    pub tx_malformed: AtomicU64,
    /// Frames the tap refused.
    pub tx_errors: AtomicU64,
}

/// A plain copy of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterValues {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_malformed: u64,
    pub tx_errors: u64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn values(&self) -> CounterValues {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            rx_dropped: g(&self.rx_dropped),
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            tx_malformed: g(&self.tx_malformed),
            tx_errors: g(&self.tx_errors),
        }
    }
}
