//! How the VMM starts its threads: named, and with stacks under 2 MiB, which no
//! transparent huge page can back (see `bulkhead_host::threads`; the nested node
//! showed a 2 MiB stack on a huge page in every VMM).

pub use bulkhead_host::threads::STACK_BYTES;

/// A builder for a VMM thread called `name`.
pub fn builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_BYTES)
}

#[cfg(test)]
mod tests {
    use bulkhead_host::threads::{report_stack_mapping, stack_mapping_in_child};

    #[test]
    fn stack_probe_child() {
        if std::env::var_os("BULKHEAD_STACK_PROBE").is_none() {
            return;
        }
        report_stack_mapping(|probe| {
            super::builder("probe")
                .spawn(probe)
                .unwrap()
                .join()
                .unwrap()
        });
    }

    #[test]
    fn a_vmm_thread_stack_cannot_hold_a_huge_page() {
        let size = stack_mapping_in_child(
            "threads::tests::stack_probe_child",
            "BULKHEAD_STACK_PROBE",
            None,
        );
        assert!(size < 2 << 20, "stack mapping of {size} bytes");
    }
}
