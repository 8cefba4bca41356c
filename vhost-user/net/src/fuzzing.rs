//! The back end's guest-facing parsing, driven by arbitrary bytes: the body of the fuzz
//! target (`vhost-user/net/fuzz`, cargo-fuzz) and of a seeded run on stable Rust in
//! `cargo test`. The bytes become a descriptor table (addresses in and out of guest
//! memory, any lengths, flags and links, loops included), a virtio-net header and a frame;
//! then the TX path and the RX path run over them. Nothing may panic, and every chain the
//! guest offered goes back to it at most once: the back end never returns more chains
//! than it took, by its own counts. (Not "than the ring holds", nor by the indices in
//! guest memory: a hostile guest may point a receive buffer, through an indirect table,
//! at the rings themselves, and a frame then rewrites their indices.)

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::header::HDR_LEN;
use crate::queues::{deliver_rx, drain_tx, FRAME_BUF};
use crate::{CounterValues, Counters};

const QUEUE: u16 = 16;
const MEM: u64 = 1 << 20;

/// Returns what moved and what was dropped, so a run can show it reached both.
pub fn frames(data: &[u8]) -> CounterValues {
    let Some((&mode, rest)) = data.split_first() else {
        return CounterValues::default();
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)])
        .expect("mock memory");
    let vq = MockSplitQueue::new(&mem, QUEUE);
    let (table, payload) = rest.split_at(rest.len().min(8 * usize::from(QUEUE)));
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(8)
        .map(|c| {
            // Addresses from the low half of memory upwards, some past its end.
            let addr = u64::from(u32::from_le_bytes([c[0], c[1], c[2], 0])) * 2 + 0x4_0000;
            let len = u32::from(u16::from_le_bytes([c[3], c[4]])) * (1 + u32::from(c[5] >> 6));
            let flags = u16::from(c[5] & 0x7);
            let next = u16::from(c[6]) % (QUEUE + 2);
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    if descs.is_empty() || vq.build_multiple_desc_chains(&descs).is_err() {
        return CounterValues::default();
    }
    // Guest bytes the TX path reads: a header and a frame from the input.
    let _ = mem.write_slice(&payload[..payload.len().min(4096)], GuestAddress(0x4_0000));
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return CounterValues::default();
    };
    let c = Counters::default();
    let features = u64::from(mode) << 8 | u64::from(mode & 1);
    if mode & 0x80 == 0 {
        let mut buf = Vec::new();
        let n = drain_tx(&mem, &mut q, features, &mut buf, &c, |f| {
            assert!(
                (HDR_LEN..=FRAME_BUF).contains(&f.len()),
                "a frame of {} bytes passed",
                f.len()
            );
            Ok(f.len())
        });
        assert!(n <= usize::from(QUEUE));
    } else {
        let mut frame = vec![0u8; HDR_LEN];
        frame.extend_from_slice(&payload[..payload.len().min(FRAME_BUF - HDR_LEN)]);
        for _ in 0..usize::from(QUEUE) + 1 {
            let _ = deliver_rx(&mem, &mut q, &frame, mode & 0x40 != 0, &c);
        }
    }
    // Both counts are the back end's own: the guest may have written over the used
    // ring's index too.
    let (used, taken) = (q.next_used(), q.next_avail());
    assert!(used <= taken, "{used} chains returned, {taken} taken");
    c.values()
}

#[cfg(test)]
mod tests {
    /// Found by the fuzzer (2026-12-04): a receive buffer reached through an indirect
    /// table lies over the avail ring, so delivering a frame raised the ring's index from
    /// 12 to 24 and the back end rightly took 17 chains. The device was right; the
    /// harness had assumed at most one ring's worth.
    #[test]
    fn a_frame_written_over_the_avail_ring_is_no_double_return() {
        let input = include_bytes!("../fuzz/regressions/rx-buffer-over-the-avail-ring");
        let v = super::frames(input);
        assert!(v.rx_frames > 0 && v.rx_dropped > 0, "{v:?}");
        // The second finding: the used ring's index in guest memory read 14 while the
        // back end had returned nothing (it refused every frame), so the check now reads
        // the back end's own counts; guest memory is the guest's to scribble on.
        let input = include_bytes!("../fuzz/regressions/rx-used-index-written-by-the-guest");
        super::frames(input);
    }

    /// The fuzz target's body over seeded pseudo-random inputs, so `cargo test` on stable
    /// covers what the fuzzer does on nightly.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut totals = [0u64; 4];
        for round in 0..3000 {
            let len = (next() % 400) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 3 == 0 {
                // Bias some inputs towards plausible chains: small lengths, in memory.
                for c in data.chunks_mut(8).skip(1).take(16) {
                    if c.len() == 8 {
                        c[2] = 0;
                        c[4] = 0;
                    }
                }
            }
            let v = super::frames(&data);
            for (t, n) in
                totals
                    .iter_mut()
                    .zip([v.tx_frames, v.tx_malformed, v.rx_frames, v.rx_dropped])
            {
                *t += n;
            }
        }
        // The inputs reached every outcome: sent, refused, delivered, dropped.
        assert!(
            totals.iter().all(|&t| t > 0),
            "tx ok/bad, rx ok/dropped: {totals:?}"
        );
    }
}
