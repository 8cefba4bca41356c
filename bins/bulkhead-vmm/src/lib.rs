//! bulkhead-vmm: a KVM virtual machine monitor for bulkhead sandboxes, built on rust-vmm
//! crates. See docs/ARCHITECTURE.md for where it sits.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod control;
pub mod cpu;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod ratelimit;
pub mod seccomp;
pub mod startup;
pub mod threads;
pub mod virtio;
pub mod vmm;
