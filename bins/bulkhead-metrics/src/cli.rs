//! The `bulkhead-metrics` command line: bind the listening socket, install the seccomp
//! allow list, then serve scrapes on one thread.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::http::{serve, Exporter};
use crate::snapshot::Collector;

const USAGE: &str = "usage: bulkhead-metrics [--listen ADDR:PORT] [--bus ADDRESS] \
                     [--min-interval-ms MS] [--seccomp kill|log|off]
  --listen        where to serve /metrics (default 127.0.0.1:9469; port 0 picks one)
  --bus           the D-Bus address bulkheadd is on (default: the one `bulkhead` uses:
                  BULKHEAD_BUS_ADDRESS, the system bus, else the embedded bus under
                  BULKHEAD_ROOT); the exporter never starts the bus or bulkheadd
  --min-interval-ms  scrapes closer together get the last answer (default 1000)";

/// The default port: Prometheus exporters live in the 9100-9999 range.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9469";

/// bulkhead-metrics' seccomp policy (seccomp/x86_64.json), compiled by build.rs: one
/// list, put on the process's only thread once the socket is bound.
static SECCOMP: bulkhead_seccomp::Programs =
    bulkhead_seccomp::Programs(include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs")));

#[derive(Debug, PartialEq)]
struct Args {
    listen: SocketAddr,
    bus: Option<String>,
    min_interval: Duration,
    seccomp: bulkhead_seccomp::Mode,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        listen: DEFAULT_LISTEN.parse().expect("a valid address"),
        bus: None,
        min_interval: Duration::from_secs(1),
        seccomp: bulkhead_seccomp::Mode::default(),
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = val()?;
                a.listen = v.parse().map_err(|_| {
                    format!("--listen {v:?}: want ADDR:PORT, e.g. {DEFAULT_LISTEN}")
                })?;
            }
            "--bus" => a.bus = Some(val()?),
            "--min-interval-ms" => {
                let v = val()?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--min-interval-ms {v:?}: want milliseconds"))?;
                a.min_interval = Duration::from_millis(ms);
            }
            "--seccomp" => a.seccomp = val()?.parse()?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

pub fn main() -> ExitCode {
    bulkhead_host::logging::component_main("bulkhead-metrics", "info", parse, run)
}

fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let bound = listener.local_addr()?;
        SECCOMP
            .install("metrics", args.seccomp, true)
            .map_err(anyhow::Error::msg)?;
        let collector = Collector::new(args.bus, bulkhead_client::state_dir());
        tracing::info!(
            bus = %collector.address(),
            seccomp = args.seccomp.as_str(),
            "serving http://{bound}/metrics"
        );
        // The address on stdout, for whoever started us with port 0.
        println!("http://{bound}/metrics");
        let exporter = Arc::new(Exporter::new(collector, args.min_interval));
        serve(listener, exporter).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let a = args(&[]).unwrap();
        assert_eq!(a.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(a.min_interval, Duration::from_secs(1));
        assert_eq!(a.seccomp, bulkhead_seccomp::Mode::Kill);
        let a = args(&[
            "--listen",
            "[::1]:0",
            "--bus",
            "unix:path=/x",
            "--min-interval-ms",
            "0",
            "--seccomp",
            "log",
        ])
        .unwrap();
        assert_eq!(a.listen.to_string(), "[::1]:0");
        assert_eq!(a.bus.as_deref(), Some("unix:path=/x"));
        assert_eq!(a.min_interval, Duration::ZERO);
        assert!(args(&["--listen", "localhost"])
            .unwrap_err()
            .contains("ADDR:PORT"));
        assert!(args(&["--min-interval-ms", "-1"]).is_err());
        assert!(args(&["--bus"]).unwrap_err().contains("needs a value"));
        assert!(args(&["--port", "1"])
            .unwrap_err()
            .contains("unknown argument"));
    }

    #[test]
    fn the_policy_kills_what_an_exporter_never_does() {
        // It reads /proc and reconnects to the bus; it never execs or traces.
        bulkhead_seccomp::testing::assert_files_and_sockets_but_no_exec(&SECCOMP, "metrics");
        use bulkhead_seccomp::testing::{assert_ioctls, FIONBIO};
        assert_ioctls(&SECCOMP, "metrics", &[FIONBIO]);
    }
}
