//! Shared by the runtime test list and the start-up benchmark: a private environment
//! (state directory, embedded bus, guest image, busybox rootfs and images, registry).

pub mod bench;
pub mod ctrd;
pub mod env;
