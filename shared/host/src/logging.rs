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
