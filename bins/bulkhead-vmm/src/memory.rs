//! Guest RAM, backed by what the VM needs.
//!
//! - **private**: anonymous private memory with transparent huge pages advised. Nothing
//!   outside this process can see it, so it needs no file; it is the fastest to fault in.
//! - **shared**: a memfd mapped shared, because a vhost-user back end (virtiofsd,
//!   bulkhead-net) must map the same pages. Huge pages come from hugetlbfs
//!   (`MFD_HUGETLB`) when enough 2 MiB pages are reserved, else from shmem THP
//!   (`MADV_HUGEPAGE`), which the host grants only when
//!   `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`, `within_size`,
//!   `always` or `force`.
//!
//! Every region is mapped at a 2 MiB-aligned host address, so a huge page on the host
//! lines up with a 2 MiB guest frame (KVM maps it huge only then). What was asked, what
//! was granted and why are kept in a [`MemoryReport`].
//!
//! The mappings live as long as the process: vCPU threads and KVM hold their addresses
//! until exit, so nothing here unmaps them.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;
use bulkhead_host::hugepages::HostPages;

/// 2 MiB: the huge page size used for alignment and hugetlbfs.
pub const HUGE_PAGE: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest memory to {mib} MiB: {source}")]
    Size { mib: u64, source: std::io::Error },
    #[error("cannot map {mib} MiB of guest memory: {msg}")]
    Map { mib: u64, msg: String },
    #[error("hugepages = hugetlb: {0}")]
    Hugetlb(String),
}

/// Whether guest RAM is private to the VMM or shareable with back-end processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// Shared when a vhost-user device is attached, private otherwise.
    #[default]
    Auto,
    Private,
    Shared,
}

/// Which huge pages to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HugePages {
    /// hugetlbfs for shared memory when enough pages are reserved, else THP.
    #[default]
    Auto,
    /// Transparent huge pages only (advised; the host's policy decides).
    Thp,
    /// hugetlbfs 2 MiB pages, or fail.
    Hugetlb,
    /// 4 KiB pages.
    Off,
}

impl Backing {
    const ALL: [Self; 3] = [Self::Auto, Self::Private, Self::Shared];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Private => "private",
            Self::Shared => "shared",
        }
    }
}

impl HugePages {
    const ALL: [Self; 4] = [Self::Auto, Self::Thp, Self::Hugetlb, Self::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Thp => "thp",
            Self::Hugetlb => "hugetlb",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for Backing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("memory backing {s:?}: want auto, private or shared"))
    }
}

impl std::str::FromStr for HugePages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| format!("hugepages {s:?}: want auto, thp, hugetlb or off"))
    }
}

/// What guest RAM asked for, what it got, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    pub asked_backing: Backing,
    pub asked_hugepages: HugePages,
    /// `private` (anonymous) or `shared` (memfd).
    pub backing: &'static str,
    /// `thp`, `hugetlb-2m` or `4k`: what the host grants for these mappings.
    pub pages: &'static str,
    pub why: String,
}

impl MemoryReport {
    /// Backed by hugetlbfs: only whole 2 MiB pages can be discarded.
    pub fn hugetlb(&self) -> bool {
        self.pages == "hugetlb-2m"
    }
}

/// One RAM region as a vhost-user back end needs to see it.
#[derive(Debug, Clone, Copy)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
    pub host_addr: u64,
}

pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    /// The memfd behind shared RAM; `None` for private RAM.
    pub file: Option<Arc<File>>,
    /// Every region, boot RAM and the hot-plug region alike (KVM, vhost-user back ends
    /// and the balloon see them all).
    pub regions: Vec<RamRegion>,
    /// The hot-plug region, for virtio-mem; never in the guest's e820 map.
    pub hotplug: Option<RamRegion>,
    pub report: MemoryReport,
}

/// How the mapping will be made, decided before anything is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Private { advise: bool },
    Memfd { hugetlb: bool, advise: bool },
}

