//! The virtio-mmio transport, version 2 (virtio 1.x), as a bus device.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, EventSink, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4b48_4c42; // "BLHK"

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

pub struct MmioTransport {
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    kicks: Vec<EventFd>,
    events: EventSink,
    queues: Vec<Queue>,
    status: u32,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        kicks: Vec<EventFd>,
        events: EventSink,
    ) -> Self {
        let queues = dev
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s).expect("queue sizes are powers of two set by the VMM"))
            .collect();
        MmioTransport {
            dev,
            mem,
            interrupt,
            kicks,
            events,
            queues,
            status: 0,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        }
    }

    pub fn device_type(&self) -> u32 {
        self.dev.device_type()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.dev
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.dev.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & S_FEATURES_OK != 0 && self.status & S_FEATURES_OK == 0 {
            let offered = self.dev.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                v &= !S_FEATURES_OK;
            }
        }
        // DRIVER_OK counts only after features were agreed: a driver that skips
        // FEATURES_OK gets a device that never starts, not one running on features
        // nobody checked.
        if v & S_DRIVER_OK != 0 && v & S_FEATURES_OK == 0 {
            v &= !S_DRIVER_OK;
        }
        self.status = v;
        if v & S_DRIVER_OK != 0 && v & S_FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .filter(|q| q.ready())
            .all(|q| q.is_valid(&self.mem));
        let result = if !valid {
            Err("a ready queue lies outside guest memory or is misaligned".to_string())
        } else {
            let event_idx = self.driver_features & super::VIRTIO_F_RING_EVENT_IDX != 0;
            let mut queues = std::mem::take(&mut self.queues);
            for q in &mut queues {
                q.set_event_idx(event_idx);
            }
            // Keep a fresh copy of the queue configuration so register reads still work.
            self.queues = queues
                .iter()
                .map(|q| {
                    let mut n = Queue::new(q.max_size()).expect("same size as before");
                    n.set_size(q.size());
                    n.set_ready(q.ready());
                    n.set_desc_table_address(
                        Some(q.desc_table() as u32),
                        Some((q.desc_table() >> 32) as u32),
                    );
                    n.set_avail_ring_address(
                        Some(q.avail_ring() as u32),
                        Some((q.avail_ring() >> 32) as u32),
                    );
                    n.set_used_ring_address(
                        Some(q.used_ring() as u32),
                        Some((q.used_ring() >> 32) as u32),
                    );
                    n
                })
                .collect();
            let kicks = self
                .kicks
                .iter()
                .filter_map(|k| k.try_clone().ok())
                .collect();
            self.dev
                .activate(Activation {
                    mem: self.mem.clone(),
                    queues,
                    interrupt: self.interrupt.clone(),
                    acked_features: self.driver_features,
                    kicks,
                    events: self.events.clone(),
                })
                .map_err(|e| e.to_string())
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                // A guest can reset and re-activate in a loop: limited.
                crate::warn_limited!(
                    "virtio device type {} failed to activate: {e}",
                    self.dev.device_type()
                );
                self.status |= S_NEEDS_RESET;
                self.interrupt.signal(INT_CONFIG);
            }
        }
    }

    fn reg_read(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.dev.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.dev.features();
                match self.features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.queue().map(|q| q.max_size() as u32).unwrap_or(0),
            0x44 => self.queue().map(|q| q.ready() as u32).unwrap_or(0),
            0x60 => {
                let s = self.interrupt.status.load(Ordering::SeqCst);
                if self.dev.external_interrupts() && self.activated {
                    s | INT_VRING
                } else {
                    s
                }
            }
            0x70 => self.status,
            // Shared memory regions (SHMLen/SHMBase): none. The spec says a missing
            // region reads as length ~0; 0 would announce an empty region at 0, which
            // the virtiofs driver then fails to reserve.
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn reg_write(&mut self, offset: u64, v: u32) {
        // Queue layout may only change before the device runs.
        let queue_writable = !self.activated && self.status & S_DRIVER_OK == 0;
        match offset {
            0x14 => self.features_sel = v,
            0x20 if self.status & S_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if queue_writable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if queue_writable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            // Only reached when the ioeventfd did not catch the write.
            0x50 if self.activated && (v as usize) < self.queues.len() => {
                self.dev.queue_notify(v as usize)
            }
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_writable => {
                if let Some(q) = self.queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !7 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.dev.read_config(offset - 0x100, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.reg_read(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & S_DRIVER != 0 || self.status & S_ACK != 0 {
                self.dev.write_config(offset - 0x100, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        } else if let (Ok(b), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.reg_write(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, TYPE_RNG};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::epoll::Epoll;

    struct Fake {
        activated: Arc<Mutex<Option<usize>>>,
        resets: Arc<Mutex<u32>>,
    }
    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            TYPE_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
            *self.activated.lock().unwrap() = Some(act.queues.iter().filter(|q| q.ready()).count());
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
    }

    type Activated = Arc<Mutex<Option<usize>>>;

    fn transport() -> (MmioTransport, Activated, Arc<Mutex<u32>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let a = Arc::default();
        let r = Arc::default();
        let dev = Fake {
            activated: Arc::clone(&a),
            resets: Arc::clone(&r),
        };
        let sink = EventSink::new(Arc::new(Epoll::new().unwrap()), 1);
        let t = MmioTransport::new(
            Box::new(dev),
            mem,
            Interrupt::new(EventFd::new(0).unwrap()),
            vec![],
            sink,
        );
        (t, a, r)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        w(t, 0x30, idx);
        w(t, 0x38, 16);
        w(t, 0x80, base as u32);
        w(t, 0x90, (base + 0x100) as u32);
        w(t, 0xa0, (base + 0x200) as u32);
        w(t, 0x44, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), TYPE_RNG);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1); // VERSION_1 is bit 32
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 16);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&mut t, 0x34), 0); // no such queue
        w(&mut t, 0xac, 0);
        assert_eq!((r(&mut t, 0xb0), r(&mut t, 0xb4)), (u32::MAX, u32::MAX));
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        t.read(0x1000, &mut b); // far past the config: zeros, no panic
        assert_eq!(b, [0, 0]);
        // Misaligned and odd-sized register accesses are ignored.
        let mut b3 = [9u8; 3];
        t.read(0x01, &mut b3);
        assert_eq!(b3, [0; 3]);
        t.write(0x70, &[1]);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn negotiation_activation_and_reset() {
        let (mut t, act, resets) = transport();
        w(&mut t, 0x70, S_ACK | S_DRIVER);
        // Driver asks for a feature we do not offer: FEATURES_OK does not stick.
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 | 2);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(r(&mut t, 0x70) & S_FEATURES_OK, 0);
        w(&mut t, 0x70, 0);
        w(&mut t, 0x70, S_ACK | S_DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_ne!(r(&mut t, 0x70) & S_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x1000);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(*act.lock().unwrap(), Some(1));
        assert!(t.is_activated());
        // Queue registers are frozen once running.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x44, 0);
        assert_eq!(r(&mut t, 0x44), 1);
        w(&mut t, 0x70, 0);
        assert_eq!(*resets.lock().unwrap(), 1);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, 0x44), 0);
    }

    #[test]
    fn driver_ok_without_features_ok_activates_nothing() {
        let (mut t, act, _) = transport();
        w(&mut t, 0x70, S_ACK | S_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        setup_queue(&mut t, 0, 0x1000);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_DRIVER_OK);
        assert_eq!(*act.lock().unwrap(), None);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, 0x70) & S_DRIVER_OK, 0);
        // The proper order still works afterwards.
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert!(t.is_activated());
    }

    #[test]
    fn queue_outside_memory_fails_activation_and_flags_needs_reset() {
        let (mut t, act, _) = transport();
        w(&mut t, 0x70, S_ACK | S_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        setup_queue(&mut t, 0, 0xffff_0000); // beyond the 1 MiB of memory
        w(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(*act.lock().unwrap(), None);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, 0x70) & S_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x60) & INT_CONFIG, 0);
        w(&mut t, 0x64, INT_CONFIG);
        assert_eq!(r(&mut t, 0x60), 0);
    }
}
