//! What a compromised guest may answer the host's agent client: `run.sh SECONDS RUNS`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bulkhead_protocol::fuzzing::agent_replies(data);
});
