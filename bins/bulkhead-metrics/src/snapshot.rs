//! One scrape's figures, read from bulkheadd over D-Bus: every sandbox object's
//! properties in one `GetManagedObjects`, then, per sandbox, its containers' `Stats`,
//! its `NetworkStats` and (on `bulkhead-vmm`) its `VmStatus`, plus the host CPU and RSS
//! of its components from /proc.
//!
//! Everything here comes from other processes (and, through the agent and the VMM, from
//! the guest), so it is read by name and type, lists are bounded, and a call that fails
//! or hangs costs that series, never the scrape.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_dbus::{Sandbox1Proxy, MANAGER_NAME, MANAGER_PATH};
use bulkhead_proctree::{tree_usage, Usage};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use zbus::zvariant::{OwnedValue, Value};

/// More sandboxes than this in one scrape are left out (and logged): a bound on the
/// exporter's memory, far above what one node runs.
pub const MAX_SANDBOXES: usize = 4096;
/// Containers, interfaces and guest statistics read per sandbox, at most.
const MAX_PER_SANDBOX: usize = 256;
/// Sandboxes whose calls are in flight at once: a scrape never floods bulkheadd.
const PARALLEL_SANDBOXES: usize = 8;

/// What one scrape saw.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `None`: the manager is not on the bus (or the bus is not there).
    pub manager: Option<Manager>,
    /// Calls that failed or timed out in this scrape (their series are left out).
    pub failed_calls: u64,
}

#[derive(Debug, Default)]
pub struct Manager {
    pub version: String,
    pub sandboxes: Vec<Sandbox>,
}

#[derive(Debug, Default)]
pub struct Sandbox {
    pub id: String,
    pub backend: String,
    pub state: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Microseconds since the epoch.
    pub created_at_us: u64,
    /// Microseconds after CreateSandbox: `vmm_exec`, `components_started`, `agent_ready`.
    pub timings: BTreeMap<String, u64>,
    pub components: Vec<Component>,
    pub containers: Vec<Container>,
    /// Per guest interface, its back end's counters.
    pub network: BTreeMap<String, BTreeMap<String, u64>>,
    pub vm: Option<Vm>,
}

#[derive(Debug, Default)]
pub struct Component {
    pub name: String,
    /// The component's own process (0 when it is not running).
    pub pid: u32,
    /// Its supervising jailer (0 when none). Usage counts this tree, which holds the
    /// component.
    pub supervisor: u32,
    /// `None` when the process is not there (pid 0, or gone).
    pub usage: Option<Usage>,
}

#[derive(Debug, Default)]
pub struct Container {
    pub id: String,
    pub state: String,
    /// `Sandbox1.Stats`: `cpu_usage_usec`, `memory_current`, ... (absent keys: unknown).
    pub stats: BTreeMap<String, u64>,
}

/// What `bulkhead-vmm` reports through `Sandbox1.VmStatus`.
#[derive(Debug, Default)]
pub struct Vm {
    /// `backing` (private|shared) and `pages` (thp|hugetlb-2m|4k).
    pub backing: String,
    pub pages: String,
    /// Start phases: name → seconds since the VMM's main.
    pub start_phases: Vec<(String, f64)>,
    /// Balloon figures (`target_mib`, `actual_mib`, `inflated_bytes`, `reported_bytes`,
    /// `refused`, `discard_errors`); empty without a balloon.
    pub balloon: BTreeMap<String, u64>,
    /// virtio-mem figures (`region_mib`, `requested_mib`, `plugged_mib`, `plugs`,
    /// `unplugs`, `refused`, and the manager's `limits_mib` and `short_mib`); empty
    /// without hot-plug memory.
    pub hotplug: BTreeMap<String, u64>,
    /// The guest's own memory statistics, as its balloon driver last sent them.
    pub guest: BTreeMap<String, u64>,
}

