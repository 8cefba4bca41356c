//! Virtio devices over the MMIO transport.
//!
//! In-process devices (vsock, blk, rng, console, balloon) are driven from the VMM's event loop:
//! each queue's notify register is an ioeventfd the loop waits on, and each device
//! raises its interrupt through an irqfd. A vhost-user device hands those same two
//! eventfds to its back end, so its data path never passes through this process.

pub mod balloon;
pub mod blk;
pub mod console;
pub mod mem;
pub mod mmio;
pub mod rng;
pub mod vhost_user;
pub mod vhost_user_fs;
pub mod vhost_user_net;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the ISR status the driver reads, and the irqfd.
pub struct Interrupt {
    pub status: AtomicU32,
    pub evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            evt,
        })
    }

    pub fn signal(&self, kind: u32) {
        self.status.fetch_or(kind, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("cannot raise virtio interrupt: {e}");
        }
    }
}

/// Lets a device watch its own file descriptors from the VMM's event loop.
#[derive(Clone)]
pub struct EventSink {
    epoll: Arc<Epoll>,
    slot: u32,
}

/// Tokens below this are queue indices; devices use tokens from here up.
pub const DEVICE_TOKEN_BASE: u32 = 0x100;

impl EventSink {
    pub fn new(epoll: Arc<Epoll>, slot: u32) -> Self {
        EventSink { epoll, slot }
    }

    fn data(&self, token: u32) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(token)
    }

    pub fn add(&self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    pub fn modify(&self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
    pub acked_features: u64,
    /// The queue notify ioeventfds (for vhost-user back ends).
    pub kicks: Vec<EventFd>,
    pub events: EventSink,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{0}")]
    Failed(String),
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device; drop queues and connections.
    fn reset(&mut self) {}
    /// A queue notification (ioeventfd) arrived.
    fn queue_notify(&mut self, _queue: usize) {}
    /// An event on a descriptor registered through [`EventSink`].
    fn handle_event(&mut self, _token: u32, _events: EventSet) {}
    /// The VM is being paused: a device with a thread of its own stops it touching guest
    /// memory before this returns. (The event loop stops serving the others itself.)
    fn pause(&mut self) {}
    /// The VM runs again.
    fn resume(&mut self) {}
    /// Wait until the device's own thread has served every kick handed to it (tests and
    /// fuzzing, which look at the rings right after a notify).
    fn settle(&self) {}
    /// Interrupts come straight from another process (vhost-user), so the ISR must read
    /// as "used buffer" whenever the driver looks.
    fn external_interrupts(&self) -> bool {
        false
    }
}

/// Copy a device config structure into a driver read, tolerating any offset and size.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - off);
    data[..n].copy_from_slice(&config[off..off + n]);
}

/// Descriptor chains a device serves from its queues in one turn of the event loop.
/// One event-loop thread serves every in-process device and the VM's exit: a guest that
/// refills a queue as fast as the device empties it must not keep the others (or the
/// exit) waiting. A device that spends its budget with work left asks to come back
/// ([`Requeue::later`]) and the loop serves whatever else is ready first.
pub const QUEUE_BUDGET: usize = 256;

/// A device's own queue notify eventfds: writing one is what a guest's kick does, so the
/// event loop comes back to that queue on a later turn.
#[derive(Default)]
pub struct Requeue(Vec<EventFd>);

impl Requeue {
    pub fn new(kicks: Vec<EventFd>) -> Self {
        Requeue(kicks)
    }

    /// Serve queue `q` again on a later turn of the event loop.
    pub fn later(&self, q: usize) {
        if let Some(k) = self.0.get(q) {
            if let Err(e) = k.write(1) {
                crate::warn_limited!("cannot requeue virtio queue {q}: {e}");
            }
        }
    }
}

/// The next chain of `q`. When there is none, the guest is asked to kick at its next one,
/// and a chain that came meanwhile is taken (its kick may have gone before the request
/// was seen). With `VIRTIO_F_RING_EVENT_IDX` the request is the used ring's
/// `avail_event`, which a device must move on or the driver stops kicking; without it,
/// the no-notify flag cleared. One look after the request, no more: a ring whose index
/// claims chains it cannot give (a hostile one) ends the caller's pass, not its thread.
pub fn pop_or_rearm<'m>(
    mem: &'m GuestMemoryMmap,
    q: &mut Queue,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
    if let Some(chain) = q.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    if q.enable_notification(mem).unwrap_or(false) {
        q.pop_descriptor_chain(mem)
    } else {
        None
    }
}

