//! virtio-balloon: memory the guest does not use goes back to the host.
//!
//! Two ways in:
//! - **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`): the guest reports free
//!   blocks of its own memory (2 MiB on x86, by address); they are discarded at once. A
//!   pod that used memory once and freed it does not keep it on the host.
//! - **inflate** to a target the host sets on the control socket: the guest hands over
//!   4 KiB page frame numbers, which are discarded; with `DEFLATE_ON_OOM` it takes them
//!   back when it would otherwise run out.
//!
//! Discarding private RAM is `MADV_DONTNEED`; shared RAM (a memfd, also mapped by
//! vhost-user back ends) needs its pages punched out of the file (`fallocate`), which
//! frees them for every mapping at once. hugetlbfs RAM is discarded only in whole
//! 2 MiB pages.
//!
//! Everything the guest sends is checked: a frame or range outside guest RAM (past its
//! end, in the MMIO hole), misaligned for the backing, or overflowing is refused and
//! counted, never discarded; chains and reports are read up to fixed bounds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, DEVICE_TOKEN_BASE,
    INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::memory::RamRegion;

pub const TYPE_BALLOON: u32 = 5;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;
/// Balloon page frames are 4 KiB whatever the guest's page size.
const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;
/// Most frame numbers read from one inflate or deflate chain (Linux sends at most 256).
const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most ranges taken from one reporting chain (Linux sends at most 32).
const MAX_REPORT_RANGES: usize = 256;
/// Most statistics read from one stats buffer (the spec defines 16 tags).
const MAX_STATS: usize = 64;
const QUEUE_SIZE: u16 = 128;
/// Token of the eventfd that asks for fresh statistics.
const TOK_REFRESH: u32 = DEVICE_TOKEN_BASE;

/// Names of the statistics tags (virtio spec 5.5.6.3).
fn stat_name(tag: u16) -> Option<&'static str> {
    Some(match tag {
        0 => "swap_in",
        1 => "swap_out",
        2 => "major_faults",
        3 => "minor_faults",
        4 => "free_memory",
        5 => "total_memory",
        6 => "available_memory",
        7 => "disk_caches",
        8 => "hugetlb_allocations",
        9 => "hugetlb_failures",
        10 => "oom_kills",
        11 => "alloc_stalls",
        12 => "async_scans",
        13 => "direct_scans",
        14 => "async_reclaims",
        15 => "direct_reclaims",
        _ => return None,
    })
}

/// What the control socket reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BalloonStatus {
    /// Whether the guest's driver is up.
    pub active: bool,
    pub target_mib: u64,
    /// How much the guest says it has given to the balloon.
    pub actual_mib: u64,
    /// Features the guest accepted: `stats`, `deflate_on_oom`, `reporting`.
    pub features: Vec<&'static str>,
    /// Bytes discarded because the guest inflated the balloon.
    pub inflated_bytes: u64,
    /// Bytes discarded because the guest reported them free.
    pub reported_bytes: u64,
    /// Frames or ranges refused (outside RAM, misaligned, overflowing).
    pub refused: u64,
    /// Discards the host refused (an fallocate or madvise error).
    pub discard_errors: u64,
    /// The guest's last statistics, by name, with their age.
    pub stats: BTreeMap<&'static str, u64>,
    pub stats_age_ms: Option<u64>,
}

#[derive(Default)]
struct Shared {
    target_pages: u32,
    actual_pages: u32,
    acked: u64,
    counters: Counters,
    stats: BTreeMap<&'static str, u64>,
    stats_at: Option<Instant>,
    irq: Option<Arc<Interrupt>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    inflated: u64,
    reported: u64,
    refused: u64,
    errors: u64,
}

/// The balloon as the control socket sees it.
pub struct BalloonControl {
    shared: Mutex<Shared>,
    refresh: EventFd,
    /// Boot RAM: what the guest has for certain.
    ram_bytes: u64,
    /// The hot-plug region's device: what of it the guest has plugged is its RAM too.
    hotplug: Option<Arc<super::mem::MemControl>>,
}

impl BalloonControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the guest to give `mib` MiB to the balloon (0 deflates it fully).
    pub fn set_target(&self, mib: u64) -> Result<(), String> {
        // Guest RAM is boot RAM and what is plugged of the hot-plug region now, never
        // the region's unplugged rest: a target there asks for memory the guest lacks.
        let ram = self.ram_bytes
            + self
                .hotplug
                .as_ref()
                .map_or(0, |h| h.status().plugged_mib << 20);
        let bytes = mib.checked_mul(1 << 20).filter(|b| *b < ram);
        let Some(bytes) = bytes else {
            return Err(format!(
                "balloon target {mib} MiB: must be below guest RAM ({} MiB)",
                ram >> 20
            ));
        };
        let mut s = self.lock();
        s.target_pages = (bytes >> PFN_SHIFT) as u32;
        if let Some(irq) = &s.irq {
            irq.signal(INT_CONFIG);
        }
        Ok(())
    }

    /// The current figures; also asks the guest for fresh statistics.
    pub fn status(&self) -> BalloonStatus {
        let _ = self.refresh.write(1);
        let s = self.lock();
        let mut features = vec![];
        for (bit, name) in [
            (F_STATS_VQ, "stats"),
            (F_DEFLATE_ON_OOM, "deflate_on_oom"),
            (F_REPORTING, "reporting"),
        ] {
            if s.acked & bit != 0 {
                features.push(name);
            }
        }
        BalloonStatus {
            active: s.irq.is_some(),
            target_mib: u64::from(s.target_pages) >> (20 - PFN_SHIFT),
            actual_mib: u64::from(s.actual_pages) >> (20 - PFN_SHIFT),
            features,
            inflated_bytes: s.counters.inflated,
            reported_bytes: s.counters.reported,
            refused: s.counters.refused,
            discard_errors: s.counters.errors,
            stats: s.stats.clone(),
            stats_age_ms: s.stats_at.map(|t| t.elapsed().as_millis() as u64),
        }
    }
}

