//! Hostile descriptor chains against bulkhead-vmm's virtio-mem device alone, over mock
//! guest memory: `run.sh mem SECONDS RUNS`.
#![no_main]

use bulkhead_vmm::fuzzing::{queue, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = queue(Kind::Mem, data);
});
