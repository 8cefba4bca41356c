//! virtio-fs through a vhost-user back end (the `virtiofsd` binary).
//!
//! The VMM owns only the transport and the config space (the tag). At activation it
//! shares guest RAM (memfd regions), the ring addresses, each queue's notify ioeventfd
//! as the kick and the device irqfd as the call, so requests and completions flow
//! between the guest and the back end without this process on the path.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_user::Frontend;

use super::{
    ActivateError, Activation, VirtioDevice, TYPE_FS, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::memory::RamRegion;

use super::vhost_user::{self, INDIRECT_DESC};

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
        let mut fe = Frontend::connect(socket, 2).map_err(|e| FsError::Connect {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let backend_features =
            vhost_user::handshake(&mut fe).map_err(|(what, e)| FsError::Setup {
                path: path.clone(),
                what,
                msg: e.to_string(),
            })?;
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
        let rings = vhost_user::Rings {
            mem: &act.mem,
            queues: &act.queues,
            bases: &[],
            call: &act.interrupt.evt,
            kicks: &act.kicks,
        };
        let features = act.acked_features & self.features();
        vhost_user::setup(
            &mut self.fe,
            self.backend_features,
            features,
            &self.regions,
            self.mem_fd,
            &rings,
        )
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
        crate::info_limited!(socket = %self.path, fd = self.fe.as_raw_fd(), "vhost-user-fs active");
        Ok(())
    }
    fn external_interrupts(&self) -> bool {
        true
    }
}
