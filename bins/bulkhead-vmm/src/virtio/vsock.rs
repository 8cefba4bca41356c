//! virtio-vsock, with host ends on unix sockets ("hybrid vsock").
//!
//! - Host to guest: connect to the VM's socket, send `CONNECT <port>\n`; once the guest
//!   accepts, read `OK <hostport>\n`, then the stream is the connection.
//! - Guest to host: a guest connection to host port P is connected to `<socket>_P`.
//!
//! Everything in a guest packet is untrusted: a packet with a wrong address, type or
//! length, or one that overruns the credit we granted, is answered with RST and the
//! device goes on. Host-bound data waiting for a slow socket is bounded by the credit.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    ActivateError, Activation, EventSink, Interrupt, VirtioDevice, DEVICE_TOKEN_BASE, INT_VRING,
    TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

pub const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;

/// Receive buffer we grant each connection: the most guest data we hold for a socket.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload we put into one rx packet.
const MAX_PKT_DATA: usize = 64 * 1024;
/// Control packets waiting for rx buffers. Near this, the device stops taking the
/// guest's tx packets (each may need a reply) until the guest posts rx buffers again;
/// past it (host-side events only) the oldest are dropped.
const MAX_PENDING_CTRL: usize = 4096;
/// The most control packets one tx packet makes (a reply and a credit update).
const CTRL_PER_TX: usize = 2;
/// Guest data held for host sockets that do not take it, across all connections.
/// Each connection may hold [`BUF_ALLOC`]; without a total, 1024 of them could make a
/// VMM hold 256 MiB. Past it the guest's tx packets wait in their ring.
const MAX_BUFFERED: usize = 16 << 20;
const MAX_CONNS: usize = 1024;
const CONNECT_LINE_MAX: usize = 32;
/// How long a host connection may wait for its `CONNECT <port>` line, and then for the
/// guest to accept it, before it is dropped (and the guest told with RST).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const RX: usize = 0;
const TX: usize = 1;
const LISTENER_TOKEN: u32 = DEVICE_TOKEN_BASE;
/// The expiry timer's token; connection tokens come after it.
const TIMER_TOKEN: u32 = DEVICE_TOKEN_BASE + 1;
const FIRST_CONN_TOKEN: u32 = DEVICE_TOKEN_BASE + 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Hdr {
            src_cid: u64at(0),
            dst_cid: u64at(8),
            src_port: u32at(16),
            dst_port: u32at(20),
            len: u32at(24),
            type_: u16at(28),
            op: u16at(30),
            flags: u32at(32),
            buf_alloc: u32at(36),
            fwd_cnt: u32at(40),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host connected and sent CONNECT; waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// (host-side port, guest-side port)
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    token: u32,
    state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we have sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest we have written to the socket.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest data (and our OK line) waiting for the socket to take it.
    out: VecDeque<u8>,
    /// Host data that came in the same read as the `CONNECT <port>` line: the first
    /// bytes for the guest once it accepts (at most [`CONNECT_LINE_MAX`]).
    early: Vec<u8>,
    /// The guest will send no more (shut down the socket's write side once `out` drains).
    peer_shut_send: bool,
    /// The guest will receive no more.
    peer_shut_rcv: bool,
    /// The socket has data or hung up, and we have not drained that yet.
    readable: bool,
    host_eof: bool,
    /// The epoll interest it has, `None` while it is not in epoll at all: a socket we
    /// want nothing from is taken out, because epoll reports a hang-up even to an empty
    /// interest, and a level-triggered hang-up would wake the loop without end.
    registered: Option<EventSet>,
    since: std::time::Instant,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn flush_out(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.peer_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

struct PendingHost {
    stream: UnixStream,
    buf: Vec<u8>,
    since: std::time::Instant,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Arc<Interrupt>,
    events: EventSink,
    requeue: super::Requeue,
}

pub struct Vsock {
    cid: u64,
    socket: PathBuf,
    listener: Option<UnixListener>,
    active: Option<Active>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u32, Key>,
    pending: HashMap<u32, PendingHost>,
    ctrl: VecDeque<Hdr>,
    next_token: u32,
    next_local_port: u32,
    rx_starved: bool,
    /// [`MAX_PENDING_CTRL`] (smaller in tests).
    ctrl_max: usize,
    /// tx packets were left in the ring because their replies had no room, or the
    /// data buffered for host sockets was over [`MAX_BUFFERED`].
    tx_held: bool,
    /// [`MAX_BUFFERED`] (smaller in tests).
    buffer_budget: usize,
    buf: Vec<u8>,
    connect_timeout: std::time::Duration,
    /// Ticks while any connection waits for its CONNECT line or for the guest's answer,
    /// so that one expires on time even when nothing else happens on the device.
    timer: TimerFd,
    timer_armed: bool,
    /// Chains this turn of the event loop may still take from either queue
    /// ([`super::QUEUE_BUDGET`] at the start of each).
    turn_budget: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on vsock socket {path}: {source}")]
pub struct VsockError {
    path: String,
    source: std::io::Error,
}

impl Vsock {
    pub fn new(cid: u32, socket: &Path) -> Result<Self, VsockError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|source| VsockError {
            path: socket.display().to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError {
                path: socket.display().to_string(),
                source,
            })?;
        let err = |source| VsockError {
            path: socket.display().to_string(),
            source,
        };
        let timer = TimerFd::new().map_err(|e| err(e.into()))?;
        // SAFETY: F_SETFL on a descriptor we own; a read of it must never block the loop.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Vsock {
            cid: u64::from(cid),
            socket: socket.to_owned(),
            listener: Some(listener),
            active: None,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: 1 << 30,
            rx_starved: false,
            ctrl_max: MAX_PENDING_CTRL,
            tx_held: false,
            buffer_budget: MAX_BUFFERED,
            buf: vec![0u8; MAX_PKT_DATA],
            connect_timeout: CONNECT_TIMEOUT,
            timer,
            timer_armed: false,
            turn_budget: super::QUEUE_BUDGET,
        })
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if !self.tokens.contains_key(&t) && !self.pending.contains_key(&t) {
                return t;
            }
        }
    }

    fn reply(&self, to: &Hdr, op: u16, flags: u32) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            ..Default::default()
        }
    }

    /// Can one more tx packet be taken: room for its replies, and guest data held for
    /// host sockets under the budget?
    fn tx_room(&self) -> bool {
        self.ctrl.len() + CTRL_PER_TX <= self.ctrl_max
            && self.conns.values().map(|c| c.out.len()).sum::<usize>() < self.buffer_budget
    }

    fn push_ctrl(&mut self, h: Hdr) {
        if self.ctrl.len() >= self.ctrl_max {
            self.ctrl.pop_front();
        }
        self.ctrl.push_back(h);
    }

    fn conn_hdr(&self, key: Key, op: u16, flags: u32) -> Hdr {
        let c = &self.conns[&key];
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
            ..Default::default()
        }
    }

    fn remove_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if let Some(a) = &self.active {
                a.events.remove(c.stream.as_raw_fd());
            }
        }
    }

    fn reset_conn(&mut self, key: Key) {
        if self.conns.contains_key(&key) {
            let h = self.conn_hdr(key, OP_RST, 0);
            self.push_ctrl(h);
            self.remove_conn(key);
        }
    }

    fn add_conn(
        &mut self,
        key: Key,
        stream: UnixStream,
        state: ConnState,
        peer: Option<&Hdr>,
    ) -> bool {
        if self.conns.len() >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
            return false;
        }
        let token = self.alloc_token();
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn {
                stream,
                token,
                state,
                peer_buf_alloc: peer.map(|h| h.buf_alloc).unwrap_or(0),
                peer_fwd_cnt: peer.map(|h| h.fwd_cnt).unwrap_or(0),
                tx_cnt: 0,
                fwd_cnt: 0,
                last_fwd_cnt_sent: 0,
                out: VecDeque::new(),
                early: Vec::new(),
                peer_shut_send: false,
                peer_shut_rcv: false,
                readable: false,
                host_eof: false,
                registered: None,
                since: std::time::Instant::now(),
            },
        );
        true
    }

    /// One packet from the guest's tx queue. `data` is the payload reader.
    fn handle_tx_packet(&mut self, h: Hdr, data: &mut virtio_queue::Reader<'_>) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                let r = self.reply(&h, OP_RST, 0);
                self.push_ctrl(r);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => {
                if self.conns.contains_key(&key) {
                    let r = self.reply(&h, OP_RST, 0);
                    self.push_ctrl(r);
                    return;
                }
                let path = format!("{}_{}", self.socket.display(), h.dst_port);
                let ok = match connect_nonblocking(&path) {
                    Ok(s) => self.add_conn(key, s, ConnState::Established, Some(&h)),
                    Err(_) => false,
                };
                let r = self.reply(&h, if ok { OP_RESPONSE } else { OP_RST }, 0);
                self.push_ctrl(r);
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::Connecting => {
                    c.state = ConnState::Established;
                    c.readable |= !c.early.is_empty();
                    c.out.extend(format!("OK {}\n", key.0).bytes());
                    if c.flush_out().is_err() {
                        self.reset_conn(key);
                    }
                }
                _ => {
                    let r = self.reply(&h, OP_RST, 0);
                    self.push_ctrl(r);
                }
            },
            OP_RST => self.remove_conn(key),
            OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                c.peer_shut_send |= h.flags & SHUT_SEND != 0;
                c.peer_shut_rcv |= h.flags & SHUT_RCV != 0;
                let _ = c.flush_out();
                if c.peer_shut_send && c.peer_shut_rcv {
                    self.reset_conn(key);
                }
            }
            OP_RW => {
                let len = h.len as usize;
                let Some(c) = self.conns.get_mut(&key) else {
                    let r = self.reply(&h, OP_RST, 0);
                    self.push_ctrl(r);
                    return;
                };
                // The guest may not send more than the credit we granted, nor claim more
                // bytes than its descriptors hold.
                if c.state != ConnState::Established
                    || len > data.available_bytes()
                    || c.out.len() + len > BUF_ALLOC as usize
                {
                    self.reset_conn(key);
                    return;
                }
                let mut left = len;
                while left > 0 {
                    let n = left.min(self.buf.len());
                    if data.read_exact(&mut self.buf[..n]).is_err() {
                        self.reset_conn(key);
                        return;
                    }
                    c.out.extend(&self.buf[..n]);
                    left -= n;
                }
                let before = c.out.len();
                if c.flush_out().is_err() {
                    self.reset_conn(key);
                    return;
                }
                self.account_flushed(key, before);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    let r = self.conn_hdr(key, OP_CREDIT_UPDATE, 0);
                    self.push_ctrl(r);
                }
            }
            _ => {
                let r = self.reply(&h, OP_RST, 0);
                self.push_ctrl(r);
            }
        }
    }

    /// After a flush: count what the socket took toward `fwd_cnt`, and tell the guest
    /// about freed credit once enough has accumulated.
    fn account_flushed(&mut self, key: Key, before: usize) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let taken = before.saturating_sub(c.out.len()) as u32;
        c.fwd_cnt = c.fwd_cnt.wrapping_add(taken);
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            let h = self.conn_hdr(key, OP_CREDIT_UPDATE, 0);
            self.push_ctrl(h);
        }
    }

    fn process_tx(&mut self) {
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        let mut used = false;
        loop {
            // A guest that posts no rx buffers gets no more of its packets read: their
            // replies would have nowhere to go (back-pressure, not dropped replies). The
            // same while host sockets hold back more guest data than the budget.
            if !self.tx_room() {
                self.tx_held = true;
                break;
            }
            if !self.take_from_budget(TX) {
                break;
            }
            let Some(a) = self.active.as_mut() else {
                return;
            };
            // Empty: the guest's next packet kicks.
            let Some(chain) = super::pop_or_rearm(&mem, &mut a.tx) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(mut r) = chain.reader(&mem) {
                let mut hb = [0u8; HDR_LEN];
                if r.read_exact(&mut hb).is_ok() {
                    self.handle_tx_packet(Hdr::from_bytes(&hb), &mut r);
                }
            }
            let Some(a) = self.active.as_mut() else {
                return;
            };
            if a.tx.add_used(&mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if let Some(a) = self.active.as_mut() {
            if used && a.tx.needs_notification(&mem).unwrap_or(true) {
                a.irq.signal(INT_VRING);
            }
        }
    }

    /// Fill rx buffers: control packets first, then data from readable sockets.
    fn process_rx(&mut self) {
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        let mut used = false;
        loop {
            let next_conn = if self.ctrl.is_empty() {
                self.conns
                    .iter()
                    .find(|(_, c)| {
                        c.readable
                            && c.state == ConnState::Established
                            && (c.credit() > 0 || c.host_eof)
                    })
                    .map(|(k, _)| *k)
            } else {
                None
            };
            if self.ctrl.is_empty() && next_conn.is_none() {
                break;
            }
            if !self.take_from_budget(RX) {
                break;
            }
            let Some(a) = self.active.as_mut() else {
                return;
            };
            // Out of buffers: only now does the guest's next one need a kick (while
            // buffers last they are taken without one).
            let Some(chain) = super::pop_or_rearm(&mem, &mut a.rx) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let mut written = Some(0u32);
            if let Ok(mut w) = chain.writer(&mem) {
                if w.available_bytes() < HDR_LEN {
                    // Unusable buffer: hand it back empty.
                } else if let Some(h) = self.ctrl.pop_front() {
                    if w.write_all(&h.to_bytes()).is_ok() {
                        written = Some(HDR_LEN as u32);
                    }
                } else if let Some(key) = next_conn {
                    written = self.fill_data_packet(key, &mut w);
                }
            }
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let Some(written) = written else {
                // The socket had nothing after all: the buffer stays the guest's, unused,
                // rather than coming back empty (a wasted buffer and interrupt).
                a.rx.go_to_previous_position();
                continue;
            };
            if a.rx.add_used(&mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if let Some(a) = self.active.as_mut() {
            if used && a.rx.needs_notification(&mem).unwrap_or(true) {
                a.irq.signal(INT_VRING);
            }
        }
    }

    /// One packet of `key`'s host data (or its end) into `w`: the bytes written, or None
    /// when the socket turned out to have nothing, so the buffer can go back unused.
    fn fill_data_packet(&mut self, key: Key, w: &mut virtio_queue::Writer<'_>) -> Option<u32> {
        let room = w.available_bytes() - HDR_LEN;
        let Some(c) = self.conns.get_mut(&key) else {
            return Some(0);
        };
        let max = room.min(MAX_PKT_DATA).min(c.credit() as usize);
        let n = if max == 0 || c.host_eof {
            Ok(0)
        } else if !c.early.is_empty() {
            let n = max.min(c.early.len());
            self.buf[..n].copy_from_slice(&c.early[..n]);
            c.early.drain(..n);
            Ok(n)
        } else {
            loop {
                match c.stream.read(&mut self.buf[..max]) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        };
        match n {
            Ok(0) if max > 0 || c.host_eof => {
                // Host closed: tell the guest neither direction carries more.
                c.host_eof = true;
                c.readable = false;
                let h = self.conn_hdr(key, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND);
                Some(write_packet(w, &h, &[]))
            }
            Ok(0) => Some(0),
            Ok(n) => {
                // A short read emptied the socket (nearly always): wait for its next
                // readiness instead of reading again for nothing. Interest is level
                // triggered, so bytes that came meanwhile are reported at once.
                if n < max {
                    c.readable = false;
                }
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.last_fwd_cnt_sent = c.fwd_cnt;
                let mut h = self.conn_hdr(key, OP_RW, 0);
                h.len = n as u32;
                Some(write_packet(w, &h, &self.buf[..n]))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.readable = false;
                None
            }
            Err(_) => {
                let h = self.conn_hdr(key, OP_RST, 0);
                self.remove_conn(key);
                Some(write_packet(w, &h, &[]))
            }
        }
    }

    /// Keep each socket's epoll interest in line with what we can do for it.
    fn update_interest(&mut self) {
        let Some(a) = &self.active else { return };
        for c in self.conns.values_mut() {
            let mut want = EventSet::empty();
            if c.state == ConnState::Established
                && !c.host_eof
                && !c.readable
                && !self.rx_starved
                && c.credit() > 0
            {
                want |= EventSet::IN;
            }
            if !c.out.is_empty() {
                want |= EventSet::OUT;
            }
            if c.registered == Some(want) {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            if want.is_empty() {
                if c.registered.take().is_some() {
                    a.events.remove(fd);
                }
                continue;
            }
            let r = match c.registered {
                None => a.events.add(fd, c.token, want),
                Some(_) => a.events.modify(fd, c.token, want),
            };
            if r.is_ok() {
                c.registered = Some(want);
            }
        }
    }

    /// Drop host connections that never sent their CONNECT line, or that the guest
    /// never answered, within [`CONNECT_TIMEOUT`]: each holds a descriptor and one of the
    /// [`MAX_CONNS`] slots.
    fn expire_connecting(&mut self) {
        let timeout = self.connect_timeout;
        let stale: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.since.elapsed() > timeout)
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            if let Some(p) = self.pending.remove(&t) {
                if let Some(a) = &self.active {
                    a.events.remove(p.stream.as_raw_fd());
                }
            }
        }
        let stale: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == ConnState::Connecting && c.since.elapsed() > timeout)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.reset_conn(k);
        }
    }

    fn accept_host(&mut self) {
        loop {
            let Some(l) = &self.listener else { return };
            match l.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err()
                        || self.pending.len() + self.conns.len() >= MAX_CONNS
                    {
                        continue;
                    }
                    let token = self.alloc_token();
                    if let Some(a) = &self.active {
                        if a.events.add(s.as_raw_fd(), token, EventSet::IN).is_err() {
                            continue;
                        }
                    }
                    self.pending.insert(
                        token,
                        PendingHost {
                            stream: s,
                            buf: Vec::new(),
                            since: std::time::Instant::now(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn pending_readable(&mut self, token: u32) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut b = [0u8; CONNECT_LINE_MAX];
        let n = match p
            .stream
            .read(&mut b[..CONNECT_LINE_MAX - p.buf.len().min(CONNECT_LINE_MAX - 1)])
        {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return
            }
            Err(_) => 0,
        };
        p.buf.extend_from_slice(&b[..n]);
        let line_end = p.buf.iter().position(|&c| c == b'\n');
        if n != 0 && line_end.is_none() && p.buf.len() < CONNECT_LINE_MAX {
            return;
        }
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        if let Some(a) = &self.active {
            a.events.remove(p.stream.as_raw_fd());
        }
        let port = line_end
            .and_then(|e| std::str::from_utf8(&p.buf[..e]).ok())
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(port) = port else { return };
        let local = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(1 << 30);
        let key = (local, port);
        if self.conns.contains_key(&key)
            || !self.add_conn(key, p.stream, ConnState::Connecting, None)
        {
            return;
        }
        // A client may write its first bytes right after the line, in the same read.
        if let (Some(c), Some(e)) = (self.conns.get_mut(&key), line_end) {
            c.early = p.buf[e + 1..].to_vec();
        }
        let h = self.conn_hdr(key, OP_REQUEST, 0);
        self.push_ctrl(h);
    }

    fn conn_event(&mut self, token: u32, events: EventSet) {
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if events.contains(EventSet::OUT) {
            let before = c.out.len();
            if c.flush_out().is_err() {
                self.reset_conn(key);
                return;
            }
            self.account_flushed(key, before);
        }
    }

    /// One chain off this turn's budget; with none left, the queue is served again on
    /// a later turn and this one stops.
    fn take_from_budget(&mut self, queue: usize) -> bool {
        if self.turn_budget == 0 {
            if let Some(a) = &self.active {
                a.requeue.later(queue);
            }
            return false;
        }
        self.turn_budget -= 1;
        true
    }

    fn after_event(&mut self) {
        self.expire_connecting();
        self.process_rx();
        // Each round takes at least one held tx packet, or ends the loop (at the latest
        // when this turn's budget is spent: process_tx then requeues the tx queue).
        while self.tx_held && self.tx_room() {
            self.tx_held = false;
            self.process_tx();
            self.process_rx();
        }
        self.update_interest();
        self.update_timer();
    }

    /// Tick while something waits to expire; stay quiet otherwise.
    fn update_timer(&mut self) {
        let waiting = !self.pending.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.state == ConnState::Connecting);
        if waiting && !self.timer_armed {
            let tick = (self.connect_timeout / 2)
                .min(std::time::Duration::from_secs(1))
                .max(std::time::Duration::from_millis(10));
            self.timer_armed = self.timer.reset(tick, Some(tick)).is_ok();
        } else if !waiting && self.timer_armed {
            self.timer_armed = self.timer.clear().is_err();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | super::VIRTIO_F_RING_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data)
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let mut q = act.queues.into_iter();
        let (Some(rx), Some(tx)) = (q.next(), q.next()) else {
            return Err(ActivateError::Failed("vsock needs rx and tx queues".into()));
        };
        if let Some(l) = &self.listener {
            act.events
                .add(l.as_raw_fd(), LISTENER_TOKEN, EventSet::IN)
                .map_err(|e| ActivateError::Failed(format!("watch vsock listener: {e}")))?;
        }
        act.events
            .add(self.timer.as_raw_fd(), TIMER_TOKEN, EventSet::IN)
            .map_err(|e| ActivateError::Failed(format!("watch vsock timer: {e}")))?;
        self.active = Some(Active {
            mem: act.mem,
            rx,
            tx,
            irq: act.interrupt,
            events: act.events,
            requeue: super::Requeue::new(act.kicks),
        });
        Ok(())
    }
    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        if let Some(a) = self.active.take() {
            if let Some(l) = &self.listener {
                a.events.remove(l.as_raw_fd());
            }
            // Disarmed by the event loop's next look (a reset runs on a vCPU thread,
            // whose filter has no timerfd calls); a tick meanwhile wakes nobody.
            a.events.remove(self.timer.as_raw_fd());
            for p in self.pending.values() {
                a.events.remove(p.stream.as_raw_fd());
            }
        }
        self.pending.clear();
        self.ctrl.clear();
        self.rx_starved = false;
        self.tx_held = false;
    }
    fn queue_notify(&mut self, queue: usize) {
        self.turn_budget = super::QUEUE_BUDGET;
        match queue {
            RX => self.rx_starved = false,
            TX => self.process_tx(),
            _ => {}
        }
        self.after_event();
    }
    fn handle_event(&mut self, token: u32, events: EventSet) {
        self.turn_budget = super::QUEUE_BUDGET;
        if token == LISTENER_TOKEN {
            self.accept_host();
        } else if token == TIMER_TOKEN {
            // Non-blocking: a tick that a disarm already took back reads EAGAIN.
            let _ = self.timer.wait();
        } else if self.pending.contains_key(&token) {
            self.pending_readable(token);
        } else {
            self.conn_event(token, events);
        }
        self.after_event();
    }
}

/// A packet (header and data) into a guest buffer: its length, or 0 (an empty buffer)
/// where it does not fit.
fn write_packet(w: &mut virtio_queue::Writer<'_>, h: &Hdr, data: &[u8]) -> u32 {
    if w.write_all(&h.to_bytes()).is_ok() && w.write_all(data).is_ok() {
        (HDR_LEN + data.len()) as u32
    } else {
        0
    }
}

/// Connect to a host listener without blocking the event loop: a listener whose
/// backlog is full refuses at once (EAGAIN), and the guest gets RST, instead of every
/// device of the VM stalling until the listener accepts.
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    s.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)))
}

#[cfg(test)]
mod tests;
