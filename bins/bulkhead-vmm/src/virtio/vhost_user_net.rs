//! virtio-net through a vhost-user back end (`bulkhead-net`), which can die and come back.
//!
//! The VMM listens on the socket and the back end connects, so a restarted back end is
//! taken back as soon as it starts: the new connection gets the handshake, guest memory
//! and every ring again, each ring starting at the guest's used index, so what the old
//! back end took but never completed is offered again rather than lost. Frames move
//! between the guest and the back end through shared memory and eventfds; this process
//! holds only the transport, the config space (MAC, link status, MTU) and the socket.
//! Every message to a back end after the first handshake (rings at activation, a new
//! back end's handshake and rings, stopping the rings on reset) goes through the
//! device's link thread ([`vhost_user::Link`]): neither the vCPU that activates the
//! device nor the event loop that accepts a new back end waits on another process.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vmm_sys_util::epoll::EventSet;

use super::vhost_user::{self, Link, INDIRECT_DESC};
use super::{
    ActivateError, Activation, EventSink, VirtioDevice, DEVICE_TOKEN_BASE, TYPE_NET,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::memory::RamRegion;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
/// What the back end may offer and the guest may take through us.
const PASSED: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF
    | VIRTIO_F_RING_EVENT_IDX
    | INDIRECT_DESC;
/// Served by this process: the config space.
const OWN: u64 = F_MAC | F_STATUS;
const STATUS_LINK_UP: u16 = 1;

const TOK_LISTEN: u32 = DEVICE_TOKEN_BASE;
const TOK_CONN: u32 = DEVICE_TOKEN_BASE + 1;
const QUEUE_SIZE: u16 = 256;
/// Longest wait for a back end's answer to one vhost-user message.
const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("vhost-user-net socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("no vhost-user-net back end connected to {path} within {secs} s")]
    NoBackend { path: String, secs: u64 },
    #[error("vhost-user-net back end at {path}: {what}: {msg}")]
    Setup {
        path: String,
        what: &'static str,
        msg: String,
    },
}

pub struct VhostUserNet {
    path: String,
    listener: UnixListener,
    backend_features: u64,
    config: [u8; 12],
    queue_sizes: [u16; 2],
    /// Every message to the back end goes through here ([`Link`]).
    link: Link,
    /// Set at activation: where the listener and the back end's socket are watched.
    events: Option<EventSink>,
}

impl VhostUserNet {
    /// Listen on `socket` and wait up to `wait` for the back end's first connection.
    pub fn listen(
        socket: &Path,
        mac: [u8; 6],
        mtu: Option<u16>,
        regions: Vec<RamRegion>,
        mem_fd: RawFd,
        wait: Duration,
    ) -> Result<Self, NetError> {
        let path = socket.display().to_string();
        let sock_err = |source| NetError::Socket {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(sock_err)?;
        listener.set_nonblocking(true).map_err(sock_err)?;
        let t0 = Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && t0.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(NetError::NoBackend {
                        path,
                        secs: wait.as_secs(),
                    })
                }
                Err(e) => return Err(sock_err(e)),
            }
        };
        let (fe, features) = first_handshake(&path, stream)?;
        let link = Link::start("vhost-user-net", &path, fe, features, regions, mem_fd)
            .map_err(sock_err)?;
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
        Ok(VhostUserNet {
            path,
            listener,
            backend_features: features | if mtu.is_some() { F_MTU } else { 0 },
            config,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            link,
            events: None,
        })
    }

    fn watch_backend(&self) {
        if let (Some(ev), Some(s)) = (self.events.as_ref(), self.link.watch()) {
            let _ = ev.add(s.as_raw_fd(), TOK_CONN, EventSet::IN | EventSet::HANG_UP);
        }
    }

    fn backend_gone(&mut self) {
        if let Some(s) = self.link.backend_gone() {
            if let Some(ev) = self.events.as_ref() {
                ev.remove(s.as_raw_fd());
            }
            tracing::warn!(socket = %self.path, "vhost-user-net back end gone; waiting for it");
        }
    }

    /// A connection on the socket: a back end (re)starting. Its handshake and the rings
    /// go to the link thread; the event loop waits for none of it.
    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.link.watch().is_some_and(alive) {
                tracing::warn!(socket = %self.path, "a second back end connected; refused");
                continue;
            }
            self.backend_gone();
            let watch = match stream
                .set_nonblocking(false)
                .and_then(|()| stream.try_clone())
            {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(socket = %self.path, "new back end: {e}");
                    continue;
                }
            };
            match self.link.replace_backend(stream, watch) {
                Ok(()) => self.watch_backend(),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

/// The first back end's handshake, at VMM start. It runs on a thread of its own and is
/// given [`BACKEND_REPLY_TIMEOUT`]: a back end that connects and never answers is an
/// error, not a VMM that never starts (its socket is shut down and the thread ends).
fn first_handshake(path: &str, stream: UnixStream) -> Result<(Frontend, u64), NetError> {
    let sock_err = |source| NetError::Socket {
        path: path.to_string(),
        source,
    };
    stream.set_nonblocking(false).map_err(sock_err)?;
    let watch = stream.try_clone().map_err(sock_err)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = crate::threads::builder("vhost-user-net")
        .spawn(move || {
            if let Err(e) = crate::seccomp::install_for(crate::seccomp::Class::Worker) {
                tracing::error!("{e}");
                return;
            }
            let mut fe = Frontend::from_stream(stream, 2);
            let r = vhost_user::handshake(&mut fe);
            let _ = tx.send((fe, r));
        })
        .map_err(sock_err)?;
    let setup_err = |what: &'static str, msg: String| NetError::Setup {
        path: path.to_string(),
        what,
        msg,
    };
    let r = match rx.recv_timeout(BACKEND_REPLY_TIMEOUT) {
        Ok((fe, Ok(features))) => Ok((fe, features)),
        Ok((_, Err((what, e)))) => Err(setup_err(what, e.to_string())),
        Err(_) => {
            let _ = watch.shutdown(std::net::Shutdown::Both);
            Err(setup_err(
                "handshake",
                format!("no answer within {BACKEND_REPLY_TIMEOUT:?}"),
            ))
        }
    };
    let _ = worker.join();
    r
}

