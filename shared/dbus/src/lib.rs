//! bulkhead's D-Bus API, shared by bulkheadd (which serves it) and its clients (the
//! `bulkhead` CLI, the shim, the metrics exporter).
//!
//! - `org.bulkhead.Manager1` at `/org/bulkhead/Manager1`: create, list, get and remove
//!   sandboxes; signals when one appears, changes state or goes. The same object serves
//!   `org.freedesktop.DBus.ObjectManager` over every sandbox object.
//! - `org.bulkhead.Sandbox1` at `/org/bulkhead/Manager1/sandbox/<escaped id>`: one object
//!   per sandbox, its state, backend, resources, containers and components as properties,
//!   and the container calls.
//! - Errors are named `org.bulkhead.Error.<Name>` ([`Error`]).
//! - Jailed components serve their own interfaces peer to peer ([`p2p`]), not on the
//!   bus: `org.bulkhead.Vmm1` ([`vmm`]) and `org.bulkhead.Net1` ([`net`]).
//!
//! The bus carries control only. A process's stdio and its exit status are handed to the
//! caller as file descriptors ([`Sandbox1Proxy::attach`]): the stream runs between the
//! caller and the guest, and outlives bulkheadd.
//!
//! Full reference: docs/dbus-api.md.

pub mod bus;
pub mod net;
pub mod options;
pub mod p2p;
mod path;
pub mod vmm;

use std::collections::HashMap;

use zbus::zvariant::{OwnedObjectPath, OwnedValue};

pub use options::{ContainerOptions, SandboxOptions};
pub use path::{escape_id, sandbox_path, unescape_id};

/// The manager's well-known name.
pub const MANAGER_NAME: &str = "org.bulkhead.Manager1";
/// The manager object's path.
pub const MANAGER_PATH: &str = "/org/bulkhead/Manager1";
/// Prefix of every sandbox object's path.
pub const SANDBOX_PATH_PREFIX: &str = "/org/bulkhead/Manager1/sandbox";
/// Prefix of every bulkhead error name.
pub const ERROR_PREFIX: &str = "org.bulkhead.Error";

/// Longest sandbox or container id accepted anywhere (the agent's limit).
pub const MAX_ID_LEN: usize = 128;

/// Named errors, `org.bulkhead.Error.<variant>`, each with a message naming the cause.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bulkhead.Error")]
pub enum Error {
    /// Transport or protocol failure (not a bulkhead error).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No sandbox, container or process by that id.
    NotFound(String),
    /// The id is taken.
    AlreadyExists(String),
    /// An argument is malformed or out of range.
    InvalidArgument(String),
    /// The object is in the wrong state for the call.
    FailedPrecondition(String),
    /// The caller may not make this call (mutating calls need uid 0).
    AccessDenied(String),
    /// The caller made more of the calls open to everyone than its rate allows (see
    /// the config's `api` section); try again later.
    LimitsExceeded(String),
    /// A host component (VMM, virtiofsd, a vhost-user back end) failed.
    Backend(String),
    /// The guest agent refused or failed the call.
    Agent(String),
    /// Anything else, with its cause.
    Failed(String),
}

/// Is `id` acceptable as a sandbox or container id? Same rule as runc: 1..=128 of
/// `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("id {id:?}: must be 1 to {MAX_ID_LEN} characters"));
    }
    if id.starts_with(['.', '-']) {
        return Err(format!("id {id:?}: must not start with '.' or '-'"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "id {id:?}: character {c:?} not allowed (use A-Z a-z 0-9 _ . -)"
        ));
    }
    Ok(())
}

/// A fresh id: 12 random hex digits (from the kernel's random pool).
pub fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        // No /dev/urandom: time and pid still make a collision unlikely.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 40);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One row of `ListSandboxes`: id, state, backend, object path.
pub type SandboxRow = (String, String, String, OwnedObjectPath);

