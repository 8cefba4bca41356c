//! The manager's state and every sandbox operation: create (components, boot, agent
//! set-up), containers, teardown, and adoption of what a previous bulkheadd left running.
//! The D-Bus interfaces (`api.rs`) are thin wrappers over this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead_dbus::{random_id, sandbox_path, valid_id, Error};
use bulkhead_host::config::{Backend, Config, NetBackend};
use bulkhead_protocol::{CreateContainer, ExecProcess, Request, Rootfs, SandboxConfig};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

use crate::agent::{Agent, Call};
use crate::backend::{self, GUEST_SHARED};
pub use crate::events::Changed;
use crate::events::{Event, Events};
use crate::lifecycle::{ContainerState, Role, SandboxState};
use crate::store::{Component, ContainerRec, SandboxRec, Store};
use crate::{jail, memory, mounts, supervisor};

pub struct Daemon {
    pub cfg: Config,
    pub state_dir: PathBuf,
    pub store: Store,
    /// Backends this host can run, best first.
    pub backends: Vec<Backend>,
    /// QEMU runs on TCG here (no KVM that boots stock kernels).
    pub tcg: bool,
    /// Who calls, and how often a caller who is not root may make the open calls.
    pub callers: crate::limit::CallerLimit,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// What the D-Bus face publishes (objects, signals).
    pub events: Events,
}

pub struct Sandbox {
    pub id: String,
    pub path: OwnedObjectPath,
    pub rec: Mutex<SandboxRec>,
    pub agent: Agent,
    removing: AtomicBool,
    /// When network back ends were restarted lately.
    net_restarts: Mutex<Vec<Instant>>,
    /// Held while the hot-plug request is worked out and sent, so two container
    /// changes at once cannot send their figures in the wrong order; it holds the
    /// size last sent (a VMM starts with 0; unknown for an adopted sandbox), so a
    /// change that leaves the size as it was costs no call.
    memory_fit: tokio::sync::Mutex<Option<u64>>,
}

pub use bulkhead_dbus::SandboxOptions;

/// At most this many restarts of one sandbox's network back ends within
/// [`NET_RESTART_WINDOW`]; one more tears the sandbox down.
const NET_RESTART_LIMIT: usize = 5;
const NET_RESTART_WINDOW: Duration = Duration::from_secs(30);
/// A network back end that dies this soon after its restart is crash-looping: its next
/// restart waits (longer each time). One that ran longer (killed, upgraded) comes back
/// at once, however many times that happens within the window.
const NET_CRASH_LOOP: Duration = Duration::from_secs(1);

/// What `CreateContainer` asks for.
pub struct NewContainer {
    pub id: String,
    pub spec_json: String,
    /// A host directory.
    pub rootfs: String,
    pub stdin: bool,
    /// Overrides the spec's `process.terminal`.
    pub terminal: Option<bool>,
    /// Keep `rootfs` read-only under a private overlay layer.
    pub overlay: bool,
    /// The root as a snapshotter's overlay (containerd's), mounted here, in place of
    /// `rootfs`, so it can be idmapped layer by layer for virtiofsd's user namespace.
    pub layers: Option<mounts::SnapshotOverlay>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Largest JSON document (spec, process, resources) a caller may send: it travels to the
/// guest in one agent frame, which is bounded too.
pub const MAX_JSON: usize = 256 * 1024;

/// Refuse an oversized JSON argument before parsing it.
pub fn check_json_size(what: &str, text: &str) -> Result<(), Error> {
    if text.len() > MAX_JSON {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes; at most {MAX_JSON}",
            text.len()
        )));
    }
    Ok(())
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Failed(format!("{what}: {e}"))
}

/// The last lines of a component's log, to say why it died.
fn log_tail(path: &Path) -> String {
    // Only the end is read: the guest writes the serial log without bound. The jailed
    // VMM owns vm/ and could leave a symlink or a FIFO there: neither is followed.
    let tail = match bulkhead_host::untrusted::tail(path, 600) {
        Ok(t) => t,
        Err(e) => return format!("(log not read: {e})"),
    };
    let text = String::from_utf8_lossy(&tail).into_owned();
    text.lines()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Carry the spec's host bind mounts into the guest: each source is bind-mounted into
/// the container's directory in the shared directory (`<cdir>/mounts/<n>`) and the spec
/// is rewritten to bind it from there. Sources under /proc, /sys and /dev name the
/// guest's own and are left alone.
fn share_bind_mounts(
    spec: &mut serde_json::Value,
    cdir: &Path,
    guest_cdir: &str,
    userns: Option<std::os::fd::BorrowedFd>,
) -> Result<(), Error> {
    let Some(list) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return Ok(());
    };
    for (n, m) in list.iter_mut().enumerate() {
        let opts: Vec<&str> = m
            .get("options")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let is_bind = m.get("type").and_then(|t| t.as_str()) == Some("bind")
            || opts.iter().any(|o| *o == "bind" || *o == "rbind");
        if !is_bind {
            continue;
        }
        let src = m
            .get("source")
            .and_then(|s| s.as_str())
            .ok_or_else(|| Error::InvalidArgument(format!("bind mount {n} has no source")))?
            .to_string();
        let src_path = Path::new(&src);
        if !src_path.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "bind mount source {src:?} is not an absolute path"
            )));
        }
        if ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| src_path.starts_with(p))
        {
            continue;
        }
        let meta = std::fs::metadata(src_path)
            .map_err(|e| Error::InvalidArgument(format!("bind mount source {src}: {e}")))?;
        // `cdir` is in the sandbox's host-only staging directory: nothing here can have
        // been planted. A file mount point is still opened as the file it must be, and
        // never truncated.
        let target = cdir.join("mounts").join(n.to_string());
        std::fs::create_dir_all(cdir.join("mounts")).map_err(io_err("cannot create mounts"))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map(drop)
        }
        .map_err(io_err("cannot create a mount point"))?;
        mounts::share(src_path, &target, userns)
            .map_err(|e| Error::Failed(format!("cannot share bind mount source {src}: {e}")))?;
        m["source"] = serde_json::Value::String(format!("{guest_cdir}/mounts/{n}"));
    }
    Ok(())
}

