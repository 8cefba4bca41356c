//! Putting a kernel, an initramfs and a command line into guest memory.
//!
//! Two entry paths. By default a Linux kernel, ELF vmlinux or bzImage, is entered through
//! the 64-bit boot protocol (long mode, identity-mapped, `%rsi` = zero page); for an ELF
//! vmlinux the zero page's setup header is written here, as a bzImage would carry it.
//! An ELF kernel can instead be entered through its PVH note (32-bit protected mode,
//! paging off, `%ebx` = `hvm_start_info`), for kernels that have no 64-bit entry. Linux
//! entered through PVH looks for Xen first, one CPUID for each of 256 leaves: 256 exits
//! that the 64-bit entry does not take.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat { path: String },
    #[error("cannot load kernel {path}: {msg}")]
    KernelLoad { path: String, msg: String },
    #[error("ELF kernel {path} has no PVH entry note; boot it with --boot linux")]
    NoPvhEntry { path: String },
    #[error("cannot open initramfs {path}: {source}")]
    InitrdOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("initramfs {path} is empty")]
    InitrdEmpty { path: String },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig { path: String, size: u64 },
    #[error("cannot read initramfs {path}: {msg}")]
    InitrdRead { path: String, msg: String },
    #[error("raw image {path} ({size} bytes) does not fit at {addr:#x}")]
    RawTooBig { path: String, size: u64, addr: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot parameters: {0}")]
    Params(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, `%ebx` = start_info address.
    Pvh,
    /// 64-bit long mode, `%rsi` = zero page address.
    Linux64,
    /// Real mode at 0000:rip (toy guests).
    Real16,
}

#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub rip: u64,
    pub mode: EntryMode,
    pub params_addr: u64,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The guest's physical memory map, as both boot protocols describe it.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let (s, e) = (start.max(HIMEM_START), start + size);
        if e > s {
            map.push((s, e - s, E820_RAM));
        }
    }
    map
}