/// Decide the backing. `shared_needed`: a vhost-user device will map guest RAM.
fn plan(
    sizes: Sizes,
    backing: Backing,
    huge: HugePages,
    shared_needed: bool,
    host: &HostPages,
) -> Result<(Plan, &'static str, String), MemoryError> {
    let mem_size = sizes.total();
    let shared = match backing {
        Backing::Auto => shared_needed,
        Backing::Shared => true,
        Backing::Private => false,
    };
    let want_huge = huge != HugePages::Off;
    let fits_hugetlb = mem_size.is_multiple_of(HUGE_PAGE);
    let reserved = host.free_hugetlb_2m.unwrap_or(0);
    // Boot RAM must be covered; the hot-plug region takes pages only as it is plugged.
    let enough = reserved.saturating_mul(HUGE_PAGE) >= sizes.boot;
    let why_backing = if shared {
        if shared_needed {
            "shared: a vhost-user device maps guest RAM"
        } else {
            "shared: asked for"
        }
    } else if backing == Backing::Private {
        "private: asked for"
    } else {
        "private: no vhost-user device needs to map guest RAM"
    };
    if huge == HugePages::Hugetlb {
        if !fits_hugetlb {
            return Err(MemoryError::Hugetlb(format!(
                "{} MiB is not a multiple of 2 MiB",
                mem_size >> 20
            )));
        }
        return Ok((
            Plan::Memfd {
                hugetlb: true,
                advise: false,
            },
            "hugetlb-2m",
            format!("{why_backing}; hugetlb: asked for"),
        ));
    }
    if shared && huge == HugePages::Auto && fits_hugetlb && enough {
        return Ok((
            Plan::Memfd {
                hugetlb: true,
                advise: false,
            },
            "hugetlb-2m",
            format!("{why_backing}; hugetlb: {reserved} free 2 MiB pages reserved"),
        ));
    }
    let policy = if shared { &host.shmem_thp } else { &host.thp };
    let knob = if shared { "shmem_enabled" } else { "enabled" };
    let (pages, why_pages) = if !want_huge {
        ("4k", "huge pages off: asked for".to_owned())
    } else {
        match policy.as_deref() {
            Some(p) if bulkhead_host::hugepages::advised_gets_huge(p) => {
                ("thp", format!("THP advised; host {knob} is {p}"))
            }
            Some(p) => (
                "4k",
                format!(
                    "THP advised but host {knob} is {p}{}",
                    if shared {
                        " (set it to advise, or reserve hugetlb pages)"
                    } else {
                        ""
                    }
                ),
            ),
            None => (
                "thp",
                format!("THP advised; host {knob} not readable here, so unconfirmed"),
            ),
        }
    };
    let plan = if shared {
        Plan::Memfd {
            hugetlb: false,
            advise: want_huge,
        }
    } else {
        Plan::Private { advise: want_huge }
    };
    Ok((plan, pages, format!("{why_backing}; {why_pages}")))
}

/// Map guest RAM as asked, falling back from hugetlbfs to THP when the reservation is
/// gone by the time we map (another VM took the pages).
pub fn create(
    mem_size: u64,
    backing: Backing,
    huge: HugePages,
    shared_needed: bool,
) -> Result<GuestRam, MemoryError> {
    create_with_hotplug(mem_size, 0, backing, huge, shared_needed)
}

/// [`create`], plus a hot-plug region of `hotplug_size` bytes for virtio-mem (see
/// [`layout::hotplug_range`]), backed like the rest and in the same memfd when shared.
pub fn create_with_hotplug(
    mem_size: u64,
    hotplug_size: u64,
    backing: Backing,
    huge: HugePages,
    shared_needed: bool,
) -> Result<GuestRam, MemoryError> {
    if backing == Backing::Private && shared_needed {
        return Err(MemoryError::Map {
            mib: mem_size >> 20,
            msg: "memory backing private: a vhost-user device needs shared guest RAM".into(),
        });
    }
    let sizes = Sizes {
        boot: mem_size,
        hotplug: hotplug_size,
    };
    create_on(&HostPages::read(), sizes, backing, huge, shared_needed)
}

/// Boot RAM and the hot-plug region, in bytes.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    boot: u64,
    hotplug: u64,
}

