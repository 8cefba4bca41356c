//! virtio-mem over mock guest memory: requests change the plugged state only when they
//! are valid, unplugged blocks are discarded and nothing else is, and hostile chains get
//! an error or nothing, never a panic.

use super::*;
use crate::virtio::testutil::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// Boot RAM 16 MiB at 0 holds the queue; the hot-plug region is 16 MiB (8 blocks) at
/// 32 MiB, with a gap before it as in the real layout.
const REGION: u64 = 32 << 20;
const REGION_SIZE: u64 = 16 << 20;
const REQ_AT: u64 = 0x10_0000;
const RESP_AT: u64 = 0x20_0000;

fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 16 << 20),
        (GuestAddress(REGION), REGION_SIZE as usize),
    ])
    .unwrap()
}

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    q: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: VirtioMem,
    control: Arc<MemControl>,
    irq: Arc<Interrupt>,
}

fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    rig_on(mem, None, false)
}

/// `hugetlb`: the device treats the region as hugetlbfs memory that holds no pages
/// until a plug populates them; `file` backs the region.
fn rig_on(mem: &GuestMemoryMmap, file: Option<Arc<std::fs::File>>, hugetlb: bool) -> Rig<'_> {
    let q = MockSplitQueue::create(mem, GuestAddress(0), 64);
    let region = ram_regions(mem)[1];
    assert_eq!(region.guest_addr, REGION);
    let (mut dev, control) = VirtioMem::new(region, file, hugetlb);
    let (act, irq) = activation(mem, vec![q.create_queue().unwrap()]);
    dev.activate(act).unwrap();
    Rig {
        mem,
        q,
        dev,
        control,
        irq,
    }
}

fn req(kind: u16, addr: u64, nb: u16) -> Vec<u8> {
    let mut r = vec![0u8; REQ_LEN];
    r[..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&nb.to_le_bytes());
    r
}

/// Send one request as Linux does (request readable, response writable); returns the
/// used length, the response type and the state field.
fn send(r: &mut Rig<'_>, request: &[u8]) -> (u32, u16, u16) {
    r.mem.write_slice(request, GuestAddress(REQ_AT)).unwrap();
    r.mem
        .write_slice(&[0xee; RESP_LEN], GuestAddress(RESP_AT))
        .unwrap();
    r.q.build_desc_chain(&[
        desc(REQ_AT, request.len() as u32, 0, 0),
        desc(RESP_AT, RESP_LEN as u32, F_WRITE, 0),
    ])
    .unwrap();
    let before = used(&r.q).len();
    r.dev.queue_notify(0);
    let all = used(&r.q);
    assert_eq!(all.len(), before + 1, "the chain came back used");
    let b = read_bytes(r.mem, RESP_AT, RESP_LEN);
    (
        all[before].1,
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[8], b[9]]),
    )
}

fn resp(r: &mut Rig<'_>, kind: u16, addr: u64, nb: u16) -> u16 {
    let (len, t, _) = send(r, &req(kind, addr, nb));
    assert_eq!(len, RESP_LEN as u32);
    t
}

fn state(r: &mut Rig<'_>, addr: u64, nb: u16) -> u16 {
    let (_, t, s) = send(r, &req(REQ_STATE, addr, nb));
    assert_eq!(t, RESP_ACK);
    s
}

fn config(dev: &VirtioMem) -> [u64; 7] {
    let mut out = [0u64; 7];
    for (i, v) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        dev.read_config(i as u64 * 8, &mut b);
        *v = u64::from_le_bytes(b);
    }
    out
}

fn block(i: u64) -> u64 {
    REGION + i * BLOCK_SIZE
}