fn sniff(kernel: &mut File) -> std::io::Result<[u8; 0x210]> {
    let mut head = [0u8; 0x210];
    kernel.seek(SeekFrom::Start(0))?;
    let mut got = 0;
    while got < head.len() {
        let n = kernel.read(&mut head[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(head)
}

/// The setup header a bzImage carries, for an ELF vmlinux entered through the 64-bit
/// protocol: the fields the kernel reads from it (the boot protocol's version says that
/// `acpi_rsdp_addr` is there, from 2.14 on).
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: 0xaa55,
        header: 0x5372_6448, // "HdrS"
        version: 0x020f,
        kernel_alignment: 0x0100_0000,
        initrd_addr_max: 0x7fff_ffff,
        ..Default::default()
    }
}

/// Load everything and write the boot parameters. `rsdp` is where the ACPI tables start;
/// `pvh`: enter an ELF kernel through its PVH note rather than the 64-bit protocol.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
    pvh: bool,
) -> Result<BootEntry, BootError> {
    let kpath = kernel_path.display().to_string();
    let mut kernel = File::open(kernel_path).map_err(|source| BootError::KernelOpen {
        path: kpath.clone(),
        source,
    })?;
    let head = sniff(&mut kernel).map_err(|source| BootError::KernelOpen {
        path: kpath.clone(),
        source,
    })?;
    let is_elf = head[..4] == *b"\x7fELF";
    let is_bz = &head[0x202..0x206] == b"HdrS";
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: kpath.clone(),
        msg: e.to_string(),
    };

    let (entry, kernel_end, setup_header) = if is_elf {
        let r =
            Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        if pvh {
            let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry { path: kpath });
            };
            (entry.raw_value(), r.kernel_end, None)
        } else {
            // The ELF entry point of a vmlinux is startup_64's physical address.
            (
                r.kernel_load.raw_value(),
                r.kernel_end,
                Some(elf_setup_header()),
            )
        }
    } else if is_bz {
        let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
        (
            r.kernel_load.raw_value() + 0x200,
            r.kernel_end,
            r.setup_header,
        )
    } else {
        return Err(BootError::KernelFormat { path: kpath });
    };

    // Command line.
    let mut cl = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);

    // Initramfs: as high in low memory as it fits, page aligned.
    let low_end = mem_size.min(MMIO_HOLE_START);
    let max_addr = setup_header
        .map(|h| u64::from(h.initrd_addr_max).min(low_end))
        .unwrap_or(low_end);
    let initrd = match initrd_path {
        Some(p) => Some(load_initrd(mem, p, kernel_end, max_addr)?),
        None => None,
    };

    let map = e820_map(mem_size);
    if is_elf && pvh {
        let mut info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE_START,
            rsdp_paddr: rsdp,
            memmap_paddr: PVH_MEMMAP_START,
            memmap_entries: map.len() as u32,
            ..Default::default()
        };
        let memmap: Vec<hvm_memmap_table_entry> = map
            .iter()
            .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            })
            .collect();
        let modlist_addr = GuestAddress(PVH_INFO_START + 0x40);
        let mut params;
        if let Some((addr, size)) = initrd {
            info.nr_modules = 1;
            info.modlist_paddr = modlist_addr.0;
            params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            params.set_modules(
                &[hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                }],
                modlist_addr,
            );
        } else {
            params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        }
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
        PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
            .map_err(|e| BootError::Params(e.to_string()))?;
        Ok(BootEntry {
            rip: entry,
            mode: EntryMode::Pvh,
            params_addr: PVH_INFO_START,
        })
    } else {
        // setup_header is Some for every bzImage the loader accepts and every ELF kernel
        // entered this way.
        let mut bp = boot_params {
            hdr: setup_header.unwrap_or_default(),
            ..Default::default()
        };
        bp.hdr.type_of_loader = 0xff;
        bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
        bp.hdr.cmdline_size = cmdline_len as u32;
        if let Some((addr, size)) = initrd {
            bp.hdr.ramdisk_image = addr as u32;
            bp.hdr.ramdisk_size = size as u32;
        }
        bp.acpi_rsdp_addr = rsdp;
        for (i, &(addr, size, t)) in map.iter().enumerate() {
            bp.e820_table[i].addr = addr;
            bp.e820_table[i].size = size;
            bp.e820_table[i].r#type = t;
        }
        bp.e820_entries = map.len() as u8;
        let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
        LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
            .map_err(|e| BootError::Params(e.to_string()))?;
        Ok(BootEntry {
            rip: entry,
            mode: EntryMode::Linux64,
            params_addr: ZERO_PAGE_START,
        })
    }
}

