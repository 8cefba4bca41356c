use super::*;
use crate::virtio::testutil::*;
use std::io::BufRead;
use std::time::Duration;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

const CID: u32 = 3;
const RX_BUF: u64 = 0x100000;
const TX_BUF: u64 = 0x200000;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx_next: u16,
    rx_seen: usize,
    dev: Vsock,
    dir: tempfile::TempDir,
    /// The queues' notify eventfds (rx, tx, event), as the event loop watches them.
    kicks: Vec<vmm_sys_util::eventfd::EventFd>,
}

fn rig<'a>(mem: &'a GuestMemoryMmap, name: &str) -> Rig<'a> {
    rig_with(mem, name, false)
}

/// A rig whose driver negotiated `VIRTIO_F_RING_EVENT_IDX` when `event_idx`.
fn rig_with<'a>(mem: &'a GuestMemoryMmap, name: &str, event_idx: bool) -> Rig<'a> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("bh-vsock-{name}-"))
        .tempdir()
        .unwrap();
    let rx = MockSplitQueue::create(mem, GuestAddress(0), 64);
    let tx = MockSplitQueue::create(mem, GuestAddress(0x10000), 512);
    // 32 rx buffers of 4 KiB each.
    let descs: Vec<_> = (0..32)
        .map(|i| desc(RX_BUF + i * 0x1000, 0x1000, F_WRITE, 0))
        .collect();
    rx.add_desc_chains(&descs, 0).unwrap();
    let mut dev = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
    let mut queues = vec![
        rx.create_queue::<Queue>().unwrap(),
        tx.create_queue().unwrap(),
        Queue::new(16).unwrap(),
    ];
    for q in &mut queues {
        q.set_event_idx(event_idx);
    }
    let (act, _, kicks) = activation_with_kicks(mem, queues);
    dev.activate(act).unwrap();
    Rig {
        mem,
        rx,
        tx,
        tx_next: 0,
        rx_seen: 0,
        dev,
        dir,
        kicks,
    }
}

impl Rig<'_> {
    /// New packets the device put in rx buffers.
    fn rx_packets(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let u = used(&self.rx);
        let out = u[self.rx_seen..]
            .iter()
            .filter(|(_, len)| *len as usize >= HDR_LEN)
            .map(|&(id, len)| {
                let addr = RX_BUF + u64::from(id) * 0x1000;
                let b = read_bytes(self.mem, addr, len as usize);
                (
                    Hdr::from_bytes(b[..HDR_LEN].try_into().unwrap()),
                    b[HDR_LEN..].to_vec(),
                )
            })
            .collect();
        self.rx_seen = u.len();
        out
    }

    fn guest_send(&mut self, h: Hdr, data: &[u8]) {
        let addr = TX_BUF + u64::from(self.tx_next) * 0x1000;
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(data);
        self.mem.write_slice(&b, GuestAddress(addr)).unwrap();
        self.tx
            .add_desc_chains(&[desc(addr, b.len() as u32, 0, 0)], self.tx_next)
            .unwrap();
        self.tx_next += 1;
        self.dev.queue_notify(TX);
    }

    fn guest_hdr(&self, src_port: u32, dst_port: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: u64::from(CID),
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Default::default()
        }
    }

    fn pump(&mut self) {
        let tokens: Vec<u32> = self
            .dev
            .pending
            .keys()
            .chain(self.dev.tokens.keys())
            .copied()
            .collect();
        self.dev.handle_event(LISTENER_TOKEN, EventSet::IN);
        for t in tokens {
            self.dev.handle_event(t, EventSet::IN);
        }
        let tokens: Vec<u32> = self.dev.pending.keys().copied().collect();
        for t in tokens {
            self.dev.handle_event(t, EventSet::IN);
        }
    }
}

#[test]
fn host_connect_round_trip() {
    let mem = test_mem();
    let mut r = rig(&mem, "host");
    let mut client = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    r.pump();
    let p = r.rx_packets();
    assert_eq!(p.len(), 1);
    let req = p[0].0;
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, req.src_cid),
        (OP_REQUEST, 1024, 3, HOST_CID)
    );
    let host_port = req.src_port;
    // Guest accepts.
    let resp = r.guest_hdr(1024, host_port, OP_RESPONSE);
    r.guest_send(resp, b"");
    let mut line = String::new();
    std::io::BufReader::new(&client)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));
    // Host to guest data.
    client.write_all(b"ping").unwrap();
    r.pump();
    let p = r.rx_packets();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0.op, p[0].1.as_slice()), (OP_RW, &b"ping"[..]));
    // Guest to host data.
    let mut rw = r.guest_hdr(1024, host_port, OP_RW);
    rw.len = 4;
    r.guest_send(rw, b"pong");
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    // Host closes: the guest is told.
    drop(client);
    r.pump();
    let p = r.rx_packets();
    assert!(
        p.iter()
            .any(|(h, _)| h.op == OP_SHUTDOWN && h.flags == SHUT_RCV | SHUT_SEND),
        "{p:?}"
    );
}

