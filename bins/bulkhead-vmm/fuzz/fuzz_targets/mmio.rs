//! A hostile driver's register accesses to the virtio-mmio transport (activation, reset,
//! queue setup, notifications, config space): `run.sh mmio SECONDS`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bulkhead_vmm::fuzzing::mmio(data);
});