impl Sizes {
    fn total(self) -> u64 {
        self.boot + self.hotplug
    }

    /// Every range to map, boot RAM first.
    fn ranges(self) -> Vec<(u64, u64)> {
        let mut r = layout::ram_ranges(self.boot);
        r.extend(layout::hotplug_range(self.boot, self.hotplug));
        r
    }
}

/// [`create`] on a host whose huge page policy is `host`.
fn create_on(
    host: &HostPages,
    sizes: Sizes,
    backing: Backing,
    huge: HugePages,
    shared_needed: bool,
) -> Result<GuestRam, MemoryError> {
    let mem_size = sizes.total();
    let (plan, pages, why) = plan(sizes, backing, huge, shared_needed, host)?;
    let report = |backing_got: &'static str| MemoryReport {
        asked_backing: backing,
        asked_hugepages: huge,
        backing: backing_got,
        pages,
        why: why.clone(),
    };
    match plan {
        Plan::Private { advise } => map(sizes, None, advise, report("private")),
        Plan::Memfd {
            hugetlb: false,
            advise,
        } => map(
            sizes,
            Some(memfd(mem_size, false)?),
            advise,
            report("shared"),
        ),
        Plan::Memfd { hugetlb: true, .. } => {
            match memfd(mem_size, true).and_then(|f| map(sizes, Some(f), false, report("shared"))) {
                // The pages went between reading the count and mapping: plan again as
                // on a host with none reserved, and say why.
                Err(e) if huge == HugePages::Auto => {
                    let none = HostPages {
                        free_hugetlb_2m: Some(0),
                        ..host.clone()
                    };
                    let mut ram = create_on(&none, sizes, backing, huge, shared_needed)?;
                    ram.report.why =
                        format!("{why}, but mapping them failed ({e}); {}", ram.report.why);
                    Ok(ram)
                }
                Err(e) => Err(MemoryError::Hugetlb(e.to_string())),
                ok => ok,
            }
        }
    }
}

pub(crate) fn memfd(mem_size: u64, hugetlb: bool) -> Result<Arc<File>, MemoryError> {
    let mib = mem_size >> 20;
    let flags = libc::MFD_CLOEXEC
        | if hugetlb {
            libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
        } else {
            0
        };
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"bulkhead-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh memfd we own.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(mem_size)
        .map_err(|source| MemoryError::Size { mib, source })?;
    Ok(file)
}

/// Map each RAM range at a 2 MiB-aligned address: anonymous private memory, or the memfd
/// shared at consecutive offsets.
fn map(
    sizes: Sizes,
    file: Option<Arc<File>>,
    advise: bool,
    report: MemoryReport,
) -> Result<GuestRam, MemoryError> {
    let mib = sizes.total() >> 20;
    let map_err = |msg: String| MemoryError::Map { mib, msg };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let hotplug_at = layout::hotplug_range(sizes.boot, sizes.hotplug).map(|(start, _)| start);
    for (start, size) in sizes.ranges() {
        // hugetlbfs reserves a shared mapping's pages when it is made; the hot-plug
        // region's are taken when the guest plugs them (virtio-mem populates them
        // then, and refuses the plug if the pool is empty).
        let noreserve = report.hugetlb() && Some(start) == hotplug_at;
        let fo = file.as_ref().map(|f| (f.as_raw_fd(), offset));
        let ptr = map_aligned(size as usize, fo, noreserve).map_err(|e| map_err(e.to_string()))?;
        if advise {
            // SAFETY: ptr..ptr+size is the mapping just made; advice does not change its
            // contents. Failure (a kernel without THP) leaves 4 KiB pages, which the
            // report already allows for.
            unsafe { libc::madvise(ptr.cast(), size as usize, libc::MADV_HUGEPAGE) };
        }
        let (flags, fofs) = match &file {
            Some(f) => (
                libc::MAP_SHARED | if noreserve { libc::MAP_NORESERVE } else { 0 },
                Some(FileOffset::from_arc(f.clone(), offset)),
            ),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                None,
            ),
        };
        let mut b = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags);
        if let Some(fo) = fofs {
            b = b.with_file_offset(fo);
        }
        // SAFETY: ptr..ptr+size is a live mapping made above that is never unmapped.
        let region = unsafe { b.with_raw_mmap_pointer(ptr) }
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| map_err("region overflows the address space".into()))?;
        regions.push(region);
        offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))?;
    let regions = region_table(&mem);
    let hotplug = layout::hotplug_range(sizes.boot, sizes.hotplug)
        .and_then(|(start, _)| regions.iter().find(|r| r.guest_addr == start).copied());
    Ok(GuestRam {
        mem,
        file,
        regions,
        hotplug,
        report,
    })
}

