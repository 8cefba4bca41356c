//! The balloon over mock guest memory: discards land where they should and nowhere
//! else, whatever the guest sends.

use super::*;
use crate::virtio::testutil::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const ALL: u64 = VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;
/// Test RAM is 16 MiB at 0; queue structures live below 1 MiB, data pages above.
const DATA: u64 = 0x40_0000;

fn regions(mem: &GuestMemoryMmap) -> Vec<RamRegion> {
    mem.iter()
        .map(|r| RamRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: 0,
            host_addr: r.as_ptr() as u64,
        })
        .collect()
}

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    qs: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    dev: Balloon,
    control: Arc<BalloonControl>,
    irq: Arc<Interrupt>,
}

fn rig(mem: &GuestMemoryMmap, acked: u64) -> Rig<'_> {
    let qs: Vec<_> = (0..4)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x4000), 64))
        .collect();
    let (mut dev, control) = Balloon::new(regions(mem), None, false, None).unwrap();
    let n = roles(acked).len();
    let (mut act, irq) = activation(
        mem,
        qs[..n].iter().map(|q| q.create_queue().unwrap()).collect(),
    );
    act.acked_features = acked;
    dev.activate(act).unwrap();
    Rig {
        mem,
        qs,
        dev,
        control,
        irq,
    }
}

/// The guest puts a list of frame numbers on the inflate queue; it must come back used.
fn inflate(r: &mut Rig<'_>, list: &[u8]) {
    r.mem.write_slice(list, GuestAddress(0x10_0000)).unwrap();
    r.qs[0]
        .build_desc_chain(&[desc(0x10_0000, list.len() as u32, 0, 0)])
        .unwrap();
    r.dev.queue_notify(0);
    assert_eq!(used(&r.qs[0]).len(), 1);
}

fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, b: u8) {
    mem.write_slice(&vec![b; len], GuestAddress(addr)).unwrap();
}

fn all(mem: &GuestMemoryMmap, addr: u64, len: usize, b: u8) -> bool {
    read_bytes(mem, addr, len).iter().all(|x| *x == b)
}

#[test]
fn inflate_discards_listed_frames_only_and_refuses_the_rest() {
    let mem = test_mem();
    let mut r = rig(&mem, ALL);
    fill(r.mem, DATA, 0x6000, 0xaa);
    // Frames DATA/4K .. +2 (one run), DATA/4K+4 (alone); then hostile ones: past the end
    // of RAM, the last u32, and the MMIO hole.
    let first = (DATA >> 12) as u32;
    let pfns: Vec<u32> = vec![
        first,
        first + 1,
        first + 2,
        first + 4,
        (16 << 20 >> 12) as u32,
        u32::MAX,
        (0xd000_0000u64 >> 12) as u32,
    ];
    let list: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    inflate(&mut r, &list);
    assert!(all(r.mem, DATA, 0x3000, 0), "frames 0..2 discarded");
    assert!(all(r.mem, DATA + 0x3000, 0x1000, 0xaa), "frame 3 kept");
    assert!(all(r.mem, DATA + 0x4000, 0x1000, 0), "frame 4 discarded");
    assert!(all(r.mem, DATA + 0x5000, 0x1000, 0xaa), "frame 5 kept");
    let s = r.control.status();
    assert_eq!(s.inflated_bytes, 4 * 4096);
    assert_eq!(s.refused, 3);
    assert!(r.irq.evt.read().unwrap() >= 1);
}

#[test]
fn a_huge_inflate_list_is_read_only_up_to_its_bound() {
    let mem = test_mem();
    let mut r = rig(&mem, ALL);
    // 16 Ki frame numbers (64 KiB), all pointing at one kept page past the bound.
    let first = (DATA >> 12) as u32;
    let mut list: Vec<u8> = Vec::new();
    for i in 0..(MAX_PFNS_PER_CHAIN as u32) {
        list.extend((first + (i % 8)).to_le_bytes());
    }
    list.extend((first + 100).to_le_bytes());
    fill(r.mem, DATA + 100 * 4096, 4096, 0x55);
    inflate(&mut r, &list);
    assert!(
        all(r.mem, DATA + 100 * 4096, 4096, 0x55),
        "past the bound: not read"
    );
}

#[test]
fn reported_ranges_are_discarded_and_hostile_ones_refused() {
    let mem = test_mem();
    let mut r = rig(&mem, ALL);
    fill(r.mem, DATA, 0x20_0000 + 0x1000, 0x77);
    r.qs[3]
        .build_desc_chain(&[
            // A free 2 MiB block, as Linux reports them.
            desc(DATA, 0x20_0000, F_WRITE, 0),
            // Past the end of RAM; straddling the end; in the MMIO hole.
            desc(16 << 20, 0x1000, F_WRITE, 0),
            desc((16 << 20) - 0x1000, 0x2000, F_WRITE, 0),
            desc(0xd000_0000, 0x1000, F_WRITE, 0),
            // Misaligned; empty; wrapping the address space.
            desc(DATA + 0x20_0800, 0x1000, F_WRITE, 0),
            desc(DATA, 0, F_WRITE, 0),
            desc(u64::MAX - 0xfff, 0x2000, F_WRITE, 0),
        ])
        .unwrap();
    r.dev.queue_notify(3);
    assert_eq!(used(&r.qs[3]).len(), 1);
    assert!(all(r.mem, DATA, 0x20_0000, 0));
    assert!(all(r.mem, DATA + 0x20_0000, 0x1000, 0x77));
    let s = r.control.status();
    assert_eq!(s.reported_bytes, 0x20_0000);
    assert_eq!(s.refused, 6);
}