/// Gives guest RAM back to the host, range by range, after checking the range.
pub struct Discarder {
    regions: Vec<RamRegion>,
    file: Option<Arc<File>>,
    /// Smallest unit that can be discarded: 4 KiB, or 2 MiB on hugetlbfs.
    granule: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Discard {
    Done,
    /// Outside guest RAM, across a region boundary, misaligned or overflowing.
    Refused,
    /// The kernel refused the discard.
    Failed,
}

impl Discarder {
    pub fn new(regions: Vec<RamRegion>, file: Option<Arc<File>>, hugetlb: bool) -> Self {
        Discarder {
            regions,
            file,
            granule: if hugetlb {
                crate::memory::HUGE_PAGE
            } else {
                PAGE
            },
        }
    }

    pub fn discard(&self, gpa: u64, len: u64) -> Discard {
        let Some(end) = gpa.checked_add(len) else {
            return Discard::Refused;
        };
        if len == 0 || !gpa.is_multiple_of(self.granule) || !len.is_multiple_of(self.granule) {
            return Discard::Refused;
        }
        let Some(r) = self
            .regions
            .iter()
            .find(|r| gpa >= r.guest_addr && end <= r.guest_addr + r.size)
        else {
            return Discard::Refused;
        };
        let off = gpa - r.guest_addr;
        let rc = match &self.file {
            // SAFETY: fallocate on our memfd, inside the part that backs this region.
            Some(f) => unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (r.file_offset + off) as libc::off_t,
                    len as libc::off_t,
                )
            },
            // SAFETY: the range lies inside the guest RAM mapping (checked above); the
            // guest gave these pages up, and reads of them see zeroes from now on.
            None => unsafe {
                libc::madvise(
                    (r.host_addr + off) as *mut libc::c_void,
                    len as usize,
                    libc::MADV_DONTNEED,
                )
            },
        };
        if rc == 0 {
            Discard::Done
        } else {
            tracing::debug!(
                gpa,
                len,
                "balloon discard failed: {}",
                std::io::Error::last_os_error()
            );
            Discard::Failed
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<(Role, Queue)>,
    irq: Arc<Interrupt>,
    /// The stats buffer the guest gave us, held until fresh figures are wanted.
    held_stats: Option<u16>,
    requeue: super::Requeue,
}

pub struct Balloon {
    control: Arc<BalloonControl>,
    discarder: Discarder,
    active: Option<Active>,
}

impl Balloon {
    /// A balloon over guest RAM `regions` (backed by `file` when shared), the hot-plug
    /// region among them when `hotplug` is its device.
    pub fn new(
        regions: Vec<RamRegion>,
        file: Option<Arc<File>>,
        hugetlb: bool,
        hotplug: Option<Arc<super::mem::MemControl>>,
    ) -> std::io::Result<(Self, Arc<BalloonControl>)> {
        let region = hotplug.as_ref().map_or(0, |h| h.status().region_mib << 20);
        let ram_bytes = regions.iter().map(|r| r.size).sum::<u64>() - region;
        let control = Arc::new(BalloonControl {
            shared: Mutex::default(),
            refresh: EventFd::new(EFD_NONBLOCK)?,
            ram_bytes,
            hotplug,
        });
        Ok((
            Balloon {
                control: control.clone(),
                discarder: Discarder::new(regions, file, hugetlb),
                active: None,
            },
            control,
        ))
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.control.lock().counters)
    }

    /// Discard a run of frames `[first, first + n)`.
    fn discard_run(&self, first: u64, n: u64, c: &mut Counters) {
        match self.discarder.discard(first << PFN_SHIFT, n << PFN_SHIFT) {
            Discard::Done => c.inflated += n << PFN_SHIFT,
            Discard::Refused => c.refused += 1,
            Discard::Failed => c.errors += 1,
        }
    }