/// Whether `key` is a figure of `table` (render's): what the exporter publishes is
/// what it keeps.
fn known(table: &[crate::render::Figure], key: &str) -> bool {
    table.iter().any(|f| f.0 == key)
}

/// Guest statistics passed on (virtio-balloon's names, as the VMM gives them).
pub const GUEST_STATS: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// `GetManagedObjects`' answer.
type ManagedObjects = HashMap<
    zbus::zvariant::OwnedObjectPath,
    HashMap<zbus::names::OwnedInterfaceName, HashMap<String, OwnedValue>>,
>;

/// Reads the manager; keeps one bus connection, opened again after a failure.
pub struct Collector {
    address: Option<String>,
    state_dir: PathBuf,
    conn: Option<zbus::Connection>,
    /// The bound on each D-Bus call.
    pub call_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Bus(#[from] zbus::Error),
    #[error("{0}")]
    Fdo(#[from] zbus::fdo::Error),
    #[error("bulkheadd is not on the bus")]
    NoManager,
    #[error("no answer in {0:?}")]
    Timeout(Duration),
    #[error("no reply")]
    NoReply,
}

impl Collector {
    /// `address`: the bus to read (else the one the CLI would use, found without
    /// starting anything).
    pub fn new(address: Option<String>, state_dir: PathBuf) -> Collector {
        Collector {
            address,
            state_dir,
            conn: None,
            call_timeout: Duration::from_secs(2),
        }
    }

    /// The bus address in use.
    pub fn address(&self) -> String {
        self.address
            .clone()
            .unwrap_or_else(|| bulkhead_dbus::bus::choose(&self.state_dir).address)
    }

    pub async fn collect(&mut self) -> Snapshot {
        let conn = match &self.conn {
            Some(c) => c.clone(),
            None => {
                let address = self.address();
                let connect = bulkhead_dbus::bus::connect(&address);
                match tokio::time::timeout(self.call_timeout, connect).await {
                    Ok(Ok(c)) => {
                        tracing::info!(%address, "connected to the bus");
                        self.conn = Some(c.clone());
                        c
                    }
                    Ok(Err(e)) => {
                        tracing::debug!("{e}");
                        return Snapshot::default();
                    }
                    Err(_) => {
                        tracing::warn!(%address, "the bus did not answer");
                        return Snapshot::default();
                    }
                }
            }
        };
        match read_manager(&conn, self.call_timeout).await {
            Ok((manager, failed_calls)) => Snapshot {
                manager: Some(manager),
                failed_calls,
            },
            Err(e) => {
                tracing::debug!("manager not read: {e}");
                if !matches!(e, ReadError::NoManager) {
                    // The bus itself may be gone: open a new connection next time.
                    self.conn = None;
                }
                Snapshot::default()
            }
        }
    }
}

async fn bounded<T, E>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ReadError>
where
    ReadError: From<E>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(ReadError::from),
        Err(_) => Err(ReadError::Timeout(limit)),
    }
}

/// A method call that never D-Bus-activates its destination (`NO_AUTO_START`): a
/// manager that went away between `NameHasOwner` and the call is an error here, not a
/// new bulkheadd started by a scrape.
async fn call<B, R>(
    proxy: &zbus::Proxy<'_>,
    method: &str,
    body: &B,
    limit: Duration,
) -> Result<R, ReadError>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
    R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
{
    let flags = zbus::proxy::MethodFlags::NoAutoStart.into();
    bounded(limit, proxy.call_with_flags::<_, B, R>(method, flags, body))
        .await?
        .ok_or(ReadError::NoReply)
}

