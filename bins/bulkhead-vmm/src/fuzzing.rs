//! Hostile guests, driven by arbitrary bytes: the bodies of the fuzz targets
//! (`bins/bulkhead-vmm/fuzz`, libFuzzer on nightly) and of seeded runs on stable Rust in
//! `cargo test`.
//!
//! - [`queues`]: the bytes choose a device (rng, balloon, vsock, blk) and one of its
//!   queues, and become that queue's descriptor table (addresses in and out of guest
//!   memory, any lengths, flags and links, loops included) and the guest bytes the
//!   chains point at; then the device is kicked. Nothing may panic, and no chain goes
//!   back to the guest more often than it was offered.
//! - [`mmio`]: the bytes become a driver's register accesses to a virtio-mmio transport
//!   (status, feature words, queue addresses and sizes, notifications, config space, any
//!   offset and width), which activates and resets its device as a driver would.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::memory::RamRegion;
use crate::virtio::balloon::Balloon;
use crate::virtio::blk::Blk;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::rng::Rng;
use crate::virtio::vsock::Vsock;
use crate::virtio::{Activation, EventSink, Interrupt, VirtioDevice};

const QUEUE: u16 = 16;
const MEM: u64 = 4 << 20;
/// Where the guest bytes from the input go; chain addresses start here.
const DATA: u64 = 0x10_0000;

fn mock_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mock memory")
}

fn events() -> EventSink {
    EventSink::new(Arc::new(Epoll::new().expect("epoll")), 0)
}

/// A scratch directory for this process's device files.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("bh-vmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        std::fs::write(d.join("disk"), vec![0u8; 1 << 20]).expect("scratch disk");
        d
    })
}

fn device(kind: u8, mem: &GuestMemoryMmap) -> Option<Box<dyn VirtioDevice>> {
    Some(match kind % 4 {
        0 => Box::new(Rng::default()),
        1 => {
            let regions = mem
                .iter()
                .map(|r| RamRegion {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                    file_offset: 0,
                    host_addr: r.as_ptr() as u64,
                })
                .collect();
            Box::new(Balloon::new(regions, None, false).ok()?.0)
        }
        2 => Box::new(Vsock::new(3, &scratch().join("v.sock")).ok()?),
        _ => Box::new(Blk::open(&scratch().join("disk"), false).ok()?),
    })
}

/// One hostile queue; returns how many chains the device gave back.
pub fn queues(data: &[u8]) -> u16 {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mem = mock_memory();
    let Some(mut dev) = device(mode, &mem) else {
        return 0;
    };
    let nq = dev.queue_max_sizes().len();
    let qi = usize::from(mode >> 2) % nq;
    let vq = MockSplitQueue::new(&mem, QUEUE);
    let (table, payload) = rest.split_at(rest.len().min(8 * usize::from(QUEUE)));
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(8)
        .map(|c| {
            // Mostly inside guest memory, some past its end; any length, flags, link.
            let addr = u64::from(u32::from_le_bytes([c[0], c[1], c[2], 0])) / 2 + DATA;
            let len = u32::from(u16::from_le_bytes([c[3], c[4]])) << (c[5] >> 5);
            let flags = u16::from(c[5] & 0x7);
            let next = u16::from(c[6]) % (QUEUE + 2);
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    if descs.is_empty() || vq.build_multiple_desc_chains(&descs).is_err() {
        return 0;
    }
    let _ = mem.write_slice(&payload[..payload.len().min(64 << 10)], GuestAddress(DATA));
    let Ok(fuzzed) = vq.create_queue::<Queue>() else {
        return 0;
    };
    let mut fuzzed = Some(fuzzed);
    let queues = (0..nq)
        .map(|i| match (i == qi).then(|| fuzzed.take()).flatten() {
            Some(q) => q,
            None => Queue::new(dev.queue_max_sizes()[i]).expect("a queue size"),
        })
        .collect();
    let act = Activation {
        mem: mem.clone(),
        queues,
        interrupt: Interrupt::new(EventFd::new(0).expect("eventfd")),
        acked_features: dev.features(),
        kicks: vec![],
        events: events(),
    };
    if dev.activate(act).is_err() {
        return 0;
    }
    for _ in 0..3 {
        dev.queue_notify(qi);
        dev.settle();
    }
    dev.reset();
    let used = vq.used().idx().load();
    assert!(
        used <= QUEUE,
        "{used} chains returned from a ring of {QUEUE}"
    );
    used
}

/// A driver's register accesses; returns how many were writes.
pub fn mmio(data: &[u8]) -> usize {
    let Some((&kind, ops)) = data.split_first() else {
        return 0;
    };
    let mem = mock_memory();
    let Some(dev) = device(kind, &mem) else {
        return 0;
    };
    let irq = Interrupt::new(EventFd::new(0).expect("eventfd"));
    let mut t = MmioTransport::new(dev, mem, irq, vec![], events());
    let mut writes = 0;
    for op in ops.chunks_exact(6).take(256) {
        // Register offsets every 4 bytes through the register file and into config space.
        let offset = u64::from(op[1]) * 4 % 0x140;
        let width = [1usize, 2, 4, 8][usize::from(op[0] >> 1 & 3)];
        let mut v = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        // Queue address registers: mostly inside guest memory, so activation gets far.
        if (0x80..0xb0).contains(&offset) && op[0] & 0x80 != 0 {
            v %= MEM as u32;
        }
        if op[0] & 1 == 1 {
            let b = u64::from(v).to_le_bytes();
            t.write(offset, &b[..width]);
            writes += 1;
        } else {
            let mut b = [0u8; 8];
            t.read(offset, &mut b[..width]);
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::fuzzing::seeded_inputs as inputs;

    #[test]
    fn hostile_queues_on_every_device_seeded() {
        let mut returned = [0u32; 4];
        for d in inputs(0x5eed_1234, 3000, 400) {
            let n = queues(&d);
            if let Some(&m) = d.first() {
                returned[usize::from(m % 4)] += u32::from(n);
            }
        }
        // The run reached each device's queue handling, not only the early exits.
        assert!(
            returned.iter().all(|&n| n > 0),
            "chains returned per device: {returned:?}"
        );
    }

    #[test]
    fn hostile_register_accesses_seeded() {
        let writes: usize = inputs(0xfeed_0042, 3000, 600).iter().map(|d| mmio(d)).sum();
        assert!(writes > 0);
    }
}
