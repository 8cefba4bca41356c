//! virtio-mem: guest RAM added and taken away in 2 MiB blocks while the VM runs.
//!
//! The VMM maps a hot-plug region above the boot RAM (see [`crate::layout::hotplug_range`])
//! and registers it with KVM, but leaves it out of the guest's e820 map: the guest boots
//! small, and its virtio-mem driver plugs blocks of the region when the host raises
//! `requested_size` (the control interface's `SetHotplugMemory`). Plugging costs the host
//! nothing until the guest touches the pages; unplugging discards them (`MADV_DONTNEED`,
//! or a hole punched in the memfd that vhost-user back ends share), so memory taken
//! away goes back to the host at once.
//!
//! Only `VIRTIO_F_VERSION_1` is offered: no NUMA node (`ACPI_PXM`), and unplugged
//! memory stays readable (no `UNPLUGGED_INACCESSIBLE`). A guest that touches blocks it
//! never plugged gets host memory for them, as it would in boot RAM: the region's size is
//! what bounds the VM, and the sandbox's memory cgroup what bounds the host.
//!
//! Every request is checked against the region and the plugged bitmap; a bad one gets
//! `ERROR` and changes nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::balloon::{Discard, Discarder};
use super::{
    drain_queue, read_config_bytes, ActivateError, Activation, Drained, Interrupt, Requeue,
    VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
};
use crate::memory::RamRegion;

pub const TYPE_MEM: u32 = 24;
/// The device's block: what one bit of the plugged bitmap stands for. 2 MiB is Linux's
/// sub-block on x86 (a pageblock), so the guest can unplug at that granularity.
pub const BLOCK_SIZE: u64 = 2 << 20;
const QUEUE_SIZE: u16 = 128;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
/// A request: type (u16), 6 bytes of padding, then address (u64) and block count (u16).
const REQ_LEN: usize = 24;

const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
/// Not now: Linux's driver tries again after a growing delay (a NACK it retries at once).
const RESP_BUSY: u16 = 2;
const RESP_ERROR: u16 = 3;
/// A response: type (u16), 6 bytes of padding, then the state (u16) for `STATE`.
const RESP_LEN: usize = 10;

const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;

/// What the control interface reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MemStatus {
    /// Whether the guest's driver is up.
    pub active: bool,
    /// Guest-physical start and size of the hot-plug region.
    pub addr: u64,
    pub region_mib: u64,
    /// What the host asked the guest to have plugged, and what it has.
    pub requested_mib: u64,
    pub plugged_mib: u64,
    /// Requests served: plugs and unplugs acknowledged, and refused (`NACK` or `ERROR`).
    pub plugs: u64,
    pub unplugs: u64,
    pub refused: u64,
    /// Unplugged blocks the host failed to discard (an fallocate or madvise error).
    pub discard_errors: u64,
}

struct Shared {
    requested: u64,
    /// One bit per block of the region.
    plugged: Vec<u64>,
    plugged_bytes: u64,
    irq: Option<Arc<Interrupt>>,
    plugs: u64,
    unplugs: u64,
    refused: u64,
    discard_errors: u64,
}

impl Shared {
    fn is_plugged(&self, block: u64) -> bool {
        self.plugged[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: u64, on: bool) {
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        if on {
            self.plugged[word] |= bit;
        } else {
            self.plugged[word] &= !bit;
        }
    }
}

/// The device as the control interface sees it.
pub struct MemControl {
    shared: Mutex<Shared>,
    addr: u64,
    size: u64,
}

impl MemControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the guest to have `mib` MiB of the region plugged (0 asks it to unplug all).
    pub fn set_requested(&self, mib: u64) -> Result<(), String> {
        let bytes = mib
            .checked_mul(1 << 20)
            .filter(|b| *b <= self.size && b.is_multiple_of(BLOCK_SIZE));
        let Some(bytes) = bytes else {
            return Err(format!(
                "hot-plug memory {mib} MiB: must be a multiple of {} MiB, at most {} MiB",
                BLOCK_SIZE >> 20,
                self.size >> 20
            ));
        };
        let mut s = self.lock();
        s.requested = bytes;
        if let Some(irq) = &s.irq {
            irq.signal(INT_CONFIG);
        }
        Ok(())
    }

    pub fn status(&self) -> MemStatus {
        let s = self.lock();
        MemStatus {
            active: s.irq.is_some(),
            addr: self.addr,
            region_mib: self.size >> 20,
            requested_mib: s.requested >> 20,
            plugged_mib: s.plugged_bytes >> 20,
            plugs: s.plugs,
            unplugs: s.unplugs,
            refused: s.refused,
            discard_errors: s.discard_errors,
        }
    }
}

