//! Address-range dispatch for port I/O and MMIO exits.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Overlap> {
        if len == 0
            || self
                .ranges
                .iter()
                .any(|(b, l, _)| base < b + l && *b < base + len)
        {
            return Err(Overlap { base, len });
        }
        self.ranges.push((base, len, dev));
        self.ranges.sort_by_key(|r| r.0);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let i = self
            .ranges
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let (base, len, dev) = &self.ranges[i];
        let off = addr - base;
        (off.checked_add(size as u64)? <= *len).then_some((off, dev))
    }

    /// Returns false when nothing claims the address (reads then see all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_overlap_and_edges() {
        let mut bus = Bus::default();
        let d = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x1000, 0x10, d.clone()).unwrap();
        assert!(bus.insert(0x100f, 1, d.clone()).is_err());
        assert!(bus.insert(0x0ff0, 0x11, d.clone()).is_err());
        bus.insert(0x1010, 0x10, d.clone()).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b, [4; 4]);
        // Straddling the end of a range is not claimed.
        assert!(!bus.read(0x100e, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x0fff, &mut [0u8; 1]));
        assert!(bus.write(0x1011, &[9]));
        assert_eq!(d.lock().unwrap().0, vec![(1, vec![9])]);
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }
}