async fn read_manager(
    conn: &zbus::Connection,
    limit: Duration,
) -> Result<(Manager, u64), ReadError> {
    // Never D-Bus-activate bulkheadd from a scrape: a stopped manager is reported as down.
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let name = zbus::names::BusName::try_from(MANAGER_NAME).map_err(zbus::Error::from)?;
    if !bounded(limit, dbus.name_has_owner(name)).await? {
        return Err(ReadError::NoManager);
    }
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(MANAGER_NAME)?
        .path(MANAGER_PATH)?
        .build()
        .await?;
    let version: OwnedValue = call(
        props.inner(),
        "Get",
        &("org.bulkhead.Manager1", "Version"),
        limit,
    )
    .await?;
    let version = string(&version).unwrap_or_default();
    let om = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(MANAGER_NAME)?
        .path(MANAGER_PATH)?
        .build()
        .await?;
    let objects: ManagedObjects = call(om.inner(), "GetManagedObjects", &(), limit).await?;
    let mut sandboxes: Vec<(String, Sandbox)> = objects
        .into_iter()
        .filter_map(|(path, ifaces)| {
            let props = ifaces
                .into_iter()
                .find(|(i, _)| i.as_str() == "org.bulkhead.Sandbox1")?
                .1;
            Some((path.to_string(), sandbox_from_properties(&props)?))
        })
        .collect();
    if sandboxes.len() > MAX_SANDBOXES {
        tracing::warn!(
            n = sandboxes.len(),
            "more sandboxes than {MAX_SANDBOXES}: the rest are left out"
        );
    }
    sandboxes.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    sandboxes.truncate(MAX_SANDBOXES);

    let gate = Arc::new(Semaphore::new(PARALLEL_SANDBOXES));
    let mut tasks = JoinSet::new();
    for (i, (path, sb)) in sandboxes.iter().enumerate() {
        let (conn, gate, path) = (conn.clone(), gate.clone(), path.clone());
        let running: Vec<String> = sb
            .containers
            .iter()
            .filter(|c| matches!(c.state.as_str(), "running" | "paused"))
            .map(|c| c.id.clone())
            .collect();
        let vm = sb.backend == "bulkhead-vmm" && sb.state == "running";
        let pids: Vec<u32> = sb
            .components
            .iter()
            .map(|c| {
                if c.supervisor != 0 {
                    c.supervisor
                } else {
                    c.pid
                }
            })
            .collect();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            (
                i,
                read_sandbox(&conn, &path, limit, running, vm, pids).await,
            )
        });
    }
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        let Ok((i, extra)) = done else {
            failed += 1;
            continue;
        };
        let sb = &mut sandboxes[i].1;
        failed += extra.failed;
        for c in &mut sb.containers {
            if let Some(s) = extra.stats.iter().find(|(id, _)| *id == c.id) {
                c.stats = s.1.clone();
            }
        }
        for (c, usage) in sb.components.iter_mut().zip(extra.usage) {
            c.usage = usage;
        }
        sb.network = extra.network;
        sb.vm = extra.vm;
    }
    Ok((
        Manager {
            version,
            sandboxes: sandboxes.into_iter().map(|(_, s)| s).collect(),
        },
        failed,
    ))
}

/// What the per-sandbox calls added.
#[derive(Default)]
struct Extra {
    stats: Vec<(String, BTreeMap<String, u64>)>,
    network: BTreeMap<String, BTreeMap<String, u64>>,
    vm: Option<Vm>,
    usage: Vec<Option<Usage>>,
    failed: u64,
}

