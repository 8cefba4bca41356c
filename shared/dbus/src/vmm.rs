//! `org.bulkhead.Vmm1`: a running `bulkhead-vmm`'s control interface, served on a
//! peer-to-peer connection over the VMM's own socket (`<run>/vm/api.sock`, given with
//! `--api-socket`), never on the bus. bulkheadd uses it for `Sandbox1.VmStatus` and
//! `Sandbox1.SetBalloonTarget`; `busctl --address=unix:path=<socket>` reads it too.
//! Errors are the manager's named errors (`org.bulkhead.Error.*`).

use std::collections::HashMap;

use zbus::zvariant::OwnedValue;

/// Where the object lives on the peer connection.
pub const VMM_PATH: &str = "/org/bulkhead/Vmm1";
/// The interface name.
pub const VMM_INTERFACE: &str = "org.bulkhead.Vmm1";

/// One start phase: name, milliseconds since the VMM's `main`, minor and major page
/// faults, process CPU milliseconds, and huge-page KiB in use (0: not measured there).
pub type PhaseRow = (String, f64, u64, u64, f64, u64);

#[zbus::proxy(interface = "org.bulkhead.Vmm1", default_path = "/org/bulkhead/Vmm1")]
pub trait Vmm1 {
    /// Stop every vCPU (fails, leaving the VM running, if they do not stop in 2 s).
    fn pause(&self) -> zbus::Result<()>;
    fn resume(&self) -> zbus::Result<()>;
    /// End the VM; the VMM exits with status 5 (stopped on request) just after replying.
    fn shutdown(&self) -> zbus::Result<()>;
    /// How guest RAM is backed: `asked_backing`, `asked_hugepages`, `backing`
    /// (private|shared), `pages` (thp|hugetlb-2m|4k) and `why`.
    fn memory(&self) -> zbus::Result<HashMap<String, String>>;
    /// The start phases so far, in order.
    fn start_phases(&self) -> zbus::Result<Vec<PhaseRow>>;
    /// The balloon's figures: `active` (b), `target_mib`, `actual_mib` (t), `features`
    /// (as), `inflated_bytes`, `reported_bytes`, `refused`, `discard_errors` (t), `stats`
    /// (a{st}, the guest's last statistics) and `stats_age_ms` (t, once the guest sent
    /// any). `FailedPrecondition` when the VM has no balloon.
    fn balloon(&self) -> zbus::Result<HashMap<String, OwnedValue>>;
    /// Ask the guest to give `mib` MiB to the balloon (0 deflates it fully).
    fn set_balloon_target(&self, mib: u64) -> zbus::Result<()>;
    /// The virtio-mem device's figures: `active` (b), `addr`, `region_mib`,
    /// `requested_mib`, `plugged_mib` (what the guest has plugged), `plugs`, `unplugs`,
    /// `refused`, `discard_errors` (t). `FailedPrecondition` when the VM has none.
    fn hotplug_memory(&self) -> zbus::Result<HashMap<String, OwnedValue>>;
    /// Ask the guest to have `mib` MiB of the hot-plug region plugged (a multiple of 2;
    /// 0 asks it to give all of it back).
    fn set_hotplug_memory(&self, mib: u64) -> zbus::Result<()>;

    /// `running` or `paused`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn cpus(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> zbus::Result<u64>;
    /// Whether the VM has a balloon device.
    #[zbus(property)]
    fn has_balloon(&self) -> zbus::Result<bool>;
}

/// A proxy for the VMM serving `socket`, connected within `timeout`.
pub async fn connect(
    socket: &std::path::Path,
    timeout: std::time::Duration,
) -> zbus::Result<Vmm1Proxy<'static>> {
    let conn = crate::p2p::connect(socket, timeout).await?;
    // A peer connection has no bus names; any destination reaches the peer. Properties
    // are read fresh each time: there is no bus to send change signals through.
    Vmm1Proxy::builder(&conn)
        .destination(VMM_INTERFACE)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}