#[test]
fn guest_connect_to_host_listener_and_refusal() {
    let mem = test_mem();
    let mut r = rig(&mem, "guest");
    let l = UnixListener::bind(r.dir.path().join("v.sock_5000")).unwrap();
    r.guest_send(r.guest_hdr(40000, 5000, OP_REQUEST), b"");
    let (mut s, _) = l.accept().unwrap();
    let p = r.rx_packets();
    assert_eq!((p[0].0.op, p[0].0.dst_port), (OP_RESPONSE, 40000));
    let mut rw = r.guest_hdr(40000, 5000, OP_RW);
    rw.len = 5;
    r.guest_send(rw, b"hello");
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    // Nobody listens on 5001.
    r.guest_send(r.guest_hdr(40001, 5001, OP_REQUEST), b"");
    let p = r.rx_packets();
    assert_eq!(p[0].0.op, OP_RST);
}

#[test]
fn hostile_packets_get_rst_and_the_device_lives_on() {
    let mem = test_mem();
    let mut r = rig(&mem, "hostile");
    let l = UnixListener::bind(r.dir.path().join("v.sock_6000")).unwrap();
    // Spoofed source cid.
    let mut h = r.guest_hdr(1, 6000, OP_REQUEST);
    h.src_cid = 99;
    r.guest_send(h, b"");
    // Wrong socket type.
    let mut h = r.guest_hdr(2, 6000, OP_REQUEST);
    h.type_ = 2;
    r.guest_send(h, b"");
    // Data for a connection that does not exist.
    let mut h = r.guest_hdr(3, 6000, OP_RW);
    h.len = 3;
    r.guest_send(h, b"abc");
    // Unknown op.
    r.guest_send(r.guest_hdr(4, 6000, 99), b"");
    let p = r.rx_packets();
    assert_eq!(
        p.iter().map(|(h, _)| h.op).collect::<Vec<_>>(),
        vec![OP_RST; 4]
    );
    // A connection whose RW claims more bytes than the descriptor holds is reset.
    r.guest_send(r.guest_hdr(5, 6000, OP_REQUEST), b"");
    let (_s, _) = l.accept().unwrap();
    let mut h = r.guest_hdr(5, 6000, OP_RW);
    h.len = 1 << 20;
    r.guest_send(h, b"short");
    let p = r.rx_packets();
    assert_eq!(
        p.iter().map(|(h, _)| h.op).collect::<Vec<_>>(),
        vec![OP_RESPONSE, OP_RST]
    );
    assert!(r.dev.conns.is_empty());
    // Short header, zero-length and out-of-memory descriptors on tx: consumed, no reply.
    for d in [
        desc(TX_BUF, 10, 0, 0),
        desc(TX_BUF, 0, 0, 0),
        desc(0xffff_0000, 44, 0, 0),
        desc(TX_BUF, 44, F_WRITE, 0),
    ] {
        r.tx.add_desc_chains(&[d], r.tx_next).unwrap();
        r.tx_next += 1;
        r.dev.queue_notify(TX);
    }
    assert!(r.rx_packets().is_empty());
    // A descriptor loop on tx.
    r.tx.add_desc_chains(&[desc(TX_BUF, 44, F_NEXT, r.tx_next)], r.tx_next)
        .unwrap();
    r.tx_next += 1;
    r.dev.queue_notify(TX);
    // Still serving: a fresh connection works.
    r.guest_send(r.guest_hdr(6, 6000, OP_REQUEST), b"");
    let p = r.rx_packets();
    assert_eq!(p.last().map(|(h, _)| h.op), Some(OP_RESPONSE));
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mem = test_mem();
    let mut r = rig(&mem, "badline");
    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'A'; 64][..]] {
        let mut c = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
        c.write_all(line).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r.pump();
        let mut b = [0u8; 1];
        assert_eq!(
            c.read(&mut b).unwrap_or(0),
            0,
            "line {line:?} was not dropped"
        );
    }
    assert!(r.rx_packets().is_empty());
    assert!(r.dev.pending.is_empty());
}