pub struct VirtioMem {
    control: Arc<MemControl>,
    /// Discards within the hot-plug region only: no request can reach boot RAM.
    discarder: Discarder,
    /// On hugetlbfs, the region's host address: its pages are not reserved when it is
    /// mapped, so each plug takes them from the pool first, and is answered BUSY if it
    /// cannot.
    populate_at: Option<u64>,
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
    requeue: Requeue,
}

impl VirtioMem {
    /// A device over the hot-plug `region` (backed by `file` when guest RAM is shared).
    pub fn new(
        region: RamRegion,
        file: Option<Arc<File>>,
        hugetlb: bool,
    ) -> (Self, Arc<MemControl>) {
        let blocks = region.size / BLOCK_SIZE;
        let control = Arc::new(MemControl {
            shared: Mutex::new(Shared {
                requested: 0,
                plugged: vec![0; blocks.div_ceil(64) as usize],
                plugged_bytes: 0,
                irq: None,
                plugs: 0,
                unplugs: 0,
                refused: 0,
                discard_errors: 0,
            }),
            addr: region.guest_addr,
            size: blocks * BLOCK_SIZE,
        });
        let dev = VirtioMem {
            control: control.clone(),
            discarder: Discarder::new(vec![region], file, hugetlb),
            populate_at: hugetlb.then_some(region.host_addr),
            active: None,
            requeue: Requeue::default(),
        };
        (dev, control)
    }

    /// The blocks `[first, first + n)` a request names, if they lie in the region.
    fn blocks(&self, addr: u64, nb_blocks: u16) -> Option<(u64, u64)> {
        let c = &self.control;
        let n = u64::from(nb_blocks);
        let len = n.checked_mul(BLOCK_SIZE)?;
        let end = addr.checked_add(len)?;
        if n == 0 || addr < c.addr || end > c.addr + c.size || !addr.is_multiple_of(BLOCK_SIZE) {
            return None;
        }
        Some(((addr - c.addr) / BLOCK_SIZE, n))
    }

    /// Discard blocks `[first, first + n)`; false if the host refused.
    fn discard(&self, first: u64, n: u64) -> bool {
        let gpa = self.control.addr + first * BLOCK_SIZE;
        self.discarder.discard(gpa, n * BLOCK_SIZE) == Discard::Done
    }