    /// The frame numbers of one inflate chain, discarded in contiguous runs.
    fn inflate(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) {
        let Ok(r) = chain.reader(mem) else {
            return self.count(|c| c.refused += 1);
        };
        let mut buf = Vec::new();
        let _ = r
            .take((MAX_PFNS_PER_CHAIN * 4) as u64)
            .read_to_end(&mut buf);
        let mut c = Counters::default();
        let mut run: Option<(u64, u64)> = None;
        for pfn in buf
            .chunks_exact(4)
            .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        {
            run = match run {
                Some((first, n)) if first + n == pfn => Some((first, n + 1)),
                Some((first, n)) => {
                    self.discard_run(first, n, &mut c);
                    Some((pfn, 1))
                }
                None => Some((pfn, 1)),
            };
        }
        if let Some((first, n)) = run {
            self.discard_run(first, n, &mut c);
        }
        self.count(|t| {
            t.inflated += c.inflated;
            t.refused += c.refused;
            t.errors += c.errors;
        });
    }

    /// Each descriptor of a reporting chain is a free block of guest RAM.
    fn report(&self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) {
        let mut c = Counters::default();
        for d in chain.take(MAX_REPORT_RANGES) {
            let len = u64::from(d.len());
            match self.discarder.discard(d.addr().0, len) {
                Discard::Done => c.reported += len,
                Discard::Refused => c.refused += 1,
                Discard::Failed => c.errors += 1,
            }
        }
        self.count(|t| {
            t.reported += c.reported;
            t.refused += c.refused;
            t.errors += c.errors;
        });
    }

    fn read_stats(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) {
        let Ok(r) = chain.reader(mem) else { return };
        let mut buf = Vec::new();
        let _ = r.take((MAX_STATS * 10) as u64).read_to_end(&mut buf);
        let mut s = self.control.lock();
        for e in buf.chunks_exact(10) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            if let Some(name) = stat_name(tag) {
                s.stats.insert(name, u64::from_le_bytes(v));
            }
        }
        s.stats_at = Some(Instant::now());
    }

    /// Give the held stats buffer back so the guest refills it.
    fn return_stats(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(head) = a.held_stats.take() else {
            return;
        };
        if let Some((_, q)) = a.queues.iter_mut().find(|(r, _)| *r == Role::Stats) {
            if q.add_used(&a.mem, head, 0).is_ok() {
                a.irq.signal(INT_VRING);
            }
        }
    }
}

/// Queue roles in the order the driver numbers them: absent queues are skipped.
fn roles(acked: u64) -> Vec<Role> {
    let mut r = vec![Role::Inflate, Role::Deflate];
    if acked & F_STATS_VQ != 0 {
        r.push(Role::Stats);
    }
    if acked & F_REPORTING != 0 {
        r.push(Role::Reporting);
    }
    r
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.control.lock();
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(&s.target_pages.to_le_bytes());
        cfg[4..].copy_from_slice(&s.actual_pages.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 32 bits) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.control.lock().actual_pages =
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let roles = roles(act.acked_features);
        let queues: Vec<(Role, Queue)> = roles
            .into_iter()
            .zip(act.queues)
            .filter(|(_, q)| q.ready())
            .collect();
        if !queues.iter().any(|(r, _)| *r == Role::Inflate) {
            return Err(ActivateError::Failed(
                "balloon: inflate queue not ready".into(),
            ));
        }
        act.events
            .add(self.control.refresh.as_raw_fd(), TOK_REFRESH, EventSet::IN)
            .map_err(|e| ActivateError::Failed(format!("balloon: {e}")))?;
        {
            let mut s = self.control.lock();
            s.acked = act.acked_features;
            s.irq = Some(act.interrupt.clone());
        }
        let n = queues.len();
        self.active = Some(Active {
            mem: act.mem,
            queues,
            irq: act.interrupt,
            held_stats: None,
            requeue: super::Requeue::new(act.kicks),
        });
        // Linux queues its first stats buffer and kicks before DRIVER_OK, when the
        // transport drops the kick: look at every queue once now.
        for q in 0..n {
            self.queue_notify(q);
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        let mut s = self.control.lock();
        s.irq = None;
        s.acked = 0;
        s.actual_pages = 0;
    }
    fn queue_notify(&mut self, queue: usize) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let Some((role, q)) = a.queues.get_mut(queue) else {
            self.active = Some(a);
            return;
        };
        let role = *role;
        let mem = a.mem.clone();
        let mut used_any = false;
        let mut served = 0;
        loop {
            if served == super::QUEUE_BUDGET {
                // The rest on a later turn: the other devices go first.
                a.requeue.later(queue);
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            match role {
                Role::Inflate => self.inflate(chain, &mem),
                Role::Deflate => {}
                Role::Reporting => self.report(chain),
                Role::Stats => {
                    self.read_stats(chain, &mem);
                    // A second buffer while one is held: the older one goes back.
                    if let Some(old) = a.held_stats.replace(head) {
                        let _ = q.add_used(&mem, old, 0);
                        used_any = true;
                    }
                    continue;
                }
            }
            if q.add_used(&mem, head, 0).is_err() {
                break;
            }
            used_any = true;
        }
        if used_any && q.needs_notification(&mem).unwrap_or(true) {
            a.irq.signal(INT_VRING);
        }
        self.active = Some(a);
    }
    fn handle_event(&mut self, token: u32, _events: EventSet) {
        if token == TOK_REFRESH {
            let _ = self.control.refresh.read();
            self.return_stats();
        }
    }
}

#[cfg(test)]
mod tests;
