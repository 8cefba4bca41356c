//! `bulkhead`: the user-facing command.
//!
//! - `bulkhead run`, `ls`, `rm`, `exec`: containers in VMs through bulkheadd on D-Bus.
//! - `bulkhead check [--json]`: what this host can run, and why not.
//! - the runc-compatible OCI runtime commands (`create`, `start`, `state`, `kill`,
//!   `delete`, ...), so podman and dockerd can use bulkhead as their runtime.
//! - `bulkhead probe`: talk to a guest agent directly (test node, benchmarks).

mod attach;
mod check;
mod client;
mod image;
mod ls;
mod probe;
mod registry;
mod run;
mod stdio;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "bulkhead", version, about = "Containers in lightweight VMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a container in its own VM.
    Run(run::RunArgs),
    /// List live sandboxes.
    Ls(ls::LsArgs),
    /// Remove sandboxes.
    Rm(ls::RmArgs),
    /// What this host can run, and why not.
    Check(check::CheckArgs),
    /// Talk to a guest agent directly (tests and benchmarks).
    Probe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = match cli.cmd {
        Cmd::Run(a) => rt.block_on(run::run(a)),
        Cmd::Ls(a) => rt.block_on(ls::ls(a)).map(|_| 0),
        Cmd::Rm(a) => rt.block_on(ls::rm(a)),
        Cmd::Check(a) => check::check(a),
        Cmd::Probe { args } => probe::run(&args).map(|_| 0),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            // As docker and podman: 125 when the runtime failed, 137 when the container
            // was killed under us (its VM died).
            let lost = e.downcast_ref::<attach::SandboxLost>().is_some();
            std::process::exit(if lost { 137 } else { 125 });
        }
    }
}
