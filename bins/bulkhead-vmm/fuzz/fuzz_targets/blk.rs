//! Hostile descriptor chains against bulkhead-vmm's blk device alone, over mock guest
//! memory: `run.sh blk SECONDS RUNS`.
#![no_main]

use bulkhead_vmm::fuzzing::{queue, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = queue(Kind::Blk, data);
});
