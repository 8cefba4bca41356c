//! Compile bulkheadd's reviewed seccomp policy into BPF at build time.

fn main() {
    bulkhead_seccomp::build::compile("seccomp/x86_64.json", &["bulkheadd"]);
}
