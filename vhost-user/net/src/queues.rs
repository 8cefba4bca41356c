//! Frames between the tap and the guest's queues. Nothing a guest puts in a descriptor
//! chain can make these functions fail: a hostile chain costs the guest its frame (or its
//! buffer) and moves a counter.

use std::io::{Read, Write};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::header::{self, check_tx, VnetHdr, HDR_LEN, MAX_FRAME, NUM_BUFFERS_OFFSET};
use crate::Counters;

/// Largest buffer a frame with its header needs.
pub const FRAME_BUF: usize = HDR_LEN + MAX_FRAME;

/// Send every frame the guest queued on the TX queue through `send`. Returns how many
/// chains were returned to the guest.
pub fn drain_tx<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
    features: u64,
    buf: &mut Vec<u8>,
    c: &Counters,
    mut send: impl FnMut(&[u8]) -> std::io::Result<usize>,
) -> usize {
    let mut returned = 0;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match gather(mem, chain, buf, features) {
            Ok(()) => match send(buf) {
                Ok(_) => {
                    Counters::add(&c.tx_frames, 1);
                    Counters::add(&c.tx_bytes, (buf.len() - HDR_LEN) as u64);
                }
                Err(e) => {
                    Counters::add(&c.tx_errors, 1);
                    tracing::debug!("tap refused a frame: {e}");
                }
            },
            Err(why) => {
                Counters::add(&c.tx_malformed, 1);
                tracing::debug!("dropped a frame from the guest: {why}");
            }
        }
        // TX buffers are only read: nothing written, length 0.
        if q.add_used(mem, head, 0).is_err() {
            break;
        }
        returned += 1;
    }
    returned
}

/// Copy one TX chain (header and frame) into `buf` and check it.
fn gather<M: GuestMemory>(
    mem: &M,
    chain: virtio_queue::DescriptorChain<&M>,
    buf: &mut Vec<u8>,
    features: u64,
) -> Result<(), String> {
    let mut r = chain.reader(mem).map_err(|e| format!("chain: {e}"))?;
    let n = r.available_bytes();
    if !(HDR_LEN..=FRAME_BUF).contains(&n) {
        return Err(header::BadFrame::Size(n.saturating_sub(HDR_LEN)).to_string());
    }
    buf.resize(n, 0);
    r.read_exact(buf).map_err(|e| format!("read: {e}"))?;
    let h: &[u8; HDR_LEN] = buf[..HDR_LEN].try_into().expect("header length");
    check_tx(&VnetHdr::parse(h), n - HDR_LEN, features).map_err(|e| e.to_string())
}

/// What became of a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rx {
    /// In the guest's buffers, in this many chains.
    Delivered(u16),
    /// The guest has not posted enough buffers: keep the frame and try again when it does.
    NoRoom,
    /// Dropped (a hostile chain, or a frame larger than the guest can ever take).
    Dropped,
}

