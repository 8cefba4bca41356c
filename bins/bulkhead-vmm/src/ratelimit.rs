//! Log lines a guest can cause, limited. A guest that kicks a broken queue a million
//! times a second, or resets and re-activates a device in a loop, would otherwise write
//! a log line each time into a file on the host: a guest-paid way to fill the host's
//! disk. Each such call site gets its own [`RateLimit`] (through [`log_limited!`],
//! [`warn_limited!`] and [`info_limited!`]): a burst of [`BURST`] lines per
//! [`WINDOW_MS`], then nothing until the next window, whose first line says how many
//! were left out.
//!
//! Written here rather than taken from a crate: tracing has no limiter of its own, and
//! this is one atomic word and a compare-exchange.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines let through per window, per call site.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW_MS: u64 = 10_000;

/// One call site's budget: the window it is in, the lines let through in it, and the
/// lines left out since the last one let through, packed in one word (window 32 bits,
/// count 8, left out 24) so that threads share it without a lock.
pub struct RateLimit(AtomicU64);

impl RateLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> RateLimit {
        RateLimit(AtomicU64::new(0))
    }

    /// At `now_ms`: `Some(left_out)` to log (with the number of lines left out since the
    /// last logged one), `None` to stay quiet.
    pub fn admit(&self, now_ms: u64) -> Option<u64> {
        // Windows are numbered from 1, so the zeroed state is "no window yet".
        let window = (now_ms / WINDOW_MS + 1) & 0xffff_ffff;
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (w, count, skipped) = (cur >> 32, (cur >> 24) & 0xff, cur & 0xff_ffff);
            let (next, out) = if w != window {
                (window << 32 | 1 << 24, Some(skipped))
            } else if count < u64::from(BURST) {
                (w << 32 | (count + 1) << 24, Some(skipped))
            } else {
                (w << 32 | count << 24 | (skipped + 1).min(0xff_ffff), None)
            };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return out,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Milliseconds on the process's monotonic clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A tracing event at `$level`, at most [`BURST`] times per [`WINDOW_MS`] from this
/// call site; the first one after a quiet spell carries `left_out`.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(left_out) = LIMIT.admit($crate::ratelimit::now_ms()) {
            if left_out > 0 {
                tracing::event!($level, left_out, $($arg)+);
            } else {
                tracing::event!($level, $($arg)+);
            }
        }
    }};
}

/// `tracing::warn!`, limited as [`log_limited!`] says.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(tracing::Level::WARN, $($arg)+) };
}

/// `tracing::info!`, limited as [`log_limited!`] says.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!(tracing::Level::INFO, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let l = RateLimit::new();
        let first: Vec<_> = (0..1000).map(|i| l.admit(i)).collect();
        assert_eq!(first.iter().filter(|x| x.is_some()).count(), BURST as usize);
        assert!(first[..BURST as usize].iter().all(|x| *x == Some(0)));
        // The next window: the first line carries how many were left out.
        assert_eq!(l.admit(WINDOW_MS), Some(1000 - u64::from(BURST)));
        assert_eq!(l.admit(WINDOW_MS + 1), Some(0));
        // A quiet stretch of many windows starts afresh.
        assert_eq!(l.admit(50 * WINDOW_MS), Some(0));
    }

    #[test]
    fn threads_share_one_budget() {
        let l = std::sync::Arc::new(RateLimit::new());
        let let_through: usize = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| l.admit(5).is_some()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(let_through, BURST as usize);
    }

    #[test]
    fn the_left_out_count_saturates_instead_of_wrapping() {
        let l = RateLimit::new();
        for _ in 0..(BURST as u64 + 0x100_0005) {
            l.admit(1);
        }
        assert_eq!(l.admit(WINDOW_MS + 1), Some(0xff_ffff));
    }
}