/// The manager.
#[zbus::proxy(
    interface = "org.bulkhead.Manager1",
    default_service = "org.bulkhead.Manager1",
    default_path = "/org/bulkhead/Manager1"
)]
pub trait Manager1 {
    /// Create a sandbox (a VM with its components) and wait until its agent answers.
    /// An empty `id` asks the manager to pick one. Options: `backend` (s: "bulkhead-vmm",
    /// "qemu"), `cpus` (u), `memory_mib` (u).
    fn create_sandbox(
        &self,
        id: &str,
        options: HashMap<&str, zbus::zvariant::Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    /// Every live sandbox.
    fn list_sandboxes(&self) -> zbus::Result<Vec<SandboxRow>>;
    /// The object path of one sandbox.
    fn get_sandbox(&self, id: &str) -> zbus::Result<OwnedObjectPath>;
    /// Stop a sandbox's VM and components and forget it. Without `force`, refused while
    /// a container in it runs.
    fn remove_sandbox(&self, id: &str, force: bool) -> zbus::Result<()>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// The hypervisor backends this host can run, best first.
    #[zbus(property)]
    fn backends(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn state_directory(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn sandbox_new(&self, id: &str, path: zbus::zvariant::ObjectPath<'_>) -> zbus::Result<()>;
    #[zbus(signal)]
    fn sandbox_state_changed(
        &self,
        id: &str,
        path: zbus::zvariant::ObjectPath<'_>,
        state: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn sandbox_removed(
        &self,
        id: &str,
        path: zbus::zvariant::ObjectPath<'_>,
        reason: &str,
    ) -> zbus::Result<()>;
}

/// One sandbox.
#[zbus::proxy(
    interface = "org.bulkhead.Sandbox1",
    default_service = "org.bulkhead.Manager1"
)]
pub trait Sandbox1 {
    /// Create a container from an OCI runtime spec (config.json text). `rootfs` is a
    /// host directory; it reaches the guest over virtio-fs. Options: `stdin` (b),
    /// `terminal` (b, overrides the spec's `process.terminal`), `overlay` (b: `rootfs`
    /// is an image to keep read-only; the container writes to a private layer above it).
    /// Every host bind mount in the spec is carried into the guest the same way.
    /// Returns the init process's guest pid.
    fn create_container(
        &self,
        id: &str,
        spec_json: &str,
        rootfs: &str,
        options: HashMap<&str, zbus::zvariant::Value<'_>>,
    ) -> zbus::Result<u32>;
    fn start_container(&self, id: &str) -> zbus::Result<()>;
    /// Run an extra process (an OCI `process` object as JSON) in a running container;
    /// returns its guest pid.
    fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &str,
        options: HashMap<&str, zbus::zvariant::Value<'_>>,
    ) -> zbus::Result<u32>;
    /// `exec_id` empty: the container's init. `all`: every process of the container.
    fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> zbus::Result<()>;
    /// Hand the caller a file descriptor for one stream of a process: `stdin`,
    /// `stdout`, `stderr` (raw bytes), or `wait` (one agent frame arrives on it when the
    /// process exits: a postcard `Response::Exited`). The stream runs between the caller
    /// and the guest; bulkheadd is not in its path.
    fn attach(
        &self,
        id: &str,
        exec_id: &str,
        stream: &str,
    ) -> zbus::Result<zbus::zvariant::OwnedFd>;
    fn delete_container(&self, id: &str, force: bool) -> zbus::Result<()>;
    fn pause(&self, id: &str) -> zbus::Result<()>;
    fn resume(&self, id: &str) -> zbus::Result<()>;
    /// New cgroup limits: OCI `linux.resources` JSON.
    fn update(&self, id: &str, resources_json: &str) -> zbus::Result<()>;
    /// Guest pids of the container's processes.
    fn processes(&self, id: &str) -> zbus::Result<Vec<u32>>;
    /// Figures from the container's guest cgroup (names as in the agent's stats).
    fn stats(&self, id: &str) -> zbus::Result<HashMap<String, u64>>;
    /// Each pod interface's network back end counters, by guest interface name.
    fn network_stats(&self) -> zbus::Result<HashMap<String, HashMap<String, u64>>>;
    /// Each component's jail, as enforced and as seen live (JSON).
    fn security(&self) -> zbus::Result<String>;
    /// False while the guest's agent does not answer within its calls' deadlines.
    #[zbus(property)]
    fn healthy(&self) -> zbus::Result<bool>;
    /// The VM as its VMM reports it (`org.bulkhead.Vmm1`; bulkhead-vmm only): `state`,
    /// `memory` (a{ss}), `start_phases` (a(sdttdt)), `balloon` (a{sv}) and `hotplug` (a{sv}) when it has them.
    fn vm_status(&self) -> zbus::Result<HashMap<String, OwnedValue>>;
    /// Ask the guest to give `mib` MiB back through the balloon (0 deflates it).
    fn set_balloon_target(&self, mib: u64) -> zbus::Result<()>;
    /// Ask the guest to have `mib` MiB of its virtio-mem region plugged.
    fn set_hotplug_memory(&self, mib: u64) -> zbus::Result<()>;
    fn resize_pty(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> zbus::Result<()>;
    fn close_stdin(&self, id: &str, exec_id: &str) -> zbus::Result<()>;

    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// creating, running, stopping.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn cpus(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> zbus::Result<u32>;
    /// Creation time, microseconds since the Unix epoch.
    #[zbus(property)]
    fn created_at(&self) -> zbus::Result<u64>;
    /// (container id, state) for each container.
    #[zbus(property)]
    fn containers(&self) -> zbus::Result<Vec<(String, String)>>;
    /// (name, the component's own host pid, its supervising jailer's pid or 0) for
    /// each component process.
    #[zbus(property)]
    fn components(&self) -> zbus::Result<Vec<(String, u32, u32)>>;
    /// Start-up phases, microseconds from the CreateSandbox call: `components_started`,
    /// `vmm_exec`, `agent_ready`.
    #[zbus(property)]
    fn timings(&self) -> zbus::Result<HashMap<String, u64>>;

    /// A container's init exited with this status (128 + signal when killed).
    #[zbus(signal)]
    fn container_exited(&self, id: &str, status: i32) -> zbus::Result<()>;
    /// The guest's OOM killer killed a process of this container (one signal per kill).
    #[zbus(signal)]
    fn container_oom(&self, id: &str) -> zbus::Result<()>;
}

/// Read a typed option out of an `a{sv}` map.
pub fn option<T>(opts: &HashMap<String, OwnedValue>, key: &str) -> Result<Option<T>, Error>
where
    T: TryFrom<OwnedValue>,
{
    match opts.get(key) {
        None => Ok(None),
        Some(v) => v
            .try_clone()
            .map_err(|e| Error::InvalidArgument(format!("option {key}: {e}")))
            .and_then(|v| {
                T::try_from(v).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "option {key}: wrong type {}",
                        v_signature(opts.get(key))
                    ))
                })
            })
            .map(Some),
    }
}