#[test]
fn header_round_trips() {
    let h = Hdr {
        src_cid: 3,
        dst_cid: 2,
        src_port: 7,
        dst_port: 9,
        len: 11,
        type_: 1,
        op: 5,
        flags: 3,
        buf_alloc: 13,
        fwd_cnt: 17,
    };
    assert_eq!(Hdr::from_bytes(&h.to_bytes()), h);
}

/// Run the device's share of the event loop once: whatever its epoll has ready.
/// Returns how many events were ready.
fn loop_once(r: &mut Rig<'_>) -> usize {
    let epoll = r.dev.active.as_ref().unwrap().events.epoll.clone();
    let mut evs = vec![vmm_sys_util::epoll::EpollEvent::default(); 16];
    let n = epoll.wait(0, &mut evs).unwrap();
    for e in &evs[..n] {
        r.dev
            .handle_event(e.data() as u32, EventSet::from_bits_truncate(e.events()));
    }
    n
}

#[test]
fn a_host_that_hangs_up_before_the_guest_answers_does_not_spin_the_loop() {
    let mem = test_mem();
    let mut r = rig(&mem, "hup");
    let mut client = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    r.pump();
    assert_eq!(r.rx_packets()[0].0.op, OP_REQUEST);
    // The guest never answers; the host gives up.
    drop(client);
    let busy = (0..50).filter(|_| loop_once(&mut r) > 0).count();
    assert!(
        busy <= 2,
        "the loop woke {busy} times in 50 for one hung-up socket"
    );
    assert!(
        r.dev.ctrl.len() <= 1,
        "{} control packets queued",
        r.dev.ctrl.len()
    );
}

#[test]
fn connections_the_guest_never_answers_and_silent_clients_expire() {
    let mem = test_mem();
    let mut r = rig(&mem, "expire");
    r.dev.connect_timeout = Duration::from_millis(50);
    let mut asked = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
    asked.write_all(b"CONNECT 1024\n").unwrap();
    let silent = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
    r.pump();
    let req = r.rx_packets()[0].0;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((r.dev.conns.len(), r.dev.pending.len()), (1, 1));
    std::thread::sleep(Duration::from_millis(100));
    r.dev.queue_notify(RX);
    assert_eq!((r.dev.conns.len(), r.dev.pending.len()), (0, 0));
    // The guest hears the request is gone; both host sockets are closed.
    let p = r.rx_packets();
    assert!(
        p.iter()
            .any(|(h, _)| h.op == OP_RST && h.src_port == req.src_port),
        "{p:?}"
    );
    for mut s in [asked, silent] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(s.read(&mut b).unwrap(), 0, "still open");
    }
}

#[test]
fn bytes_sent_with_the_connect_line_reach_the_guest_first() {
    let mem = test_mem();
    let mut r = rig(&mem, "early");
    // One write: the line and the start of the conversation.
    let (mut client, req) = host_client(&mut r, b"CONNECT 1024\nhello");
    assert_eq!(req.op, OP_REQUEST);
    let resp = r.guest_hdr(1024, req.src_port, OP_RESPONSE);
    r.guest_send(resp, b"");
    let mut line = String::new();
    std::io::BufReader::new(&client)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
    client.write_all(b" world").unwrap();
    r.pump();
    let data: Vec<u8> = r
        .rx_packets()
        .into_iter()
        .filter(|(h, _)| h.op == OP_RW)
        .flat_map(|(_, d)| d)
        .collect();
    assert_eq!(String::from_utf8_lossy(&data), "hello world");
}

#[test]
fn a_host_listener_with_a_full_backlog_is_refused_without_blocking() {
    let mem = test_mem();
    let mut r = rig(&mem, "backlog");
    let path = r.dir.path().join("v.sock_7000");
    // A listener that never accepts, with the smallest backlog, filled up.
    let l = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    l.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
    l.listen(0).unwrap();
    let mut fillers = vec![];
    for _ in 0..8 {
        let s = socket2::Socket::new(
            socket2::Domain::UNIX,
            socket2::Type::STREAM.nonblocking(),
            None,
        )
        .unwrap();
        if s.connect(&socket2::SockAddr::unix(&path).unwrap()).is_err() {
            break;
        }
        fillers.push(s);
    }
    let t = std::time::Instant::now();
    r.guest_send(r.guest_hdr(40002, 7000, OP_REQUEST), b"");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the loop blocked {:?}",
        t.elapsed()
    );
    assert_eq!(r.rx_packets()[0].0.op, OP_RST);
    drop(l);
}

