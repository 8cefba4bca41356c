//! Compile the reviewed seccomp policy into BPF at build time (see seccomp/README.md).

fn main() {
    bulkhead_seccomp::build::compile("seccomp/x86_64.json", &["main", "vcpu", "worker", "api"]);
}
