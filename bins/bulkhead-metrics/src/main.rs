//! `bulkhead-metrics`: a Prometheus exporter fed over D-Bus. It reads bulkheadd's
//! sandbox objects (and, through them, the guest agents' container statistics, the
//! network back ends' counters and the VMMs' memory figures) and serves them at
//! `/metrics`. It holds no state of its own and needs no privilege: any local user may
//! read what it reads. The series are listed in docs/metrics.md.

mod cli;
mod http;
mod render;
mod snapshot;

fn main() -> std::process::ExitCode {
    bulkhead_host::threads::small_thread_stacks();
    cli::main()
}
