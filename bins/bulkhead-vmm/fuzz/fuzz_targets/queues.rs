//! Hostile descriptor chains against each in-process virtio device of bulkhead-vmm (rng,
//! balloon, vsock, blk) over mock guest memory: `run.sh queues SECONDS`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bulkhead_vmm::fuzzing::queues(data);
});
