//! virtio-fs through a vhost-user back end (the `virtiofsd` binary).
//!
//! The VMM owns only the transport and the config space (the tag). At activation it
//! shares guest RAM (memfd regions), the ring addresses, each queue's notify ioeventfd
//! as the kick and the device irqfd as the call, so requests and completions flow
//! between the guest and the back end without this process on the path.
//!
//! Those hand-overs, and stopping the rings when the driver resets the device, are
//! messages that wait on another process. They run on the device's own
//! `vhost-user-fs` thread, started with the device: never on the vCPU that wrote
//! DRIVER_OK or the reset (it holds the device's transport lock, and the guest waits on
//! it), and with a bound on every answer.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, TYPE_FS, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
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

/// Longest a reset waits for the back end to stop its rings; one that has not by then
/// is disconnected (the vhost crate itself waits for an answer without end).
const RESET_WAIT: Duration = Duration::from_secs(1);

pub struct VhostUserFs {
    path: String,
    backend_features: u64,
    config: [u8; 40],
    queue_sizes: [u16; 2],
    link: Sender<Command>,
    /// Commands sent to the link thread, and how many it has carried out.
    sent: u64,
    done: Arc<(Mutex<u64>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// The back end's socket, to cut a back end that stops answering loose (the link
    /// thread's wait then ends in an error).
    watch: std::os::unix::net::UnixStream,
}

/// What the link thread does for the device.
enum Command {
    /// Hand the back end guest memory and the rings (the driver set DRIVER_OK).
    Start(Box<Rings>),
    /// Stop the rings (the driver reset the device).
    Stop,
}

/// What activation handed over, owned by the link thread while the rings run.
struct Rings {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    kicks: Vec<EventFd>,
    features: u64,
}

/// The back end's side of the device, owned by the link thread.
struct Link {
    path: String,
    fe: Frontend,
    backend_features: u64,
    regions: Vec<RamRegion>,
    mem_fd: RawFd,
    /// The rings the back end runs now (the kick eventfds stay registered with KVM and
    /// are kept alive here with them).
    running: Option<Rings>,
}

impl Link {
    fn serve(mut self, commands: std::sync::mpsc::Receiver<Command>, done: &(Mutex<u64>, Condvar)) {
        for c in commands {
            match c {
                Command::Start(r) => self.start(*r),
                Command::Stop => self.stop(),
            }
            *done.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            done.1.notify_all();
        }
    }

    fn start(&mut self, r: Rings) {
        self.stop();
        let rings = vhost_user::Rings {
            mem: &r.mem,
            queues: &r.queues,
            bases: &[],
            call: &r.interrupt.evt,
            kicks: &r.kicks,
        };
        let features = r.features;
        match vhost_user::setup(
            &mut self.fe,
            self.backend_features,
            features,
            &self.regions,
            self.mem_fd,
            &rings,
        ) {
            Ok(()) => {
                crate::info_limited!(socket = %self.path, fd = self.fe.as_raw_fd(), "vhost-user-fs active");
                self.running = Some(r);
            }
            // The guest sees a device that never answers, as with a dead back end.
            Err(e) => crate::warn_limited!("vhost-user-fs {}: ring setup: {e}", self.path),
        }
    }

