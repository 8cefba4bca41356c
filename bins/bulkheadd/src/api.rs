//! The D-Bus face of the daemon: `org.bulkhead.Manager1` and one `org.bulkhead.Sandbox1`
//! object per sandbox, under an ObjectManager. Each method checks the caller, reads its
//! arguments and calls into [`Daemon`]; nothing here holds state of its own.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bulkhead_dbus::{
    known_options, option, ContainerOptions, Error, SandboxOptions, SandboxRow, MANAGER_PATH,
};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue};
use zbus::{interface, Connection};

use crate::agent::Call;
use crate::daemon::{Daemon, NewContainer, Sandbox};
use crate::events::{Changed, Event, Sent};

pub struct ManagerIface {
    pub d: Arc<Daemon>,
}

#[interface(name = "org.bulkhead.Manager1")]
impl ManagerIface {
    async fn create_sandbox(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        let opts = SandboxOptions::from_dict(&options)?;
        self.d.create_sandbox(id, opts).await
    }

    async fn list_sandboxes(&self) -> Vec<SandboxRow> {
        self.d
            .list()
            .iter()
            .map(|sb| {
                let r = sb.snapshot();
                (r.id, r.state.as_str().into(), r.backend, sb.path.clone())
            })
            .collect()
    }

    async fn get_sandbox(&self, id: String) -> Result<OwnedObjectPath, Error> {
        Ok(self.d.get(&id)?.path.clone())
    }

    async fn remove_sandbox(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        force: bool,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.remove_sandbox(&id, force).await
    }

    #[zbus(property)]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }

    #[zbus(property)]
    async fn backends(&self) -> Vec<String> {
        self.d
            .backends
            .iter()
            .map(|b| b.as_str().to_string())
            .collect()
    }

    #[zbus(property)]
    async fn state_directory(&self) -> String {
        self.d.state_dir.display().to_string()
    }

    #[zbus(signal)]
    async fn sandbox_new(e: &SignalEmitter<'_>, id: &str, path: ObjectPath<'_>)
        -> zbus::Result<()>;

    #[zbus(signal)]
    async fn sandbox_state_changed(
        e: &SignalEmitter<'_>,
        id: &str,
        path: ObjectPath<'_>,
        state: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn sandbox_removed(
        e: &SignalEmitter<'_>,
        id: &str,
        path: ObjectPath<'_>,
        reason: &str,
    ) -> zbus::Result<()>;
}

pub struct SandboxIface {
    d: Arc<Daemon>,
    sb: Arc<Sandbox>,
}

/// An empty exec id names the container's init.
fn exec_id_opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[interface(name = "org.bulkhead.Sandbox1")]
impl SandboxIface {
    async fn create_container(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        spec_json: String,
        rootfs: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<u32, Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        let n = NewContainer {
            id,
            spec_json,
            rootfs,
            options: ContainerOptions::from_dict(&options)?,
        };
        self.d.create_container(&self.sb.id, n).await
    }

    async fn start_container(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.start_container(&self.sb.id, id).await
    }

    async fn exec(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        exec_id: String,
        process_json: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<u32, Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        known_options(&options, &["stdin"])?;
        let stdin = option::<bool>(&options, "stdin")?.unwrap_or(false);
        self.d
            .exec(&self.sb.id, id, exec_id, process_json, stdin)
            .await
    }

    async fn signal(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        exec_id: String,
        signal: i32,
        all: bool,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        if !(1..=64).contains(&signal) {
            return Err(Error::InvalidArgument(format!(
                "signal {signal}: want 1 to 64"
            )));
        }
        let cid = id.clone();
        let eid = exec_id_opt(exec_id);
        self.d
            .container_call(&self.sb.id, &id, Call::Read, move |c| {
                c.signal(&cid, eid.as_deref(), signal, all)
            })
            .await
    }

    async fn attach(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        exec_id: String,
        stream: String,
    ) -> Result<zbus::zvariant::OwnedFd, Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        let s = self
            .d
            .attach(&self.sb.id, id, exec_id_opt(exec_id), &stream)
            .await?;
        Ok(OwnedFd::from(s).into())
    }

    async fn delete_container(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        force: bool,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.delete_container(&self.sb.id, id, force).await
    }

    async fn pause(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.pause(&self.sb.id, id, true).await
    }

