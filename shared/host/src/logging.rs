//! How our host programs log: tracing to stderr, filtered by `BULKHEAD_LOG` (a level, and
//! levels per module: `debug`, or `info,bulkhead_vmm=debug`), else a default level.
//!
//! The filter is tracing-subscriber's `Targets`, not its `EnvFilter`: the same syntax
//! for levels and modules without span and field filters, and without the regex engine
//! EnvFilter links in, which every VMM would otherwise map and run at start.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter `BULKHEAD_LOG` asks for, else `default`; a value that does not parse is
/// reported on stderr and `default` used.
pub fn filter(default: &str) -> Targets {
    let (filter, error) = parse_filter(std::env::var("BULKHEAD_LOG").ok().as_deref(), default);
    if let Some(e) = error {
        eprintln!("BULKHEAD_LOG is not a log filter ({e}); using {default:?}");
    }
    filter
}

/// `value` as a filter, else `default`, with why `value` was not used.
fn parse_filter(value: Option<&str>, default: &str) -> (Targets, Option<String>) {
    let fallback = || default.parse::<Targets>().unwrap_or_default();
    match value.map(str::trim) {
        Some(v) if !v.is_empty() => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (fallback(), Some(format!("{v:?}: {e}"))),
        },
        _ => (fallback(), None),
    }
}

/// Install the stderr subscriber; `default` is the filter without `BULKHEAD_LOG`.
/// Warnings and errors that crates log through `log` (virtio-queue's, on rings a guest
/// broke, among them) come through too, at most [`LOG_BURST`] lines per window.
pub fn init_stderr(default: &str) {
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter(default))
        .init();
    if log::set_logger(&LOG_BRIDGE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Lines from `log` passed on per [`LOG_WINDOW_SECS`]: what those crates log, a guest
/// can often cause, and the host's log is not its to fill.
pub const LOG_BURST: u32 = 20;
pub const LOG_WINDOW_SECS: u64 = 10;

/// Passes `log` records on to tracing, rate-limited. (tracing-log does the passing in
/// general; it is not among the crates this build can use, and adds no limit.)
struct LogBridge {
    /// (window start in seconds since the epoch, lines passed in it, lines left out)
    state: std::sync::Mutex<(u64, u32, u64)>,
}

static LOG_BRIDGE: LogBridge = LogBridge {
    state: std::sync::Mutex::new((0, 0, 0)),
};

impl LogBridge {
    /// Whether a line may pass at `now_s`, and how many were left out before it.
    fn admit(&self, now_s: u64) -> Option<u64> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now_s >= g.0 + LOG_WINDOW_SECS {
            *g = (now_s, 0, g.2);
        }
        if g.1 >= LOG_BURST {
            g.2 += 1;
            return None;
        }
        g.1 += 1;
        Some(std::mem::take(&mut g.2))
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(left_out) = self.admit(now_s) else {
            return;
        };
        let target = r.target();
        if r.level() == log::Level::Error {
            tracing::error!(target: "log", from = target, left_out, "{}", r.args());
        } else {
            tracing::warn!(target: "log", from = target, left_out, "{}", r.args());
        }
    }

    fn flush(&self) {}
}

/// A component's `main`: logging set up, the arguments parsed by `parse` (a usage
/// error is printed and exits 2), then `run` (an error is logged and exits 1).
pub fn component_main<A, E: std::fmt::Display>(
    name: &str,
    default_level: &str,
    parse: impl FnOnce(std::env::Args) -> Result<A, String>,
    run: impl FnOnce(A) -> Result<(), E>,
) -> std::process::ExitCode {
    init_stderr(default_level);
    let mut argv = std::env::args();
    argv.next();
    let args = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod filter_tests {
    use super::parse_filter;
    use tracing::Level;

    #[test]
    fn levels_per_module_and_a_default() {
        let (t, e) = parse_filter(Some("warn,bulkhead_vmm=debug"), "info");
        assert!(e.is_none());
        assert!(t.would_enable("bulkhead_vmm::cpu", &Level::DEBUG));
        assert!(!t.would_enable("bulkhead_vmm::cpu", &Level::TRACE));
        assert!(t.would_enable("zbus", &Level::WARN));
        assert!(!t.would_enable("zbus", &Level::INFO));
    }

    #[test]
    fn unset_or_empty_takes_the_default() {
        for v in [None, Some(""), Some("  ")] {
            let (t, e) = parse_filter(v, "info");
            assert!(e.is_none());
            assert!(t.would_enable("x", &Level::INFO));
            assert!(!t.would_enable("x", &Level::DEBUG));
        }
    }

    #[test]
    fn a_bad_value_is_reported_and_the_default_used() {
        let (t, e) = parse_filter(Some("bulkhead_vmm=loud"), "warn");
        assert!(e.unwrap().contains("bulkhead_vmm=loud"));
        assert!(t.would_enable("bulkhead_vmm", &Level::WARN));
        assert!(!t.would_enable("bulkhead_vmm", &Level::INFO));
    }
}

/// The lines tracing writes while `f` runs on this thread (tests of what a component
/// logs).
#[cfg(any(test, feature = "testing"))]
pub fn log_lines(f: impl FnOnce()) -> Vec<String> {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(sub, f);
    let bytes = buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_crates_log_reaches_our_log() {
        use log::Log;
        let bridge = LogBridge {
            state: std::sync::Mutex::new((0, 0, 0)),
        };
        let text = log_lines(|| {
            bridge.log(
                &log::Record::builder()
                    .args(format_args!(
                        "attempt to use virtio queue that is not marked ready"
                    ))
                    .level(log::Level::Error)
                    .target("virtio_queue::queue")
                    .build(),
            );
            bridge.log(
                &log::Record::builder()
                    .args(format_args!("chatter"))
                    .level(log::Level::Info)
                    .target("virtio_queue::queue")
                    .build(),
            );
        })
        .join("\n");
        assert!(
            text.contains("ERROR") && text.contains("not marked ready"),
            "{text}"
        );
        assert!(text.contains("virtio_queue::queue"), "{text}");
        assert!(!text.contains("chatter"), "info lines pass: {text}");
    }

    #[test]
    fn log_lines_pass_a_burst_per_window_and_count_the_rest() {
        let b = LogBridge {
            state: std::sync::Mutex::new((0, 0, 0)),
        };
        let passed = (0..1000).filter(|_| b.admit(100).is_some()).count();
        assert_eq!(passed, LOG_BURST as usize);
        // The next window's first line says how many were left out.
        assert_eq!(
            b.admit(100 + LOG_WINDOW_SECS),
            Some(1000 - u64::from(LOG_BURST))
        );
        assert_eq!(b.admit(100 + LOG_WINDOW_SECS), Some(0));
    }
}
