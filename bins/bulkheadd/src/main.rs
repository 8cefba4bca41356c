//! Thin entry point: flags, logging, the runtime; the work is in the library.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: bulkheadd [--state-dir DIR] [--bus-address ADDRESS] [--log-file FILE]
  --state-dir DIR        sandbox records, sockets, the embedded bus (default:
                         $BULKHEAD_ROOT or /run/bulkhead)
  --bus-address ADDRESS  the bus to serve on (default: the bus that activated us, else
                         the one `bulkhead` would pick)
  --log-file FILE        append logs here instead of stderr (an activated bulkheadd
                         has no useful stderr)
  --seccomp MODE         kill (default), log (calls outside bulkheadd's allow list go
                         through and the kernel logs them) or off; default from
                         $BULKHEADD_SECCOMP
BULKHEAD_LOG sets the log filter (default info).";

fn parse() -> Result<(bulkheadd::Options, Option<PathBuf>, bulkhead_seccomp::Mode)> {
    let mut state_dir = std::env::var_os("BULKHEAD_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| bulkhead_host::config::DEFAULT_STATE_DIR.into());
    let mut bus = None;
    let mut log_file = None;
    let mut seccomp =
        bulkhead_seccomp::Mode::from_env("BULKHEADD_SECCOMP").map_err(anyhow::Error::msg)?;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--state-dir" => state_dir = it.next().context("--state-dir needs a value")?.into(),
            "--bus-address" => bus = Some(it.next().context("--bus-address needs a value")?),
            "--log-file" => log_file = Some(it.next().context("--log-file needs a value")?.into()),
            "--seccomp" => {
                seccomp = it
                    .next()
                    .context("--seccomp needs a value")?
                    .parse()
                    .map_err(anyhow::Error::msg)?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let bus_address = bus
        .or_else(|| std::env::var("DBUS_STARTER_ADDRESS").ok())
        .unwrap_or_else(|| bulkhead_dbus::bus::choose(&state_dir).address);
    Ok((
        bulkheadd::Options {
            state_dir,
            bus_address,
        },
        log_file,
        seccomp,
    ))
}

fn init_logging(log_file: Option<&PathBuf>) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = bulkhead_host::logging::filter("info");
    let fmt = tracing_subscriber::fmt::layer().with_ansi(false);
    match log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))?;
            let fmt = fmt.with_writer(std::sync::Mutex::new(f));
            tracing_subscriber::registry().with(fmt).with(filter).init();
        }
        None => {
            let fmt = fmt.with_writer(std::io::stderr);
            tracing_subscriber::registry().with(fmt).with(filter).init();
        }
    }
    Ok(())
}

fn main() {
    bulkhead_host::threads::small_thread_stacks();
    let r = parse().and_then(|(opts, log_file, seccomp)| {
        init_logging(log_file.as_ref())?;
        bulkheadd::confine(seccomp, &opts.state_dir)?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(bulkheadd::serve(opts))
    });
    if let Err(e) = r {
        eprintln!("bulkheadd: {e:#}");
        std::process::exit(1);
    }
}