/// Put one frame (its header first) into the RX queue: across several chains when
/// mergeable buffers were negotiated (`num_buffers` says how many), in one otherwise.
pub fn deliver_rx<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
    frame: &[u8],
    mergeable: bool,
    c: &Counters,
) -> Rx {
    let start = q.next_avail();
    let mut chains = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        if chains.len() >= usize::from(q.size()) || (!mergeable && !chains.is_empty()) {
            // More chains than the ring holds, or one chain where only one may be used:
            // the guest can never take this frame.
            q.set_next_avail(start);
            Counters::add(&c.rx_dropped, 1);
            return Rx::Dropped;
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            q.set_next_avail(start);
            return Rx::NoRoom;
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= if chains.is_empty() { HDR_LEN } else { 1 } => {
                room += w.available_bytes();
                chains.push((head, w));
            }
            _ => {
                // A chain that cannot be written (read-only, outside guest memory, too
                // short for a header): it and every chain taken for this frame go back
                // empty; the guest sees short buffers and reposts them.
                for h in chains.iter().map(|(h, _)| *h).chain([head]) {
                    let _ = q.add_used(mem, h, 0);
                }
                Counters::add(&c.rx_dropped, 1);
                return Rx::Dropped;
            }
        }
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr.copy_from_slice(&frame[..HDR_LEN]);
    let n = chains.len() as u16;
    hdr[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
    let mut rest: &[u8] = &frame[HDR_LEN..];
    let mut first = true;
    for (head, mut w) in chains {
        let mut written = 0;
        if first {
            written += write_some(&mut w, &hdr);
            first = false;
        }
        let k = write_some(&mut w, rest);
        rest = &rest[k..];
        written += k;
        let _ = q.add_used(mem, head, written as u32);
    }
    Counters::add(&c.rx_frames, 1);
    Counters::add(&c.rx_bytes, (frame.len() - HDR_LEN) as u64);
    Rx::Delivered(n)
}

fn write_some(
    w: &mut virtio_queue::Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    data: &[u8],
) -> usize {
    let k = data.len().min(w.available_bytes());
    match w.write_all(&data[..k]) {
        Ok(()) => k,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn used<M: GuestMemoryBackend>(vq: &MockSplitQueue<'_, M>) -> Vec<(u32, u32)> {
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn frame(hdr: [u8; HDR_LEN], len: usize, fill: u8) -> Vec<u8> {
        let mut f = hdr.to_vec();
        f.extend(std::iter::repeat_n(fill, len));
        f
    }

    #[test]
    fn tx_sends_good_frames_and_drops_hostile_chains() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let good = frame([0; HDR_LEN], 60, 0xab);
        m.write_slice(&good[..HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        m.write_slice(&good[HDR_LEN..], GuestAddress(0x20_0000))
            .unwrap();
        let mut bad_flags = [0u8; HDR_LEN];
        bad_flags[0] = 0x80;
        m.write_slice(&frame(bad_flags, 60, 1), GuestAddress(0x30_0000))
            .unwrap();
        let mut bad_csum = [0u8; HDR_LEN];
        bad_csum[0] = 1;
        bad_csum[6] = 0xff;
        bad_csum[7] = 0xff;
        m.write_slice(&frame(bad_csum, 60, 1), GuestAddress(0x40_0000))
            .unwrap();
        vq.build_multiple_desc_chains(&[
            // 0-1: a header and a frame in two descriptors.
            d(0x10_0000, HDR_LEN as u32, NEXT, 1),
            d(0x20_0000, 60, 0, 0),
            // 2: shorter than a header.
            d(0x30_0000, 8, 0, 0),
            // 3: outside guest memory.
            d(0xffff_0000, 72, 0, 0),
            // 4: unknown header flags.
            d(0x30_0000, 72, 0, 0),
            // 5: a checksum offset far outside the frame.
            d(0x40_0000, 72, 0, 0),
            // 6: longer than any frame.
            d(0x50_0000, (FRAME_BUF + 1) as u32, 0, 0),
            // 7: only a device-writable buffer: nothing to send.
            d(0x60_0000, 72, WRITE, 0),
            // 8: a header and no frame.
            d(0x10_0000, HDR_LEN as u32, 0, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = Counters::default();
        let mut sent = Vec::new();
        let mut buf = Vec::new();
        let n = drain_tx(&m, &mut q, FEATURES, &mut buf, &c, |f| {
            sent.push(f.to_vec());
            Ok(f.len())
        });
        assert_eq!(n, 8, "every chain goes back to the guest");
        assert_eq!(sent, vec![good]);
        let v = c.values();
        assert_eq!((v.tx_frames, v.tx_bytes, v.tx_malformed), (1, 60, 7));
        assert!(used(&vq).iter().all(|&(_, len)| len == 0));
    }

    #[test]
    fn tx_counts_what_the_tap_refuses_and_goes_on() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&frame([0; HDR_LEN], 60, 7), GuestAddress(0x10_0000))
            .unwrap();
        vq.build_multiple_desc_chains(&[d(0x10_0000, 72, 0, 0), d(0x10_0000, 72, 0, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = Counters::default();
        let mut calls = 0;
        let n = drain_tx(&m, &mut q, 0, &mut Vec::new(), &c, |f| {
            calls += 1;
            if calls == 1 {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(f.len())
            }
        });
        assert_eq!(n, 2);
        let v = c.values();
        assert_eq!((v.tx_errors, v.tx_frames), (1, 1));
    }

    #[test]
    fn rx_merges_buffers_and_sets_num_buffers() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_multiple_desc_chains(&[
            d(0x10_0000, 100, WRITE, 0),
            d(0x20_0000, 100, WRITE, 0),
            d(0x30_0000, 100, WRITE, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = Counters::default();
        let mut hdr = [0u8; HDR_LEN];
        hdr[0] = 2;
        let f: Vec<u8> = hdr
            .iter()
            .copied()
            .chain((0..150u32).map(|i| i as u8))
            .collect();
        assert_eq!(deliver_rx(&m, &mut q, &f, true, &c), Rx::Delivered(2));
        assert_eq!(used(&vq), vec![(0, 100), (1, 62)]);
        let mut got = vec![0u8; 100];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[0], 2, "the tap's header flags are kept");
        assert_eq!(&got[NUM_BUFFERS_OFFSET..HDR_LEN], &2u16.to_le_bytes());
        assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..100]);
        let mut rest = vec![0u8; 62];
        m.read_slice(&mut rest, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&rest[..], &f[100..]);
        // One 100-byte buffer left: the next 150-byte frame waits, nothing is consumed.
        assert_eq!(deliver_rx(&m, &mut q, &f, true, &c), Rx::NoRoom);
        assert_eq!(used(&vq).len(), 2);
        assert_eq!(q.next_avail(), 2);
        let v = c.values();
        assert_eq!((v.rx_frames, v.rx_bytes, v.rx_dropped), (1, 150, 0));
    }

    #[test]
    fn rx_without_mergeable_buffers_needs_one_chain() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_multiple_desc_chains(&[d(0x10_0000, 100, WRITE, 0), d(0x20_0000, 4096, WRITE, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = Counters::default();
        let big = frame([0; HDR_LEN], 150, 1);
        // Too big for the first buffer: dropped, the buffer stays for the next frame.
        assert_eq!(deliver_rx(&m, &mut q, &big, false, &c), Rx::Dropped);
        assert_eq!(q.next_avail(), 0);
        let small = frame([0; HDR_LEN], 50, 1);
        assert_eq!(deliver_rx(&m, &mut q, &small, false, &c), Rx::Delivered(1));
        assert_eq!(deliver_rx(&m, &mut q, &big, false, &c), Rx::Delivered(1));
        assert_eq!(used(&vq), vec![(0, 62), (1, 162)]);
        assert_eq!(c.values().rx_dropped, 1);
    }

    #[test]
    fn rx_hostile_chains_cost_the_guest_its_frame_only() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_multiple_desc_chains(&[
            // Read-only: the device may not write it.
            d(0x10_0000, 4096, 0, 0),
            // Outside guest memory.
            d(0xffff_0000, 4096, WRITE, 0),
            // Shorter than a header.
            d(0x20_0000, 4, WRITE, 0),
            // Good.
            d(0x30_0000, 4096, WRITE, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = Counters::default();
        let f = frame([0; HDR_LEN], 60, 9);
        for _ in 0..3 {
            assert_eq!(deliver_rx(&m, &mut q, &f, true, &c), Rx::Dropped);
        }
        assert_eq!(deliver_rx(&m, &mut q, &f, true, &c), Rx::Delivered(1));
        assert_eq!(used(&vq), vec![(0, 0), (1, 0), (2, 0), (3, 72)]);
        assert_eq!(c.values().rx_dropped, 3);
        assert_eq!(deliver_rx(&m, &mut q, &f, true, &c), Rx::NoRoom);
    }

    #[test]
    fn rx_frame_larger_than_the_whole_ring_is_dropped() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 4);
        vq.build_multiple_desc_chains(&[
            d(0x10_0000, 16, WRITE, 0),
            d(0x20_0000, 16, WRITE, 0),
            d(0x30_0000, 16, WRITE, 0),
            d(0x40_0000, 16, WRITE, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let c = Counters::default();
        let f = frame([0; HDR_LEN], 1000, 1);
        assert_eq!(deliver_rx(&m, &mut q, &f, true, &c), Rx::Dropped);
        assert_eq!(q.next_avail(), 0, "the buffers stay for frames that fit");
        let small = frame([0; HDR_LEN], 20, 1);
        assert_eq!(deliver_rx(&m, &mut q, &small, true, &c), Rx::Delivered(2));
    }
}
