//! Guest RAM: one memfd, mapped shared, so vhost-user back ends can map the same pages.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest memory to {mib} MiB: {source}")]
    Size { mib: u64, source: std::io::Error },
    #[error("cannot map {mib} MiB of guest memory: {msg}")]
    Map { mib: u64, msg: String },
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
    pub file: Arc<File>,
    pub regions: Vec<RamRegion>,
}

pub fn create(mem_size: u64) -> Result<GuestRam, MemoryError> {
    let mib = mem_size >> 20;
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"bulkhead-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh memfd we own.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(mem_size)
        .map_err(|source| MemoryError::Size { mib, source })?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (start, size) in layout::ram_ranges(mem_size) {
        ranges.push((
            GuestAddress(start),
            size as usize,
            Some(FileOffset::from_arc(file.clone(), offset)),
        ));
        offset += size;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| MemoryError::Map {
        mib,
        msg: e.to_string(),
    })?;
    let regions = region_table(&mem);
    Ok(GuestRam { mem, file, regions })
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_shared_file_backed_and_split() {
        let ram = create(64 << 20).unwrap();
        assert_eq!(ram.regions.len(), 1);
        assert_eq!(ram.regions[0].size, 64 << 20);
        ram.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the memfd.
        let mut b = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    }
}