/// Load a flat binary for a toy guest: real mode at 0x1000 (below the EBDA), or 32-bit
/// flat mode at 1 MiB.
pub fn load_raw(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    real_mode: bool,
) -> Result<BootEntry, BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::KernelOpen {
        path: p.clone(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| BootError::KernelOpen {
            path: p.clone(),
            source,
        })?
        .len();
    let (addr, limit) = if real_mode {
        (0x1000, CMDLINE_START)
    } else {
        (HIMEM_START, mem_size.min(MMIO_HOLE_START))
    };
    if size == 0 || addr + size > limit {
        return Err(BootError::RawTooBig {
            path: p,
            size,
            addr,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::KernelLoad {
            path: p,
            msg: e.to_string(),
        })?;
    Ok(BootEntry {
        rip: addr,
        mode: if real_mode {
            EntryMode::Real16
        } else {
            EntryMode::Pvh
        },
        params_addr: 0,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<(u64, u64), BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::InitrdOpen {
        path: p.clone(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| BootError::InitrdOpen {
            path: p.clone(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(BootError::InitrdEmpty { path: p });
    }
    let addr = max_addr
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && *a >= HIMEM_START)
        .ok_or(BootError::InitrdTooBig {
            path: p.clone(),
            size,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::InitrdRead {
            path: p,
            msg: e.to_string(),
        })?;
    debug_assert!(mem.address_in_range(GuestAddress(addr + size - 1)));
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    /// A file holding `bytes`, removed when dropped.
    fn tmp(name: &str, bytes: &[u8]) -> tempfile::TempPath {
        let f = tempfile::Builder::new()
            .prefix(&format!("bh-boot-{name}-"))
            .tempfile()
            .unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f.into_temp_path()
    }

    #[test]
    fn e820_covers_ram_and_reserves_legacy_hole() {
        let m = e820_map(256 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        let big = e820_map(6 << 30);
        assert_eq!(big.last().unwrap().0, MMIO_HOLE_END);
    }

    #[test]
    fn garbage_and_missing_kernels_are_named_errors() {
        let m = mem(64 << 20);
        let p = tmp("garbage", &[0x55u8; 4096]);
        let e = load(&m, 64 << 20, &p, None, "", ACPI_START, false).unwrap_err();
        assert!(matches!(e, BootError::KernelFormat { .. }), "{e}");
        let e = load(
            &m,
            64 << 20,
            Path::new("/nonexistent/vmlinux"),
            None,
            "",
            ACPI_START,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        // A truncated ELF header.
        let p = tmp("short-elf", b"\x7fELF\x02\x01\x01");
        let e = load(&m, 64 << 20, &p, None, "", ACPI_START, false).unwrap_err();
        assert!(matches!(e, BootError::KernelLoad { .. }), "{e}");
        // A bzImage magic with nothing sensible behind it.
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let p = tmp("bad-bz", &bz);
        let e = load(&m, 64 << 20, &p, None, "", ACPI_START, false).unwrap_err();
        assert!(matches!(e, BootError::KernelLoad { .. }), "{e}");
    }

    #[test]
    fn an_elf_kernel_enters_through_the_64_bit_protocol_unless_pvh_is_asked_for() {
        let m = mem(64 << 20);
        let k = tmp("elf", &crate::fuzzing::minimal_elf());
        let i = tmp("elf-initrd", &[9u8; 5000]);
        let e = load(&m, 64 << 20, &k, Some(&i), "quiet", ACPI_START, false).unwrap();
        assert_eq!(
            (e.mode, e.rip, e.params_addr),
            (EntryMode::Linux64, 0x10_0000, ZERO_PAGE_START)
        );
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = bp.hdr;
        assert_eq!((hdr.boot_flag, hdr.header), (0xaa55, 0x5372_6448));
        // 2.14 or later, or the kernel ignores acpi_rsdp_addr and scans for the RSDP.
        assert!(hdr.version >= 0x020e);
        assert_eq!({ bp.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(
            (hdr.cmd_line_ptr, hdr.cmdline_size),
            (CMDLINE_START as u32, 5)
        );
        assert_eq!({ hdr.ramdisk_size }, 5000);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(u64::from(hdr.ramdisk_image)))
                .unwrap(),
            9
        );
        assert_eq!(usize::from(bp.e820_entries), e820_map(64 << 20).len());

        let e = load(&m, 64 << 20, &k, Some(&i), "quiet", ACPI_START, true).unwrap();
        assert_eq!((e.mode, e.params_addr), (EntryMode::Pvh, PVH_INFO_START));
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.magic, info.nr_modules), (XEN_HVM_START_MAGIC, 1));
    }

    #[test]
    fn initrd_is_placed_page_aligned_at_the_top_or_refused() {
        let m = mem(64 << 20);
        let p = tmp("initrd", &[7u8; 10000]);
        let (addr, size) = load_initrd(&m, &p, 0x200000, 64 << 20).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 9999)).unwrap(), 7);
        let e = load_initrd(&m, &p, (64 << 20) - 4096, 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
        let empty = tmp("empty", b"");
        assert!(matches!(
            load_initrd(&m, &empty, 0x200000, 64 << 20).unwrap_err(),
            BootError::InitrdEmpty { .. }
        ));
    }
}