fn v_signature(v: Option<&OwnedValue>) -> String {
    v.map(|v| v.value_signature().to_string())
        .unwrap_or_default()
}

/// Refuse options nobody asked for, so a typo is an error instead of a silent default.
pub fn known_options(opts: &HashMap<String, OwnedValue>, known: &[&str]) -> Result<(), Error> {
    match opts.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(Error::InvalidArgument(format!(
            "unknown option {k:?} (known: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("abc-1.2_x").is_ok());
        assert!(valid_id("").is_err());
        assert!(valid_id("-x").is_err());
        assert!(valid_id(".x").is_err());
        assert!(valid_id("a/b").is_err());
        assert!(valid_id("a b").is_err());
        assert!(valid_id(&"a".repeat(129)).is_err());
        assert!(valid_id(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn random_ids_are_valid_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 12);
        assert!(valid_id(&a).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn error_names() {
        use zbus::DBusError;
        assert_eq!(
            Error::NotFound("x".into()).name().as_str(),
            "org.bulkhead.Error.NotFound"
        );
        assert_eq!(
            Error::AccessDenied("x".into()).name().as_str(),
            "org.bulkhead.Error.AccessDenied"
        );
    }

    #[test]
    fn options_are_typed_and_checked() {
        let mut o = HashMap::new();
        o.insert("cpus".to_string(), OwnedValue::from(2u32));
        assert_eq!(option::<u32>(&o, "cpus").unwrap(), Some(2));
        assert_eq!(option::<u32>(&o, "memory_mib").unwrap(), None);
        assert!(option::<String>(&o, "cpus").is_err());
        assert!(known_options(&o, &["cpus"]).is_ok());
        assert!(known_options(&o, &["memory_mib"]).is_err());
    }
}
