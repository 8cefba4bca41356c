//! Hostile descriptor chains against bulkhead-vmm's vsock device alone, over mock guest
//! memory: `run.sh vsock SECONDS RUNS`.
#![no_main]

use bulkhead_vmm::fuzzing::{queue, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = queue(Kind::Vsock, data);
});