#[test]
fn config_describes_the_region_and_a_new_request_interrupts_the_guest() {
    let mem = test_mem();
    let r = rig(&mem);
    let [bs, node, addr, size, usable, plugged, requested] = config(&r.dev);
    assert_eq!((bs, node, addr), (BLOCK_SIZE, 0, REGION));
    assert_eq!(
        (size, usable, plugged, requested),
        (REGION_SIZE, REGION_SIZE, 0, 0)
    );
    // A read past the 56 bytes is zeroes, not a panic.
    let mut b = [0xffu8; 8];
    r.dev.read_config(200, &mut b);
    assert_eq!(b, [0; 8]);

    r.control.set_requested(6).unwrap();
    assert_eq!(config(&r.dev)[6], 6 << 20);
    assert_eq!(
        r.irq.status.load(std::sync::atomic::Ordering::SeqCst) & INT_CONFIG,
        INT_CONFIG
    );
    assert!(r.irq.evt.read().unwrap() >= 1);
    // Past the region, or not whole blocks: refused, and the request stands.
    assert!(r.control.set_requested(32).is_err());
    assert!(r.control.set_requested(3).is_err());
    assert!(r.control.set_requested(u64::MAX).is_err());
    assert_eq!(r.control.status().requested_mib, 6);
}

#[test]
fn plug_is_acked_up_to_the_request_and_refused_past_it() {
    let mem = test_mem();
    let mut r = rig(&mem);
    // Nothing requested yet: the guest may not plug.
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 1), RESP_NACK);
    r.control.set_requested(6).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 2), RESP_ACK);
    assert_eq!(resp(&mut r, REQ_PLUG, block(5), 1), RESP_ACK);
    assert_eq!(config(&r.dev)[5], 6 << 20);
    // A fourth block would pass the 6 MiB asked for.
    assert_eq!(resp(&mut r, REQ_PLUG, block(2), 1), RESP_NACK);
    // Already plugged, even in part.
    r.control.set_requested(16).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(1), 2), RESP_ERROR);
    assert_eq!(state(&mut r, block(0), 2), STATE_PLUGGED);
    assert_eq!(state(&mut r, block(2), 3), STATE_UNPLUGGED);
    assert_eq!(state(&mut r, block(4), 2), STATE_MIXED);
    let s = r.control.status();
    assert_eq!((s.plugged_mib, s.plugs, s.refused), (6, 2, 3));
    assert!(s.active);
}

#[test]
fn requests_outside_the_region_are_errors_and_change_nothing() {
    let mem = test_mem();
    let mut r = rig(&mem);
    r.control.set_requested(16).unwrap();
    for (addr, nb) in [
        (block(0) + 0x1000, 1),         // misaligned
        (block(0), 0),                  // no blocks
        (block(7), 2),                  // runs past the end
        (block(8), 1),                  // just past the end
        (0, 1),                         // boot RAM
        (REGION - BLOCK_SIZE, 2),       // straddles the start
        (u64::MAX - BLOCK_SIZE + 1, 2), // wraps the address space
        (block(0), u16::MAX),           // far more blocks than the region has
    ] {
        for kind in [REQ_PLUG, REQ_UNPLUG, REQ_STATE] {
            let (len, t, _) = send(&mut r, &req(kind, addr, nb));
            assert_eq!(
                (len, t),
                (RESP_LEN as u32, RESP_ERROR),
                "{kind} {addr:#x} {nb}"
            );
        }
    }
    // An unknown request type.
    assert_eq!(resp(&mut r, 9, block(0), 1), RESP_ERROR);
    let s = r.control.status();
    assert_eq!((s.plugged_mib, s.plugs, s.unplugs), (0, 0, 0));
    assert_eq!(s.refused, 8 * 3 + 1);
    assert_eq!(state(&mut r, block(0), 8), STATE_UNPLUGGED);
}

#[test]
fn unplug_discards_those_blocks_only() {
    let mem = test_mem();
    let mut r = rig(&mem);
    r.control.set_requested(16).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 4), RESP_ACK);
    r.mem
        .write_slice(&vec![0x5a; 4 * BLOCK_SIZE as usize], GuestAddress(block(0)))
        .unwrap();
    r.mem
        .write_slice(&[0x5a; 64], GuestAddress(0x30_0000))
        .unwrap();
    // Unplugging blocks that are not all plugged is an error and discards nothing.
    assert_eq!(resp(&mut r, REQ_UNPLUG, block(3), 2), RESP_ERROR);
    assert!(read_bytes(r.mem, block(3), 4096).iter().all(|b| *b == 0x5a));
    assert_eq!(resp(&mut r, REQ_UNPLUG, block(1), 2), RESP_ACK);
    assert!(read_bytes(r.mem, block(1), 2 * BLOCK_SIZE as usize)
        .iter()
        .all(|b| *b == 0));
    for kept in [block(0), block(3)] {
        assert!(read_bytes(r.mem, kept, BLOCK_SIZE as usize)
            .iter()
            .all(|b| *b == 0x5a));
    }
    assert_eq!(
        read_bytes(r.mem, 0x30_0000, 64),
        vec![0x5a; 64],
        "boot RAM untouched"
    );
    assert_eq!(state(&mut r, block(0), 4), STATE_MIXED);
    assert_eq!(r.control.status().plugged_mib, 4);
    // Unplugging twice is an error.
    assert_eq!(resp(&mut r, REQ_UNPLUG, block(1), 1), RESP_ERROR);
}

