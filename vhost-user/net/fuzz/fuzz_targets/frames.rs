//! `cargo +nightly fuzz run frames` (from vhost-user/net): hostile descriptor chains,
//! headers and frames against bulkhead-net's TX and RX paths.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bulkhead_vhost_net::fuzzing::frames(data);
});
