//! A relay between the front end (QEMU) and the `vhost-user-backend` daemon, for one
//! quirk: QEMU's virtio-net sends `VHOST_USER_SET_VRING_ENABLE` while it sets the device
//! up, before any `VHOST_USER_SET_FEATURES`, and (7.2) never again when it starts the
//! device. The `vhost` crate refuses that message until `VHOST_USER_F_PROTOCOL_FEATURES`
//! is acked and drops the connection; without that feature QEMU 7.2 will not start the
//! device at all. The relay passes every message and its descriptors through unchanged,
//! except an enable that comes before the features: that one it holds (answering it, if
//! asked to), and hands the daemon each ring's last held state right after
//! `SET_FEATURES`, when the daemon accepts it.
//!
//! Only control messages cross the relay; frames move through shared guest memory and
//! eventfds, never through here.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// `struct VhostUserMsgHeader`: request, flags, payload size.
const HDR: usize = 12;
/// Largest payload a vhost-user message carries.
const MAX_PAYLOAD: usize = 0x1000;
/// Most descriptors one message carries.
const MAX_FDS: usize = 32;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One message with the descriptors that came with it.
struct Msg {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn new(request: u32, flags: u32, body: &[u8]) -> Msg {
        let mut bytes = Vec::with_capacity(HDR + body.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        Msg { bytes, fds: vec![] }
    }

    fn field(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
    }
    fn request(&self) -> u32 {
        self.field(0)
    }
    fn flags(&self) -> u32 {
        self.field(1)
    }
}

/// Read one message: `Ok(None)` when the peer closed.
fn read_msg(s: &mut UnixStream) -> std::io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR {
        let mut iov = [IoSliceMut::new(&mut hdr[got..])];
        let r = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for c in r.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: descriptors just received are owned by nobody else.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if r.bytes == 0 {
            return Ok(None);
        }
        got += r.bytes;
    }
    let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut bytes = vec![0u8; HDR + size];
    bytes[..HDR].copy_from_slice(&hdr);
    s.read_exact(&mut bytes[HDR..])?;
    Ok(Some(Msg { bytes, fds }))
}

fn write_msg(s: &mut UnixStream, m: &Msg) -> std::io::Result<()> {
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(&m.bytes)];
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(std::io::Error::from)?;
    if n < m.bytes.len() {
        s.write_all(&m.bytes[n..])?;
    }
    Ok(())
}

/// VMM to daemon: everything but an enable that comes before the features.
fn relay_down(
    from: &mut UnixStream,
    to: &mut UnixStream,
    reply: &mut UnixStream,
    features_set: &AtomicBool,
) -> std::io::Result<()> {
    // Ring index -> enabled, as the front end last asked before the features.
    let mut held: std::collections::BTreeMap<u32, u32> = Default::default();
    while let Some(m) = read_msg(from)? {
        tracing::trace!(request = m.request(), flags = m.flags(), fds = m.fds.len(), body = ?&m.bytes[HDR..], "front end message");
        match m.request() {
            SET_FEATURES => {
                features_set.store(true, Ordering::SeqCst);
                write_msg(to, &m)?;
                for (index, num) in std::mem::take(&mut held) {
                    let mut body = index.to_le_bytes().to_vec();
                    body.extend_from_slice(&num.to_le_bytes());
                    write_msg(to, &Msg::new(SET_VRING_ENABLE, 1, &body))?;
                }
                continue;
            }
            SET_VRING_ENABLE if !features_set.load(Ordering::SeqCst) => {
                if m.bytes.len() == HDR + 8 {
                    held.insert(m.field(3), m.field(4));
                }
                if m.flags() & FLAG_NEED_REPLY != 0 {
                    write_msg(
                        reply,
                        &Msg::new(SET_VRING_ENABLE, FLAG_REPLY | 1, &0u64.to_le_bytes()),
                    )?;
                }
                continue;
            }
            _ => {}
        }
        write_msg(to, &m)?;
    }
    Ok(())
}