#[test]
fn unplug_all_discards_every_plugged_run() {
    let mem = test_mem();
    let mut r = rig(&mem);
    r.control.set_requested(16).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 2), RESP_ACK);
    assert_eq!(resp(&mut r, REQ_PLUG, block(5), 3), RESP_ACK);
    r.mem
        .write_slice(&vec![0x11; REGION_SIZE as usize], GuestAddress(REGION))
        .unwrap();
    assert_eq!(resp(&mut r, REQ_UNPLUG_ALL, 0, 0), RESP_ACK);
    assert!(read_bytes(r.mem, block(0), 2 * BLOCK_SIZE as usize)
        .iter()
        .all(|b| *b == 0));
    assert!(read_bytes(r.mem, block(5), 3 * BLOCK_SIZE as usize)
        .iter()
        .all(|b| *b == 0));
    // Blocks that were never plugged are not the device's to discard.
    assert!(read_bytes(r.mem, block(2), 3 * BLOCK_SIZE as usize)
        .iter()
        .all(|b| *b == 0x11));
    assert_eq!(state(&mut r, block(0), 8), STATE_UNPLUGGED);
    let s = r.control.status();
    assert_eq!((s.plugged_mib, s.unplugs, s.discard_errors), (0, 1, 0));
    assert_eq!(config(&r.dev)[5], 0);
}

#[test]
fn hostile_chains_get_an_error_or_nothing() {
    let mem = test_mem();
    let mut r = rig(&mem);
    r.control.set_requested(16).unwrap();
    // A request shorter than 24 bytes: ERROR, nothing plugged.
    let (len, t, _) = send(&mut r, &req(REQ_PLUG, block(0), 1)[..16]);
    assert_eq!((len, t), (RESP_LEN as u32, RESP_ERROR));
    // No writable descriptor, one too small, or one outside guest memory: the chain comes
    // back with nothing written, and a valid request in it is still not served twice.
    let chains: [&[_]; 3] = [
        &[desc(REQ_AT, 24, 0, 0)],
        &[desc(REQ_AT, 24, 0, 0), desc(RESP_AT, 4, F_WRITE, 0)],
        &[
            desc(REQ_AT, 24, 0, 0),
            desc(0xffff_f000_0000, 10, F_WRITE, 0),
        ],
    ];
    r.mem
        .write_slice(&req(REQ_STATE, block(0), 1), GuestAddress(REQ_AT))
        .unwrap();
    for c in chains {
        r.q.build_desc_chain(c).unwrap();
        let before = used(&r.q).len();
        r.dev.queue_notify(0);
        assert_eq!(used(&r.q)[before].1, 0);
    }
    // A request outside guest memory: ERROR.
    r.q.build_desc_chain(&[
        desc(0xffff_f000_0000, 24, 0, 0),
        desc(RESP_AT, RESP_LEN as u32, F_WRITE, 0),
    ])
    .unwrap();
    r.dev.queue_notify(0);
    assert_eq!(read_bytes(r.mem, RESP_AT, 2), RESP_ERROR.to_le_bytes());
    assert_eq!(r.control.status().plugged_mib, 0);
}

#[test]
fn plugged_blocks_survive_a_reset() {
    let mem = test_mem();
    let mut r = rig(&mem);
    r.control.set_requested(4).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 2), RESP_ACK);
    r.dev.reset();
    let s = r.control.status();
    assert_eq!((s.active, s.plugged_mib, s.requested_mib), (false, 4, 4));
    // Requests set while the driver is away are kept for it, and raise nothing.
    r.control.set_requested(8).unwrap();
    assert_eq!(config(&r.dev)[5..], [4 << 20, 8 << 20]);
    // No queue, no work: a stray notify is ignored.
    r.dev.queue_notify(0);
}