/// How a bounded pass over a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// No chain left (or the queue is broken).
    Empty,
    /// [`QUEUE_BUDGET`] chains served; there may be more.
    BudgetSpent,
}

/// Pop-process-complete helper shared by the simple devices: hands each available chain
/// to `f`, which returns the number of bytes written to the chain, up to
/// [`QUEUE_BUDGET`] chains; then notifies once. A queue left empty asks for the guest's
/// next kick ([`pop_or_rearm`]); one left with chains is served again by its caller.
pub fn drain_queue<F>(mem: &GuestMemoryMmap, q: &mut Queue, irq: &Interrupt, mut f: F) -> Drained
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used_any = false;
    let mut served = 0;
    let mut end = Drained::Empty;
    // A queue whose rings point outside guest memory yields no chain, not a panic.
    while let Some(chain) = pop_or_rearm(mem, q) {
        let head = chain.head_index();
        let len = f(chain);
        if let Err(e) = q.add_used(mem, head, len) {
            // The guest chose where the used ring is: a line per kick would be its to cause.
            crate::warn_limited!("add_used failed: {e}");
            break;
        }
        used_any = true;
        served += 1;
        if served == QUEUE_BUDGET {
            end = Drained::BudgetSpent;
            break;
        }
    }
    if used_any && q.needs_notification(mem).unwrap_or(true) {
        irq.signal(INT_VRING);
    }
    end
}

#[cfg(test)]
pub mod testutil {
    //! Mock guest memory and queues for device tests.
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;
    pub const VRING_DESC_F_WRITE: u16 = F_WRITE;

    pub fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    pub fn activation(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (Activation, Arc<Interrupt>) {
        let (act, irq, _) = activation_with_kicks(mem, queues);
        (act, irq)
    }

    /// `mem`'s regions as a vhost-user back end is told about them.
    pub fn ram_regions(mem: &GuestMemoryMmap) -> Vec<crate::memory::RamRegion> {
        use vm_memory::GuestMemoryRegion;
        mem.iter()
            .map(|r| crate::memory::RamRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: 0,
                host_addr: r.as_ptr() as u64,
            })
            .collect()
    }

    /// Also returns the queues' notify eventfds, as the event loop would see them.
    pub fn activation_with_kicks(
        mem: &GuestMemoryMmap,
        queues: Vec<Queue>,
    ) -> (Activation, Arc<Interrupt>, Vec<EventFd>) {
        let irq = Interrupt::new(EventFd::new(0).unwrap());
        let kicks: Vec<EventFd> = queues
            .iter()
            .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
            .collect();
        let act = Activation {
            mem: mem.clone(),
            queues,
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
            kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            events: EventSink::new(Arc::new(Epoll::new().unwrap()), 1),
        };
        (act, irq, kicks)
    }

    /// (head id, len) of every used-ring entry so far.
    pub fn used<M: GuestMemoryBackend>(vq: &MockSplitQueue<'_, M>) -> Vec<(u32, u32)> {
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    pub fn used_lens<M: GuestMemoryBackend>(
        _mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, M>,
    ) -> Vec<u32> {
        used(vq).into_iter().map(|(_, l)| l).collect()
    }

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[cfg(test)]
mod log_tests {
    use super::testutil::*;
    use super::*;
    use bulkhead_host::logging::log_lines;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    #[test]
    fn a_guest_that_breaks_its_used_ring_cannot_flood_the_host_log() {
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 256);
        let chains: Vec<_> = (0..200)
            .map(|i| desc(0x10000 + i * 64, 64, F_WRITE, 0))
            .collect();
        vq.build_multiple_desc_chains(&chains).unwrap();
        // The driver's rings, except the used ring: past the end of guest memory.
        let mut q = Queue::new(256).unwrap();
        let (d, a) = (vq.desc_table_addr().0, vq.avail_addr().0);
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(0xffff_0000), Some(0));
        q.set_size(256);
        q.set_ready(true);
        let irq = Interrupt::new(EventFd::new(0).unwrap());
        let lines = log_lines(|| {
            for _ in 0..200 {
                drain_queue(&mem, &mut q, &irq, |_| 0);
            }
        });
        let failed = lines
            .iter()
            .filter(|l| l.contains("add_used failed"))
            .count();
        assert!(failed >= 1, "the failure is still said: {lines:?}");
        assert!(
            failed <= crate::ratelimit::BURST as usize,
            "{failed} lines for 200 kicks"
        );
    }
}

