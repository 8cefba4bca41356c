//! The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes) on every frame, and the
//! checks a guest's header passes before its frame goes to the tap.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

pub const HDR_LEN: usize = bulkhead_netlink::tap::VNET_HDR_LEN;
/// Shortest frame after the header: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Longest frame after the header: 64 KiB of IP packet, an Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 65535 + 14 + 4;
/// Offset of `num_buffers`, which the device fills on receive with mergeable buffers.
pub const NUM_BUFFERS_OFFSET: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8; HDR_LEN]) -> VnetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// Why a frame from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    #[error("frame of {0} bytes (want {MIN_FRAME} to {MAX_FRAME} after the header)")]
    Size(usize),
    #[error("unknown header flags {0:#x}")]
    Flags(u8),
    #[error("checksum offload at {start}+{offset} outside a {len}-byte frame")]
    Checksum { start: u16, offset: u16, len: usize },
    #[error("checksum offload not negotiated")]
    ChecksumNotNegotiated,
    #[error("segmentation type {0:#x} not negotiated or unknown")]
    GsoType(u8),
    #[error("segmentation without a segment size")]
    GsoSize,
}

/// Check the header of a frame of `frame_len` bytes (header excluded) from a guest that
/// negotiated `features`.
pub fn check_tx(h: &VnetHdr, frame_len: usize, features: u64) -> Result<(), BadFrame> {
    if !(MIN_FRAME..=MAX_FRAME).contains(&frame_len) {
        return Err(BadFrame::Size(frame_len));
    }
    let known = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
    if h.flags & !known != 0 {
        return Err(BadFrame::Flags(h.flags));
    }
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
        if !has(features, VIRTIO_NET_F_CSUM) {
            return Err(BadFrame::ChecksumNotNegotiated);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame_len {
            return Err(BadFrame::Checksum {
                start: h.csum_start,
                offset: h.csum_offset,
                len: frame_len,
            });
        }
    }
    let ecn = h.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    if ecn && !has(features, VIRTIO_NET_F_HOST_ECN) {
        return Err(BadFrame::GsoType(h.gso_type));
    }
    let negotiated = match u32::from(h.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        VIRTIO_NET_HDR_GSO_TCPV4 => has(features, VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(features, VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    };
    if !negotiated {
        return Err(BadFrame::GsoType(h.gso_type));
    }
    // Segmentation needs the checksum offload too, or the tap refuses it; so do we.
    if h.gso_size == 0 {
        return Err(BadFrame::GsoSize);
    }
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 == 0 {
        return Err(BadFrame::ChecksumNotNegotiated);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN);

    fn hdr(flags: u8, gso_type: u8, gso_size: u16, start: u16, off: u16) -> VnetHdr {
        VnetHdr {
            flags,
            gso_type,
            hdr_len: 54,
            gso_size,
            csum_start: start,
            csum_offset: off,
        }
    }

    #[test]
    fn plain_and_offloaded_frames_pass() {
        check_tx(&hdr(0, 0, 0, 0, 0), 60, 0).unwrap();
        check_tx(&hdr(1, 1, 1448, 34, 16), 64000, ALL).unwrap();
        check_tx(&hdr(1, 4 | 0x80, 1428, 54, 16), 9000, ALL).unwrap();
        check_tx(&hdr(1, 0, 0, 34, 16), 60, ALL).unwrap();
    }

    #[test]
    fn hostile_headers_are_refused() {
        let cases = [
            (hdr(0, 0, 0, 0, 0), 0, ALL, BadFrame::Size(0)),
            (hdr(0, 0, 0, 0, 0), 13, ALL, BadFrame::Size(13)),
            (
                hdr(0, 0, 0, 0, 0),
                MAX_FRAME + 1,
                ALL,
                BadFrame::Size(MAX_FRAME + 1),
            ),
            (hdr(0x80, 0, 0, 0, 0), 60, ALL, BadFrame::Flags(0x80)),
            (
                hdr(1, 0, 0, 60, 0),
                60,
                ALL,
                BadFrame::Checksum {
                    start: 60,
                    offset: 0,
                    len: 60,
                },
            ),
            (
                hdr(1, 0, 0, 0xffff, 0xffff),
                60,
                ALL,
                BadFrame::Checksum {
                    start: 0xffff,
                    offset: 0xffff,
                    len: 60,
                },
            ),
            (hdr(1, 0, 0, 34, 16), 60, 0, BadFrame::ChecksumNotNegotiated),
            (
                hdr(1, 1, 1448, 34, 16),
                9000,
                1 << VIRTIO_NET_F_CSUM,
                BadFrame::GsoType(1),
            ),
            (hdr(1, 3, 1448, 34, 6), 9000, ALL, BadFrame::GsoType(3)),
            (
                hdr(1, 0x81, 1448, 34, 16),
                9000,
                ALL & !(1 << VIRTIO_NET_F_HOST_ECN),
                BadFrame::GsoType(0x81),
            ),
            (hdr(1, 1, 0, 34, 16), 9000, ALL, BadFrame::GsoSize),
            (
                hdr(0, 1, 1448, 0, 0),
                9000,
                ALL,
                BadFrame::ChecksumNotNegotiated,
            ),
        ];
        for (h, len, f, want) in cases {
            assert_eq!(check_tx(&h, len, f), Err(want.clone()), "{h:?} len {len}");
        }
    }

    #[test]
    fn header_fields_are_little_endian() {
        let b = [1, 4, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
        assert_eq!(VnetHdr::parse(&b), hdr(1, 4, 1448, 34, 16));
    }
}
