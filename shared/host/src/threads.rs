//! Thread stacks under 2 MiB for our long-lived host processes.
//!
//! Rust's default thread stack is 2 MiB. On a kernel before 6.7 whose transparent huge
//! pages are `always` (Debian 12's 6.1, RHEL 9's 5.14), a 2 MiB stack mapping that
//! happens to sit on a 2 MiB boundary is backed by one huge page at its first touch:
//! 2 MiB resident for a few KiB of stack (the nested node showed one in every VMM).
//! A mapping smaller than 2 MiB can never hold a huge page.

/// The stack our threads get: far more than any of them uses, and under 2 MiB.
pub const STACK_BYTES: usize = 1 << 20;

/// Give every thread that does not choose its own stack size (the ones crates start:
/// tokio's blocking pool, ttrpc's, vhost-user-backend's workers) [`STACK_BYTES`],
/// unless `RUST_MIN_STACK` already says otherwise. Call it first in `main`, before any
/// thread starts: the standard library reads the variable once.
pub fn small_thread_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", STACK_BYTES.to_string());
    }
}

/// The size of the mapping in /proc/self/maps that holds `addr`.
#[cfg(any(test, feature = "testing"))]
pub fn mapping_size(addr: usize) -> Option<usize> {
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

/// The stack mapping's size of a thread `spawn` starts, in a fresh child process of
/// this test binary running `test` (glibc hands a new thread the cached stack of an
/// exited one, and a test binary is full of those). The child is the test `test` run
/// with `env` set and `RUST_MIN_STACK` as `min_stack` says; it prints
/// `STACK-MAPPING <bytes>`.
#[cfg(any(test, feature = "testing"))]
pub fn stack_mapping_in_child(test: &str, env: &str, min_stack: Option<&str>) -> usize {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture"])
        .env(env, "1")
        .env_remove("RUST_MIN_STACK");
    if let Some(v) = min_stack {
        cmd.env("RUST_MIN_STACK", v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("STACK-MAPPING ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size from the child: {text}"))
}

/// In the child [`stack_mapping_in_child`] starts: print the stack mapping's size of
/// the thread `spawn` starts.
#[cfg(any(test, feature = "testing"))]
pub fn report_stack_mapping(spawn: impl FnOnce(fn() -> Option<usize>) -> Option<usize>) {
    fn probe() -> Option<usize> {
        let local = 0u8;
        mapping_size(std::ptr::addr_of!(local) as usize)
    }
    let size = spawn(probe).expect("the stack is in /proc/self/maps");
    println!("STACK-MAPPING {size}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_child() {
        if std::env::var_os("BULKHEAD_SPAWN_CHILD").is_none() {
            return;
        }
        report_stack_mapping(|probe| std::thread::spawn(probe).join().unwrap());
    }

    #[test]
    fn env_child() {
        if std::env::var_os("BULKHEAD_ENV_CHILD").is_none() {
            return;
        }
        small_thread_stacks();
        println!("RUST_MIN_STACK={:?}", std::env::var("RUST_MIN_STACK"));
    }

    /// In a real `main` the variable is set before any thread starts; a test's child
    /// has its harness threads already, so the two halves are shown apart: what the
    /// call sets, and what a thread that does not ask gets with it.
    #[test]
    fn threads_that_do_not_ask_get_small_stacks() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "threads::tests::env_child", "--nocapture"])
            .env("BULKHEAD_ENV_CHILD", "1")
            .env_remove("RUST_MIN_STACK")
            .output()
            .unwrap();
        let want = format!("RUST_MIN_STACK=Ok(\"{STACK_BYTES}\")");
        assert!(String::from_utf8_lossy(&out.stdout).contains(&want));
        let small = STACK_BYTES.to_string();
        let size = stack_mapping_in_child(
            "threads::tests::spawn_child",
            "BULKHEAD_SPAWN_CHILD",
            Some(&small),
        );
        assert!(size < 2 << 20, "stack mapping of {size} bytes");
        let size =
            stack_mapping_in_child("threads::tests::spawn_child", "BULKHEAD_SPAWN_CHILD", None);
        assert!(
            size >= 2 << 20,
            "without it, a stack mapping of {size} bytes"
        );
    }
}
