//! bulkheadd: the manager. It owns `org.bulkhead.Manager1` on the bus, starts each
//! sandbox's components (VMM, virtiofsd, vhost-user back ends) as separate processes,
//! keeps every sandbox's record on disk, and adopts the sandboxes still running when it
//! starts again. See docs/ARCHITECTURE.md and docs/dbus-api.md.

pub mod agent;
pub mod api;
pub mod backend;
pub mod daemon;
pub mod events;
pub mod jail;
pub mod lifecycle;
pub mod limit;
pub mod memory;
pub mod mounts;
pub mod net;
pub mod spawner;
pub mod store;
pub mod supervisor;

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bulkhead_dbus::{MANAGER_NAME, MANAGER_PATH};

/// bulkheadd's seccomp policy (seccomp/x86_64.json), compiled by build.rs: one list,
/// `bulkheadd`, on every thread.
pub static SECCOMP: bulkhead_seccomp::Programs =
    bulkhead_seccomp::Programs(include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs")));

/// Find what the host can give virtiofsd (a fork), fork the spawner (the one process
/// that starts components, see `spawner.rs`), then put bulkheadd's own allow list on
/// every thread. Call it while bulkheadd has one thread, before the runtime: the forks
/// and the filter must come first.
pub fn confine(mode: bulkhead_seccomp::Mode, state_dir: &std::path::Path) -> Result<()> {
    use bulkhead_host::config::{Binary, Config};
    let cfg = Config::load()?;
    let run = state_dir.join("run");
    // Every sandbox's run directory is below it: root's alone (docs/security.md).
    bulkhead_host::private_dir(&run).with_context(|| format!("cannot create {}", run.display()))?;
    jail::probe_userns(&cfg, &run);
    let allowed = [
        Binary::BulkheadJailer,
        Binary::BulkheadVmm,
        Binary::Qemu,
        Binary::Virtiofsd,
        Binary::VhostDeviceVsock,
        Binary::BulkheadNet,
    ]
    .into_iter()
    .filter_map(|b| cfg.binary(b))
    .collect();
    let pid = spawner::start(allowed).context("cannot start the spawner")?;
    SECCOMP
        .install("bulkheadd", mode, true)
        .map_err(anyhow::Error::msg)?;
    tracing::info!(spawner = pid, seccomp = mode.as_str(), "confined");
    Ok(())
}

pub struct Options {
    pub state_dir: PathBuf,
    pub bus_address: String,
}

/// Serve until SIGTERM or SIGINT. Sandboxes keep running when bulkheadd stops: the next
/// bulkheadd adopts them.
pub async fn serve(opts: Options) -> Result<()> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("cannot create {}", opts.state_dir.display()))?;
    let lock = std::fs::File::create(opts.state_dir.join("bulkheadd.lock"))?;
    // SAFETY: flock on an fd we own; held for the life of the process.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another bulkheadd already serves {}",
            opts.state_dir.display()
        );
    }
    let cfg = bulkhead_host::config::Config::load()?;
    let d = daemon::Daemon::new(cfg, opts.state_dir.clone())?;
    let conn = zbus::connection::Builder::address(opts.bus_address.as_str())?
        .serve_at(MANAGER_PATH, api::ManagerIface { d: d.clone() })?
        .serve_at(MANAGER_PATH, zbus::fdo::ObjectManager)?
        .build()
        .await
        .with_context(|| format!("cannot connect to the bus at {}", opts.bus_address))?;
    let events = d.events.take().context("the daemon's events are taken")?;
    tokio::spawn(api::publish(conn.clone(), d.clone(), events));
    d.adopt().await;
    conn.request_name(MANAGER_NAME)
        .await
        .with_context(|| format!("cannot own {MANAGER_NAME} (another bulkheadd?)"))?;
    tracing::info!(
        bus = %opts.bus_address,
        state = %opts.state_dir.display(),
        backends = ?d.backends,
        "bulkheadd ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping; sandboxes keep running and are adopted by the next bulkheadd");
    drop(lock);
    Ok(())
}

#[cfg(test)]
mod seccomp_policy {
    #[test]
    fn the_policy_kills_exec_and_ptrace() {
        bulkhead_seccomp::testing::assert_files_and_sockets_but_no_exec(
            &super::SECCOMP,
            "bulkheadd",
        );
    }

    #[test]
    fn ioctl_only_for_nonblocking_sockets_and_making_taps() {
        use bulkhead_seccomp::testing::*;
        let taps = [FIONBIO, TUNSETIFF, TUNSETPERSIST, TUNSETVNETHDRSZ];
        assert_ioctls(&super::SECCOMP, "bulkheadd", &taps);
    }
}