/// A pipe, both ends close-on-exec: (read, write).
fn cloexec_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Wait until each back end has created its socket; one that exits first, or takes over
/// 10 s, fails the sandbox with the tail of its log. In a jailed sandbox the sockets are
/// then handed to the jail uid: a back end that runs as root (virtiofsd) makes its socket root's, and
/// the VMM must be able to connect to it.
async fn wait_sockets(
    pending: &[(Component, PathBuf, PathBuf)],
    jail_uid: Option<u32>,
) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (comp, sock, log) in pending {
        while !sock.exists() {
            if !supervisor::alive(comp) || Instant::now() > deadline {
                return Err(Error::Backend(format!(
                    "{} did not create {}: {}",
                    comp.name,
                    sock.display(),
                    log_tail(log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some(uid) = jail_uid {
            std::os::unix::fs::lchown(sock, Some(uid), Some(uid)).map_err(io_err(&format!(
                "cannot hand {} to the jail",
                sock.display()
            )))?;
        }
    }
    Ok(())
}

impl Sandbox {
    /// `requested_mib`: the hot-plug size its VMM was last asked for, if known.
    fn new(rec: SandboxRec, requested_mib: Option<u64>, cfg: &Config) -> Arc<Sandbox> {
        Arc::new(Sandbox {
            id: rec.id.clone(),
            path: sandbox_path(&rec.id),
            agent: Agent::new(rec.vsock_socket(), cfg.agent.clone()),
            rec: Mutex::new(rec),
            removing: AtomicBool::new(false),
            net_restarts: Mutex::new(vec![]),
            memory_fit: tokio::sync::Mutex::new(requested_mib),
        })
    }

    /// A sandbox of [`crate::store::test_rec`]'s record, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(id: &str) -> Arc<Sandbox> {
        Sandbox::new(crate::store::test_rec(id), None, &Config::default())
    }

    pub fn snapshot(&self) -> SandboxRec {
        self.rec.lock().expect("rec lock").clone()
    }

    fn vmm(&self) -> Option<Component> {
        self.rec
            .lock()
            .expect("rec lock")
            .components
            .iter()
            .find(|c| Role::of(&c.name) == Some(Role::Vmm))
            .cloned()
    }
}

impl Daemon {
    pub fn new(cfg: Config, state_dir: PathBuf) -> anyhow::Result<Arc<Daemon>> {
        let report = bulkhead_host::check::check(&cfg);
        let mut backends: Vec<Backend> = report
            .backends
            .iter()
            .filter(|b| b.usable)
            .filter_map(|b| Backend::parse(b.name))
            .collect();
        if let Some(pref) = report.chosen() {
            backends.retain(|b| *b != pref);
            backends.insert(0, pref);
        }
        let tcg = bulkhead_host::check::qemu_accel(bulkhead_host::kvm_kind()) == "tcg";
        Ok(Arc::new(Daemon {
            store: Store::new(&state_dir)?,
            callers: crate::limit::CallerLimit::new(&cfg.api),
            cfg,
            state_dir,
            backends,
            tcg,
            sandboxes: Mutex::new(HashMap::new()),
            events: Events::default(),
        }))
    }

    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, Error> {
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no sandbox {id:?}")))
    }

    pub fn list(&self) -> Vec<Arc<Sandbox>> {
        let mut v: Vec<_> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn save(&self, sb: &Sandbox) {
        let rec = sb.snapshot();
        if let Err(e) = self.store.save(&rec) {
            tracing::error!(sandbox = %sb.id, "cannot save state: {e}");
        }
    }

    /// Change the record, save it, and send the change signals.
    async fn update(&self, sb: &Arc<Sandbox>, what: Changed, f: impl FnOnce(&mut SandboxRec)) {
        f(&mut sb.rec.lock().expect("rec lock"));
        self.save(sb);
        self.notify(sb, what).await;
    }

    async fn notify(&self, sb: &Arc<Sandbox>, what: Changed) {
        self.events
            .emit(Event::Changed {
                sb: sb.clone(),
                what,
            })
            .await;
    }

    // ---- sandboxes ----

    pub async fn create_sandbox(
        self: &Arc<Self>,
        id: String,
        opts: SandboxOptions,
    ) -> Result<OwnedObjectPath, Error> {
        let SandboxOptions {
            backend,
            cpus,
            memory_mib,
            hotplug_mib,
            hostname,
            netns,
            net_backend,
            virtiofsd_userns,
            layers_mib,
        } = opts;
        let layers_mib = layers_mib.map_or(self.cfg.layers_mib, u64::from);
        if !(16..=1 << 20).contains(&layers_mib) {
            return Err(Error::InvalidArgument(format!(
                "layers_mib {layers_mib}: want 16 to 1048576"
            )));
        }
        if let Some(ns) = &netns {
            if !ns.starts_with('/') || ns.len() > 4096 || !Path::new(ns).exists() {
                return Err(Error::InvalidArgument(format!(
                    "netns {ns:?}: want the absolute path of an existing network namespace"
                )));
            }
        }
        if let Some(h) = &hostname {
            if h.is_empty()
                || h.len() > 63
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(Error::InvalidArgument(format!(
                    "hostname {h:?}: want 1 to 63 letters, digits, '-' or '.'"
                )));
            }
        }
        let t0 = Instant::now();
        let id = if id.is_empty() { random_id() } else { id };
        valid_id(&id).map_err(Error::InvalidArgument)?;
        let backend = match backend {
            None => *self.backends.first().ok_or_else(|| {
                Error::FailedPrecondition(
                    "no hypervisor backend can run on this host (see `bulkhead check`)".into(),
                )
            })?,
            Some(name) => {
                let b = Backend::parse(&name).ok_or_else(|| {
                    Error::InvalidArgument(format!("backend {name:?}: want bulkhead-vmm or qemu"))
                })?;
                if !self.backends.contains(&b) {
                    return Err(Error::FailedPrecondition(format!(
                        "backend {name} cannot run on this host (see `bulkhead check`)"
                    )));
                }
                b
            }
        };
        let net_backend = match net_backend.as_deref() {
            None => NetBackend::default(),
            Some(name) => NetBackend::parse(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "net_backend {name:?}: want bulkhead-net or vhost-net"
                ))
            })?,
        };
        if net_backend == NetBackend::VhostNet {
            if backend != Backend::Qemu {
                return Err(Error::InvalidArgument(format!(
                    "net_backend vhost-net: only the qemu backend can use the kernel's vhost-net, not {}",
                    backend.as_str()
                )));
            }
            if !Path::new(crate::net::VHOST_NET).exists() {
                return Err(Error::FailedPrecondition(format!(
                    "net_backend vhost-net: {} is missing (modprobe vhost_net)",
                    crate::net::VHOST_NET
                )));
            }
        }
        let cpus = cpus.unwrap_or(self.cfg.cpus);
        let memory_mib = memory_mib.unwrap_or(self.cfg.memory_mib);
        if !(1..=64).contains(&cpus) {
            return Err(Error::InvalidArgument(format!("cpus {cpus}: want 1 to 64")));
        }
        if !(64..=65536).contains(&memory_mib) {
            return Err(Error::InvalidArgument(format!(
                "memory_mib {memory_mib}: want 64 to 65536"
            )));
        }
        // The configured region is a default for the backend that has virtio-mem.
        let hotplug_mib = hotplug_mib.unwrap_or(match backend {
            Backend::BulkheadVmm => self.cfg.hotplug_mib,
            _ => 0,
        });
        if !hotplug_mib.is_multiple_of(128) || hotplug_mib > 65536 {
            return Err(Error::InvalidArgument(format!(
                "hotplug_mib {hotplug_mib}: want a multiple of 128 up to 65536"
            )));
        }
        if hotplug_mib > 0 && backend != Backend::BulkheadVmm {
            return Err(Error::InvalidArgument(format!(
                "hotplug_mib: only bulkhead-vmm has virtio-mem, not {}",
                backend.as_str()
            )));
        }
        let run_dir = self.state_dir.join("run").join(random_id());
        let rec = SandboxRec {
            id: id.clone(),
            backend: backend.as_str().into(),
            cpus,
            memory_mib,
            hotplug_mib,
            hotplug_floor_mib: 0,
            created_at_us: now_us(),
            state: SandboxState::Creating,
            run_dir: run_dir.clone(),
            components: vec![],
            containers: vec![],
            timings: Default::default(),
            hostname,
            network: None,
            jail_uid: None,
            fs_userns: false,
            net_backend,
        };
        let sb = Sandbox::new(rec, Some(0), &self.cfg);
        {
            let mut map = self.sandboxes.lock().expect("sandboxes lock");
            if map.contains_key(&id) {
                return Err(Error::AlreadyExists(format!("sandbox {id:?} exists")));
            }
            if self.cfg.jail.enabled() {
                let used: Vec<u32> = map.values().filter_map(|s| s.snapshot().jail_uid).collect();
                let uid = jail::allocate_uid(&self.cfg, &used).ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "every jail uid of the configured range ({}) is in use",
                        self.cfg.jail.uid_count
                    ))
                })?;
                let fs_userns = jail::fs_userns(&self.cfg, virtiofsd_userns.unwrap_or(false))
                    .map_err(Error::FailedPrecondition)?;
                let mut r = sb.rec.lock().expect("rec lock");
                r.jail_uid = Some(uid);
                r.fs_userns = fs_userns;
            }
            map.insert(id.clone(), sb.clone());
        }
        let created = async {
            let rec = sb.snapshot();
            jail::make_run_dir(&rec)
                .and_then(|()| std::fs::create_dir(rec.staging_dir()))
                .and_then(|()| std::fs::create_dir(rec.shared_dir()))
                .and_then(|()| jail::make_vm_dir(&rec))
                .and_then(|()| jail::make_layers_dir(&rec, layers_mib))
                .and_then(|()| mounts::make_staging(&rec.staging_dir(), &rec.shared_dir()))
                .and_then(|()| jail::own_shared_dir(&rec, &rec.staging_dir()))
                .map_err(io_err("cannot create the sandbox's directories"))?;
            self.save(&sb);
            self.events.emit(Event::SandboxAdded(sb.clone())).await;
            self.watch_health(&sb);
            if let Some(ns) = netns {
                self.plumb(&sb, PathBuf::from(ns)).await?;
            }
            self.boot(&sb, t0).await
        }
        .await;
        match created {
            Ok(()) => {
                self.update(
                    &sb,
                    Changed {
                        state: true,
                        ..Default::default()
                    },
                    |r| {
                        r.move_to(SandboxState::Running);
                    },
                )
                .await;
                self.watch_oom(&sb);
                tracing::info!(sandbox = %id, backend = backend.as_str(), "sandbox running in {:?}", t0.elapsed());
                Ok(sb.path.clone())
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, "create failed: {e}");
                self.teardown(&sb, &format!("create failed: {e}"), false)
                    .await;
                Err(e)
            }
        }
    }

    /// Start the components in order, wait for the agent, set the guest up.
    async fn boot(self: &Arc<Self>, sb: &Arc<Sandbox>, t0: Instant) -> Result<(), Error> {
        let rec = sb.snapshot();
        let specs = backend::plan(&self.cfg, &rec, self.tcg).map_err(|e| Error::Backend(e.0))?;
        // Every component starts at once. A jailed VMM sets its jail up beside the back
        // ends and waits at its jailer's start gate until every socket it connects to is
        // there and handed to the jail's uid; an unjailed one starts after them.
        let ready = crate::agent::ready_listener(&rec.vsock_socket(), rec.jail_uid)
            .map_err(
                |e| tracing::warn!(sandbox = %sb.id, "no listener for the agent's ready word: {e}"),
            )
            .ok();
        let mut pending: Vec<(Component, PathBuf, PathBuf)> = vec![];
        let mut gate: Option<std::fs::File> = None;
        for mut spec in specs {
            let log = rec.run_dir.join(format!("{}.log", spec.name));
            if Role::of(&spec.name) == Some(Role::Vmm) {
                if rec.jail_uid.is_some() {
                    let (rd, wr) =
                        cloexec_pipe().map_err(|e| Error::Backend(format!("start gate: {e}")))?;
                    let n = spec
                        .fds
                        .iter()
                        .map(|(_, n)| n + 1)
                        .max()
                        .unwrap_or(3)
                        .max(3);
                    spec.fds.push((rd, n));
                    spec.start_gate = Some(n);
                    gate = Some(wr);
                } else {
                    wait_sockets(&std::mem::take(&mut pending), rec.jail_uid).await?;
                }
                sb.rec
                    .lock()
                    .expect("rec lock")
                    .timings
                    .insert("vmm_exec".into(), t0.elapsed().as_micros() as u64);
            }
            let mut cmd = jail::command(&self.cfg, &rec, &spec).map_err(|e| Error::Backend(e.0))?;
            // Off the manager's one runtime thread: a start waits for the spawner's
            // answer, and a wedged spawner must not stall every other call. The passed
            // descriptors close here once the component holds its copies.
            let (name, fds, out) = (
                spec.name.clone(),
                std::mem::take(&mut spec.fds),
                log.clone(),
            );
            let comp =
                tokio::task::spawn_blocking(move || supervisor::spawn(&name, &mut cmd, &fds, &out))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|e| Error::Backend(format!("cannot start {}: {e}", spec.name)))?;
            tracing::debug!(sandbox = %sb.id, "started {} pid {}", comp.name, comp.pid);
            // Saved at once, so a manager restarted mid-start knows what to stop; the
            // bus hears of them all together below.
            sb.rec
                .lock()
                .expect("rec lock")
                .components
                .push(comp.clone());
            self.save(sb);
            self.watch_component(sb, comp.clone());
            if let Some(sock) = spec.ready_socket {
                pending.push((comp, sock, log));
            }
        }
        self.notify(
            sb,
            Changed {
                components: true,
                ..Default::default()
            },
        )
        .await;
        // On an error the gate's write end closes with `gate`: the jailer gives up.
        wait_sockets(&pending, rec.jail_uid).await?;
        if let Some(mut g) = gate {
            use std::io::Write;
            g.write_all(&[1]).map_err(|e| {
                Error::Backend(format!(
                    "the VMM's jail did not wait for its start ({e}): {}",
                    log_tail(&rec.run_dir.join("vmm.log"))
                ))
            })?;
        }
        sb.rec
            .lock()
            .expect("rec lock")
            .timings
            .insert("components_started".into(), t0.elapsed().as_micros() as u64);
        let vmm = sb
            .vmm()
            .ok_or_else(|| Error::Backend("no VMM component".into()))?;
        let serial = rec.vm_dir().join("serial.log");
        sb.agent
            .wait_ready(Duration::from_secs(self.cfg.boot_timeout_s), ready, || {
                (!supervisor::alive(&vmm)).then(|| {
                    format!(
                        "the VMM exited while the guest booted: {} / serial: {}",
                        log_tail(&rec.run_dir.join("vmm.log")),
                        log_tail(&serial)
                    )
                })
            })
            .await
            .map_err(|e| match e {
                Error::Backend(m) => {
                    Error::Backend(format!("{m} / guest serial: {}", log_tail(&serial)))
                }
                other => other,
            })?;
        sb.rec
            .lock()
            .expect("rec lock")
            .timings
            .insert("agent_ready".into(), t0.elapsed().as_micros() as u64);
        let hostname = sb
            .snapshot()
            .hostname
            .unwrap_or_else(|| sb.id.chars().take(63).collect());
        let (interfaces, routes) = match &sb.snapshot().network {
            Some(n) => (
                n.links.iter().map(|l| l.guest.clone()).collect(),
                n.routes.clone(),
            ),
            None => (vec![], vec![]),
        };
        let unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        sb.agent
            .call(Call::Change, move |c| {
                c.create_sandbox(SandboxConfig {
                    hostname: Some(hostname),
                    share_pid: false,
                })?;
                c.expect_ok(&Request::MountVirtiofs {
                    tag: backend::SHARE_TAG.into(),
                    target: GUEST_SHARED.into(),
                })?;
                c.expect_ok(&Request::SetTime { unix_nanos })?;
                if !interfaces.is_empty() {
                    c.update_network(interfaces, routes)?;
                }
                Ok(())
            })
            .await?;
        self.save(sb);
        Ok(())
    }

    /// Mirror the pod's network namespace for the guest and record what was made, so a
    /// teardown (also after a crash) undoes it.
    async fn plumb(&self, sb: &Arc<Sandbox>, netns: PathBuf) -> Result<(), Error> {
        let t = Instant::now();
        let rec = tokio::task::spawn_blocking(move || crate::net::plumb(&netns))
            .await
            .map_err(|e| Error::Backend(format!("network plumbing: {e}")))?
            .map_err(|e| match e {
                crate::net::NetError::Netns { .. } | crate::net::NetError::Invalid(_) => {
                    Error::InvalidArgument(e.to_string())
                }
                other => Error::Backend(format!("network plumbing: {other}")),
            })?;
        tracing::info!(sandbox = %sb.id, interfaces = rec.links.len(), ms = t.elapsed().as_secs_f64() * 1e3, "pod network plumbed");
        sb.rec.lock().expect("rec lock").network = Some(rec);
        self.save(sb);
        Ok(())
    }

    /// When a component exits on its own: a network back end of a running sandbox is
    /// started again (the VMM takes it back, the pod goes on); for any other, the sandbox
    /// cannot go on and is torn down.
    fn watch_component(self: &Arc<Self>, sb: &Arc<Sandbox>, comp: Component) {
        let d = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            let status = supervisor::watch(comp.clone()).await;
            if sb.removing.load(Ordering::SeqCst) {
                return;
            }
            let mut why = format!(
                "{} (pid {}) exited{}",
                comp.name,
                comp.pid,
                status
                    .map(|s| format!(" with status {s}"))
                    .unwrap_or_default()
            );
            if status == Some(128 + libc::SIGSYS) {
                why.push_str(", killed by its seccomp filter");
                tracing::error!(
                    sandbox = %sb.id,
                    component = %comp.name,
                    security_event = "seccomp",
                    "security event: {} made a system call its filter forbids and was killed \
                     (the kernel's audit log names the call)",
                    comp.name
                );
            }
            let rec = sb.snapshot();
            tracing::debug!(sandbox = %sb.id, "{} log: {}", comp.name, log_tail(&rec.run_dir.join(format!("{}.log", comp.name))));
            let restartable = Role::of(&comp.name).is_some_and(Role::restartable)
                && rec.state == SandboxState::Running;
            if restartable {
                match d.restart_component(&sb, &comp).await {
                    Ok(new) => {
                        tracing::warn!(sandbox = %sb.id, "{why}: started again as pid {}", new.pid);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(sandbox = %sb.id, "{why}; cannot start it again: {e}")
                    }
                }
            }
            tracing::warn!(sandbox = %sb.id, "{why}: tearing the sandbox down");
            d.teardown(&sb, &why, false).await;
        });
    }

    /// Start a network back end again in place of `old`, within the restart budget.
    async fn restart_component(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        old: &Component,
    ) -> Result<Component, String> {
        let (tries, crash_loop) = {
            let mut r = sb.net_restarts.lock().expect("restarts lock");
            r.retain(|t| t.elapsed() < NET_RESTART_WINDOW);
            if r.len() >= NET_RESTART_LIMIT {
                return Err(format!(
                    "{NET_RESTART_LIMIT} restarts in {NET_RESTART_WINDOW:?} already"
                ));
            }
            let crash_loop = r.last().is_some_and(|t| t.elapsed() < NET_CRASH_LOOP);
            r.push(Instant::now());
            (r.len(), crash_loop)
        };
        // A restart is immediate (traffic is stopped meanwhile); a back end that dies
        // again within moments of its start is given more time each round.
        if crash_loop {
            tokio::time::sleep(Duration::from_millis(100 << tries.min(5))).await;
        }
        let Some(Role::Net(i)) = Role::of(&old.name) else {
            return Err(format!("{} is not a network back end", old.name));
        };
        let i = i as usize;
        let rec = sb.snapshot();
        let cfg = self.cfg.clone();
        let comp = tokio::task::spawn_blocking(move || {
            let spec = backend::bulkhead_net(&cfg, &rec, i).map_err(|e| e.0)?;
            let log = rec.run_dir.join(format!("{}.log", spec.name));
            let mut cmd = jail::command(&cfg, &rec, &spec).map_err(|e| e.0)?;
            supervisor::spawn(&spec.name, &mut cmd, &spec.fds, &log).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let name = old.name.clone();
        let new = comp.clone();
        self.update(
            sb,
            Changed {
                components: true,
                ..Default::default()
            },
            |r| match r.components.iter_mut().find(|c| c.name == name) {
                Some(c) => *c = new,
                None => r.components.push(new),
            },
        )
        .await;
        self.watch_component(sb, comp.clone());
        Ok(comp)
    }

    pub async fn remove_sandbox(self: &Arc<Self>, id: &str, force: bool) -> Result<(), Error> {
        let sb = self.get(id)?;
        if !force {
            let running: Vec<String> = sb
                .snapshot()
                .containers
                .iter()
                .filter(|c| c.state.is_live())
                .map(|c| c.id.clone())
                .collect();
            if !running.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} has running containers {running:?}: stop them or use force"
                )));
            }
        }
        self.teardown(&sb, "removed", true).await;
        Ok(())
    }

    /// Stop everything of a sandbox and forget it. `graceful`: ask the guest to power off
    /// first. Runs once per sandbox; later callers return at once.
    pub async fn teardown(self: &Arc<Self>, sb: &Arc<Sandbox>, reason: &str, graceful: bool) {
        if sb.removing.swap(true, Ordering::SeqCst) {
            return;
        }
        self.update(
            sb,
            Changed {
                state: true,
                ..Default::default()
            },
            |r| {
                r.move_to(SandboxState::Stopping);
            },
        )
        .await;
        let vmm = sb.vmm();
        if graceful && vmm.as_ref().is_some_and(supervisor::alive) {
            let agent = sb.agent.clone();
            let bye = async {
                let _ = agent.request(Call::Change, Request::DestroySandbox).await;
                let _ = agent.request(Call::Change, Request::Shutdown).await;
                while vmm.as_ref().is_some_and(supervisor::alive) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(10), bye)
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %sb.id, "guest did not power off in 10 s; killing");
            }
        }
        let rec = sb.snapshot();
        supervisor::stop_all(&rec.components, Duration::from_secs(2)).await;
        jail::remove_cgroup(&rec);
        if let Some(net) = rec.network.clone() {
            match tokio::task::spawn_blocking(move || crate::net::unplumb(&net)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(sandbox = %sb.id, "network cleanup: {e}"),
                Err(e) => tracing::error!(sandbox = %sb.id, "network cleanup: {e}"),
            }
        }
        // A guest-filled tree can take long to remove: off the runtime's thread.
        let run_dir = rec.run_dir.clone();
        match tokio::task::spawn_blocking(move || mounts::unmount_and_remove(&run_dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sandbox = %sb.id, "cleanup: {e}"),
            Err(e) => tracing::error!(sandbox = %sb.id, "cleanup: {e}"),
        }
        if let Err(e) = self.store.remove(&sb.id) {
            tracing::error!(sandbox = %sb.id, "cannot remove state file: {e}");
        }
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .remove(&sb.id);
        self.events
            .emit(Event::SandboxRemoved {
                sb: sb.clone(),
                reason: reason.into(),
            })
            .await;
        tracing::info!(sandbox = %sb.id, "sandbox removed: {reason}");
    }

    /// Take over the sandboxes a previous bulkheadd left: watch the live ones again,
    /// clean up after the dead ones.
    pub async fn adopt(self: &Arc<Self>) {
        for r in self.store.load_all() {
            let rec = match r {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::error!("unreadable sandbox record: {e}");
                    continue;
                }
            };
            let id = rec.id.clone();
            let all_alive =
                !rec.components.is_empty() && rec.components.iter().all(supervisor::alive);
            let sb = Sandbox::new(rec.clone(), None, &self.cfg);
            self.sandboxes
                .lock()
                .expect("sandboxes lock")
                .insert(id.clone(), sb.clone());
            self.events.emit(Event::SandboxAdded(sb.clone())).await;
            self.watch_health(&sb);
            if !all_alive || rec.state != SandboxState::Running {
                let why = if rec.state != SandboxState::Running {
                    format!("the manager restarted while it was {}", rec.state)
                } else {
                    "a component died while the manager was down".into()
                };
                tracing::warn!(sandbox = %id, "not adopting: {why}");
                self.teardown(&sb, &why, false).await;
                continue;
            }
            for c in &rec.components {
                self.watch_component(&sb, c.clone());
            }
            for c in rec.containers.iter().filter(|c| c.state.is_live()) {
                self.watch_exit(&sb, c.id.clone());
            }
            self.watch_oom(&sb);
            tracing::info!(sandbox = %id, "adopted ({} components)", rec.components.len());
        }
    }

    /// See `Sandbox1.NetworkStats`.
    pub async fn network_stats(
        &self,
        sid: &str,
    ) -> Result<HashMap<String, HashMap<String, u64>>, Error> {
        let sb = self.running(sid)?;
        let rec = sb.snapshot();
        let mut out = HashMap::new();
        if rec.net_backend == NetBackend::VhostNet {
            // No back end of ours to ask: the kernel counts each tap.
            let Some(net) = rec.network.clone() else {
                return Ok(out);
            };
            let taps = tokio::task::spawn_blocking(move || crate::net::tap_counters(&net))
                .await
                .map_err(|e| Error::Backend(format!("tap counters: {e}")))?
                .map_err(|e| Error::Backend(format!("sandbox {sid}: tap counters: {e}")))?;
            return Ok(taps);
        }
        for (i, l) in rec.network.iter().flat_map(|n| n.links.iter()).enumerate() {
            let sock = backend::net_dbus_socket(&rec, i);
            let read = async {
                let conn = bulkhead_dbus::p2p::connect(&sock, Duration::from_secs(2)).await?;
                // A peer connection has no bus names; any destination is the peer.
                let p = bulkhead_dbus::net::Net1Proxy::new(&conn, "org.bulkhead.Net1").await?;
                p.counters().await
            };
            match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok(mut c)) => {
                    // The back end is a separate (jailed) process: only the counters it
                    // should have are passed on.
                    c.retain(|k, _| bulkhead_dbus::net::COUNTER_NAMES.contains(&k.as_str()));
                    out.insert(l.guest.name.clone(), c);
                }
                Ok(Err(e)) => tracing::debug!(sandbox = %sid, "net{i} counters: {e}"),
                Err(_) => tracing::debug!(sandbox = %sid, "net{i} counters: no answer in 2 s"),
            }
        }
        Ok(out)
    }

    /// The VMM's `org.bulkhead.Vmm1`, for a running bulkhead-vmm sandbox.
    async fn vmm1(&self, sid: &str) -> Result<bulkhead_dbus::vmm::Vmm1Proxy<'static>, Error> {
        let rec = self.running(sid)?.snapshot();
        if rec.backend != Backend::BulkheadVmm.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {sid} runs on {}: only bulkhead-vmm serves the VM control interface (org.bulkhead.Vmm1)",
                rec.backend
            )));
        }
        bulkhead_dbus::vmm::connect(&backend::vmm_api_socket(&rec), Duration::from_secs(2))
            .await
            .map_err(|e| Error::Backend(format!("sandbox {sid}: VMM control interface: {e}")))
    }

    /// See `Sandbox1.VmStatus`.
    pub async fn vm_status(&self, sid: &str) -> Result<HashMap<String, OwnedValue>, Error> {
        let p = self.vmm1(sid).await?;
        let rec = self.get(sid)?.snapshot();
        let hotplug = rec.hotplug_mib > 0;
        let from_vmm = |e: zbus::Error| vmm_error(sid, e);
        let read = async {
            let mut out: HashMap<String, OwnedValue> = HashMap::new();
            let state = p.state().await.map_err(from_vmm)?;
            out.insert("state".into(), owned(Value::from(clip(state))));
            let memory: HashMap<String, String> = p
                .memory()
                .await
                .map_err(from_vmm)?
                .into_iter()
                .filter(|(k, _)| VM_MEMORY_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k, clip(v)))
                .collect();
            out.insert("memory".into(), owned(Value::from(memory)));
            let mut phases = p.start_phases().await.map_err(from_vmm)?;
            phases.truncate(16);
            for ph in &mut phases {
                ph.0 = clip(std::mem::take(&mut ph.0));
            }
            out.insert("start_phases".into(), owned(Value::from(phases)));
            if p.has_balloon().await.map_err(from_vmm)? {
                let b: HashMap<String, OwnedValue> = p
                    .balloon()
                    .await
                    .map_err(from_vmm)?
                    .into_iter()
                    .filter(|(k, v)| field_ok(&VM_BALLOON_FIELDS, k, v))
                    .collect();
                out.insert("balloon".into(), owned(Value::from(b)));
            }
            if hotplug {
                let mut h: HashMap<String, OwnedValue> = p
                    .hotplug_memory()
                    .await
                    .map_err(from_vmm)?
                    .into_iter()
                    .filter(|(k, v)| field_ok(&VM_HOTPLUG_FIELDS, k, v))
                    .collect();
                // The manager's side: what sizes the request, and what the region
                // cannot hold of it.
                let t = Self::memory_target(&rec, rec.hotplug_floor_mib);
                for (k, v) in [
                    ("floor_mib", rec.hotplug_floor_mib),
                    ("limits_mib", t.limits_mib),
                    ("short_mib", t.short_mib),
                ] {
                    h.insert(k.into(), OwnedValue::from(v));
                }
                out.insert("hotplug".into(), owned(Value::from(h)));
            }
            Ok::<_, Error>(out)
        };
        within_vmm_bound(sid, read).await?
    }

    /// See `Sandbox1.SetHotplugMemory`: `mib` becomes the floor under what the
    /// containers' limits ask for.
    pub async fn set_hotplug_memory(&self, sid: &str, mib: u64) -> Result<(), Error> {
        let sb = self.get(sid)?;
        let mut sent = sb.memory_fit.lock().await;
        let rec = sb.snapshot();
        if rec.hotplug_mib == 0 {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {sid} has no hot-plug memory (create it with hotplug_mib)"
            )));
        }
        if mib > u64::from(rec.hotplug_mib) {
            return Err(Error::InvalidArgument(format!(
                "{mib} MiB is more than sandbox {sid}'s hot-plug region ({} MiB)",
                rec.hotplug_mib
            )));
        }
        let t = Self::memory_target(&rec, mib);
        self.request_hotplug(sid, t.mib).await?;
        *sent = Some(t.mib);
        self.update(&sb, Changed::default(), |r| r.hotplug_floor_mib = mib)
            .await;
        Ok(())
    }

    fn memory_target(rec: &SandboxRec, floor_mib: u64) -> memory::Target {
        memory::target(
            rec.memory_mib.into(),
            rec.hotplug_mib.into(),
            floor_mib,
            rec.containers.iter().filter_map(|c| c.memory_limit_mib),
        )
    }

    async fn request_hotplug(&self, sid: &str, mib: u64) -> Result<(), Error> {
        let p = self.vmm1(sid).await?;
        within_vmm_bound(sid, p.set_hotplug_memory(mib))
            .await?
            .map_err(|e| vmm_error(sid, e))
    }

    /// Ask the VMM for as much of the hot-plug region as the containers' limits need
    /// (see `memory.rs`); with `wait`, until the guest has plugged it, for at most
    /// [`memory::PLUG_WAIT`]. Nothing here fails the container change that called it:
    /// a VMM that cannot be asked is logged, and the container's own limit still holds.
    async fn fit_memory(&self, sb: &Arc<Sandbox>, wait: bool) {
        let mut sent = sb.memory_fit.lock().await;
        let rec = sb.snapshot();
        if rec.hotplug_mib == 0 {
            return;
        }
        let t = Self::memory_target(&rec, rec.hotplug_floor_mib);
        // Already asked for (and, if it grew, waited for) by an earlier change.
        if *sent == Some(t.mib) {
            return;
        }
        if t.short_mib > 0 {
            tracing::warn!(
                sandbox = %sb.id,
                "the containers' memory limits need {} MiB more than the VM's hot-plug region ({} MiB) holds",
                t.short_mib,
                rec.hotplug_mib
            );
        }
        if let Err(e) = self.request_hotplug(&sb.id, t.mib).await {
            tracing::warn!(sandbox = %sb.id, "cannot ask for {} MiB of hot-plug memory: {e}", t.mib);
            *sent = None;
            return;
        }
        *sent = Some(t.mib);
        tracing::info!(sandbox = %sb.id, "hot-plug memory asked: {} MiB", t.mib);
        if wait && !self.wait_plugged(&sb.id, t.mib).await {
            tracing::warn!(
                sandbox = %sb.id,
                "the guest did not plug {} MiB within {:?}; going on without it",
                t.mib,
                memory::PLUG_WAIT
            );
        }
    }

    /// Whether the guest had `mib` MiB of the region plugged within [`memory::PLUG_WAIT`].
    async fn wait_plugged(&self, sid: &str, mib: u64) -> bool {
        let deadline = Instant::now() + memory::PLUG_WAIT;
        let Ok(p) = self.vmm1(sid).await else {
            return false;
        };
        loop {
            let plugged = within_vmm_bound(sid, p.hotplug_memory())
                .await
                .ok()
                .and_then(|r| r.ok())
                .and_then(|h| h.get("plugged_mib").and_then(|v| u64::try_from(v).ok()));
            if plugged.is_some_and(|p| p >= mib) {
                return true;
            }
            if plugged.is_none() || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// See `Sandbox1.SetBalloonTarget`.
    pub async fn set_balloon_target(&self, sid: &str, mib: u64) -> Result<(), Error> {
        let p = self.vmm1(sid).await?;
        within_vmm_bound(sid, p.set_balloon_target(mib))
            .await?
            .map_err(|e| vmm_error(sid, e))
    }

    /// The security posture of every component of a sandbox, as JSON: what its jailer
    /// reported enforcing, and what `/proc` shows for the live process and its children
    /// (uids, capability sets, no_new_privs, seccomp mode of every thread, namespaces).
    pub fn security(&self, sid: &str) -> Result<String, Error> {
        let sb = self.get(sid)?;
        let rec = sb.snapshot();
        let mut out = vec![];
        for c in &rec.components {
            let (pid, supervisor) = c.pids();
            let jailed = supervisor.is_some();
            let report: Option<serde_json::Value> = std::fs::read(jail::report_path(&rec, &c.name))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .filter(|_| jailed);
            let process = pid.and_then(|p| bulkhead_jail::posture::live(p).ok());
            let children: Vec<_> = pid
                .map(bulkhead_jail::posture::descendants)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| bulkhead_jail::posture::live(p).ok())
                .collect();
            out.push(serde_json::json!({
                "name": c.name,
                "jailer_pid": supervisor,
                "pid": pid,
                "jailed": jailed,
                "report": report,
                "process": process,
                "children": children,
            }));
        }
        serde_json::to_string(&out).map_err(|e| Error::Failed(e.to_string()))
    }

    // ---- containers ----

    fn running(&self, id: &str) -> Result<Arc<Sandbox>, Error> {
        let sb = self.get(id)?;
        let state = sb.snapshot().state;
        if state != SandboxState::Running {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} is {state}"
            )));
        }
        Ok(sb)
    }

    fn container_state(sb: &Sandbox, cid: &str) -> Result<ContainerState, Error> {
        sb.snapshot()
            .container(cid)
            .map(|c| c.state)
            .ok_or_else(|| Error::NotFound(format!("no container {cid:?} in sandbox {}", sb.id)))
    }

    pub async fn create_container(
        self: &Arc<Self>,
        sid: &str,
        n: NewContainer,
    ) -> Result<u32, Error> {
        let NewContainer {
            id: cid,
            spec_json,
            rootfs,
            stdin,
            terminal,
            overlay,
            layers,
        } = n;
        let sb = self.running(sid)?;
        valid_id(&cid).map_err(Error::InvalidArgument)?;
        check_json_size("spec", &spec_json)?;
        let mut spec: serde_json::Value = serde_json::from_str(&spec_json)
            .map_err(|e| Error::InvalidArgument(format!("spec is not valid JSON: {e}")))?;
        if !spec.is_object() || !spec.get("process").is_some_and(|p| p.is_object()) {
            return Err(Error::InvalidArgument(
                "spec must be an OCI runtime spec object with a process".into(),
            ));
        }
        if let Some(t) = terminal {
            spec["process"]["terminal"] = serde_json::Value::Bool(t);
        }
        // Hooks name host binaries and run on the host (the OCI CLI runs them): the guest
        // could not run them, and must not be asked to.
        if let Some(o) = spec.as_object_mut() {
            o.remove("hooks");
        }
        let src = PathBuf::from(&rootfs);
        match &layers {
            Some(_) if !rootfs.is_empty() || overlay => {
                return Err(Error::InvalidArgument(
                    "give a rootfs directory or rootfs_overlay layers, not both".into(),
                ))
            }
            Some(l) => l.check_dirs().map_err(Error::InvalidArgument)?,
            None if !src.is_absolute() || !src.is_dir() => {
                return Err(Error::InvalidArgument(format!(
                    "rootfs {rootfs:?} is not an existing directory (absolute path)"
                )))
            }
            None => {}
        }
        let mount = {
            let mut r = sb.rec.lock().expect("rec lock");
            if r.container(&cid).is_some() {
                return Err(Error::AlreadyExists(format!(
                    "container {cid:?} exists in sandbox {sid}"
                )));
            }
            let mount = r.staging_dir().join(&cid).join("rootfs");
            r.containers.push(ContainerRec {
                id: cid.clone(),
                state: ContainerState::Creating,
                rootfs_mount: mount.clone(),
                exit_code: None,
                memory_limit_mib: memory::Limit::of(&spec["linux"]["resources"]).mib(),
            });
            mount
        };
        self.save(&sb);
        // The VM grows first, so the memory is there when the container starts.
        self.fit_memory(&sb, true).await;
        let result = async {
            let rec = sb.snapshot();
            if !rec.staging_dir().is_dir() {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {sid} was made by an older bulkheadd, whose shared directory \
                     the guest can write: recreate it to add containers"
                )));
            }
            let userns = jail::fs_userns_fd(&rec)
                .map_err(io_err("cannot reach virtiofsd's user namespace"))?;
            let ns = userns.as_ref().map(std::os::fd::AsFd::as_fd);
            let cdir = mount.parent().unwrap_or(&mount);
            std::fs::create_dir_all(&mount)
                .and_then(|()| jail::own_shared_dir(&rec, cdir))
                .map_err(io_err("cannot create the rootfs mount point"))?;
            if let Some(l) = &layers {
                let at = rec.run_dir.join("layers").join(&cid);
                let layer_ns = match ns {
                    Some(_) => Some(
                        jail::layer_userns(&rec)
                            .map_err(io_err("cannot make the writable layer's user namespace"))?,
                    ),
                    None => None,
                };
                let both = ns.zip(layer_ns.as_ref().map(std::os::fd::AsFd::as_fd));
                mounts::snapshot_overlay(l, &at, &mount, both)
                    .map_err(io_err("cannot mount the rootfs layers"))?;
            } else if overlay {
                // The writable layer lives outside the shared directory: the guest sees
                // only the merged view.
                let layer = rec.run_dir.join("layers").join(&cid);
                let owner = rec.jail_uid.unwrap_or(0);
                mounts::overlay(&src, &layer, &mount, ns.map(|n| (n, owner)))
                    .map_err(io_err("cannot mount the rootfs overlay"))?;
            } else {
                mounts::share(&src, &mount, ns).map_err(|e| match (ns, e.raw_os_error()) {
                    (Some(_), Some(libc::EINVAL)) => Error::FailedPrecondition(format!(
                        "cannot bind-mount the rootfs: this sandbox's virtiofsd runs in a \
                         user namespace, and {rootfs} is on a file system the kernel cannot \
                         idmap (an overlay mount?): {e}"
                    )),
                    _ => io_err("cannot bind-mount the rootfs")(e),
                })?;
            }
            share_bind_mounts(&mut spec, cdir, &format!("{GUEST_SHARED}/{cid}"), ns)?;
            let binds = cdir.join("mounts");
            if binds.exists() {
                jail::own_shared_dir(&rec, &binds).map_err(io_err("cannot create mounts"))?;
            }
            let req = CreateContainer {
                id: cid.clone(),
                spec_json: spec.to_string(),
                rootfs: Rootfs::Path(format!("{GUEST_SHARED}/{cid}/rootfs")),
                stdin,
            };
            sb.agent
                .call(Call::Change, move |c| c.create_container(req))
                .await
        }
        .await;
        match result {
            Ok(pid) => {
                self.update(
                    &sb,
                    Changed {
                        containers: true,
                        ..Default::default()
                    },
                    |r| {
                        if let Some(c) = r.container_mut(&cid) {
                            c.move_to(ContainerState::Created);
                        }
                    },
                )
                .await;
                Ok(pid)
            }
            Err(e) => {
                if let Some(dir) = mount.parent() {
                    let _ = mounts::unmount_and_remove(dir);
                }
                let _ =
                    mounts::unmount_and_remove(&sb.snapshot().run_dir.join("layers").join(&cid));
                sb.rec
                    .lock()
                    .expect("rec lock")
                    .containers
                    .retain(|c| c.id != cid);
                self.save(&sb);
                self.fit_memory(&sb, false).await;
                Err(e)
            }
        }
    }

    pub async fn start_container(self: &Arc<Self>, sid: &str, cid: String) -> Result<(), Error> {
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        let id = cid.clone();
        sb.agent.call(Call::Change, move |c| c.start(&id)).await?;
        self.set_container_state(&sb, &cid, ContainerState::Running, None)
            .await;
        self.watch_exit(&sb, cid);
        Ok(())
    }

    async fn set_container_state(
        &self,
        sb: &Arc<Sandbox>,
        cid: &str,
        state: ContainerState,
        code: Option<i32>,
    ) {
        self.update(
            sb,
            Changed {
                containers: true,
                ..Default::default()
            },
            |r| {
                if let Some(c) = r.container_mut(cid) {
                    if c.move_to(state) && code.is_some() {
                        c.exit_code = code;
                    }
                }
            },
        )
        .await;
    }

    /// Follow a running container until its init exits, then record the exit.
    /// Log and announce (`Healthy`) each change of the agent's health. Holds the
    /// sandbox weakly: the task ends with it.
    fn watch_health(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let d = Arc::downgrade(self);
        let weak = Arc::downgrade(sb);
        let mut rx = sb.agent.health();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let healthy = *rx.borrow_and_update();
                let (Some(d), Some(sb)) = (d.upgrade(), weak.upgrade()) else {
                    return;
                };
                if healthy {
                    tracing::info!(sandbox = %sb.id, "the guest agent answers again");
                } else {
                    tracing::warn!(sandbox = %sb.id, security_event = "agent-silent", "the guest agent stopped answering: sandbox unhealthy");
                }
                d.notify(
                    &sb,
                    Changed {
                        health: true,
                        ..Default::default()
                    },
                )
                .await;
            }
        });
    }

    /// Pass the guest's OOM kills on as `ContainerOom` signals, one per kill, for the
    /// sandbox's lifetime. The id comes from the guest: only a container this sandbox
    /// has is announced.
    fn watch_oom(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let d = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            while !sb.removing.load(Ordering::SeqCst) {
                match sb.agent.wait_oom().await {
                    Ok(cid) if sb.snapshot().container(&cid).is_none() => {
                        // The guest named a container it does not have: counted as a
                        // failure, so a guest answering this in a loop is backed off
                        // and then no longer asked.
                        failures += 1;
                        let shown: String = cid.chars().take(64).collect();
                        tracing::warn!(sandbox = %sb.id, "OOM event for an unknown container {shown:?}");
                        if failures >= 5 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    }
                    Ok(cid) => {
                        failures = 0;
                        tracing::info!(sandbox = %sb.id, container = %cid, "OOM kill in the guest");
                        d.events
                            .emit(Event::ContainerOom {
                                sb: sb.clone(),
                                id: cid,
                            })
                            .await;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures >= 5 || sb.removing.load(Ordering::SeqCst) {
                            if !sb.removing.load(Ordering::SeqCst) {
                                tracing::warn!(sandbox = %sb.id, "stopped watching OOM kills: {e}");
                            }
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    }
                }
            }
        });
    }

    fn watch_exit(self: &Arc<Self>, sb: &Arc<Sandbox>, cid: String) {
        let d = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            match sb.agent.wait_exit(cid.clone(), None).await {
                Ok(st) => {
                    d.set_container_state(&sb, &cid, ContainerState::Stopped, Some(st.code))
                        .await;
                    d.events
                        .emit(Event::ContainerExited {
                            sb: sb.clone(),
                            id: cid,
                            status: st.code,
                        })
                        .await;
                }
                Err(e) if !sb.removing.load(Ordering::SeqCst) => {
                    tracing::warn!(sandbox = %sb.id, container = %cid, "lost the exit: {e}")
                }
                Err(_) => {}
            }
        });
    }

    pub async fn exec(
        &self,
        sid: &str,
        cid: String,
        exec_id: String,
        process_json: String,
        stdin: bool,
    ) -> Result<u32, Error> {
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        valid_id(&exec_id).map_err(Error::InvalidArgument)?;
        check_json_size("process", &process_json)?;
        serde_json::from_str::<serde_json::Value>(&process_json)
            .ok()
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                Error::InvalidArgument("process must be an OCI process JSON object".into())
            })?;
        let e = ExecProcess {
            id: cid,
            exec_id,
            process_json,
            stdin,
        };
        sb.agent.call(Call::Change, move |c| c.exec(e)).await
    }

    /// A plain agent call on a container of a running sandbox.
    pub async fn container_call<T: Send + 'static>(
        &self,
        sid: &str,
        cid: &str,
        kind: Call,
        f: impl FnOnce(
                &mut bulkhead_protocol::client::AgentClient<std::os::unix::net::UnixStream>,
            ) -> Result<T, bulkhead_protocol::client::ClientError>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        let sb = self.running(sid)?;
        Self::container_state(&sb, cid)?;
        sb.agent.call(kind, f).await
    }

    pub async fn pause(&self, sid: &str, cid: String, pause: bool) -> Result<(), Error> {
        let id = cid.clone();
        self.container_call(sid, &cid, Call::Change, move |c| {
            c.expect_ok(&if pause {
                Request::Pause { id }
            } else {
                Request::Resume { id }
            })
        })
        .await?;
        let sb = self.get(sid)?;
        self.set_container_state(
            &sb,
            &cid,
            if pause {
                ContainerState::Paused
            } else {
                ContainerState::Running
            },
            None,
        )
        .await;
        Ok(())
    }

    pub async fn delete_container(&self, sid: &str, cid: String, force: bool) -> Result<(), Error> {
        let id = cid.clone();
        self.container_call(sid, &cid, Call::Change, move |c| c.delete(&id, force))
            .await?;
        let sb = self.get(sid)?;
        let mount = sb
            .snapshot()
            .container(&cid)
            .map(|c| c.rootfs_mount.clone());
        // The container's writable layer is the guest's to fill: removed off the
        // runtime's thread.
        let layer = sb.snapshot().run_dir.join("layers").join(&cid);
        tokio::task::spawn_blocking(move || {
            if let Some(m) = mount.as_ref().and_then(|m| m.parent()) {
                mounts::unmount_and_remove(m).map_err(io_err("cannot unmount the rootfs"))?;
            }
            let _ = mounts::unmount_and_remove(&layer);
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::Failed(format!("container cleanup task: {e}")))??;
        self.update(
            &sb,
            Changed {
                containers: true,
                ..Default::default()
            },
            |r| r.containers.retain(|c| c.id != cid),
        )
        .await;
        self.fit_memory(&sb, false).await;
        Ok(())
    }

    /// See `Sandbox1.Update`. A raised memory limit grows the VM before the guest is
    /// told (and waits for it, bounded); a lowered one shrinks it after.
    pub async fn update_container(
        &self,
        sid: &str,
        cid: String,
        resources_json: String,
    ) -> Result<(), Error> {
        check_json_size("resources", &resources_json)?;
        let resources = serde_json::from_str::<serde_json::Value>(&resources_json)
            .ok()
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "resources must be an OCI linux.resources JSON object".into(),
                )
            })?;
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        let old = sb
            .snapshot()
            .container(&cid)
            .and_then(|c| c.memory_limit_mib);
        let change = memory::LimitChange::of(old, memory::Limit::of(&resources));
        if let memory::LimitChange::Grow(new) = change {
            self.set_memory_limit(&sb, &cid, new, true).await;
        }
        let id = cid.clone();
        let told = self
            .container_call(sid, &cid, Call::Change, move |c| {
                c.expect_ok(&Request::Update { id, resources_json })
            })
            .await;
        match (&told, change) {
            // The guest kept the old limit: so does the record.
            (Err(_), memory::LimitChange::Grow(_)) => {
                self.set_memory_limit(&sb, &cid, old, false).await
            }
            (Ok(()), memory::LimitChange::Shrink(new)) => {
                self.set_memory_limit(&sb, &cid, new, false).await
            }
            _ => {}
        }
        told
    }

    /// Record a container's memory limit and fit the VM's hot-plug memory to it.
    async fn set_memory_limit(&self, sb: &Arc<Sandbox>, cid: &str, to: Option<u64>, wait: bool) {
        self.update(sb, Changed::default(), |r| {
            if let Some(c) = r.container_mut(cid) {
                c.memory_limit_mib = to;
            }
        })
        .await;
        self.fit_memory(sb, wait).await;
    }

    pub async fn attach(
        &self,
        sid: &str,
        cid: String,
        exec_id: Option<String>,
        stream: &str,
    ) -> Result<std::os::unix::net::UnixStream, Error> {
        use bulkhead_protocol::StdioStream;
        let sb = self.running(sid)?;
        Self::container_state(&sb, &cid)?;
        let which = match stream {
            "stdin" => StdioStream::Stdin,
            "stdout" => StdioStream::Stdout,
            "stderr" => StdioStream::Stderr,
            "wait" => return sb.agent.wait_stream(cid, exec_id).await,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "stream {other:?}: want stdin, stdout, stderr or wait"
                )))
            }
        };
        sb.agent.attach_stdio(cid, exec_id, which).await
    }
}