async fn read_sandbox(
    conn: &zbus::Connection,
    path: &str,
    limit: Duration,
    running: Vec<String>,
    vm: bool,
    pids: Vec<u32>,
) -> Extra {
    let mut x = Extra {
        usage: pids
            .iter()
            .map(|&p| {
                (p != 0 && std::path::Path::new(&format!("/proc/{p}")).exists())
                    .then(|| tree_usage(p))
            })
            .collect(),
        ..Default::default()
    };
    let proxy = async {
        Sandbox1Proxy::builder(conn)
            .path(path.to_string())?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
    };
    let Ok(sb) = proxy.await else {
        x.failed += 1;
        return x;
    };
    for id in running.into_iter().take(MAX_PER_SANDBOX) {
        let stats: Result<HashMap<String, u64>, _> =
            call(sb.inner(), "Stats", &(id.as_str(),), limit).await;
        match stats {
            Ok(s) => x
                .stats
                .push((id, s.into_iter().take(MAX_PER_SANDBOX).collect())),
            Err(e) if gone(&e) => {}
            Err(e) => {
                tracing::debug!(path, id, "Stats: {e}");
                x.failed += 1;
            }
        }
    }
    let net: Result<HashMap<String, HashMap<String, u64>>, _> =
        call(sb.inner(), "NetworkStats", &(), limit).await;
    match net {
        Ok(n) => {
            x.network = n
                .into_iter()
                .take(MAX_PER_SANDBOX)
                .map(|(i, c)| (i, c.into_iter().take(MAX_PER_SANDBOX).collect()))
                .collect()
        }
        Err(e) if gone(&e) => {}
        Err(e) => {
            tracing::debug!(path, "NetworkStats: {e}");
            x.failed += 1;
        }
    }
    if vm {
        let status: Result<HashMap<String, OwnedValue>, _> =
            call(sb.inner(), "VmStatus", &(), limit).await;
        match status {
            Ok(s) => x.vm = Some(vm_from_status(&s)),
            Err(e) if gone(&e) => {}
            Err(e) => {
                tracing::debug!(path, "VmStatus: {e}");
                x.failed += 1;
            }
        }
    }
    x
}

/// An error that means the thing went away between the listing and the call (a
/// container that exited, a sandbox being removed): no figure, and no failure either.
fn gone(e: &ReadError) -> bool {
    let name = match e {
        ReadError::Bus(zbus::Error::MethodError(name, _, _)) => name.as_str(),
        ReadError::Fdo(zbus::fdo::Error::UnknownObject(_)) => return true,
        _ => return false,
    };
    matches!(
        name,
        "org.bulkhead.Error.NotFound"
            | "org.bulkhead.Error.FailedPrecondition"
            | "org.freedesktop.DBus.Error.UnknownObject"
            | "org.freedesktop.DBus.Error.UnknownMethod"
    )
}