    async fn resume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.pause(&self.sb.id, id, false).await
    }

    async fn update(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        resources_json: String,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d
            .update_container(&self.sb.id, id, resources_json)
            .await
    }

    async fn processes(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
    ) -> Result<Vec<u32>, Error> {
        self.d.callers.open_call(conn, &hdr, "Processes").await?;
        let cid = id.clone();
        self.d
            .container_call(&self.sb.id, &id, Call::Read, move |c| c.processes(&cid))
            .await
    }

    /// Each pod interface's back end counters, by guest interface name (`eth0`...), read
    /// from its `bulkhead-net` over a peer connection. An interface whose back end is
    /// restarting at that moment is left out.
    async fn network_stats(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, HashMap<String, u64>>, Error> {
        self.d.callers.open_call(conn, &hdr, "NetworkStats").await?;
        self.d.network_stats(&self.sb.id).await
    }

    /// The VM as its VMM reports it over `org.bulkhead.Vmm1` (bulkhead-vmm only):
    /// `state` (s), `memory` (a{ss}: asked and got backing and pages, and why),
    /// `start_phases` (a(sdttdt)), with a balloon `balloon` (a{sv}), and with hot-plug
    /// memory `hotplug` (a{sv}).
    async fn vm_status(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, zbus::zvariant::OwnedValue>, Error> {
        self.d.callers.open_call(conn, &hdr, "VmStatus").await?;
        self.d.vm_status(&self.sb.id).await
    }

    /// Ask the guest to give `mib` MiB of its RAM back to the host through the balloon
    /// (0 deflates it). `InvalidArgument` at or above the VM's memory.
    async fn set_balloon_target(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        mib: u64,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.set_balloon_target(&self.sb.id, mib).await
    }

    /// Ask the guest to have `mib` MiB of its virtio-mem region plugged (a multiple of
    /// 2; 0 takes it all back). `FailedPrecondition` for a sandbox created without
    /// `hotplug_mib`; `InvalidArgument` past the region.
    async fn set_hotplug_memory(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        mib: u64,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        self.d.set_hotplug_memory(&self.sb.id, mib).await
    }

    /// Each component's jail as enforced and as seen live, as JSON (see
    /// docs/security.md): what `bulkhead inspect` prints.
    async fn security(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        self.d.callers.open_call(conn, &hdr, "Security").await?;
        // /proc reads of every component: off the runtime's thread, so a caller looping
        // on this open call holds up no other.
        let (d, id) = (self.d.clone(), self.sb.id.clone());
        tokio::task::spawn_blocking(move || d.security(&id))
            .await
            .map_err(|e| Error::Failed(format!("security task: {e}")))?
    }

    async fn stats(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
    ) -> Result<HashMap<String, u64>, Error> {
        self.d.callers.open_call(conn, &hdr, "Stats").await?;
        let cid = id.clone();
        let s = self
            .d
            .container_call(&self.sb.id, &id, Call::Read, move |c| c.stats(&cid))
            .await?;
        let pairs = [
            ("cpu_usage_usec", s.cpu_usage_usec),
            ("cpu_user_usec", s.cpu_user_usec),
            ("cpu_system_usec", s.cpu_system_usec),
            ("memory_current", s.memory_current),
            ("memory_limit", s.memory_limit),
            ("memory_oom_kills", s.memory_oom_kills),
            ("pids_current", s.pids_current),
            ("pids_limit", s.pids_limit),
            ("io_read_bytes", s.io_read_bytes),
            ("io_write_bytes", s.io_write_bytes),
        ];
        Ok(pairs
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect())
    }

    async fn resize_pty(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        exec_id: String,
        rows: u16,
        cols: u16,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        let cid = id.clone();
        let eid = exec_id_opt(exec_id);
        self.d
            .container_call(&self.sb.id, &id, Call::Read, move |c| {
                c.expect_ok(&bulkhead_protocol::Request::ResizePty {
                    id: cid,
                    exec_id: eid,
                    rows,
                    cols,
                })
            })
            .await
    }

    async fn close_stdin(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        id: String,
        exec_id: String,
    ) -> Result<(), Error> {
        self.d.callers.require_admin(conn, &hdr).await?;
        let cid = id.clone();
        let eid = exec_id_opt(exec_id);
        self.d
            .container_call(&self.sb.id, &id, Call::Read, move |c| {
                c.expect_ok(&bulkhead_protocol::Request::CloseStdin {
                    id: cid,
                    exec_id: eid,
                })
            })
            .await
    }

    #[zbus(property)]
    async fn id(&self) -> String {
        self.sb.id.clone()
    }

    #[zbus(property)]
    async fn state(&self) -> String {
        self.sb.snapshot().state.as_str().into()
    }

    #[zbus(property)]
    async fn backend(&self) -> String {
        self.sb.snapshot().backend
    }

    /// What carries the pod network's frames: `bulkhead-net` or `vhost-net`.
    #[zbus(property)]
    async fn net_backend(&self) -> String {
        self.sb.snapshot().net_backend.as_str().into()
    }

    #[zbus(property)]
    async fn cpus(&self) -> u32 {
        self.sb.snapshot().cpus
    }

    #[zbus(property, name = "MemoryMiB")]
    async fn memory_mib(&self) -> u32 {
        self.sb.snapshot().memory_mib
    }

    #[zbus(property)]
    async fn created_at(&self) -> u64 {
        self.sb.snapshot().created_at_us
    }

    #[zbus(property)]
    async fn containers(&self) -> Vec<(String, String)> {
        self.sb
            .snapshot()
            .containers
            .into_iter()
            .map(|c| (c.id, c.state.as_str().into()))
            .collect()
    }

    /// (name, the component's own host pid, its supervising jailer's pid): a pid is 0
    /// where there is none (no jailer; a jailer whose component is not running).
    #[zbus(property)]
    async fn components(&self) -> Vec<(String, u32, u32)> {
        self.sb
            .snapshot()
            .components
            .into_iter()
            .map(|c| {
                let (own, supervisor) = c.pids();
                (c.name, own.unwrap_or(0), supervisor.unwrap_or(0))
            })
            .collect()
    }

    /// False while the guest's agent does not answer within its calls' deadlines
    /// (`agent.*_timeout_s`): calls to it fail at once or at their deadline, and other
    /// sandboxes are not held up. True again at its next answer.
    #[zbus(property)]
    async fn healthy(&self) -> bool {
        *self.sb.agent.health().borrow()
    }

    #[zbus(property)]
    async fn timings(&self) -> HashMap<String, u64> {
        self.sb.snapshot().timings.into_iter().collect()
    }

    /// A container's init exited with this status (128 + signal when killed).
    #[zbus(signal)]
    async fn container_exited(e: &SignalEmitter<'_>, id: &str, status: i32) -> zbus::Result<()>;

    /// The guest's OOM killer killed a process of this container.
    #[zbus(signal)]
    async fn container_oom(e: &SignalEmitter<'_>, id: &str) -> zbus::Result<()>;
}

/// Publish the daemon's events on the bus, one at a time in the order sent, each
/// acknowledged once out (the daemon waits for that).
pub async fn publish(
    conn: Connection,
    d: Arc<Daemon>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Sent>,
) {
    while let Some((e, ack)) = events.recv().await {
        match e {
            Event::SandboxAdded(sb) => add_sandbox(&conn, &d, &sb).await,
            Event::SandboxRemoved { sb, reason } => remove_sandbox(&conn, &sb, &reason).await,
            Event::Changed { sb, what } => notify(&conn, &sb, what).await,
            Event::ContainerExited { sb, id, status } => {
                container_exited(&conn, &sb, &id, status).await
            }
            Event::ContainerOom { sb, id } => container_oom(&conn, &sb, &id).await,
        }
        let _ = ack.send(());
    }
}

/// Put a sandbox's object on the bus and announce it.
async fn add_sandbox(conn: &Connection, d: &Arc<Daemon>, sb: &Arc<Sandbox>) {
    let iface = SandboxIface {
        d: d.clone(),
        sb: sb.clone(),
    };
    if let Err(e) = conn.object_server().at(&sb.path, iface).await {
        tracing::error!(sandbox = %sb.id, "cannot export the sandbox object: {e}");
    }
    if let Ok(em) = SignalEmitter::new(conn, MANAGER_PATH) {
        let _ = ManagerIface::sandbox_new(&em, &sb.id, sb.path.as_ref()).await;
    }
}

/// Take a sandbox's object off the bus and announce why.
async fn remove_sandbox(conn: &Connection, sb: &Arc<Sandbox>, reason: &str) {
    let _ = conn
        .object_server()
        .remove::<SandboxIface, _>(&sb.path)
        .await;
    if let Ok(em) = SignalEmitter::new(conn, MANAGER_PATH) {
        let _ = ManagerIface::sandbox_removed(&em, &sb.id, sb.path.as_ref(), reason).await;
    }
}

/// Send PropertiesChanged for what changed (and the manager's state signal).
async fn notify(conn: &Connection, sb: &Arc<Sandbox>, what: Changed) {
    let Ok(iref) = conn
        .object_server()
        .interface::<_, SandboxIface>(&sb.path)
        .await
    else {
        return;
    };
    let em = iref.signal_emitter();
    let iface = iref.get().await;
    if what.state {
        let _ = iface.state_changed(em).await;
        if let Ok(m) = SignalEmitter::new(conn, MANAGER_PATH) {
            let state = sb.snapshot().state;
            let _ =
                ManagerIface::sandbox_state_changed(&m, &sb.id, sb.path.as_ref(), state.as_str())
                    .await;
        }
    }
    if what.containers {
        let _ = iface.containers_changed(em).await;
    }
    if what.components {
        let _ = iface.components_changed(em).await;
    }
    if what.health {
        let _ = iface.healthy_changed(em).await;
    }
}

async fn container_oom(conn: &Connection, sb: &Arc<Sandbox>, cid: &str) {
    if let Ok(em) = SignalEmitter::new(conn, sb.path.clone()) {
        let _ = SandboxIface::container_oom(&em, cid).await;
    }
}

async fn container_exited(conn: &Connection, sb: &Arc<Sandbox>, cid: &str, status: i32) {
    if let Ok(em) = SignalEmitter::new(conn, sb.path.clone()) {
        let _ = SandboxIface::container_exited(&em, cid, status).await;
    }
}
