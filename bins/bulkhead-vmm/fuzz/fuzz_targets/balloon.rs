//! Hostile descriptor chains against bulkhead-vmm's balloon device alone, over mock guest
//! memory: `run.sh balloon SECONDS RUNS`.
#![no_main]

use bulkhead_vmm::fuzzing::{queue, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = queue(Kind::Balloon, data);
});