/// A sandbox from its `org.bulkhead.Sandbox1` properties; `None` without a valid id.
fn sandbox_from_properties(p: &HashMap<String, OwnedValue>) -> Option<Sandbox> {
    let get = |k: &str| p.get(k).map(|v| &**v);
    let id = string(get("Id")?)?;
    bulkhead_dbus::valid_id(&id).ok()?;
    // Structures whose first field is a string: (that string, the other fields).
    let rows = |k: &str| -> Vec<(String, Vec<Value<'_>>)> {
        match get(k) {
            Some(Value::Array(a)) => a
                .iter()
                .take(MAX_PER_SANDBOX)
                .filter_map(|v| match v {
                    Value::Structure(s) => match s.fields() {
                        [name, rest @ ..] if !rest.is_empty() => Some((
                            string(name)?,
                            rest.iter().filter_map(|f| f.try_clone().ok()).collect(),
                        )),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    };
    Some(Sandbox {
        backend: get("Backend").and_then(string).unwrap_or_default(),
        state: get("State").and_then(string).unwrap_or_default(),
        cpus: get("Cpus").and_then(number).unwrap_or(0) as u32,
        memory_mib: get("MemoryMiB").and_then(number).unwrap_or(0) as u32,
        created_at_us: get("CreatedAt").and_then(number).unwrap_or(0),
        timings: get("Timings").map(numbers).unwrap_or_default(),
        components: rows("Components")
            .into_iter()
            .map(|(name, f)| {
                let pid = |i: usize| f.get(i).and_then(number).unwrap_or(0) as u32;
                Component {
                    name,
                    pid: pid(0),
                    supervisor: pid(1),
                    usage: None,
                }
            })
            .collect(),
        containers: rows("Containers")
            .into_iter()
            .filter(|(id, _)| bulkhead_dbus::valid_id(id).is_ok())
            .map(|(id, f)| Container {
                id,
                state: f.first().and_then(string).unwrap_or_default(),
                stats: BTreeMap::new(),
            })
            .collect(),
        id,
        ..Default::default()
    })
}

fn vm_from_status(s: &HashMap<String, OwnedValue>) -> Vm {
    let mut vm = Vm::default();
    if let Some(Value::Dict(m)) = s.get("memory").map(|v| &**v) {
        for (k, v) in m.iter() {
            match (string(k).as_deref(), string(v)) {
                (Some("backing"), Some(v)) => vm.backing = v,
                (Some("pages"), Some(v)) => vm.pages = v,
                _ => {}
            }
        }
    }
    if let Some(Value::Array(a)) = s.get("start_phases").map(|v| &**v) {
        for row in a.iter().take(16) {
            if let Value::Structure(st) = row {
                if let [Value::Str(name), Value::F64(ms), ..] = st.fields() {
                    if ms.is_finite() && *ms >= 0.0 {
                        vm.start_phases.push((name.to_string(), ms / 1000.0));
                    }
                }
            }
        }
    }
    if let Some(Value::Dict(b)) = s.get("balloon").map(|v| &**v) {
        for (k, v) in b.iter() {
            let Some(k) = string(k) else { continue };
            let v = match v {
                Value::Value(inner) => &**inner,
                v => v,
            };
            if k == "stats" {
                vm.guest = numbers(v)
                    .into_iter()
                    .filter(|(k, _)| GUEST_STATS.contains(&k.as_str()))
                    .collect();
            } else if known(&crate::render::BALLOON, &k) {
                if let Some(n) = number(v) {
                    vm.balloon.insert(k, n);
                }
            }
        }
    }
    if let Some(h) = s.get("hotplug") {
        vm.hotplug = numbers(h)
            .into_iter()
            .filter(|(k, _)| known(&crate::render::HOTPLUG, k))
            .collect();
    }
    vm
}

fn string(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.to_string()),
        Value::Value(inner) => string(inner),
        _ => None,
    }
}

fn number(v: &Value<'_>) -> Option<u64> {
    match *v {
        Value::U8(n) => Some(n.into()),
        Value::U16(n) => Some(n.into()),
        Value::U32(n) => Some(n.into()),
        Value::U64(n) => Some(n),
        Value::Value(ref inner) => number(inner),
        _ => None,
    }
}

/// An `a{st}` (or `a{su}`) as a map; anything else is empty.
fn numbers(v: &Value<'_>) -> BTreeMap<String, u64> {
    match v {
        Value::Dict(d) => d
            .iter()
            .take(MAX_PER_SANDBOX)
            .filter_map(|(k, v)| Some((string(k)?, number(v)?)))
            .collect(),
        Value::Value(inner) => numbers(inner),
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::zvariant::{Dict, Signature};

    fn owned(v: Value<'_>) -> OwnedValue {
        OwnedValue::try_from(v).unwrap()
    }

    fn props(id: &str) -> HashMap<String, OwnedValue> {
        let mut p = HashMap::new();
        p.insert("Id".into(), owned(Value::from(id)));
        p.insert("Backend".into(), owned(Value::from("bulkhead-vmm")));
        p.insert("State".into(), owned(Value::from("running")));
        p.insert("Cpus".into(), owned(Value::from(2u32)));
        p.insert("MemoryMiB".into(), owned(Value::from(512u32)));
        p.insert(
            "CreatedAt".into(),
            owned(Value::from(1_700_000_000_000_000u64)),
        );
        let containers = vec![
            ("web".to_string(), "running".to_string()),
            ("bad\"id".to_string(), "running".to_string()),
        ];
        p.insert("Containers".into(), owned(Value::from(containers)));
        p.insert(
            "Components".into(),
            owned(Value::from(vec![("vmm".to_string(), 42u32, 41u32)])),
        );
        let timings: HashMap<String, u64> = [("agent_ready".to_string(), 1500u64)].into();
        p.insert("Timings".into(), owned(Value::from(timings)));
        p
    }

    #[test]
    fn a_sandbox_from_its_properties() {
        let sb = sandbox_from_properties(&props("pod1")).unwrap();
        assert_eq!(sb.id, "pod1");
        assert_eq!(sb.backend, "bulkhead-vmm");
        assert_eq!((sb.cpus, sb.memory_mib), (2, 512));
        assert_eq!(sb.created_at_us, 1_700_000_000_000_000);
        assert_eq!(sb.timings["agent_ready"], 1500);
        assert_eq!(sb.components[0].name, "vmm");
        assert_eq!(sb.components[0].pid, 42);
        assert_eq!(sb.components[0].supervisor, 41);
        // A container id that the manager should never have accepted is dropped.
        let ids: Vec<_> = sb.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["web"]);
    }

    #[test]
    fn properties_of_the_wrong_shape_are_left_out() {
        let mut p = props("pod1");
        p.insert("Cpus".into(), owned(Value::from("two")));
        p.insert("Containers".into(), owned(Value::from(7u32)));
        let sb = sandbox_from_properties(&p).unwrap();
        assert_eq!(sb.cpus, 0);
        assert!(sb.containers.is_empty());
        assert!(sandbox_from_properties(&props("../etc")).is_none());
        assert!(sandbox_from_properties(&HashMap::new()).is_none());
    }

    #[test]
    fn vm_status_read_by_name_and_type() {
        let mut s = HashMap::new();
        let memory: HashMap<String, String> = [
            ("backing".to_string(), "shared".to_string()),
            ("pages".to_string(), "thp".to_string()),
        ]
        .into();
        s.insert("memory".into(), owned(Value::from(memory)));
        let phases = vec![
            (
                "kernel_loaded".to_string(),
                900.0f64,
                1u64,
                0u64,
                5.0f64,
                0u64,
            ),
            ("bogus".to_string(), f64::NAN, 1, 0, 5.0, 0),
        ];
        s.insert("start_phases".into(), owned(Value::from(phases)));
        let stats: HashMap<String, u64> = [
            ("free_memory".to_string(), 100u64),
            ("made_up".to_string(), 1u64),
        ]
        .into();
        let mut b = Dict::new(
            &Signature::try_from("s").unwrap(),
            &Signature::try_from("v").unwrap(),
        );
        b.add("target_mib", Value::new(Value::from(128u64)))
            .unwrap();
        b.add("actual_mib", Value::new(Value::from("lots")))
            .unwrap();
        b.add("stats", Value::new(Value::from(stats))).unwrap();
        b.add("unknown", Value::new(Value::from(9u64))).unwrap();
        s.insert("balloon".into(), owned(Value::Dict(b)));
        let mut h = Dict::new(
            &Signature::try_from("s").unwrap(),
            &Signature::try_from("v").unwrap(),
        );
        h.add("plugged_mib", Value::new(Value::from(512u64)))
            .unwrap();
        h.add("short_mib", Value::new(Value::from(64u64))).unwrap();
        h.add("addr", Value::new(Value::from(1u64 << 32))).unwrap();
        s.insert("hotplug".into(), owned(Value::Dict(h)));
        let vm = vm_from_status(&s);
        assert_eq!((vm.backing.as_str(), vm.pages.as_str()), ("shared", "thp"));
        assert_eq!(vm.start_phases, [("kernel_loaded".to_string(), 0.9)]);
        assert_eq!(vm.balloon.len(), 1, "{:?}", vm.balloon);
        assert_eq!(vm.balloon["target_mib"], 128);
        assert_eq!(vm.guest.len(), 1);
        assert_eq!(vm.guest["free_memory"], 100);
        // Only the figures the exporter knows; the region's address is not one.
        assert_eq!(
            vm.hotplug,
            [
                ("plugged_mib".to_string(), 512),
                ("short_mib".to_string(), 64)
            ]
            .into()
        );
    }
}
