//! How the VMM starts its threads: named, and with stacks under 2 MiB.
//!
//! Rust's default thread stack is 2 MiB. On a kernel before 6.7 whose transparent huge
//! pages are `always` (Debian 12's 6.1), a 2 MiB stack mapping that happens to sit on a
//! 2 MiB boundary is backed by one huge page at its first touch: 2 MiB resident for a
//! few KiB of stack. The nested node showed it (one such stack per VMM, most of its
//! non-guest RSS). A mapping smaller than 2 MiB can never hold a huge page.

/// Every VMM thread's stack: far more than any of them uses, and under 2 MiB.
pub const STACK_BYTES: usize = 1 << 20;

/// A builder for a VMM thread called `name`.
pub fn builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_BYTES)
}

/// The size of the mapping in /proc/self/maps that holds `addr`.
#[cfg(test)]
pub(crate) fn mapping_size(addr: usize) -> Option<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        );
        (lo..hi).contains(&addr).then_some(hi - lo)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run as a child by `a_vmm_thread_stack_cannot_hold_a_huge_page`: in a process of
    /// its own, since glibc hands a new thread a cached stack of an exited one, which in
    /// a test binary full of threads may be a 2 MiB one.
    #[test]
    fn stack_probe_child() {
        if std::env::var_os("BULKHEAD_STACK_PROBE").is_none() {
            return;
        }
        let size = builder("probe")
            .spawn(|| {
                let local = 0u8;
                mapping_size(std::ptr::addr_of!(local) as usize)
            })
            .unwrap()
            .join()
            .unwrap()
            .expect("the stack is in /proc/self/maps");
        println!("STACK-MAPPING {size}");
    }

    #[test]
    fn a_vmm_thread_stack_cannot_hold_a_huge_page() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "threads::tests::stack_probe_child",
                "--nocapture",
            ])
            .env("BULKHEAD_STACK_PROBE", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let size: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("STACK-MAPPING ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no size from the child: {text}"));
        assert!(size < 2 << 20, "stack mapping of {size} bytes");
    }

    #[test]
    fn the_default_stack_could() {
        // What the builder exists for: a thread with Rust's default stack has a
        // mapping of 2 MiB or more (when RUST_MIN_STACK does not say otherwise).
        if std::env::var_os("RUST_MIN_STACK").is_some() {
            return;
        }
        let size = std::thread::spawn(|| {
            let local = 0u8;
            mapping_size(std::ptr::addr_of!(local) as usize)
        })
        .join()
        .unwrap()
        .unwrap();
        assert!(size >= 2 << 20, "stack mapping of {size} bytes");
    }
}
