//! virtio-fs through a vhost-user back end (the `virtiofsd` binary).
//!
//! The VMM owns only the transport and the config space (the tag). At activation it
//! shares guest RAM (memfd regions), the ring addresses, each queue's notify ioeventfd
//! as the kick and the device irqfd as the call, so requests and completions flow
//! between the guest and the back end without this process on the path. Those
//! hand-overs, and stopping the rings on reset, go through the device's link thread
//! ([`vhost_user::Link`]).

use std::os::fd::RawFd;
use std::path::Path;

use vhost::vhost_user::Frontend;

use super::vhost_user::{self, Link, INDIRECT_DESC};
use super::{
    ActivateError, Activation, VirtioDevice, TYPE_FS, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::memory::RamRegion;

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
    backend_features: u64,
    config: [u8; 40],
    queue_sizes: [u16; 2],
    link: Link,
}

impl VhostUserFs {
    /// Connect to the back end at `socket`, run the handshake, and start the device's
    /// link thread (this runs at VMM start, before the seccomp filters).
    pub fn connect(
        socket: &Path,
        tag: &str,
        queue_size: u16,
        regions: Vec<RamRegion>,
        mem_fd: RawFd,
    ) -> Result<Self, FsError> {
        let path = socket.display().to_string();
        let setup_err = |what: &'static str, msg: String| FsError::Setup {
            path: path.clone(),
            what,
            msg,
        };
        let mut fe = Frontend::connect(socket, 2).map_err(|e| FsError::Connect {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let backend_features =
            vhost_user::handshake(&mut fe).map_err(|(what, e)| setup_err(what, e.to_string()))?;
        let mut config = [0u8; 40];
        let n = tag.len().min(36);
        config[..n].copy_from_slice(&tag.as_bytes()[..n]);
        config[36..40].copy_from_slice(&1u32.to_le_bytes());
        let link = Link::start(
            "vhost-user-fs",
            &path,
            fe,
            backend_features,
            regions,
            mem_fd,
        )
        .map_err(|e| setup_err("link thread", e.to_string()))?;
        Ok(VhostUserFs {
            backend_features,
            config,
            queue_sizes: [queue_size, queue_size],
            link,
        })
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
    /// Hands the rings to the link thread and returns: the guest's kicks wait in their
    /// eventfds until the back end has them.
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let features = act.acked_features & self.features();
        self.link.start_rings(act, features)
    }
    fn reset(&mut self) {
        self.link.stop_rings();
    }
    fn pause(&mut self) {
        self.link.pause();
    }
    fn resume(&mut self) {
        self.link.resume();
    }
    fn settle(&self) {
        self.link.settle();
    }
    fn external_interrupts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::*;
    use crate::virtio::vhost_user::stand_in::{self, count, Seen, GET_VRING_BASE, SET_VRING_KICK};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::time::{Duration, Instant};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    struct Rig {
        dir: std::path::PathBuf,
        dev: VhostUserFs,
        seen: Seen,
        _memfd: std::fs::File,
    }

    fn rig(name: &str, mem: &GuestMemoryMmap, mute: bool) -> Rig {
        let dir = std::env::temp_dir().join(format!("bh-vufs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("fs.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let seen = stand_in::serve_when_connected(move || l.accept().unwrap().0, mute);
        let regions = ram_regions(mem);
        // Any descriptor does: the stand-in never maps it.
        let memfd = std::fs::File::open("/dev/null").unwrap();
        let dev = VhostUserFs::connect(&sock, "pod", 64, regions, memfd.as_raw_fd()).unwrap();
        Rig {
            dir,
            dev,
            seen,
            _memfd: memfd,
        }
    }

    fn activation_of(mem: &GuestMemoryMmap) -> Activation {
        let q0 = MockSplitQueue::create(mem, vm_memory::GuestAddress(0), 64);
        let q1 = MockSplitQueue::create(mem, vm_memory::GuestAddress(0x10000), 64);
        let (mut act, _, _) = activation_with_kicks(
            mem,
            vec![q0.create_queue().unwrap(), q1.create_queue().unwrap()],
        );
        act.acked_features = VIRTIO_F_VERSION_1;
        act
    }

    #[test]
    fn a_back_end_that_stops_answering_holds_up_neither_activation_nor_reset() {
        let mem = test_mem();
        let mut r = rig("mute", &mem, true);
        let t = Instant::now();
        r.dev.activate(activation_of(&mem)).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "activation waited: {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        r.dev.reset();
        assert!(
            t.elapsed() < vhost_user::RESET_WAIT + Duration::from_secs(3),
            "reset waited: {:?}",
            t.elapsed()
        );
        drop(r.dev);
        let _ = std::fs::remove_dir_all(&r.dir);
    }

    #[test]
    fn a_pause_stops_the_rings_and_resume_starts_them_where_they_stopped() {
        const SET_VRING_BASE: u32 = 10;
        let mem = test_mem();
        let mut r = rig("pause", &mem, false);
        r.dev.activate(activation_of(&mem)).unwrap();
        r.dev.settle();
        assert_eq!(count(&r.seen, SET_VRING_KICK, 2), 2);
        r.dev.pause();
        assert_eq!(
            count(&r.seen, GET_VRING_BASE, 2),
            2,
            "rings run on while paused"
        );
        r.dev.resume();
        r.dev.settle();
        assert_eq!(
            count(&r.seen, SET_VRING_KICK, 4),
            4,
            "rings not started again"
        );
        let bases: Vec<u32> = r
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(q, _)| *q == SET_VRING_BASE)
            .map(|(_, b)| u32::from_le_bytes(b[4..8].try_into().unwrap()))
            .collect();
        // At start from 0; after the pause from where the back end said it stopped.
        assert_eq!(bases, vec![0, 0, 7, 7]);
        // A reset while paused asks nothing more of stopped rings.
        r.dev.pause();
        r.dev.reset();
        assert_eq!(count(&r.seen, GET_VRING_BASE, 4), 4);
        assert_eq!(count(&r.seen, GET_VRING_BASE, 5), 4);
        drop(r.dev);
        let _ = std::fs::remove_dir_all(&r.dir);
    }

    #[test]
    fn a_reset_stops_the_rings_and_a_new_activation_starts_them_again() {
        let mem = test_mem();
        let mut r = rig("reset", &mem, false);
        r.dev.activate(activation_of(&mem)).unwrap();
        r.dev.settle();
        assert_eq!(count(&r.seen, SET_VRING_KICK, 2), 2);
        assert_eq!(count(&r.seen, GET_VRING_BASE, 0), 0);
        r.dev.reset();
        assert_eq!(count(&r.seen, GET_VRING_BASE, 2), 2, "rings not stopped");
        // A second reset with nothing running sends nothing.
        r.dev.reset();
        assert_eq!(count(&r.seen, GET_VRING_BASE, 2), 2);
        r.dev.activate(activation_of(&mem)).unwrap();
        r.dev.settle();
        assert_eq!(
            count(&r.seen, SET_VRING_KICK, 4),
            4,
            "{:?}",
            r.seen.lock().unwrap()
        );
        drop(r.dev);
        let _ = std::fs::remove_dir_all(&r.dir);
    }
}