    /// GET_VRING_BASE stops a ring in the back end; it then touches it no more.
    fn stop(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        for (i, q) in r.queues.iter().enumerate() {
            if q.ready() {
                if let Err(e) = self.fe.get_vring_base(i) {
                    crate::warn_limited!("vhost-user-fs {}: stop ring {i}: {e}", self.path);
                }
            }
        }
    }
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
        // SAFETY: dup of the front end's live socket; the copy is owned by `watch`.
        let dup = unsafe { libc::fcntl(fe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(setup_err(
                "dup",
                std::io::Error::last_os_error().to_string(),
            ));
        }
        // SAFETY: `dup` is a new descriptor nothing else owns.
        let watch =
            unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        let backend_features =
            vhost_user::handshake(&mut fe).map_err(|(what, e)| setup_err(what, e.to_string()))?;
        let mut config = [0u8; 40];
        let n = tag.len().min(36);
        config[..n].copy_from_slice(&tag.as_bytes()[..n]);
        config[36..40].copy_from_slice(&1u32.to_le_bytes());
        let link = Link {
            path: path.clone(),
            fe,
            backend_features,
            regions,
            mem_fd,
            running: None,
        };
        let (tx, rx) = channel();
        let done: Arc<(Mutex<u64>, Condvar)> = Arc::default();
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-fs".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install_for(crate::seccomp::Class::Worker) {
                    tracing::error!("vhost-user-fs: {e}");
                    return;
                }
                link.serve(rx, &d);
            })
            .map_err(|e| setup_err("link thread", e.to_string()))?;
        Ok(VhostUserFs {
            path,
            backend_features,
            config,
            queue_sizes: [queue_size, queue_size],
            link: tx,
            sent: 0,
            done,
            thread: Some(thread),
            watch,
        })
    }

    fn send(&mut self, c: Command) -> Result<(), String> {
        self.link
            .send(c)
            .map_err(|_| format!("vhost-user-fs {}: its link thread is gone", self.path))?;
        self.sent += 1;
        Ok(())
    }

    /// Wait up to `limit` for the link thread to carry out every command sent so far.
    fn wait_done(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let (lock, cv) = &*self.done;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *g < self.sent {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            g = cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        // Closing the channel ends the link thread once it is done with its command;
        // the socket going down ends any wait for the back end.
        let _ = self.watch.shutdown(std::net::Shutdown::Both);
        let (tx, _) = channel();
        drop(std::mem::replace(&mut self.link, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
        self.send(Command::Start(Box::new(Rings {
            mem: act.mem,
            queues: act.queues,
            interrupt: act.interrupt,
            kicks: act.kicks,
            features,
        })))
        .map_err(ActivateError::Failed)
    }
    /// The back end stops the rings before the driver may reuse their memory; a back
    /// end that does not answer within [`RESET_WAIT`] is not waited for longer.
    fn reset(&mut self) {
        if self.send(Command::Stop).is_ok() && !self.wait_done(RESET_WAIT) {
            crate::warn_limited!(
                "vhost-user-fs {}: the back end did not stop its rings within {RESET_WAIT:?}; disconnected",
                self.path
            );
            let _ = self.watch.shutdown(std::net::Shutdown::Both);
        }
    }
    fn settle(&self) {
        self.wait_done(Duration::from_secs(30));
    }
    fn external_interrupts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Instant;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    const GET_FEATURES: u32 = 1;
    const GET_VRING_BASE: u32 = 11;
    const SET_VRING_KICK: u32 = 12;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const NEED_REPLY: u32 = 0x8;

    /// A stand-in back end on `sock`: answers the handshake (offering REPLY_ACK), then,
    /// unless `mute`, every request that wants an answer. Records each request.
    fn fake_backend(sock: &Path, mute: bool) -> Arc<Mutex<Vec<u32>>> {
        let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
        let l = UnixListener::bind(sock).unwrap();
        let log = seen.clone();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut muted = false;
            let mut hdr = [0u8; 12];
            while s.read_exact(&mut hdr).is_ok() {
                let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
                let (req, flags, size) = (word(0), word(4), word(8) as usize);
                let mut body = vec![0u8; size];
                if s.read_exact(&mut body).is_err() {
                    return;
                }
                log.lock().unwrap().push(req);
                let reply: Option<Vec<u8>> = match req {
                    GET_FEATURES => Some(((1u64 << 30) | (1 << 32)).to_le_bytes().to_vec()),
                    GET_PROTOCOL_FEATURES => Some((1u64 << 3).to_le_bytes().to_vec()),
                    GET_VRING_BASE => Some([&body[..4], &0u32.to_le_bytes()].concat()),
                    _ if flags & NEED_REPLY != 0 => Some(0u64.to_le_bytes().to_vec()),
                    _ => None,
                };
                if let Some(r) = reply.filter(|_| !muted) {
                    let mut m = Vec::new();
                    m.extend_from_slice(&req.to_le_bytes());
                    m.extend_from_slice(&(1u32 | 4).to_le_bytes());
                    m.extend_from_slice(&(r.len() as u32).to_le_bytes());
                    m.extend_from_slice(&r);
                    if s.write_all(&m).is_err() {
                        return;
                    }
                }
                muted |= mute && req == SET_PROTOCOL_FEATURES;
            }
        });
        seen
    }

    struct Rig {
        dir: std::path::PathBuf,
        dev: VhostUserFs,
        seen: Arc<Mutex<Vec<u32>>>,
        _memfd: std::fs::File,
    }

    fn rig(name: &str, mem: &GuestMemoryMmap, mute: bool) -> Rig {
        let dir = std::env::temp_dir().join(format!("bh-vufs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("fs.sock");
        let seen = fake_backend(&sock, mute);
        let regions = mem
            .iter()
            .map(|r| RamRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: 0,
                host_addr: r.as_ptr() as u64,
            })
            .collect();
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

    /// How many `req` messages the stand-in has read, once `want` arrived or 2 s passed
    /// (a message that wants no answer can still be on its way when the sender is done).
    fn count(seen: &Mutex<Vec<u32>>, req: u32, want: usize) -> usize {
        let n = || seen.lock().unwrap().iter().filter(|&&r| r == req).count();
        let deadline = Instant::now() + Duration::from_secs(2);
        while n() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        n()
    }

    #[test]
    fn a_back_end_that_stops_answering_holds_up_neither_activation_nor_reset() {
        let mem = test_mem();
        let mut r = rig("mute", &mem, true);
        let t = Instant::now();
        r.dev.activate(activation_of(&mem)).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "activation waited: {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        r.dev.reset();
        assert!(
            t.elapsed() < RESET_WAIT + Duration::from_millis(500),
            "reset waited: {:?}",
            t.elapsed()
        );
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
