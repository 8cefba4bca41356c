//! Compile the allow lists the jailer installs for programs that bring no filter of
//! their own (see seccomp/README.md).

fn main() {
    bulkhead_seccomp::build::compile("seccomp/x86_64.json", &["vhost-device-vsock"]);
}
