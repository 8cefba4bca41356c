//! Hostile kernel images (ELF and bzImage) and initramfs loaded into mock guest memory
//! the way a start loads them: `run.sh loader SECONDS RUNS`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bulkhead_vmm::fuzzing::loader(data);
});