#[test]
fn without_stats_the_reporting_queue_is_the_third() {
    let mem = test_mem();
    let mut r = rig(&mem, VIRTIO_F_VERSION_1 | F_REPORTING);
    fill(r.mem, DATA, 0x1000, 0x11);
    r.qs[2]
        .build_desc_chain(&[desc(DATA, 0x1000, F_WRITE, 0)])
        .unwrap();
    r.dev.queue_notify(2);
    assert!(all(r.mem, DATA, 0x1000, 0));
    assert_eq!(r.control.status().features, vec!["reporting"]);
    // A notify for a queue that does not exist is ignored.
    r.dev.queue_notify(3);
}

#[test]
fn stats_are_held_and_given_back_for_fresh_figures() {
    let mem = test_mem();
    let mut r = rig(&mem, ALL);
    let mut buf = Vec::new();
    for (tag, v) in [(4u16, 100u64 << 20), (5, 512 << 20), (999, 1)] {
        buf.extend(tag.to_le_bytes());
        buf.extend(v.to_le_bytes());
    }
    r.mem.write_slice(&buf, GuestAddress(0x10_0000)).unwrap();
    r.qs[2]
        .build_desc_chain(&[desc(0x10_0000, buf.len() as u32, 0, 0)])
        .unwrap();
    r.dev.queue_notify(2);
    assert!(used(&r.qs[2]).is_empty(), "held until figures are wanted");
    let s = r.control.status();
    assert_eq!(s.stats.get("free_memory"), Some(&(100 << 20)));
    assert_eq!(s.stats.get("total_memory"), Some(&(512 << 20)));
    assert_eq!(s.stats.len(), 2, "unknown tags dropped");
    // status() asked for a refresh: the event hands the buffer back.
    r.dev.handle_event(TOK_REFRESH, EventSet::IN);
    assert_eq!(used(&r.qs[2]).len(), 1);
}

#[test]
fn a_stats_buffer_queued_before_activation_is_read_at_activation() {
    let mem = test_mem();
    let qs: Vec<_> = (0..4)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(i * 0x4000), 64))
        .collect();
    let mut buf = Vec::new();
    buf.extend(6u16.to_le_bytes());
    buf.extend((300u64 << 20).to_le_bytes());
    mem.write_slice(&buf, GuestAddress(0x10_0000)).unwrap();
    qs[2]
        .build_desc_chain(&[desc(0x10_0000, buf.len() as u32, 0, 0)])
        .unwrap();
    let (mut dev, control) = Balloon::new(regions(&mem), None, false, None).unwrap();
    let (mut act, _irq) = activation(&mem, qs.iter().map(|q| q.create_queue().unwrap()).collect());
    act.acked_features = ALL;
    dev.activate(act).unwrap();
    assert_eq!(
        control.status().stats.get("available_memory"),
        Some(&(300 << 20))
    );
}

#[test]
fn target_and_actual_through_config_space() {
    let mem = test_mem();
    let mut r = rig(&mem, ALL);
    r.control.set_target(8).unwrap();
    let mut b = [0u8; 4];
    r.dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 8 << 8);
    assert!(r.irq.status.load(std::sync::atomic::Ordering::SeqCst) & INT_CONFIG != 0);
    r.dev.write_config(4, &(2048u32).to_le_bytes());
    r.dev.write_config(0, &(1u32).to_le_bytes()); // num_pages is not the driver's
    assert_eq!(r.control.status().actual_mib, 8);
    assert_eq!(r.control.status().target_mib, 8);
    let e = r.control.set_target(16).unwrap_err();
    assert!(e.contains("below guest RAM"), "{e}");
    assert!(r.control.set_target(u64::MAX).is_err());
    // Odd-sized reads of config space are tolerated.
    let mut odd = [0xffu8; 3];
    r.dev.read_config(6, &mut odd);
    assert_eq!(odd, [0, 0, 0]);
}

#[test]
fn shared_ram_is_punched_out_of_the_file() {
    use std::os::unix::fs::FileExt;
    let ram = crate::memory::create(
        32 << 20,
        crate::memory::Backing::Shared,
        crate::memory::HugePages::Off,
        true,
    )
    .unwrap();
    let file = ram.file.clone().unwrap();
    fill(&ram.mem, DATA, 0x2000, 0x5a);
    let d = Discarder::new(ram.regions.clone(), Some(file.clone()), false);
    assert_eq!(d.discard(DATA, 0x1000), Discard::Done);
    let mut b = [0xffu8; 2];
    file.read_exact_at(&mut b[..1], DATA).unwrap();
    file.read_exact_at(&mut b[1..], DATA + 0x1000).unwrap();
    assert_eq!(
        b,
        [0, 0x5a],
        "punched page reads zero in the file; its neighbour is kept"
    );
    assert!(all(&ram.mem, DATA, 0x1000, 0), "and through the mapping");
    assert_eq!(d.discard(32 << 20, 0x1000), Discard::Refused);
    // On hugetlbfs only whole 2 MiB pages can go.
    let h = Discarder::new(ram.regions.clone(), Some(file), true);
    assert_eq!(h.discard(DATA, 0x1000), Discard::Refused);
}
