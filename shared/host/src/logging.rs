//! How our host programs log: tracing to stderr, filtered by `BULKHEAD_LOG` (tracing's
//! env-filter syntax, e.g. `debug` or `bulkhead_vmm=debug`), else a default level.

/// Install the stderr subscriber; `default` is the filter without `BULKHEAD_LOG`.
pub fn init_stderr(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
