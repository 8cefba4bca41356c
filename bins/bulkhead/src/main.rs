//! `bulkhead`: the user-facing command.
//!
//! - `bulkhead run`, `ls`, `rm`, `exec`: containers in VMs through bulkheadd on D-Bus.
//! - `bulkhead check [--json]`: what this host can run, and why not.
//! - the runc-compatible OCI runtime commands (`create`, `start`, `state`, `kill`,
//!   `delete`, ...), so podman and dockerd can use bulkhead as their runtime.

mod attach;
mod auth;
mod check;
mod client;
mod hooks;
mod image;
mod inspect;
mod ls;
mod monitor;
mod oci;
mod registry;
mod run;
mod stdio;
mod vm;
mod zstd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "bulkhead", version, about = "Containers in lightweight VMs")]
struct Cli {
    #[command(flatten)]
    global: oci::Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a container in its own VM (with --bundle: runc's `run`).
    Run(run::RunArgs),
    /// Run a command in a running container.
    Exec(oci::ExecArgs),
    /// List live sandboxes.
    Ls(ls::LsArgs),
    /// How each host process of a sandbox is jailed (uids, capabilities, seccomp,
    /// landlock, namespaces), read live.
    Inspect(inspect::InspectArgs),
    /// The VM as its VMM reports it: guest RAM backing, start phases, the balloon
    /// (bulkhead-vmm); `--balloon MIB` asks the guest to give memory back.
    Vm(vm::VmArgs),
    /// Remove sandboxes.
    Rm(ls::RmArgs),
    /// What this host can run, and why not.
    Check(check::CheckArgs),
    /// OCI: create a container from a bundle (it waits for `start`).
    Create(oci::CreateArgs),
    /// OCI: start a created container.
    Start { id: String },
    /// OCI: the container's state as JSON.
    State { id: String },
    /// OCI: send a signal (default SIGTERM).
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// OCI: delete a container and its sandbox.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// OCI: the container's processes (guest pids).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
    },
    /// OCI: containers in --root.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// OCI: freeze a container's processes.
    Pause { id: String },
    /// OCI: thaw them.
    Resume { id: String },
    /// OCI: change a container's resource limits.
    Update(oci::UpdateArgs),
    /// OCI: resource usage, once (--stats) or every --interval.
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// OCI: what this runtime supports, as JSON.
    Features,
    #[command(name = "__monitor", hide = true)]
    Monitor(monitor::MonitorArgs),
}

fn main() {
    bulkhead_host::logging::init_stderr("warn");
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let g = cli.global;
    let r = match cli.cmd {
        Cmd::Run(a) => match a.bundle.clone() {
            Some(bundle) => rt.block_on(oci::run(&g, a.into_oci(bundle))),
            None => rt.block_on(run::run(a)),
        },
        Cmd::Exec(a) => rt.block_on(oci::exec(&g, a)),
        Cmd::Create(a) => rt.block_on(oci::create(&g, a)),
        Cmd::Start { id } => rt.block_on(oci::start(&g, &id)),
        Cmd::State { id } => rt.block_on(oci::state(&g, &id)),
        Cmd::Kill { all, id, signal } => rt.block_on(oci::kill(&g, &id, &signal, all)),
        Cmd::Delete { force, id } => rt.block_on(oci::delete(&g, &id, force)),
        Cmd::Ps { format, id } => rt.block_on(oci::ps(&g, &id, format == "json")),
        Cmd::List { format, quiet } => rt.block_on(oci::list(&g, quiet, format == "json")),
        Cmd::Pause { id } => rt.block_on(oci::pause(&g, &id, true)),
        Cmd::Resume { id } => rt.block_on(oci::pause(&g, &id, false)),
        Cmd::Update(a) => rt.block_on(oci::update(&g, a)),
        Cmd::Events {
            stats,
            interval,
            id,
        } => {
            let secs = interval.trim_end_matches('s').parse().unwrap_or(5);
            rt.block_on(oci::events(&g, &id, stats, secs))
        }
        Cmd::Features => oci::features(),
        Cmd::Monitor(a) => rt.block_on(monitor::monitor(a)),
        Cmd::Ls(a) => rt.block_on(ls::ls(a)).map(|_| 0),
        Cmd::Inspect(a) => rt.block_on(inspect::inspect(a)),
        Cmd::Vm(a) => rt.block_on(vm::vm(a)),
        Cmd::Rm(a) => rt.block_on(ls::rm(a)),
        Cmd::Check(a) => check::check(a),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            g.log_error(&e);
            eprintln!("bulkhead: {e:#}");
            // As docker and podman: 125 when the runtime failed, 137 when the container
            // was killed under us (its VM died).
            let lost = e.downcast_ref::<attach::SandboxLost>().is_some();
            std::process::exit(if lost { 137 } else { 125 });
        }
    }
}
