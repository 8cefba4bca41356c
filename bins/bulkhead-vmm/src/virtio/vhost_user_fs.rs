//! virtio-fs through a vhost-user back end (the `virtiofsd` binary).
//!
//! The VMM owns only the transport and the config space (the tag). At activation it
//! shares guest RAM (memfd regions), the ring addresses, each queue's notify ioeventfd
//! as the kick and the device irqfd as the call, so requests and completions flow
//! between the guest and the back end without this process on the path.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{
    ActivateError, Activation, VirtioDevice, TYPE_FS, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::memory::RamRegion;

const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const INDIRECT_DESC: u64 = 1 << 28;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot connect to vhost-user-fs back end at {path}: {msg}")]
    Connect { path: String, msg: String },
    #[error("vhost-user-fs back end at {path}: {what}: {msg}")]
    Setup {
        path: String,
        what: &'static str,
        msg: String,
    },
}

pub struct VhostUserFs {
    path: String,
    fe: Frontend,
    backend_features: u64,
    config: [u8; 40],
    queue_sizes: [u16; 2],
    regions: Vec<RamRegion>,
    mem_fd: RawFd,
    _kicks: Vec<vmm_sys_util::eventfd::EventFd>,
}

impl VhostUserFs {
    pub fn connect(
        socket: &Path,
        tag: &str,
        queue_size: u16,
        regions: Vec<RamRegion>,
        mem_fd: RawFd,
    ) -> Result<Self, FsError> {
        let path = socket.display().to_string();
        let setup = |what: &'static str| {
            let path = path.clone();
            move |e: vhost::Error| FsError::Setup {
                path,
                what,
                msg: e.to_string(),
            }
        };
        let mut fe = Frontend::connect(socket, 2).map_err(|e| FsError::Connect {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        fe.set_owner().map_err(setup("SET_OWNER"))?;
        let backend_features = fe.get_features().map_err(setup("GET_FEATURES"))?;
        if backend_features & PROTOCOL_FEATURES_BIT != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(setup("GET_PROTOCOL_FEATURES"))?;
            let want =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            fe.set_protocol_features(want)
                .map_err(setup("SET_PROTOCOL_FEATURES"))?;
        }
        let mut config = [0u8; 40];
        let n = tag.len().min(36);
        config[..n].copy_from_slice(&tag.as_bytes()[..n]);
        config[36..40].copy_from_slice(&1u32.to_le_bytes());
        Ok(VhostUserFs {
            path,
            fe,
            backend_features,
            config,
            queue_sizes: [queue_size, queue_size],
            regions,
            mem_fd,
            _kicks: vec![],
        })
    }

    fn setup_rings(&mut self, act: &Activation) -> Result<(), vhost::Error> {
        let features = (act.acked_features & self.features())
            | (self.backend_features & PROTOCOL_FEATURES_BIT);
        self.fe.set_features(features)?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.file_offset,
                mmap_handle: self.mem_fd,
            })
            .collect();
        self.fe.set_mem_table(&regions)?;
        // Ring addresses travel as addresses in this process, as vhost-user expects.
        let hva = |gpa: u64| {
            act.mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        for (i, q) in act.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            self.fe.set_vring_num(i, q.size())?;
            self.fe.set_vring_addr(
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
            self.fe.set_vring_base(i, 0)?;
            self.fe.set_vring_call(i, &act.interrupt.evt)?;
            let kick = act.kicks.get(i).ok_or(vhost::Error::InvalidQueue)?;
            self.fe.set_vring_kick(i, kick)?;
            if self.backend_features & PROTOCOL_FEATURES_BIT != 0 {
                self.fe.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (self.backend_features & (VIRTIO_F_RING_EVENT_IDX | INDIRECT_DESC))
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data)
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        self.setup_rings(&act)
            .map_err(|e| ActivateError::Failed(format!("vhost-user-fs {}: {e}", self.path)))?;
        // The kick eventfds stay registered with KVM; keep our copies alive with them.
        self._kicks = act.kicks;
        tracing::info!(socket = %self.path, fd = self.fe.as_raw_fd(), "vhost-user-fs active");
        Ok(())
    }
    fn external_interrupts(&self) -> bool {
        true
    }
}
