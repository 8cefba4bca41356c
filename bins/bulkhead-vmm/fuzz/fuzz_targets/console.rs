//! Hostile descriptor chains against bulkhead-vmm's console device alone, over mock guest
//! memory: `run.sh console SECONDS RUNS`.
#![no_main]

use bulkhead_vmm::fuzzing::{queue, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = queue(Kind::Console, data);
});
