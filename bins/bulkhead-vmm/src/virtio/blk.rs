//! virtio-blk on a raw image file: read, write (unless read-only), flush, get-id.
//!
//! The file I/O runs on the device's own `blk-io` thread, started with the device
//! (before any seccomp filter, under the `worker` class from its first step), never on
//! the event loop that serves every other device: a guest that keeps its disk busy, or a
//! slow fsync, holds up only its own disk. The event loop hands kicks over; the thread
//! serves up to [`super::QUEUE_BUDGET`] requests per kick and requeues the rest.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;

use super::{
    drain_queue, ActivateError, Activation, Drained, Interrupt, Requeue, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};

const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_SEG_MAX: u64 = 1 << 2;
/// Bounce-buffer size: requests are copied in pieces this big, whatever their length.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("disk image {path} is {len} bytes, not a multiple of 512")]
    Size { path: String, len: u64 },
}

pub struct Blk {
    readonly: bool,
    config: [u8; 16],
    io: Arc<IoShared>,
    thread: Option<JoinHandle<()>>,
}

/// The image and what serving it needs; owned by the `blk-io` thread.
struct Disk {
    file: File,
    readonly: bool,
    sectors: u64,
    id: [u8; 20],
    buf: Vec<u8>,
}

/// What the device's handlers (vCPU threads, the event loop) share with `blk-io`.
#[derive(Default)]
struct IoShared {
    state: Mutex<IoState>,
    cv: Condvar,
}

#[derive(Default)]
struct IoState {
    /// The queue while the device is active; `blk-io` takes it out for a batch.
    active: Option<ActiveQueue>,
    /// A kick arrived that no batch has served yet.
    kicked: bool,
    /// `blk-io` is serving a batch.
    busy: bool,
    /// The VM is paused: no batch starts.
    held: bool,
    /// The device was stopped.
    stop: bool,
    /// Bumped by every activation and reset: a batch begun before one is not put back.
    generation: u64,
}

struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<Interrupt>,
    requeue: Requeue,
}