/// Relay between `front` (the VMM) and `back` (the daemon) until either closes.
pub fn run(front: UnixStream, back: UnixStream) -> std::io::Result<()> {
    let features_set = Arc::new(AtomicBool::new(false));
    let (mut f_rx, mut b_tx) = (front.try_clone()?, back.try_clone()?);
    let (mut b_rx, mut f_tx) = (back, front);
    let mut f_reply = f_tx.try_clone()?;
    let fs = features_set.clone();
    let down = std::thread::Builder::new()
        .name("relay-front".into())
        .spawn(move || {
            let r = relay_down(&mut f_rx, &mut b_tx, &mut f_reply, &fs);
            // Whatever ended it, the daemon's side goes too.
            let _ = b_tx.shutdown(std::net::Shutdown::Both);
            r
        })?;
    let up = (|| -> std::io::Result<()> {
        while let Some(m) = read_msg(&mut b_rx)? {
            write_msg(&mut f_tx, &m)?;
        }
        Ok(())
    })();
    let _ = f_tx.shutdown(std::net::Shutdown::Both);
    let _ = b_rx.shutdown(std::net::Shutdown::Both);
    let down = down
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("relay thread panicked")));
    up.and(down)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(req: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn early_enable_is_answered_later_ones_pass_with_their_descriptors() {
        let (front_vmm, front_relay) = UnixStream::pair().unwrap();
        let (back_relay, back_daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || run(front_relay, back_relay));
        let mut vmm = front_vmm;
        let mut daemon = back_daemon;
        // GET_FEATURES passes.
        vmm.write_all(&msg(1, 1, &[])).unwrap();
        let m = read_msg(&mut daemon).unwrap().unwrap();
        assert_eq!(m.bytes, msg(1, 1, &[]));
        // An early enable asking for a reply is answered by the relay, not forwarded.
        let state = [0u8; 8]; // ring 0, disabled
        vmm.write_all(&msg(SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, &state))
            .unwrap();
        let ack = read_msg(&mut vmm).unwrap().unwrap();
        assert_eq!(ack.request(), SET_VRING_ENABLE);
        assert_eq!(ack.flags() & FLAG_REPLY, FLAG_REPLY);
        // A message with a descriptor passes, descriptor and all.
        let (a, _b) = UnixStream::pair().unwrap();
        let call = msg(13, 1, &0u64.to_le_bytes());
        write_msg(
            &mut vmm,
            &Msg {
                bytes: call.clone(),
                fds: vec![OwnedFd::from(a)],
            },
        )
        .unwrap();
        let m = read_msg(&mut daemon).unwrap().unwrap();
        assert_eq!(m.bytes, call, "the early enable never reached the daemon");
        assert_eq!(m.fds.len(), 1);
        // A second early enable for ring 1, then ring 0 disabled and enabled again.
        let ring = |i: u32, on: u32| [i.to_le_bytes(), on.to_le_bytes()].concat();
        vmm.write_all(&msg(SET_VRING_ENABLE, 1, &ring(1, 1)))
            .unwrap();
        vmm.write_all(&msg(SET_VRING_ENABLE, 1, &ring(0, 0)))
            .unwrap();
        vmm.write_all(&msg(SET_VRING_ENABLE, 1, &ring(0, 1)))
            .unwrap();
        // After SET_FEATURES the daemon gets each ring's last state, then enables pass.
        vmm.write_all(&msg(SET_FEATURES, 1, &0u64.to_le_bytes()))
            .unwrap();
        assert_eq!(
            read_msg(&mut daemon).unwrap().unwrap().request(),
            SET_FEATURES
        );
        for want in [ring(0, 1), ring(1, 1)] {
            let m = read_msg(&mut daemon).unwrap().unwrap();
            assert_eq!(m.request(), SET_VRING_ENABLE);
            assert_eq!(&m.bytes[HDR..], &want[..]);
        }
        vmm.write_all(&msg(SET_VRING_ENABLE, 1, &state)).unwrap();
        assert_eq!(
            read_msg(&mut daemon).unwrap().unwrap().request(),
            SET_VRING_ENABLE
        );
        // Replies go back to the VMM.
        daemon
            .write_all(&msg(1, 1 | FLAG_REPLY, &7u64.to_le_bytes()))
            .unwrap();
        assert_eq!(read_msg(&mut vmm).unwrap().unwrap().field(3), 7);
        // An oversized message ends the relay instead of being buffered.
        vmm.write_all(&msg(5, 1, &[])[..8]).unwrap();
        vmm.write_all(&(MAX_PAYLOAD as u32 + 1).to_le_bytes())
            .unwrap();
        assert!(t.join().unwrap().is_err());
        assert!(
            read_msg(&mut daemon).unwrap().is_none(),
            "daemon side closed"
        );
    }
}