/// mmap `size` bytes at an address aligned to [`HUGE_PAGE`]: reserve a larger window,
/// map over its aligned part, and give the slack back.
fn map_aligned(size: usize, file: Option<(i32, u64)>, noreserve: bool) -> std::io::Result<*mut u8> {
    let align = HUGE_PAGE as usize;
    let window = size + align;
    // SAFETY: a fresh inaccessible reservation; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            window,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let b = base as usize;
    let start = (b + align - 1) & !(align - 1);
    let (flags, fd, off) = match file {
        Some((fd, off)) => (
            libc::MAP_SHARED | if noreserve { libc::MAP_NORESERVE } else { 0 },
            fd,
            off as libc::off_t,
        ),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        ),
    };
    // SAFETY: start..start+size lies inside the reservation made above, which is ours.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            fd,
            off,
        )
    };
    let err = (p == libc::MAP_FAILED).then(std::io::Error::last_os_error);
    // SAFETY: the head and tail slack are parts of our reservation that nothing uses; on
    // failure the whole reservation goes.
    unsafe {
        if err.is_some() {
            libc::munmap(base, window);
        } else {
            if start > b {
                libc::munmap(base, start - b);
            }
            let end = start + size;
            if b + window > end {
                libc::munmap(end as *mut libc::c_void, b + window - end);
            }
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(start as *mut u8),
    }
}

fn region_table(mem: &GuestMemoryMmap) -> Vec<RamRegion> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| RamRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: r.file_offset().map(|f| f.start()).unwrap_or(0),
            host_addr: r.as_ptr() as u64,
        })
        .collect()
}