/// What `Sandbox1.VmStatus` passes on from the VMM (a separate, jailed process): known
/// keys only, strings clipped.
const VM_MEMORY_KEYS: [&str; 5] = [
    "asked_backing",
    "asked_hugepages",
    "backing",
    "pages",
    "why",
];
/// Each balloon figure the VMM may send, with its D-Bus signature.
const VM_BALLOON_FIELDS: [(&str, &str); 10] = [
    ("active", "b"),
    ("target_mib", "t"),
    ("actual_mib", "t"),
    ("features", "as"),
    ("inflated_bytes", "t"),
    ("reported_bytes", "t"),
    ("refused", "t"),
    ("discard_errors", "t"),
    ("stats", "a{st}"),
    ("stats_age_ms", "t"),
];
/// Each virtio-mem figure the VMM may send, with its D-Bus signature.
const VM_HOTPLUG_FIELDS: [(&str, &str); 9] = [
    ("active", "b"),
    ("addr", "t"),
    ("region_mib", "t"),
    ("requested_mib", "t"),
    ("plugged_mib", "t"),
    ("plugs", "t"),
    ("unplugs", "t"),
    ("refused", "t"),
    ("discard_errors", "t"),
];
/// The most entries passed on in `features` or `stats` (the VMM keeps at most 64 stats).
const VM_BALLOON_LIST_MAX: usize = 64;