#[cfg(test)]
mod event_idx_tests {
    use super::testutil::*;
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const SIZE: u16 = 256;

    /// The device's `avail_event`: the u16 after the used ring's entries.
    fn avail_event(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj(vq.used_addr().unchecked_add(4 + 8 * u64::from(SIZE)))
            .unwrap()
    }

    /// The driver's `used_event`: the u16 after the available ring's entries.
    fn set_used_event(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>, v: u16) {
        mem.write_obj(v, vq.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE)))
            .unwrap();
    }

    /// `n` one-descriptor chains from descriptor `first` on.
    fn post(vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, n: u16) {
        let chains: Vec<_> = (first..first + n)
            .map(|i| desc(0x10_0000 + u64::from(i) * 64, 64, F_WRITE, 0))
            .collect();
        vq.add_desc_chains(&chains, first).unwrap();
    }

    /// A driver's queue in `mem`, the device's view of it (`event_idx` negotiated or
    /// not), and the interrupt it raises.
    fn rings(
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue, Arc<Interrupt>) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), SIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(event_idx);
        (vq, q, Interrupt::new(EventFd::new(0).unwrap()))
    }

    fn signalled(irq: &Interrupt) -> bool {
        irq.status.swap(0, Ordering::SeqCst) != 0
    }

    #[test]
    fn an_emptied_queue_asks_for_a_kick_at_the_next_chain() {
        let mem = test_mem();
        let (vq, mut q, irq) = rings(&mem, true);
        post(&vq, 0, 3);
        assert_eq!(drain_queue(&mem, &mut q, &irq, |_| 0), Drained::Empty);
        assert_eq!(used(&vq).len(), 3);
        // Without this the driver, whose kick test reads avail_event, never kicks again.
        assert_eq!(avail_event(&mem, &vq), 3);
        post(&vq, 3, 2);
        drain_queue(&mem, &mut q, &irq, |_| 0);
        assert_eq!(avail_event(&mem, &vq), 5);
    }

    #[test]
    fn a_queue_left_with_chains_is_not_rearmed_until_it_runs_empty() {
        let mem = test_mem();
        let (vq, mut q, irq) = rings(&mem, true);
        post(&vq, 0, SIZE);
        // The budget ends the pass: the device comes back by itself, so no kick is asked.
        assert_eq!(drain_queue(&mem, &mut q, &irq, |_| 0), Drained::BudgetSpent);
        assert_eq!(avail_event(&mem, &vq), 0);
        assert_eq!(drain_queue(&mem, &mut q, &irq, |_| 0), Drained::Empty);
        assert_eq!(avail_event(&mem, &vq), SIZE);
    }

    #[test]
    fn the_driver_chooses_which_completion_interrupts_it() {
        let mem = test_mem();
        let (vq, mut q, irq) = rings(&mem, true);
        // Interrupt me once the used index passes 4 (used_event = 4): completions 1-3
        // do not, the fifth does.
        set_used_event(&mem, &vq, 4);
        post(&vq, 0, 3);
        drain_queue(&mem, &mut q, &irq, |_| 0);
        assert!(!signalled(&irq), "used index 3 has not passed used_event 4");
        post(&vq, 3, 2);
        drain_queue(&mem, &mut q, &irq, |_| 0);
        assert!(signalled(&irq), "used index 5 passed used_event 4");
    }

    #[test]
    fn without_event_idx_every_completion_interrupts_and_avail_event_is_untouched() {
        let mem = test_mem();
        let (vq, mut q, irq) = rings(&mem, false);
        set_used_event(&mem, &vq, 100);
        post(&vq, 0, 1);
        drain_queue(&mem, &mut q, &irq, |_| 0);
        assert!(signalled(&irq));
        assert_eq!(avail_event(&mem, &vq), 0);
    }
}

#[cfg(test)]
mod broken_ring_tests {
    use super::testutil::*;
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_ring_that_claims_chains_it_cannot_give_ends_the_pass() {
        let mem = test_mem();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        for event_idx in [false, true] {
            let mut q: Queue = vq.create_queue().unwrap();
            q.set_event_idx(event_idx);
            // The available ring at address 0: virtio-queue refuses to pop from it, while
            // its index (read at address 2) says five chains wait.
            q.set_avail_ring_address(Some(0), Some(0));
            mem.write_obj(5u16, GuestAddress(2)).unwrap();
            let irq = Interrupt::new(EventFd::new(0).unwrap());
            assert_eq!(drain_queue(&mem, &mut q, &irq, |_| 0), Drained::Empty);
        }
    }
}
