//! Hostile descriptor chains against bulkhead-vmm's rng device alone, over mock guest
//! memory: `run.sh rng SECONDS RUNS`.
#![no_main]

use bulkhead_vmm::fuzzing::{queue, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = queue(Kind::Rng, data);
});