impl IoShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, IoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait while `blk-io` serves a batch.
    fn wait_idle(&self) {
        let mut g = self.lock();
        while g.busy {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// `blk-io`'s loop: one batch per kick, while active and not held.
    fn serve(&self, mut disk: Disk) {
        loop {
            let (mut a, generation) = {
                let mut g = self.lock();
                g.busy = false;
                self.cv.notify_all();
                loop {
                    if g.stop {
                        return;
                    }
                    if g.kicked && !g.held && g.active.is_some() {
                        break;
                    }
                    g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                g.kicked = false;
                g.busy = true;
                let Some(a) = g.active.take() else { continue };
                (a, g.generation)
            };
            let mem = a.mem.clone();
            let end = drain_queue(&mem, &mut a.queue, &a.irq, |chain| {
                disk.request(&mem, chain)
            });
            if end == Drained::BudgetSpent {
                a.requeue.later(0);
            }
            let mut g = self.lock();
            if g.generation == generation {
                g.active = Some(a);
            }
        }
    }
}

impl Blk {
    pub fn open(path: &Path, readonly: bool) -> Result<Self, BlkError> {
        let p = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlkError::Open {
                path: p.clone(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlkError::Open {
                path: p.clone(),
                source,
            })?
            .len();
        if len % SECTOR != 0 {
            return Err(BlkError::Size { path: p, len });
        }
        let sectors = len / SECTOR;
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&sectors.to_le_bytes());
        // size_max (unused, 0) then seg_max.
        config[12..16].copy_from_slice(&126u32.to_le_bytes());
        let mut id = [0u8; 20];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let disk = Disk {
            file,
            readonly,
            sectors,
            id,
            buf: vec![0u8; CHUNK],
        };
        let io = Arc::new(IoShared::default());
        let shared = io.clone();
        let thread = crate::threads::builder("blk-io")
            .spawn(move || {
                if let Err(e) = crate::seccomp::install_for(crate::seccomp::Class::Worker) {
                    tracing::error!("blk-io: {e}");
                    return;
                }
                shared.serve(disk);
            })
            .map_err(|source| BlkError::Open { path: p, source })?;
        Ok(Blk {
            readonly,
            config,
            io,
            thread: Some(thread),
        })
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.io.lock().stop = true;
        self.io.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Disk {
    /// Serve one request; returns bytes written into the chain (data + status byte).
    fn request(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            return 0;
        };
        // The status byte is the last writable byte; without one there is no way to answer.
        let Some(data_len) = w.available_bytes().checked_sub(1) else {
            return 0;
        };
        let Ok(mut status_w) = w.split_at(data_len) else {
            return 0;
        };
        let mut hdr = [0u8; 16];
        let (status, written) = if r.read_exact(&mut hdr).is_err() {
            (S_IOERR, 0)
        } else {
            let t = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
            let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
            match t {
                T_IN => self.read_into(&mut w, sector, data_len),
                T_OUT if self.readonly => (S_IOERR, 0),
                T_OUT => (self.write_from(&mut r, sector), 0),
                T_FLUSH => (
                    if self.readonly || self.file.sync_data().is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    },
                    0,
                ),
                T_GET_ID => {
                    let n = data_len.min(20);
                    match w.write_all(&self.id[..n]) {
                        Ok(()) => (S_OK, n),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_UNSUPP, 0),
            }
        };
        if status_w.write_all(&[status]).is_err() {
            return written as u32;
        }
        written as u32 + 1
    }

    fn in_range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR && (len as u64).is_multiple_of(SECTOR)).then_some(off)
    }

    fn read_into(
        &mut self,
        w: &mut virtio_queue::Writer<'_>,
        sector: u64,
        len: usize,
    ) -> (u8, usize) {
        let Some(mut off) = self.in_range(sector, len) else {
            return (S_IOERR, 0);
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if self.file.read_exact_at(&mut self.buf[..n], off).is_err()
                || w.write_all(&self.buf[..n]).is_err()
            {
                return (S_IOERR, done);
            }
            off += n as u64;
            done += n;
        }
        (S_OK, done)
    }

    fn write_from(&mut self, r: &mut virtio_queue::Reader<'_>, sector: u64) -> u8 {
        let len = r.available_bytes();
        let Some(mut off) = self.in_range(sector, len) else {
            return S_IOERR;
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if r.read_exact(&mut self.buf[..n]).is_err()
                || self.file.write_all_at(&self.buf[..n], off).is_err()
            {
                return S_IOERR;
            }
            off += n as u64;
            done += n;
        }
        S_OK
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | super::VIRTIO_F_RING_EVENT_IDX
            | F_FLUSH
            | F_SEG_MAX
            | if self.readonly { F_RO } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data)
    }
    fn activate(&mut self, mut act: Activation) -> Result<(), ActivateError> {
        let q = act
            .queues
            .pop()
            .ok_or_else(|| ActivateError::Failed("no queue".into()))?;
        let mut g = self.io.lock();
        g.active = Some(ActiveQueue {
            mem: act.mem,
            queue: q,
            irq: act.interrupt,
            requeue: Requeue::new(act.kicks),
        });
        g.generation += 1;
        g.kicked = false;
        Ok(())
    }
    /// Returns once no batch is running: after a reset nothing touches the old queue.
    fn reset(&mut self) {
        {
            let mut g = self.io.lock();
            g.active = None;
            g.generation += 1;
            g.kicked = false;
        }
        self.io.wait_idle();
    }
    fn queue_notify(&mut self, _queue: usize) {
        self.io.lock().kicked = true;
        self.io.cv.notify_all();
    }
    fn pause(&mut self) {
        self.io.lock().held = true;
        self.io.wait_idle();
    }
    fn resume(&mut self) {
        self.io.lock().held = false;
        self.io.cv.notify_all();
    }
    fn settle(&self) {
        let mut g = self.io.lock();
        while g.busy || (g.kicked && !g.held && g.active.is_some()) {
            g = self.io.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A disk image named `name` (the device's ID is the file name) whose every sector
    /// holds its own number, in a directory removed when the guard is dropped.
    fn image(name: &str, len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::Builder::new()
            .prefix("bh-blk-")
            .tempdir()
            .unwrap();
        let p = d.path().join(name);
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, data).unwrap();
        (d, p)
    }

    fn hdr(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        mem.write_obj(t, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn run(blk: &mut Blk, mem: &GuestMemoryMmap, chains: &[&[RawDescriptor]]) -> Vec<u32> {
        let vq = MockSplitQueue::new(mem, 32);
        let mut off = 0;
        for c in chains {
            vq.add_desc_chains(c, off).unwrap();
            off += c.len() as u16;
        }
        let (act, _irq) = activation(mem, vec![vq.create_queue().unwrap()]);
        blk.activate(act).unwrap();
        blk.queue_notify(0);
        blk.settle();
        used_lens(mem, &vq)
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// `n` get-id requests, each in its own three-descriptor chain.
    fn get_id_queue(mem: &GuestMemoryMmap, n: u16) -> MockSplitQueue<'_, GuestMemoryMmap> {
        let vq = MockSplitQueue::new(mem, 1024);
        let chains: Vec<RawDescriptor> = (0..n)
            .flat_map(|i| {
                let at = 0x100000 + u64::from(i) * 0x100;
                hdr(mem, at, T_GET_ID, 0);
                let first = i * 3;
                [
                    d(at, 16, F_NEXT, first + 1),
                    d(at + 0x20, 20, F_WRITE | F_NEXT, first + 2),
                    d(at + 0x40, 1, F_WRITE, 0),
                ]
            })
            .collect();
        vq.build_multiple_desc_chains(&chains).unwrap();
        vq
    }

    #[test]
    fn io_runs_off_the_caller_a_budget_per_kick_and_stops_while_paused() {
        let mem = test_mem();
        let (_dir, p) = image("turns.img", 4096);
        let mut blk = Blk::open(&p, false).unwrap();
        let vq = get_id_queue(&mem, 300);
        let (act, _irq, kicks) = activation_with_kicks(&mem, vec![vq.create_queue().unwrap()]);
        blk.activate(act).unwrap();

        // Paused: a kick is taken, nothing is served, until resume.
        blk.pause();
        blk.queue_notify(0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(used(&vq).len(), 0, "served while paused");
        blk.resume();
        blk.settle();
        // One kick: one budget, and the queue handed back to the event loop.
        assert_eq!(used(&vq).len(), crate::virtio::QUEUE_BUDGET);
        assert_eq!(kicks[0].read().unwrap(), 1, "the rest was not requeued");
        blk.queue_notify(0);
        blk.settle();
        assert_eq!(used(&vq).len(), 300);
        assert!(used(&vq).iter().all(|&(_, len)| len == 21));
    }

    #[test]
    fn nothing_is_served_after_a_reset() {
        let mem = test_mem();
        let (_dir, p) = image("reset.img", 4096);
        let mut blk = Blk::open(&p, false).unwrap();
        let vq = get_id_queue(&mem, 4);
        let (act, _irq) = activation(&mem, vec![vq.create_queue().unwrap()]);
        blk.activate(act).unwrap();
        blk.pause();
        blk.queue_notify(0);
        blk.reset();
        blk.resume();
        blk.queue_notify(0);
        blk.settle();
        assert_eq!(used(&vq).len(), 0);
    }

    #[test]
    fn read_write_flush_id_and_bad_requests() {
        let mem = test_mem();
        let (_dir, p) = image("rw.img", 4096);
        let mut blk = Blk::open(&p, false).unwrap();
        hdr(&mem, 0x10000, T_IN, 2);
        hdr(&mem, 0x11000, T_OUT, 3);
        mem.write_slice(&[0xab; 512], GuestAddress(0x31000))
            .unwrap();
        hdr(&mem, 0x12000, T_IN, 8); // past the end
        hdr(&mem, 0x13000, T_GET_ID, 0);
        hdr(&mem, 0x14000, 99, 0);
        hdr(&mem, 0x15000, T_FLUSH, 0);
        // Linux >= 6.2 style: header and data in one readable descriptor.
        hdr(&mem, 0x16000, T_OUT, 4);
        mem.write_slice(&[0xcd; 512], GuestAddress(0x16010))
            .unwrap();
        let lens = run(
            &mut blk,
            &mem,
            &[
                &[
                    d(0x10000, 16, F_NEXT, 1),
                    d(0x30000, 512, F_WRITE | F_NEXT, 2),
                    d(0x40000, 1, F_WRITE, 0),
                ],
                &[
                    d(0x11000, 16, F_NEXT, 4),
                    d(0x31000, 512, F_NEXT, 5),
                    d(0x40001, 1, F_WRITE, 0),
                ],
                &[
                    d(0x12000, 16, F_NEXT, 7),
                    d(0x32000, 512, F_WRITE | F_NEXT, 8),
                    d(0x40002, 1, F_WRITE, 0),
                ],
                &[
                    d(0x13000, 16, F_NEXT, 10),
                    d(0x33000, 20, F_WRITE | F_NEXT, 11),
                    d(0x40003, 1, F_WRITE, 0),
                ],
                &[d(0x14000, 16, F_NEXT, 13), d(0x40004, 1, F_WRITE, 0)],
                &[d(0x15000, 16, F_NEXT, 15), d(0x40005, 1, F_WRITE, 0)],
                &[d(0x16000, 16 + 512, F_NEXT, 17), d(0x40006, 1, F_WRITE, 0)],
            ],
        );
        assert_eq!(lens, vec![513, 1, 1, 21, 1, 1, 1]);
        let st: Vec<u8> = (0..7)
            .map(|i| mem.read_obj(GuestAddress(0x40000 + i)).unwrap())
            .collect();
        assert_eq!(st, vec![S_OK, S_OK, S_IOERR, S_OK, S_UNSUPP, S_OK, S_OK]);
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(0x30000)).unwrap();
        assert_eq!(b, [2u8; 512]);
        let disk = std::fs::read(&p).unwrap();
        assert_eq!(&disk[3 * 512..4 * 512], &[0xab; 512][..]);
        assert_eq!(&disk[4 * 512..5 * 512], &[0xcd; 512][..]);
        let mut id = [0u8; 6];
        mem.read_slice(&mut id, GuestAddress(0x33000)).unwrap();
        assert_eq!(&id, b"rw.img");
    }

    #[test]
    fn readonly_disk_refuses_writes() {
        let mem = test_mem();
        let (_dir, p) = image("ro.img", 2048);
        let mut blk = Blk::open(&p, true).unwrap();
        assert_ne!(blk.features() & F_RO, 0);
        hdr(&mem, 0x10000, T_OUT, 0);
        let lens = run(
            &mut blk,
            &mem,
            &[&[
                d(0x10000, 16, F_NEXT, 1),
                d(0x31000, 512, F_NEXT, 2),
                d(0x40000, 1, F_WRITE, 0),
            ]],
        );
        assert_eq!(lens, vec![1]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40000)).unwrap(), S_IOERR);
        assert_eq!(std::fs::read(&p).unwrap()[0], 0);
    }

    #[test]
    fn hostile_chains_are_rejected_and_the_device_lives_on() {
        let mem = test_mem();
        let (_dir, p) = image("hostile.img", 4096);
        let mut blk = Blk::open(&p, false).unwrap();
        hdr(&mem, 0x10000, T_IN, 0);
        let lens = run(
            &mut blk,
            &mem,
            &[
                // No writable status byte at all.
                &[d(0x10000, 16, 0, 0)],
                // Header in a writable descriptor (wrong direction).
                &[
                    d(0x10000, 16, F_WRITE | F_NEXT, 2),
                    d(0x40000, 1, F_WRITE, 0),
                ],
                // Data buffer outside guest memory.
                &[
                    d(0x10000, 16, F_NEXT, 4),
                    d(0xffff_0000, 512, F_WRITE | F_NEXT, 5),
                    d(0x40001, 1, F_WRITE, 0),
                ],
                // Zero-length header.
                &[d(0x10000, 0, F_NEXT, 7), d(0x40002, 1, F_WRITE, 0)],
                // A loop: next points back at itself.
                &[d(0x10000, 16, F_NEXT, 8)],
                // A good read afterwards still works.
                &[
                    d(0x10000, 16, F_NEXT, 10),
                    d(0x30000, 512, F_WRITE | F_NEXT, 11),
                    d(0x40003, 1, F_WRITE, 0),
                ],
            ],
        );
        assert_eq!(lens.last(), Some(&513));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40003)).unwrap(), S_OK);
        // The wrong-direction header request was answered with an error, not data.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40000)).unwrap(), S_IOERR);
    }

    #[test]
    fn odd_sized_and_missing_images_are_named() {
        let (_dir, p) = image("odd.img", 1000);
        assert!(Blk::open(&p, true)
            .err()
            .unwrap()
            .to_string()
            .contains("multiple of 512"));
        let e = Blk::open(Path::new("/nonexistent/disk.img"), true)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/disk.img"));
    }
}
