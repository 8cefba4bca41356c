//! Hostile guests, driven by arbitrary bytes: the bodies of the fuzz targets
//! (`bins/bulkhead-vmm/fuzz`, libFuzzer on nightly) and of seeded runs on stable Rust in
//! `cargo test`.
//!
//! - [`queues`]: the bytes choose a device (rng, balloon, vsock, blk, console, virtio-mem)
//!   and one of its queues, and become that queue's descriptor table (addresses in and
//!   out of guest memory, any lengths, flags and links, loops included) and the guest
//!   bytes the chains point at; then the device is kicked. Nothing may panic, and no chain goes
//!   back to the guest more often than it was offered. [`queue`] does the same on one
//!   device, for a fuzz target of its own.
//! - [`mmio`]: the bytes become a driver's register accesses to a virtio-mmio transport
//!   (status, feature words, queue addresses and sizes, notifications, config space, any
//!   offset and width), which activates and resets its device as a driver would.
//! - [`loader`]: the bytes become a kernel (ELF or bzImage, headers and all) and an
//!   initramfs, loaded into guest memory with the boot parameters written as for a
//!   real start. A bad image must be an error, never a panic or a write outside RAM.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::memory::RamRegion;
use crate::virtio::balloon::Balloon;
use crate::virtio::blk::Blk;
use crate::virtio::console::Console;
use crate::virtio::mem::VirtioMem;
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

/// A scratch directory for this process's device files. It is removed when the process
/// exits normally (`cargo test`, a fuzz run that ends); a crash leaves it for its report.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove_scratch() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("bh-vmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        std::fs::write(d.join("disk"), vec![0u8; 1 << 20]).expect("scratch disk");
        // SAFETY: `remove_scratch` takes no arguments, never unwinds (its errors are
        // ignored) and reads only a static that is set before it is registered.
        unsafe { libc::atexit(remove_scratch) };
        d
    })
}

/// The in-process devices a guest drives through queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rng,
    Balloon,
    Vsock,
    Blk,
    Console,
    Mem,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Rng,
        Kind::Balloon,
        Kind::Vsock,
        Kind::Blk,
        Kind::Console,
        Kind::Mem,
    ];

    fn from_byte(b: u8) -> Kind {
        Kind::ALL[usize::from(b) % Kind::ALL.len()]
    }
}

fn device(kind: Kind, mem: &GuestMemoryMmap) -> Option<Box<dyn VirtioDevice>> {
    let regions: Vec<RamRegion> = mem
        .iter()
        .map(|r| RamRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: 0,
            host_addr: r.as_ptr() as u64,
        })
        .collect();
    Some(match kind {
        Kind::Rng => Box::new(Rng::default()),
        Kind::Balloon => Box::new(Balloon::new(regions, None, false, None).ok()?.0),
        Kind::Mem => {
            // The top 2 MiB of mock memory is its hot-plug region, already requested in
            // full, so plugs can succeed as well as fail.
            let r = regions.first()?;
            let half = r.size / 2;
            let region = RamRegion {
                guest_addr: r.guest_addr + half,
                size: half,
                file_offset: 0,
                host_addr: r.host_addr + half,
            };
            let (dev, control) = VirtioMem::new(region, None, false);
            control.set_requested(half >> 20).ok()?;
            Box::new(dev)
        }
        Kind::Vsock => Box::new(Vsock::new(3, &scratch().join("v.sock")).ok()?),
        Kind::Blk => Box::new(Blk::open(&scratch().join("disk"), false).ok()?),
        Kind::Console => Box::new(Console::new(std::fs::File::create("/dev/null").ok()?)),
    })
}

/// One hostile queue on the device the first byte chooses; returns how many chains the
/// device gave back.
pub fn queues(data: &[u8]) -> u16 {
    match data.split_first() {
        Some((&b, _)) => queue(Kind::from_byte(b), data),
        None => 0,
    }
}