    /// Give blocks `[first, first + n)` host pages before the guest may use them; false
    /// if the host has none to give (an empty hugetlb pool), where a guest access would
    /// otherwise kill the VMM with SIGBUS.
    fn populate(&self, first: u64, n: u64) -> bool {
        let Some(base) = self.populate_at else {
            return true;
        };
        let at = base + first * BLOCK_SIZE;
        // SAFETY: the range lies within the hot-plug region's mapping (`blocks` checked
        // it); MADV_POPULATE_WRITE faults its pages in without changing their contents.
        let r = unsafe {
            libc::madvise(
                at as *mut libc::c_void,
                (n * BLOCK_SIZE) as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            tracing::warn!(
                "virtio-mem: no host pages for {} MiB at {at:#x}: {}",
                (n * BLOCK_SIZE) >> 20,
                std::io::Error::last_os_error()
            );
        }
        r == 0
    }

    /// Serve one request; the response type and, for `STATE`, the state.
    fn handle(&self, req: &[u8; REQ_LEN]) -> (u16, u16) {
        let kind = u16::from_le_bytes([req[0], req[1]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&req[8..16]);
        let addr = u64::from_le_bytes(a);
        let nb = u16::from_le_bytes([req[16], req[17]]);
        let mut s = self.control.lock();
        let (resp, state) = match kind {
            REQ_PLUG | REQ_UNPLUG | REQ_STATE => match self.blocks(addr, nb) {
                None => (RESP_ERROR, 0),
                Some((first, n)) => {
                    let range = first..first + n;
                    let plugged = range.clone().filter(|b| s.is_plugged(*b)).count() as u64;
                    match kind {
                        REQ_STATE => (
                            RESP_ACK,
                            match plugged {
                                0 => STATE_UNPLUGGED,
                                p if p == n => STATE_PLUGGED,
                                _ => STATE_MIXED,
                            },
                        ),
                        REQ_PLUG if plugged != 0 => (RESP_ERROR, 0),
                        REQ_PLUG if s.plugged_bytes + n * BLOCK_SIZE > s.requested => {
                            (RESP_NACK, 0)
                        }
                        // Refused for now: the guest's driver tries again later. What
                        // the attempt took from the pool goes back to it.
                        REQ_PLUG if !self.populate(first, n) => {
                            if !self.discard(first, n) {
                                s.discard_errors += 1;
                            }
                            (RESP_BUSY, 0)
                        }
                        REQ_PLUG => {
                            range.for_each(|b| s.set(b, true));
                            s.plugged_bytes += n * BLOCK_SIZE;
                            s.plugs += 1;
                            (RESP_ACK, 0)
                        }
                        _ if plugged != n => (RESP_ERROR, 0),
                        _ => {
                            // Unplugged whether or not the host could discard: the guest
                            // no longer uses the blocks either way.
                            if !self.discard(first, n) {
                                s.discard_errors += 1;
                            }
                            range.for_each(|b| s.set(b, false));
                            s.plugged_bytes -= n * BLOCK_SIZE;
                            s.unplugs += 1;
                            (RESP_ACK, 0)
                        }
                    }
                }
            },
            REQ_UNPLUG_ALL => {
                let blocks = self.control.size / BLOCK_SIZE;
                let mut b = 0;
                while b < blocks {
                    if !s.is_plugged(b) {
                        b += 1;
                        continue;
                    }
                    let first = b;
                    while b < blocks && s.is_plugged(b) {
                        s.set(b, false);
                        b += 1;
                    }
                    if !self.discard(first, b - first) {
                        s.discard_errors += 1;
                    }
                }
                s.plugged_bytes = 0;
                s.unplugs += 1;
                (RESP_ACK, 0)
            }
            _ => (RESP_ERROR, 0),
        };
        if resp != RESP_ACK {
            s.refused += 1;
        }
        (resp, state)
    }

    /// One chain: the request readable, then room for the response. Returns the bytes
    /// written (0 when the chain has no room for a response).
    fn serve(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let mut req = [0u8; REQ_LEN];
        let read = chain
            .clone()
            .reader(mem)
            .ok()
            .and_then(|mut r| r.read_exact(&mut req).ok());
        let (kind, state) = match read {
            Some(()) => self.handle(&req),
            None => {
                self.control.lock().refused += 1;
                (RESP_ERROR, 0)
            }
        };
        let Ok(mut w) = chain.writer(mem) else {
            return 0;
        };
        if w.available_bytes() < RESP_LEN {
            return 0;
        }
        let mut resp = [0u8; RESP_LEN];
        resp[..2].copy_from_slice(&kind.to_le_bytes());
        resp[8..].copy_from_slice(&state.to_le_bytes());
        match w.write_all(&resp) {
            Ok(()) => RESP_LEN as u32,
            Err(_) => 0,
        }
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = &self.control;
        let s = c.lock();
        let mut cfg = [0u8; 56];
        cfg[0..8].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        // node_id (8..10) stays 0: one node, and ACPI_PXM is not offered.
        cfg[16..24].copy_from_slice(&c.addr.to_le_bytes());
        cfg[24..32].copy_from_slice(&c.size.to_le_bytes());
        // usable_region_size: all of it.
        cfg[32..40].copy_from_slice(&c.size.to_le_bytes());
        cfg[40..48].copy_from_slice(&s.plugged_bytes.to_le_bytes());
        cfg[48..56].copy_from_slice(&s.requested.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }
    fn activate(&mut self, mut act: Activation) -> Result<(), ActivateError> {
        let q =
            act.queues.pop().filter(|q| q.ready()).ok_or_else(|| {
                ActivateError::Failed("virtio-mem: request queue not ready".into())
            })?;
        self.control.lock().irq = Some(act.interrupt.clone());
        self.active = Some((act.mem, q, act.interrupt));
        self.requeue = Requeue::new(act.kicks);
        Ok(())
    }
    /// The plugged blocks stay plugged (the spec asks it): a driver that starts again
    /// unplugs them all first.
    fn reset(&mut self) {
        self.active = None;
        self.control.lock().irq = None;
    }
    fn queue_notify(&mut self, queue: usize) {
        let Some((mem, mut q, irq)) = self.active.take() else {
            return;
        };
        let end = drain_queue(&mem, &mut q, &irq, |chain| self.serve(chain, &mem));
        if end == Drained::BudgetSpent {
            self.requeue.later(queue);
        }
        self.active = Some((mem, q, irq));
    }
}

#[cfg(test)]
mod tests;