#[test]
fn a_silent_client_expires_on_time_with_nothing_else_happening() {
    let mem = test_mem();
    let mut r = rig(&mem, "tick");
    r.dev.connect_timeout = Duration::from_millis(60);
    let silent = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
    r.pump();
    assert_eq!(r.dev.pending.len(), 1);
    // Only the event loop runs: no device event, no guest kick, no other client.
    let t = std::time::Instant::now();
    while !r.dev.pending.is_empty() && t.elapsed() < Duration::from_secs(2) {
        loop_once(&mut r);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        r.dev.pending.is_empty(),
        "still waiting after {:?}",
        t.elapsed()
    );
    assert!(
        !r.dev.timer_armed,
        "the timer ticks on with nothing to expire"
    );
    drop(silent);
}

#[test]
fn a_guest_that_posts_no_rx_buffers_is_held_back_not_answered_with_drops() {
    let mem = test_mem();
    let mut r = rig(&mem, "ctrlfull");
    r.dev.ctrl_max = 8;
    // 60 requests to a port nobody listens on: 60 RSTs owed, 32 rx buffers posted.
    for i in 0..60 {
        r.guest_send(r.guest_hdr(50_000 + i, 9999, OP_REQUEST), b"");
    }
    assert!(
        r.dev.ctrl.len() <= 8,
        "{} control packets queued",
        r.dev.ctrl.len()
    );
    let mut rst: Vec<u32> = r
        .rx_packets()
        .into_iter()
        .filter(|(h, _)| h.op == OP_RST)
        .map(|(h, _)| h.dst_port)
        .collect();
    assert_eq!(rst.len(), 32);
    // The guest posts 32 more buffers: every reply owed arrives, none was dropped.
    let descs: Vec<_> = (32..64)
        .map(|i| desc(RX_BUF + i * 0x1000, 0x1000, F_WRITE, 0))
        .collect();
    r.rx.add_desc_chains(&descs, 32).unwrap();
    r.dev.queue_notify(RX);
    rst.extend(
        r.rx_packets()
            .into_iter()
            .filter(|(h, _)| h.op == OP_RST)
            .map(|(h, _)| h.dst_port),
    );
    rst.sort_unstable();
    assert_eq!(rst, (50_000..50_060).collect::<Vec<u32>>());
}

