//! What every vhost-user front end here does: the handshake with a back end, handing it
//! guest memory and the rings (addresses, base index, kick and call eventfds), and the
//! link thread that does both, and stops the rings on reset, away from vCPUs and the
//! event loop.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Activation, GuestMemoryMmap, Interrupt};
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

/// What activation hands a vhost-user back end, owned by the device's link thread while
/// the rings run.
struct OwnedRings {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    /// The queue notify eventfds; they stay registered with KVM, and alive here.
    kicks: Vec<EventFd>,
    /// The features the driver acked that the back end is to know.
    features: u64,
}

impl OwnedRings {
    /// Each ring's used index, read from guest memory: where a new back end starts, so
    /// that what an old one took and never completed is offered again.
    fn used_indices(&self) -> Vec<u16> {
        self.queues
            .iter()
            .map(|q| {
                self.mem
                    .read_obj::<u16>(GuestAddress(q.used_ring().wrapping_add(2)))
                    .map(u16::from_le)
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// What a device asks of its link thread.
enum Command {
    /// A (re)started back end connected: handshake with it, and hand it the rings if
    /// they run.
    Backend(UnixStream),
    /// The driver set DRIVER_OK: hand the back end guest memory and the rings.
    Start(Box<OwnedRings>),
    /// The driver reset the device: the back end stops every ring.
    Stop,
    /// The VM is paused: the back end stops every ring, keeping where each was.
    Pause,
    /// The VM runs again: the rings start where they stopped.
    Resume,
}

/// Longest a reset waits for the back end to stop its rings; one that has not by then
/// is disconnected (the vhost crate itself waits for an answer without end).
pub const RESET_WAIT: Duration = Duration::from_secs(1);

/// The back end's side of a device, owned by its link thread.
struct LinkState {
    path: String,
    fe: Option<Frontend>,
    /// What the first back end offered; the driver negotiated against it.
    backend_features: u64,
    regions: Vec<RamRegion>,
    mem_fd: RawFd,
    running: Option<OwnedRings>,
    /// While the VM is paused: where each running ring stopped (the back end has them
    /// stopped).
    paused_at: Option<Vec<u16>>,
}

impl LinkState {
    fn serve(mut self, commands: Receiver<Command>, done: &(Mutex<u64>, Condvar)) {
        for c in commands {
            match c {
                Command::Backend(s) => self.backend(s),
                Command::Start(r) => self.start(*r),
                Command::Stop => self.stop(),
                Command::Pause => self.pause(),
                Command::Resume => self.resume(),
            }
            *done.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            done.1.notify_all();
        }
    }

    fn backend(&mut self, stream: UnixStream) {
        let mut fe = Frontend::from_stream(stream, 2);
        match handshake(&mut fe) {
            Ok(f) if f & self.backend_features == self.backend_features => {}
            Ok(f) => {
                crate::warn_limited!(
                    "vhost-user back end at {}: offers {f:#x}, less than the first one ({:#x}); refused",
                    self.path,
                    self.backend_features
                );
                return;
            }
            Err((what, e)) => {
                crate::warn_limited!("vhost-user back end at {}: {what}: {e}", self.path);
                return;
            }
        }
        self.fe = Some(fe);
        let Some(r) = self.running.take() else {
            return;
        };
        let bases = r.used_indices();
        if self.paused_at.is_some() {
            // Its rings start on resume.
            self.paused_at = Some(bases);
            self.running = Some(r);
            return;
        }
        if self.setup(&r, &bases) {
            kick_all(&r);
            tracing::warn!(socket = %self.path, ?bases, "vhost-user back end taken back");
        }
        self.running = Some(r);
    }

    fn start(&mut self, r: OwnedRings) {
        self.stop();
        // Without a back end now, the next one to connect gets the rings.
        if self.setup(&r, &[]) {
            crate::info_limited!(socket = %self.path, "vhost-user device active");
        }
        self.running = Some(r);
    }

    fn setup(&mut self, r: &OwnedRings, bases: &[u16]) -> bool {
        let Some(fe) = self.fe.as_mut() else {
            return false;
        };
        let rings = Rings {
            mem: &r.mem,
            queues: &r.queues,
            bases,
            call: &r.interrupt.evt,
            kicks: &r.kicks,
        };
        match setup(
            fe,
            self.backend_features,
            r.features,
            &self.regions,
            self.mem_fd,
            &rings,
        ) {
            Ok(()) => true,
            Err(e) => {
                // The guest sees a device that does not answer, as with a dead back end.
                crate::warn_limited!("vhost-user back end at {}: ring setup: {e}", self.path);
                false
            }
        }
    }

    /// The driver reset the device: the rings stop (unless a pause stopped them).
    fn stop(&mut self) {
        let r = self.running.take();
        if self.paused_at.take().is_none() {
            if let Some(r) = r {
                self.stop_rings(&r);
            }
        }
    }

    fn pause(&mut self) {
        if self.paused_at.is_some() {
            return;
        }
        let bases = match self.running.take() {
            Some(r) => {
                let b = self.stop_rings(&r);
                self.running = Some(r);
                b
            }
            None => Vec::new(),
        };
        self.paused_at = Some(bases);
    }

    fn resume(&mut self) {
        let (Some(bases), Some(r)) = (self.paused_at.take(), self.running.take()) else {
            return;
        };
        if self.setup(&r, &bases) {
            kick_all(&r);
        }
        self.running = Some(r);
    }

    /// GET_VRING_BASE stops a ring in the back end, which then touches it no more, and
    /// says where it stopped (0 for a ring that was not running).
    fn stop_rings(&mut self, r: &OwnedRings) -> Vec<u16> {
        let Some(fe) = self.fe.as_mut() else {
            return r.used_indices();
        };
        r.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if !q.ready() {
                    return 0;
                }
                match fe.get_vring_base(i) {
                    Ok(b) => b as u16,
                    Err(e) => {
                        crate::warn_limited!(
                            "vhost-user back end at {}: stop ring {i}: {e}",
                            self.path
                        );
                        0
                    }
                }
            })
            .collect()
    }
}

/// Kick every ring of a back end that takes rings over (a new one, or after a pause):
/// what the guest queued meanwhile must not wait for its next kick, which, with event
/// suppression, may come only when its TCP retransmission timer fires (seconds, and
/// longer after each outage).
fn kick_all(r: &OwnedRings) {
    for (k, q) in r.kicks.iter().zip(&r.queues) {
        if q.ready() {
            let _ = k.write(1);
        }
    }
}

/// A device's messages to its vhost-user back end, sent from a thread of its own (the
/// `worker` seccomp class): they wait on another process, which must happen neither on
/// a vCPU (it holds the device's transport lock, and the guest waits) nor on the event
/// loop. Callers hand work over and go on; only a reset waits, and at most
/// [`RESET_WAIT`].
pub struct Link {
    path: String,
    tx: Option<Sender<Command>>,
    /// Commands sent, and (shared with the thread) how many it has carried out.
    sent: u64,
    done: Arc<(Mutex<u64>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// The current back end's socket, to notice it hang up and to cut off one that
    /// stops answering (the thread's wait then ends in an error).
    watch: Option<UnixStream>,
}

/// A second handle on `fe`'s socket.
fn socket_of(fe: &Frontend) -> std::io::Result<UnixStream> {
    // SAFETY: dup of the front end's live socket; the copy is owned by the stream.
    let dup = unsafe { libc::fcntl(fe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new descriptor nothing else owns.
    Ok(unsafe { UnixStream::from_raw_fd(dup) })
}

impl Link {
    /// Start the link thread `name` for the back end at `path`, whose handshake
    /// (`fe`, `backend_features`) is done.
    pub fn start(
        name: &str,
        path: &str,
        fe: Frontend,
        backend_features: u64,
        regions: Vec<RamRegion>,
        mem_fd: RawFd,
    ) -> std::io::Result<Self> {
        let watch = socket_of(&fe)?;
        let state = LinkState {
            path: path.to_string(),
            fe: Some(fe),
            backend_features,
            regions,
            mem_fd,
            running: None,
            paused_at: None,
        };
        let (tx, rx) = channel();
        let done: Arc<(Mutex<u64>, Condvar)> = Arc::default();
        let d = done.clone();
        let thread = crate::threads::builder(name).spawn(move || {
            if let Err(e) = crate::seccomp::install_for(crate::seccomp::Class::Worker) {
                tracing::error!("vhost-user link: {e}");
                return;
            }
            state.serve(rx, &d);
        })?;
        Ok(Link {
            path: path.to_string(),
            tx: Some(tx),
            sent: 0,
            done,
            thread: Some(thread),
            watch: Some(watch),
        })
    }

    /// Hand `c` to the link thread.
    fn send(&mut self, c: Command) -> Result<(), String> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(c).ok())
            .ok_or_else(|| format!("vhost-user {}: its link thread is gone", self.path))?;
        self.sent += 1;
        Ok(())
    }

    /// The driver set DRIVER_OK: the back end gets the rings (`features`: what it is to
    /// know of the driver's). Returns at once; kicks wait in their eventfds meanwhile.
    pub fn start_rings(&mut self, act: Activation, features: u64) -> Result<(), ActivateError> {
        self.send(Command::Start(Box::new(OwnedRings {
            mem: act.mem,
            queues: act.queues,
            interrupt: act.interrupt,
            kicks: act.kicks,
            features,
        })))
        .map_err(ActivateError::Failed)
    }

    /// Wait until the link thread has carried out every command (tests and fuzzing).
    pub fn settle(&self) {
        self.wait_done(Duration::from_secs(30));
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

    /// The driver reset the device: the back end stops the rings before the driver may
    /// reuse their memory. One that does not answer within [`RESET_WAIT`] is cut off.
    pub fn stop_rings(&mut self) {
        if self.send(Command::Stop).is_ok() && !self.wait_done(RESET_WAIT) {
            crate::warn_limited!(
                "vhost-user {}: the back end did not stop its rings within {RESET_WAIT:?}; disconnected",
                self.path
            );
            self.cut();
        }
    }

    /// The VM is being paused: the back end stops the rings (waiting at most
    /// [`RESET_WAIT`]; a back end that does not answer by then is left running).
    pub fn pause(&mut self) {
        if self.send(Command::Pause).is_ok() && !self.wait_done(RESET_WAIT) {
            crate::warn_limited!(
                "vhost-user {}: the back end did not stop its rings for the pause within {RESET_WAIT:?}",
                self.path
            );
        }
    }

    /// The VM runs again: the rings start where they stopped.
    pub fn resume(&mut self) {
        if let Err(e) = self.send(Command::Resume) {
            tracing::warn!("{e}");
        }
    }

    /// The current back end's socket, while there is one.
    pub fn watch(&self) -> Option<&UnixStream> {
        self.watch.as_ref()
    }

    /// Take a newly connected back end: `stream` goes to the link thread, `watch` (a
    /// second handle on it) stays here.
    pub fn replace_backend(&mut self, stream: UnixStream, watch: UnixStream) -> Result<(), String> {
        self.send(Command::Backend(stream))?;
        self.watch = Some(watch);
        Ok(())
    }

    /// Forget the current back end's socket (it hung up).
    pub fn backend_gone(&mut self) -> Option<UnixStream> {
        self.watch.take()
    }

    fn cut(&mut self) {
        if let Some(w) = &self.watch {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The socket going down ends any wait for the back end; the channel closing ends
        // the thread.
        self.cut();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
pub mod stand_in {
    //! A stand-in vhost-user back end for the front ends' tests.
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    /// Every request the stand-in read: its type and body.
    pub type Seen = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

    pub const GET_FEATURES: u32 = 1;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const NEED_REPLY: u32 = 0x8;

    /// A stand-in back end on the stream `connect` gives: answers the handshake
    /// (offering REPLY_ACK), then, unless `mute`, every request that wants an answer.
    /// Records each request and its body.
    pub fn serve_when_connected(
        connect: impl FnOnce() -> UnixStream + Send + 'static,
        mute: bool,
    ) -> Seen {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            let mut s = connect();
            let mut muted = false;
            let mut hdr = [0u8; 12];
            while s.read_exact(&mut hdr).is_ok() {
                let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
                let (req, flags, size) = (word(0), word(4), word(8) as usize);
                let mut body = vec![0u8; size];
                if s.read_exact(&mut body).is_err() {
                    return;
                }
                log.lock().unwrap().push((req, body.clone()));
                let reply: Option<Vec<u8>> = match req {
                    GET_FEATURES => Some(((1u64 << 30) | (1 << 32)).to_le_bytes().to_vec()),
                    GET_PROTOCOL_FEATURES => Some((1u64 << 3).to_le_bytes().to_vec()),
                    // Every ring stopped at avail index 7.
                    GET_VRING_BASE => Some([&body[..4], &7u32.to_le_bytes()].concat()),
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

    /// How many `req` messages the stand-in has read, once `want` arrived or 2 s passed
    /// (a message that wants no answer can still be on its way when the sender is done).
    pub fn count(seen: &Seen, req: u32, want: usize) -> usize {
        let n = || {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(r, _)| *r == req)
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while n() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        n()
    }
}
