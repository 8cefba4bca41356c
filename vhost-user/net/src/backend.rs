//! The `vhost-user-backend` glue: which features are offered, where guest memory is, and
//! what each event means. Queue 0 is RX, queue 1 TX; the tap's readiness is one more event.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use bulkhead_netlink::tap;

use crate::queues::{deliver_rx, drain_tx, Rx, FRAME_BUF};
use crate::Counters;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// Event id of the tap becoming readable (ids up to the queue count are the library's).
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Largest ring the front end may set up (QEMU gives TX 1024 entries with vhost-user).
pub const QUEUE_SIZE: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Handler = Arc<VringEpollHandler<Arc<NetBackend>>>;

/// Features offered to the front end. The offloads let TCP segments of up to 64 KiB pass
/// whole in both directions.
///
/// `VHOST_USER_F_PROTOCOL_FEATURES` is not offered: QEMU's virtio-net sends
/// `SET_VRING_ENABLE` before `SET_FEATURES`, which the `vhost` crate refuses while that
/// feature is unacked. Without it the rings start enabled when kicked (vhost-user spec),
/// and nothing this back end needs is a protocol feature.
pub fn offered_features() -> u64 {
    [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_F_NOTIFY_ON_EMPTY,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
    ]
    .iter()
    .fold(0u64, |f, b| f | (1u64 << b))
        | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The tap offloads (`TUN_F_*`) matching what the guest accepts on receive.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |b: u32| acked & (1u64 << b) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= tap::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= tap::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= tap::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) {
            f |= tap::TUN_F_TSO_ECN;
        }
    }
    f
}

struct State {
    mem: Option<Mem>,
    acked: u64,
    event_idx: bool,
    /// A frame read from the tap that the guest had no room for yet, and its length.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// The tap is in the epoll set (it is taken out while the guest has no RX buffers, so
    /// a readable tap does not spin).
    tap_listening: bool,
}

pub struct NetBackend {
    tap: File,
    state: Mutex<State>,
    counters: Arc<Counters>,
    handler: Mutex<Option<Handler>>,
    exit: (EventConsumer, EventNotifier),
}

impl NetBackend {
    /// Serve `tap` (made non-blocking here).
    pub fn new(tap: File, counters: Arc<Counters>) -> std::io::Result<Arc<Self>> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(tap.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Arc::new(NetBackend {
            tap,
            state: Mutex::new(State {
                mem: None,
                acked: 0,
                event_idx: false,
                rx_buf: vec![0; FRAME_BUF],
                rx_pending: None,
                tx_buf: Vec::with_capacity(FRAME_BUF),
                tap_listening: false,
            }),
            counters,
            handler: Mutex::new(None),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        }))
    }

    /// Give the backend the daemon's epoll handler, so it can follow the tap once the
    /// guest's memory is known.
    pub fn set_handler(&self, h: Handler) {
        *self.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listen_tap(&self, st: &mut State, on: bool) {
        if st.tap_listening == on {
            return;
        }
        let h = self.handler.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = h.as_ref() else { return };
        let fd = self.tap.as_raw_fd();
        let r = if on {
            h.register_listener(fd, EventSet::IN, u64::from(TAP_EVENT))
        } else {
            h.unregister_listener(fd, EventSet::IN, u64::from(TAP_EVENT))
        };
        match r {
            Ok(()) => st.tap_listening = on,
            Err(e) => tracing::warn!("tap listener: {e}"),
        }
    }

    /// Move frames from the tap into the guest until either runs dry.
    fn process_rx(&self, st: &mut State, vring: &VringRwLock<Mem>) {
        let Some(mem) = st.mem.as_ref().map(|m| m.memory()) else {
            self.listen_tap(st, false);
            return;
        };
        let mergeable = st.acked & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut delivered = false;
        loop {
            let len = match st.rx_pending {
                Some(n) => n,
                None => match (&self.tap).read(&mut st.rx_buf) {
                    Ok(n) if n >= crate::header::HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != ErrorKind::WouldBlock {
                            tracing::warn!("tap read: {e}");
                        }
                        break;
                    }
                },
            };
            let res = {
                let mut vs = vring.get_mut();
                deliver_rx(
                    &*mem,
                    vs.get_queue_mut(),
                    &st.rx_buf[..len],
                    mergeable,
                    &self.counters,
                )
            };
            match res {
                Rx::Delivered(_) => {
                    st.rx_pending = None;
                    delivered = true;
                }
                Rx::Dropped => st.rx_pending = None,
                Rx::NoRoom => {
                    // Wait for the guest's next RX kick; ask for it.
                    st.rx_pending = Some(len);
                    if st.event_idx {
                        let _ = vring.enable_notification();
                    }
                    self.listen_tap(st, false);
                    break;
                }
            }
        }
        if delivered {
            self.notify(st, vring);
        }
    }

    fn process_tx(&self, st: &mut State, vring: &VringRwLock<Mem>) {
        let Some(mem) = st.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let features = st.acked;
        loop {
            if st.event_idx {
                let _ = vring.disable_notification();
            }
            let n = {
                let mut vs = vring.get_mut();
                drain_tx(
                    &*mem,
                    vs.get_queue_mut(),
                    features,
                    &mut st.tx_buf,
                    &self.counters,
                    |frame| (&self.tap).write(frame),
                )
            };
            if n > 0 {
                self.notify(st, vring);
            }
            if !st.event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
    }

    fn notify(&self, st: &State, vring: &VringRwLock<Mem>) {
        let needed = !st.event_idx || vring.needs_notification().unwrap_or(true);
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("cannot interrupt the guest: {e}");
            }
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        offered_features()
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!("features acked: {features:#x}");
        self.lock().acked = features;
        if let Err(e) = tap::set_offload(&self.tap, tap_offloads(features)) {
            tracing::warn!("tap offloads: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.lock().event_idx = enabled;
    }

    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        tracing::debug!("guest memory table received");
        let mut st = self.lock();
        st.mem = Some(mem);
        // Frames can be taken from the tap now; until the guest posts RX buffers the
        // first one waits (and the tap is left alone again).
        self.listen_tap(&mut st, true);
        Ok(())
    }

    fn reset_device(&self) {
        let mut st = self.lock();
        st.rx_pending = None;
        st.acked = 0;
        self.listen_tap(&mut st, false);
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            tracing::warn!(device_event, ?evset, "unexpected event set");
            return Ok(());
        }
        let [rx, tx] = vrings else {
            return Ok(());
        };
        let mut st = self.lock();
        match device_event {
            RX_QUEUE => {
                // New RX buffers: the tap may be followed again.
                self.listen_tap(&mut st, true);
                self.process_rx(&mut st, rx);
            }
            TX_QUEUE => self.process_tx(&mut st, tx),
            TAP_EVENT => self.process_rx(&mut st, rx),
            other => tracing::debug!("unexpected event {other}"),
        }
        Ok(())
    }
}

/// Ask the worker thread to leave.
pub fn request_exit(b: &NetBackend) {
    let _ = b.exit.1.notify();
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("counters", &self.counters.values())
            .finish()
    }
}
