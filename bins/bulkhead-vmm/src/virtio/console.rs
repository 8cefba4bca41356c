//! virtio-console: the guest's hvc0, written to a host file. Input is not wired yet.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::Queue;

use crate::legacy::{Capped, OUTPUT_CAP};
use vm_memory::GuestMemoryMmap;

use super::{
    drain_queue, ActivateError, Activation, Drained, Interrupt, Requeue, VirtioDevice,
    TYPE_CONSOLE, VIRTIO_F_VERSION_1,
};

const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;

pub struct Console {
    out: Capped<File>,
    active: Option<(GuestMemoryMmap, Vec<Queue>, Arc<Interrupt>)>,
    requeue: Requeue,
}

impl Console {
    /// Guest output goes to `out`, up to [`OUTPUT_CAP`] bytes.
    pub fn new(out: File) -> Self {
        Console {
            out: Capped::new(out, OUTPUT_CAP),
            active: None,
            requeue: Requeue::default(),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64, 64]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | super::VIRTIO_F_RING_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr
        super::read_config_bytes(&[80, 0, 25, 0, 1, 0, 0, 0], offset, data)
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        if act.queues.len() < 2 {
            return Err(ActivateError::Failed("console needs two queues".into()));
        }
        self.active = Some((act.mem, act.queues, act.interrupt));
        self.requeue = Requeue::new(act.kicks);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_notify(&mut self, queue: usize) {
        if queue == RECEIVEQ {
            return;
        }
        let Some((mem, qs, irq)) = self.active.as_mut() else {
            return;
        };
        let out = &mut self.out;
        let mut buf = [0u8; 4096];
        let end = drain_queue(mem, &mut qs[TRANSMITQ], irq, |chain| {
            let Ok(mut r) = chain.reader(mem) else {
                return 0;
            };
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    // Host-side write errors must not stop the guest.
                    Ok(n) => {
                        let _ = out.write_all(&buf[..n]);
                    }
                }
            }
            0
        });
        if end == Drained::BudgetSpent {
            self.requeue.later(TRANSMITQ);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn transmitted_bytes_reach_the_file() {
        let mem = test_mem();
        let p = tempfile::Builder::new()
            .prefix("bh-console-")
            .tempfile()
            .unwrap()
            .into_temp_path();
        let mut c = Console::new(File::create(&p).unwrap());
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        mem.write_slice(b"hello ", GuestAddress(0x100000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0x100100)).unwrap();
        txq.add_desc_chains(
            &[
                desc(0x100000, 6, F_NEXT, 1),
                desc(0x100100, 5, 0, 0),
                desc(0xffff_0000, 9, 0, 0),
            ],
            0,
        )
        .unwrap();
        let (act, _) = activation(
            &mem,
            vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()],
        );
        c.activate(act).unwrap();
        c.queue_notify(TRANSMITQ);
        assert_eq!(used(&txq).len(), 2);
        assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
    }
}