#[test]
fn a_full_queue_is_served_a_budget_per_turn() {
    let mem = test_mem();
    let q = MockSplitQueue::create(&mem, GuestAddress(0), 1024);
    let region = ram_regions(&mem)[1];
    let (mut dev, control) = VirtioMem::new(region, None, false);
    let chains: Vec<_> = (0..300u64)
        .flat_map(|i| {
            [
                desc(REQ_AT, 24, F_NEXT, (2 * i + 1) as u16),
                desc(RESP_AT + i * 16, 10, F_WRITE, 0),
            ]
        })
        .collect();
    mem.write_slice(&req(REQ_STATE, block(0), 1), GuestAddress(REQ_AT))
        .unwrap();
    q.add_desc_chains(&chains, 0).unwrap();
    let (act, _, kicks) = activation_with_kicks(&mem, vec![q.create_queue().unwrap()]);
    dev.activate(act).unwrap();
    dev.queue_notify(0);
    assert_eq!(used(&q).len(), crate::virtio::QUEUE_BUDGET);
    assert_eq!(kicks[0].read().unwrap(), 1, "not requeued");
    dev.queue_notify(0);
    assert_eq!(used(&q).len(), 300);
    assert_eq!(control.status().refused, 0);
}

#[test]
fn the_balloon_counts_only_what_is_plugged_as_guest_ram() {
    use crate::virtio::balloon::Balloon;
    let mem = test_mem();
    let mut r = rig(&mem);
    // The balloon sees both regions (it may be told of pages in either), but a target
    // past boot RAM asks for memory the guest does not have until it is plugged.
    let (_dev, balloon) =
        Balloon::new(ram_regions(&mem), None, false, Some(r.control.clone())).unwrap();
    assert!(balloon.set_target(15).is_ok());
    let e = balloon.set_target(16).unwrap_err();
    assert!(e.contains("below guest RAM (16 MiB)"), "{e}");
    r.control.set_requested(4).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 2), RESP_ACK);
    assert!(balloon.set_target(19).is_ok());
    assert!(balloon.set_target(20).is_err());
    assert_eq!(resp(&mut r, REQ_UNPLUG, block(0), 2), RESP_ACK);
    assert!(balloon.set_target(16).is_err());
}

#[test]
fn a_plug_takes_host_pages_first_and_is_refused_without_them() {
    use std::os::unix::fs::MetadataExt;
    use vm_memory::FileOffset;
    // The region is a memfd: a page past the file's end has nothing behind it, as a
    // hugetlbfs mapping made without a reservation has nothing once the pool is empty.
    let file = crate::memory::memfd(REGION_SIZE, false).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([
        (GuestAddress(0), 16 << 20, None),
        (
            GuestAddress(REGION),
            REGION_SIZE as usize,
            Some(FileOffset::from_arc(file.clone(), 0)),
        ),
    ])
    .unwrap();
    let mut r = rig_on(&mem, Some(file.clone()), true);
    r.control.set_requested(8).unwrap();
    assert_eq!(file.metadata().unwrap().blocks(), 0);
    assert_eq!(resp(&mut r, REQ_PLUG, block(0), 1), RESP_ACK);
    // Populated before the guest was told yes.
    assert!(file.metadata().unwrap().blocks() * 512 >= BLOCK_SIZE);
    file.set_len(2 * BLOCK_SIZE).unwrap();
    // Blocks 1-2 reach past the end now: BUSY (try later), not plugged, what the try
    // allocated given back, and the VMM still here (a guest store there would have been
    // a SIGBUS).
    assert_eq!(resp(&mut r, REQ_PLUG, block(1), 2), RESP_BUSY);
    assert_eq!(state(&mut r, block(1), 1), STATE_UNPLUGGED);
    assert!(file.metadata().unwrap().blocks() * 512 <= BLOCK_SIZE);
    let s = r.control.status();
    assert_eq!((s.plugged_mib, s.plugs, s.refused), (2, 1, 1));
    // Once there are pages again, the guest's retry succeeds.
    file.set_len(REGION_SIZE).unwrap();
    assert_eq!(resp(&mut r, REQ_PLUG, block(2), 1), RESP_ACK);
}