/// A known figure of `fields`, of the expected type, its lists within bounds.
fn field_ok(fields: &[(&str, &str)], key: &str, v: &OwnedValue) -> bool {
    let sig = v.value_signature().to_string();
    if !fields.contains(&(key, sig.as_str())) {
        return false;
    }
    match &**v {
        Value::Array(a) => {
            a.len() <= VM_BALLOON_LIST_MAX
                && a.iter()
                    .all(|s| matches!(s, Value::Str(s) if s.len() <= 64))
        }
        Value::Dict(d) => {
            d.iter().count() <= VM_BALLOON_LIST_MAX
                && d.iter()
                    .all(|(k, _)| matches!(k, Value::Str(s) if s.len() <= 64))
        }
        _ => true,
    }
}

/// Every call to a VMM is bounded: a stuck or hostile VMM costs a caller 5 s at most.
async fn within_vmm_bound<T>(
    sid: &str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .map_err(|_| Error::Backend(format!("sandbox {sid}: the VMM did not answer in 5 s")))
}

fn clip(mut s: String) -> String {
    if s.len() > 512 {
        let mut end = 512;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn owned(v: Value<'_>) -> OwnedValue {
    v.try_to_owned().unwrap_or_else(|_| OwnedValue::from(0u8))
}

/// A Vmm1 failure as the manager reports it: the VMM's own named errors keep their
/// kind (a refused balloon target stays `InvalidArgument`), anything else is `Backend`.
fn vmm_error(sid: &str, e: zbus::Error) -> Error {
    if let zbus::Error::MethodError(name, msg, _) = &e {
        let msg = clip(msg.clone().unwrap_or_default());
        match name.as_str() {
            "org.bulkhead.Error.InvalidArgument" => return Error::InvalidArgument(msg),
            "org.bulkhead.Error.FailedPrecondition" => return Error::FailedPrecondition(msg),
            _ => {}
        }
    }
    Error::Backend(format!("sandbox {sid}: VMM control interface: {e}"))
}