/// Huge pages actually backing this process's memory, from `/proc/self/smaps_rollup`
/// (KiB): THP anonymous, THP shmem mapped at PMD level, and hugetlbfs.
pub fn huge_kib_in_use() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    Some(
        s.lines()
            .filter(|l| {
                [
                    "AnonHugePages:",
                    "ShmemPmdMapped:",
                    "Shared_Hugetlb:",
                    "Private_Hugetlb:",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    fn host(thp: &str, shmem: &str, free: u64) -> HostPages {
        HostPages {
            thp: Some(thp.into()),
            shmem_thp: Some(shmem.into()),
            free_hugetlb_2m: Some(free),
        }
    }

    /// The VmFlags line of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            if let Some((range, _)) = l.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                    {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = l.strip_prefix("VmFlags:") {
                    return f.trim().to_owned();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn shared_ram_is_the_memfd_and_aligned() {
        let ram = create(64 << 20, Backing::Shared, HugePages::Thp, false).unwrap();
        assert_eq!(ram.report.backing, "shared");
        assert_eq!(ram.regions.len(), 1);
        assert_eq!(ram.regions[0].size, 64 << 20);
        assert_eq!(ram.regions[0].host_addr % HUGE_PAGE, 0);
        ram.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the memfd, as a back end would see them.
        let mut b = [0u8; 4];
        ram.file
            .as_ref()
            .unwrap()
            .read_exact_at(&mut b, 0x1000)
            .unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        let flags = vm_flags(ram.regions[0].host_addr);
        assert!(flags.split(' ').any(|f| f == "sh"), "{flags}");
        assert!(flags.split(' ').any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn private_ram_has_no_file_and_is_advised_huge() {
        let ram = create(64 << 20, Backing::Auto, HugePages::Auto, false).unwrap();
        assert_eq!(ram.report.backing, "private");
        assert!(ram.file.is_none());
        assert_eq!(ram.regions[0].host_addr % HUGE_PAGE, 0);
        ram.mem.write_obj(7u8, GuestAddress(0x3f_ffff)).unwrap();
        assert_eq!(ram.mem.read_obj::<u8>(GuestAddress(0x3f_ffff)).unwrap(), 7);
        let flags = vm_flags(ram.regions[0].host_addr);
        assert!(!flags.split(' ').any(|f| f == "sh"), "{flags}");
        assert!(flags.split(' ').any(|f| f == "hg"), "{flags}");
        let off = create(64 << 20, Backing::Private, HugePages::Off, false).unwrap();
        assert_eq!(off.report.pages, "4k");
        let flags = vm_flags(off.regions[0].host_addr);
        assert!(!flags.split(' ').any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn ram_above_the_hole_continues_the_file() {
        let size = layout::MMIO_HOLE_START + (64 << 20);
        let ram = create(size, Backing::Shared, HugePages::Off, false).unwrap();
        assert_eq!(ram.regions.len(), 2);
        assert_eq!(ram.regions[1].guest_addr, layout::MMIO_HOLE_END);
        assert_eq!(ram.regions[1].file_offset, layout::MMIO_HOLE_START);
        assert_eq!(ram.regions[1].host_addr % HUGE_PAGE, 0);
    }

    #[test]
    fn hotplug_region_follows_boot_ram_in_the_file_and_at_4_gib_in_the_guest() {
        let ram = create_with_hotplug(64 << 20, 256 << 20, Backing::Shared, HugePages::Off, false)
            .unwrap();
        assert_eq!(ram.regions.len(), 2);
        let h = ram.hotplug.unwrap();
        assert_eq!((h.guest_addr, h.size), (4 << 30, 256 << 20));
        assert_eq!(h.file_offset, 64 << 20);
        assert_eq!(h.host_addr % HUGE_PAGE, 0);
        let file = ram.file.as_ref().unwrap();
        assert_eq!(file.metadata().unwrap().len(), 320 << 20);
        // The guest's writes there land in the file, after boot RAM.
        ram.mem.write_obj(0x42u8, GuestAddress(4 << 30)).unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 64 << 20).unwrap();
        assert_eq!(b, [0x42]);
        // Private RAM gets the region too; none asked, none made.
        let private =
            create_with_hotplug(64 << 20, 128 << 20, Backing::Private, HugePages::Off, false)
                .unwrap();
        assert_eq!(private.hotplug.map(|r| r.guest_addr), Some(4 << 30));
        assert!(create(64 << 20, Backing::Private, HugePages::Off, false)
            .unwrap()
            .hotplug
            .is_none());
    }

    #[test]
    fn private_backing_refused_when_a_back_end_must_map_ram() {
        let e = create(64 << 20, Backing::Private, HugePages::Auto, true)
            .err()
            .unwrap();
        assert!(e.to_string().contains("vhost-user"), "{e}");
    }

    const HUGETLB: Plan = Plan::Memfd {
        hugetlb: true,
        advise: false,
    };

    #[test]
    fn plan_follows_need_and_host_policy() {
        let mib = |m: u64| Sizes {
            boot: m << 20,
            hotplug: 0,
        };
        // No back end: private, THP as the host allows.
        let (p, pages, why) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            false,
            &host("madvise", "never", 0),
        )
        .unwrap();
        assert_eq!(p, Plan::Private { advise: true });
        assert_eq!(pages, "thp");
        assert!(why.contains("no vhost-user"), "{why}");
        let (_, pages, why) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            false,
            &host("never", "never", 0),
        )
        .unwrap();
        assert_eq!(pages, "4k");
        assert!(why.contains("enabled is never"), "{why}");
        // A back end: shared; shmem THP only where shmem_enabled allows it.
        let (p, pages, why) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            true,
            &host("madvise", "never", 0),
        )
        .unwrap();
        assert_eq!(
            p,
            Plan::Memfd {
                hugetlb: false,
                advise: true
            }
        );
        assert_eq!(pages, "4k");
        assert!(
            why.contains("shmem_enabled is never") && why.contains("advise"),
            "{why}"
        );
        let (_, pages, _) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            true,
            &host("madvise", "advise", 0),
        )
        .unwrap();
        assert_eq!(pages, "thp");
        // Enough reserved 2 MiB pages for boot RAM: hugetlbfs (a hot-plug region beside
        // it takes none up front); too few: THP.
        let with_region = Sizes {
            boot: 128 << 20,
            hotplug: 1 << 30,
        };
        for sizes in [mib(128), with_region] {
            let (p, pages, why) = plan(
                sizes,
                Backing::Auto,
                HugePages::Auto,
                true,
                &host("madvise", "never", 64),
            )
            .unwrap();
            assert_eq!(p, HUGETLB);
            assert_eq!(pages, "hugetlb-2m");
            assert!(why.contains("64 free"), "{why}");
        }
        let (p, _, _) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            true,
            &host("madvise", "advise", 63),
        )
        .unwrap();
        assert_eq!(
            p,
            Plan::Memfd {
                hugetlb: false,
                advise: true
            }
        );
        // Private RAM does not take reserved pages unless asked.
        let (p, _, _) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            false,
            &host("madvise", "never", 64),
        )
        .unwrap();
        assert_eq!(p, Plan::Private { advise: true });
        // hugetlb asked for: odd sizes refused; off means no advice.
        assert!(plan(
            mib(129),
            Backing::Auto,
            HugePages::Hugetlb,
            false,
            &HostPages::default()
        )
        .is_err());
        let (p, pages, _) = plan(
            mib(128),
            Backing::Shared,
            HugePages::Off,
            false,
            &HostPages::default(),
        )
        .unwrap();
        assert_eq!(
            p,
            Plan::Memfd {
                hugetlb: false,
                advise: false
            }
        );
        assert_eq!(pages, "4k");
        // A jail without /sys: advised, reported as unconfirmed.
        let (_, pages, why) = plan(
            mib(128),
            Backing::Auto,
            HugePages::Auto,
            false,
            &HostPages::default(),
        )
        .unwrap();
        assert_eq!(pages, "thp");
        assert!(why.contains("unconfirmed"), "{why}");
    }

    #[test]
    fn hugetlb_asked_without_reserved_pages_fails_clearly() {
        if HostPages::read().free_hugetlb_2m.unwrap_or(0) >= 32 {
            return; // this host has pages reserved; the failure path cannot be shown here
        }
        let e = create(64 << 20, Backing::Shared, HugePages::Hugetlb, false)
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("hugepages = hugetlb"), "{e}");
        // Auto with too few pages never tries them.
        let ram = create(64 << 20, Backing::Shared, HugePages::Auto, false).unwrap();
        assert_ne!(ram.report.pages, "hugetlb-2m");
    }

    /// Where 2 MiB pages are reserved (not on CI; `echo 64 > /proc/sys/vm/nr_hugepages`
    /// to run it): the hot-plug region reserves none of them when mapped.
    #[test]
    fn a_hugetlb_hot_plug_region_reserves_no_pages_up_front() {
        let free = HostPages::read().free_hugetlb_2m.unwrap_or(0);
        if free < 48 {
            return;
        }
        let rsvd = || {
            let m = std::fs::read_to_string("/proc/meminfo").unwrap();
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Rsvd:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap()
        };
        let before = rsvd();
        let ram = create_with_hotplug(
            64 << 20,
            (free + 64) * HUGE_PAGE,
            Backing::Shared,
            HugePages::Hugetlb,
            false,
        )
        .unwrap();
        assert_eq!(ram.report.pages, "hugetlb-2m");
        // Boot RAM's 32 pages, none of the region's (which is larger than the pool).
        assert_eq!(rsvd() - before, 32);
        let h = ram.hotplug.unwrap();
        assert!(
            vm_flags(h.host_addr).contains(" nr"),
            "{}",
            vm_flags(h.host_addr)
        );
    }
}