/// Is the peer of `s` still there? (A back end never writes unasked on this socket, so
/// readable means closed.)
fn alive(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv into a 1-byte buffer we own; MSG_PEEK|MSG_DONTWAIT changes nothing.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::WouldBlock
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | OWN | (self.backend_features & (PASSED | F_MTU))
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data)
    }
    /// Hands the rings to the link thread and returns; a back end that is gone gets
    /// them when the next one connects.
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let _ = act
            .events
            .add(self.listener.as_raw_fd(), TOK_LISTEN, EventSet::IN);
        self.events = Some(act.events.clone());
        let act_features = act.acked_features & (PASSED | VIRTIO_F_VERSION_1);
        if !self.link.watch().is_some_and(alive) {
            // It died before the guest got here; the next one to connect gets the rings.
            self.backend_gone();
        }
        self.link.start_rings(act, act_features)?;
        self.watch_backend();
        Ok(())
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
    fn handle_event(&mut self, token: u32, _events: EventSet) {
        match token {
            TOK_LISTEN => self.accept(),
            TOK_CONN if !self.link.watch().is_some_and(alive) => self.backend_gone(),
            _ => {}
        }
    }
    fn external_interrupts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connect to `path` as a back end does, once the VMM listens there.
    fn connect_when_listening(path: &Path) -> UnixStream {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// A stand-in back end: answers the handshake the way bulkhead-net does.
    fn fake_backend(path: std::path::PathBuf, features: u64) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut s = connect_when_listening(&path);
            let mut hdr = [0u8; 12];
            while s.read_exact(&mut hdr).is_ok() {
                let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
                let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
                let mut body = vec![0u8; size];
                if s.read_exact(&mut body).is_err() {
                    return;
                }
                if req == 1 {
                    // GET_FEATURES: reply with `features`.
                    let mut r = Vec::new();
                    r.extend_from_slice(&1u32.to_le_bytes());
                    r.extend_from_slice(&(1u32 | 4).to_le_bytes());
                    r.extend_from_slice(&8u32.to_le_bytes());
                    r.extend_from_slice(&features.to_le_bytes());
                    s.write_all(&r).unwrap();
                }
            }
        })
    }

    #[test]
    fn features_and_config_come_from_the_back_end_and_the_mac() {
        let dir = std::env::temp_dir().join(format!("bh-vun-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("net.sock");
        let backend = F_CSUM | F_HOST_TSO4 | F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX | (1 << 40);
        let t = fake_backend(sock.clone(), backend);
        let dev = VhostUserNet::listen(
            &sock,
            [2, 0, 0, 0, 0, 7],
            Some(1400),
            vec![],
            -1,
            Duration::from_secs(10),
        )
        .unwrap();
        let f = dev.features();
        assert_eq!(
            f & (F_CSUM | F_HOST_TSO4 | F_MRG_RXBUF),
            F_CSUM | F_HOST_TSO4 | F_MRG_RXBUF
        );
        assert_ne!(f & F_MAC, 0);
        assert_ne!(f & F_MTU, 0);
        assert_eq!(
            f & (1 << 40),
            0,
            "unknown back end features are not passed on"
        );
        assert_eq!(f & F_GUEST_TSO6, 0, "nor features the back end lacks");
        let mut cfg = [0u8; 12];
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[2, 0, 0, 0, 0, 7]);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), STATUS_LINK_UP);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400);
        assert!(dev.link.watch().is_some_and(alive));
        drop(dev);
        t.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_back_end_that_never_answers_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("bh-vun-mute-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("net.sock");
        let s2 = sock.clone();
        let mute = std::thread::spawn(move || {
            let s = connect_when_listening(&s2);
            // Reads what comes and answers nothing, until the VMM hangs up.
            use std::io::Read;
            let mut s = s;
            let mut b = [0u8; 256];
            while s.read(&mut b).is_ok_and(|n| n > 0) {}
        });
        let t = Instant::now();
        let e = VhostUserNet::listen(
            &sock,
            [2, 0, 0, 0, 0, 7],
            None,
            vec![],
            -1,
            Duration::from_secs(10),
        )
        .err()
        .unwrap();
        assert!(
            t.elapsed() < BACKEND_REPLY_TIMEOUT + Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert!(e.to_string().contains("no answer within"), "{e}");
        mute.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_back_end_that_comes_back_gets_the_rings_at_the_used_index_without_the_loop_waiting() {
        use crate::virtio::testutil::*;
        use crate::virtio::vhost_user::stand_in::{self, count, SET_VRING_KICK};
        use virtio_queue::mock::MockSplitQueue;
        const SET_VRING_BASE: u32 = 10;
        let dir = std::env::temp_dir().join(format!("bh-vun-back-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("net.sock");
        let s1 = sock.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let first = stand_in::serve_when_connected(
            move || {
                let s = connect_when_listening(&s1);
                tx.send(s.try_clone().unwrap()).unwrap();
                s
            },
            false,
        );
        let memfd = std::fs::File::open("/dev/null").unwrap();
        let mem = test_mem();
        let mut dev = VhostUserNet::listen(
            &sock,
            [2, 0, 0, 0, 0, 7],
            None,
            ram_regions(&mem),
            memfd.as_raw_fd(),
            Duration::from_secs(10),
        )
        .unwrap();
        let q0 = MockSplitQueue::create(&mem, vm_memory::GuestAddress(0), 64);
        let q1 = MockSplitQueue::create(&mem, vm_memory::GuestAddress(0x10000), 64);
        // The guest has had 5 rx buffers used already.
        q0.used().idx().store(u16::to_le(5));
        let (act, _, kicks) = activation_with_kicks(
            &mem,
            vec![q0.create_queue().unwrap(), q1.create_queue().unwrap()],
        );
        dev.activate(act).unwrap();
        dev.settle();
        assert_eq!(count(&first, SET_VRING_KICK, 2), 2);
        assert!(kicks[1].read().is_err(), "kicked with nothing to say");

        // The back end dies; the event loop hears its socket hang up.
        rx.recv()
            .unwrap()
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        let t = Instant::now();
        while dev.link.watch().is_some_and(alive) {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        dev.handle_event(TOK_CONN, EventSet::HANG_UP);
        // A new one connects and answers nothing yet: taking it costs the loop no wait.
        let s2 = sock.clone();
        let second =
            stand_in::serve_when_connected(move || UnixStream::connect(&s2).unwrap(), false);
        let t = Instant::now();
        while dev.link.watch().is_none() {
            dev.handle_event(TOK_LISTEN, EventSet::IN);
            assert!(t.elapsed() < Duration::from_secs(5), "never accepted");
            std::thread::sleep(Duration::from_millis(5));
        }
        dev.settle();
        assert_eq!(
            count(&second, SET_VRING_KICK, 2),
            2,
            "rings not handed to the new back end"
        );
        assert_eq!(count(&second, SET_VRING_BASE, 2), 2);
        // vhost_vring_state: index, then the avail index to start at.
        let bases: Vec<(u32, u32)> = second
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| *r == SET_VRING_BASE)
            .map(|(_, b)| {
                let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
                (word(0), word(4))
            })
            .collect();
        assert_eq!(bases, vec![(0, 5), (1, 0)], "not started at the used index");
        // Both rings kicked: what the guest queued meanwhile does not wait for its next
        // kick (with event suppression, its TCP retransmission timer).
        for (i, k) in kicks.iter().enumerate() {
            assert_eq!(
                k.read().unwrap(),
                1,
                "ring {i} not kicked for the new back end"
            );
        }
        drop(dev);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_back_end_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("bh-vun-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = VhostUserNet::listen(
            &dir.join("net.sock"),
            [2, 0, 0, 0, 0, 7],
            None,
            vec![],
            -1,
            Duration::from_millis(50),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("no vhost-user-net back end"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
