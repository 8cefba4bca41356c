//! What every vhost-user front end here does: the handshake with a back end, and handing
//! it guest memory and the rings (addresses, base index, kick and call eventfds).

use std::os::fd::RawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::GuestMemoryMmap;
use crate::memory::RamRegion;

pub const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
pub const INDIRECT_DESC: u64 = 1 << 28;

/// SET_OWNER, GET_FEATURES and, when offered, the protocol features we use. Returns the
/// back end's features.
pub fn handshake(fe: &mut Frontend) -> Result<u64, (&'static str, vhost::Error)> {
    fe.set_owner().map_err(|e| ("SET_OWNER", e))?;
    let features = fe.get_features().map_err(|e| ("GET_FEATURES", e))?;
    if features & PROTOCOL_FEATURES_BIT != 0 {
        let offered = fe
            .get_protocol_features()
            .map_err(|e| ("GET_PROTOCOL_FEATURES", e))?;
        let want = offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(want)
            .map_err(|e| ("SET_PROTOCOL_FEATURES", e))?;
    }
    Ok(features)
}

/// Where the rings are and how far the back end should start in each.
pub struct Rings<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queues: &'a [Queue],
    /// The avail index each ring starts at (0 for a fresh device).
    pub bases: &'a [u16],
    pub call: &'a EventFd,
    pub kicks: &'a [EventFd],
}

/// Features, memory table, then each ready ring: size, addresses, base, call, kick, enable.
pub fn setup(
    fe: &mut Frontend,
    backend_features: u64,
    features: u64,
    regions: &[RamRegion],
    mem_fd: RawFd,
    rings: &Rings<'_>,
) -> Result<(), vhost::Error> {
    fe.set_features(features | (backend_features & PROTOCOL_FEATURES_BIT))?;
    let table: Vec<VhostUserMemoryRegionInfo> = regions
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.host_addr,
            mmap_offset: r.file_offset,
            mmap_handle: mem_fd,
        })
        .collect();
    fe.set_mem_table(&table)?;
    // Ring addresses travel as addresses in this process, as vhost-user expects.
    let hva = |gpa: u64| {
        rings
            .mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| vhost::Error::InvalidGuestMemory)
    };
    for (i, q) in rings.queues.iter().enumerate() {
        if !q.ready() {
            continue;
        }
        fe.set_vring_num(i, q.size())?;
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: hva(q.desc_table())?,
                used_ring_addr: hva(q.used_ring())?,
                avail_ring_addr: hva(q.avail_ring())?,
                log_addr: None,
            },
        )?;
        fe.set_vring_base(i, rings.bases.get(i).copied().unwrap_or(0))?;
        fe.set_vring_call(i, rings.call)?;
        let kick = rings.kicks.get(i).ok_or(vhost::Error::InvalidQueue)?;
        fe.set_vring_kick(i, kick)?;
        if backend_features & PROTOCOL_FEATURES_BIT != 0 {
            fe.set_vring_enable(i, true)?;
        }
    }
    Ok(())
}