/// One hostile queue of `kind` (the first byte also chooses which of its queues, and with
/// its low bit whether the driver negotiated `VIRTIO_F_RING_EVENT_IDX`); returns how many
/// chains the device gave back.
pub fn queue(kind: Kind, data: &[u8]) -> u16 {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mem = mock_memory();
    let Some(mut dev) = device(kind, &mem) else {
        return 0;
    };
    let nq = dev.queue_max_sizes().len();
    let qi = usize::from(mode >> 3) % nq;
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
    let Ok(mut fuzzed) = vq.create_queue::<Queue>() else {
        return 0;
    };
    if mode & 1 == 1 {
        fuzzed.set_event_idx(true);
        // The driver's used_event, from the payload: any index, past the ring's too.
        let used_event = payload
            .get(..2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let at = vq.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE));
        let _ = mem.write_obj(used_event, at);
    }
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
    let Some(dev) = device(Kind::from_byte(kind), &mem) else {
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

/// A kernel and an initramfs from `data`, loaded as a start loads them; `true` if both
/// loaded. The first byte chooses ELF or bzImage (its magic is set, so inputs reach the
/// header parsers) and where the initramfs starts in `data`; an ELF kernel is entered
/// through PVH when the initramfs's first byte is odd, else the 64-bit protocol.
pub fn loader(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let split = rest.len() * usize::from(mode >> 1) / 128;
    let (kernel, initrd) = rest.split_at(split.min(rest.len()));
    let mut kernel = kernel.to_vec();
    if mode & 1 == 0 {
        // 64-bit little-endian, as the loader requires before reading further.
        if kernel.len() >= 6 {
            kernel[..6].copy_from_slice(b"\x7fELF\x02\x01");
        }
    } else {
        if kernel.len() < 0x210 {
            kernel.resize(0x210, 0);
        }
        kernel[0x202..0x206].copy_from_slice(b"HdrS");
    }
    let (kpath, ipath) = (scratch().join("kernel"), scratch().join("initrd"));
    if std::fs::write(&kpath, &kernel).is_err() || std::fs::write(&ipath, initrd).is_err() {
        return false;
    }
    let pvh = initrd.first().is_some_and(|b| b & 1 == 1);
    let mem = mock_memory();
    crate::boot::load(
        &mem,
        MEM,
        &kpath,
        Some(&ipath),
        "console=hvc0",
        0xe_0000,
        pvh,
    )
    .is_ok()
}

#[cfg(test)]
/// An x86-64 ELF with one PT_LOAD at 1 MiB and a PVH entry note.
pub(crate) fn minimal_elf() -> Vec<u8> {
    let mut e = vec![0u8; 0x100];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    e[0x18..0x20].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    e[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes()); // phnum
    let ph = |e: &mut Vec<u8>, at: usize, kind: u32, off: u64, addr: u64, size: u64| {
        e[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        e[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        e[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        e[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        e[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        e[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
    };
    ph(&mut e, 0x40, 1, 0xf0, 0x10_0000, 0x10); // PT_LOAD
    ph(&mut e, 0x78, 4, 0xc0, 0, 0x18); // PT_NOTE

    // Note "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), a 4-byte entry point.
    e[0xc0..0xc4].copy_from_slice(&4u32.to_le_bytes());
    e[0xc4..0xc8].copy_from_slice(&4u32.to_le_bytes());
    e[0xc8..0xcc].copy_from_slice(&18u32.to_le_bytes());
    e[0xcc..0xd0].copy_from_slice(b"Xen\0");
    e[0xd0..0xd4].copy_from_slice(&0x10_0000u32.to_le_bytes());
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::fuzzing::seeded_inputs as inputs;

    #[test]
    fn hostile_queues_on_every_device_seeded() {
        let mut returned = [0u32; Kind::ALL.len()];
        for d in inputs(0x5eed_1234, 3000, 400) {
            let n = queues(&d);
            if let Some(&m) = d.first() {
                returned[usize::from(m) % Kind::ALL.len()] += u32::from(n);
            }
        }
        // The run reached each device's queue handling, not only the early exits.
        assert!(
            returned.iter().all(|&n| n > 0),
            "chains returned per device: {returned:?}"
        );
    }

    #[test]
    fn hostile_kernels_and_initramfs_seeded() {
        let loaded = inputs(0x10ad_0001, 3000, 1200)
            .iter()
            .filter(|d| loader(d))
            .count();
        // Random headers almost never make a loadable kernel; what matters is that none
        // panicked. One that does load must be a deliberate one:
        assert_eq!(loaded, 0);
        let mut elf = vec![0u8; 1];
        elf.extend(minimal_elf());
        elf.extend(b"initramfs");
        elf[0] = ((minimal_elf().len() * 128 / (elf.len() - 1)) as u8 + 1) << 1;
        assert!(loader(&elf), "a well-formed ELF with a PVH note loads");
        // An even first initramfs byte takes the 64-bit protocol: the same ELF loads.
        let at = elf.len() - b"initramfs".len();
        elf[at] = b'h';
        assert!(loader(&elf), "and loads for the 64-bit entry");
    }

    #[test]
    fn hostile_register_accesses_seeded() {
        let writes: usize = inputs(0xfeed_0042, 3000, 600).iter().map(|d| mmio(d)).sum();
        assert!(writes > 0);
    }
}
