//! containerd-shim-bulkhead-v2: containerd's runtime `io.containerd.bulkhead.v2`.
//! See `lib.rs`.

fn main() {
    bulkhead_host::threads::small_thread_stacks();
    containerd_shim_bulkhead_v2::main();
}