#[test]
fn guest_data_held_for_slow_host_sockets_stays_within_one_budget() {
    let mem = test_mem();
    let mut r = rig(&mem, "budget");
    r.dev.buffer_budget = 16 * 1024;
    let l = UnixListener::bind(r.dir.path().join("v.sock_5100")).unwrap();
    r.guest_send(r.guest_hdr(41000, 5100, OP_REQUEST), b"");
    let (mut host, _) = l.accept().unwrap();
    assert_eq!(r.rx_packets()[0].0.op, OP_RESPONSE);
    // The host does not read: the socket's kernel buffer fills, then ours.
    let chunk = vec![7u8; 3000];
    let sent = 60;
    for _ in 0..sent {
        let mut rw = r.guest_hdr(41000, 5100, OP_RW);
        rw.len = chunk.len() as u32;
        r.guest_send(rw, &chunk);
    }
    let held: usize = r.dev.conns.values().map(|c| c.out.len()).sum();
    assert!(
        held < 16 * 1024 + chunk.len(),
        "{held} bytes held past a 16 KiB budget"
    );
    let taken = used(&r.tx).len();
    // The host reads now: everything the guest sent arrives, the held packets included.
    host.set_nonblocking(true).unwrap();
    let mut got = 0usize;
    let t = std::time::Instant::now();
    while got < sent * chunk.len() && t.elapsed() < Duration::from_secs(5) {
        let mut b = vec![0u8; 65536];
        match host.read(&mut b) {
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                loop_once(&mut r);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, sent * chunk.len());
    assert!(
        taken < sent,
        "the budget held no packet back ({taken} of {sent} taken at once)"
    );
}

#[test]
fn a_guest_that_refills_its_tx_queue_gets_a_budget_per_turn_not_the_loop() {
    let mem = test_mem();
    let mut r = rig(&mem, "turns");
    // 300 packets that need no reply (RST for no connection), posted before one kick.
    let chains: Vec<_> = (0..300u32)
        .map(|i| {
            let addr = TX_BUF + u64::from(i) * 0x1000;
            let h = r.guest_hdr(40_000 + i, 9999, OP_RST);
            mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
            desc(addr, HDR_LEN as u32, 0, 0)
        })
        .collect();
    r.tx.add_desc_chains(&chains, 0).unwrap();
    r.dev.queue_notify(TX);
    assert_eq!(used(&r.tx).len(), crate::virtio::QUEUE_BUDGET);
    // The device asked the loop to come back to its tx queue, and nothing more.
    assert_eq!(r.kicks[TX].read().unwrap(), 1);
    assert!(
        r.kicks[RX].read().is_err(),
        "rx requeued with nothing to do"
    );
    r.dev.queue_notify(TX);
    assert_eq!(used(&r.tx).len(), 300);
    assert!(r.kicks[TX].read().is_err(), "requeued with the queue empty");
}

/// The device's `avail_event` in `vq`'s used ring: where the driver kicks next.
fn avail_event(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>, size: u64) -> u16 {
    mem.read_obj(vq.used_addr().unchecked_add(4 + 8 * size))
        .unwrap()
}

/// A host client that connected to the VM's socket and wrote `first`, and the first
/// packet the guest got for it.
fn host_client(r: &mut Rig<'_>, first: &[u8]) -> (UnixStream, Hdr) {
    let mut client = UnixStream::connect(r.dir.path().join("v.sock")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(first).unwrap();
    r.pump();
    (client, r.rx_packets()[0].0)
}

/// A host client connected to guest port 1024, the guest's accept sent and the host's
/// `OK` line read.
fn established(r: &mut Rig<'_>) -> UnixStream {
    let (client, req) = host_client(r, b"CONNECT 1024\n");
    r.guest_send(r.guest_hdr(1024, req.src_port, OP_RESPONSE), b"");
    let mut line = String::new();
    std::io::BufReader::new(&client)
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    client
}

#[test]
fn a_socket_with_nothing_to_read_costs_the_guest_no_buffer() {
    let mem = test_mem();
    let mut r = rig(&mem, "no-empty");
    let mut client = established(&mut r);
    for _ in 0..5 {
        client.write_all(b"ping").unwrap();
        r.pump();
        // Readiness with nothing behind it (the packet above took the bytes).
        r.pump();
    }
    // The connect request, then one buffer per write, each with its data.
    let u = used(&r.rx);
    assert_eq!(u.len(), 6, "{u:?}");
    assert!(
        u[1..].iter().all(|&(_, len)| len as usize == HDR_LEN + 4),
        "{u:?}"
    );
    let data: Vec<u8> = r.rx_packets().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"ping".repeat(5));
}

#[test]
fn with_event_idx_tx_is_kicked_per_batch_and_rx_only_once_its_buffers_run_out() {
    let mem = test_mem();
    let mut r = rig_with(&mem, "event-idx", true);
    let mut client = established(&mut r);
    // 31 rx buffers left: the guest need not kick when it adds more.
    assert_eq!(avail_event(&mem, &r.rx, 64), 0);
    // The tx queue ran empty: the guest's next packet kicks.
    assert_eq!(avail_event(&mem, &r.tx, 512), 1);
    // One packet per buffer until the 32 buffers are gone; then the device asks for a
    // kick at the next buffer, and host data waits for it.
    for _ in 0..100 {
        // Not yet: the buffers last, and the guest adding more need not kick.
        assert_eq!(avail_event(&mem, &r.rx, 64), 0);
        client.write_all(b"ping").unwrap();
        r.pump();
        if r.dev.rx_starved {
            break;
        }
    }
    assert!(r.dev.rx_starved);
    assert_eq!(used(&r.rx).len(), 32);
    assert_eq!(avail_event(&mem, &r.rx, 64), 32);
    r.rx_packets();
    let more: Vec<_> = (32..40)
        .map(|i| desc(RX_BUF + i * 0x1000, 0x1000, F_WRITE, 0))
        .collect();
    r.rx.add_desc_chains(&more, 32).unwrap();
    r.dev.queue_notify(RX);
    r.pump();
    let p = r.rx_packets();
    assert!(
        !p.is_empty() && p.iter().all(|(h, _)| h.op == OP_RW),
        "{p:?}"
    );
}
