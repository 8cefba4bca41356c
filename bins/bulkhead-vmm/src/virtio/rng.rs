//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{
    drain_queue, ActivateError, Activation, Drained, Interrupt, Requeue, VirtioDevice, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};
use std::io::Write;
use std::sync::Arc;

/// Most bytes handed out per request, so one huge buffer cannot stall the event loop.
const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
    requeue: Requeue,
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut act: Activation) -> Result<(), ActivateError> {
        let q = act
            .queues
            .pop()
            .ok_or_else(|| ActivateError::Failed("no queue".into()))?;
        self.active = Some((act.mem, q, act.interrupt));
        self.requeue = Requeue::new(act.kicks);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_notify(&mut self, queue: usize) {
        let Some((mem, q, irq)) = self.active.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; MAX_PER_REQUEST];
        let end = drain_queue(mem, q, irq, |chain| {
            let Ok(mut w) = chain.writer(mem) else {
                return 0;
            };
            let n = w.available_bytes().min(MAX_PER_REQUEST);
            if n == 0 || !fill_random(&mut buf[..n]) {
                return 0;
            }
            match w.write_all(&buf[..n]) {
                Ok(()) => n as u32,
                Err(_) => 0,
            }
        });
        if end == Drained::BudgetSpent {
            self.requeue.later(queue);
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

    #[test]
    fn fills_writable_buffers_and_skips_hostile_ones() {
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            // A good 64-byte writable buffer.
            RawDescriptor::from(Descriptor::new(0x10000, 64, VRING_DESC_F_WRITE, 0)),
            // Read-only (wrong direction): nothing may be written.
            RawDescriptor::from(Descriptor::new(0x20000, 64, 0, 0)),
            // Out of guest memory.
            RawDescriptor::from(Descriptor::new(0xffff_0000, 64, VRING_DESC_F_WRITE, 0)),
            // Zero length.
            RawDescriptor::from(Descriptor::new(0x30000, 0, VRING_DESC_F_WRITE, 0)),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let (act, irq) = activation(&mem, vec![vq.create_queue().unwrap()]);
        let mut rng = Rng::default();
        rng.activate(act).unwrap();
        mem.write_slice(&[0u8; 64], GuestAddress(0x10000)).unwrap();
        mem.write_slice(&[7u8; 64], GuestAddress(0x20000)).unwrap();
        rng.queue_notify(0);
        assert_eq!(used_lens(&mem, &vq), vec![64, 0, 0, 0]);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert_ne!(got, [0u8; 64]);
        mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(got, [7u8; 64]);
        assert!(irq.evt.read().unwrap() >= 1);
    }

    #[test]
    fn a_full_queue_is_served_a_budget_per_turn_and_requeued() {
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 512);
        let descs: Vec<_> = (0..300u64)
            .map(|i| desc(0x100000 + i * 64, 64, VRING_DESC_F_WRITE, 0))
            .collect();
        vq.build_multiple_desc_chains(&descs).unwrap();
        let (act, _, kicks) = activation_with_kicks(&mem, vec![vq.create_queue().unwrap()]);
        let mut rng = Rng::default();
        rng.activate(act).unwrap();
        rng.queue_notify(0);
        assert_eq!(used(&vq).len(), crate::virtio::QUEUE_BUDGET);
        assert_eq!(kicks[0].read().unwrap(), 1, "not requeued");
        rng.queue_notify(0);
        assert_eq!(used(&vq).len(), 300);
        assert!(kicks[0].read().is_err(), "requeued with the queue empty");
    }
}
