//! The manager's state: its sandboxes and what it shares between their operations
//! (records saved and changes published as events). The operations, one concern each:
//! - `sandboxes.rs`: a sandbox's life (create, boot, remove, adopt);
//! - `components.rs`: its host processes once started (watched, restarted, `Security()`);
//! - `containers.rs`: containers in a running sandbox;
//! - `watch.rs`: the agent's health, containers' exits and OOM kills;
//! - `vm.rs`: the VM's control passed through to its components.
//!
//! The D-Bus face (`api.rs`) calls in; the daemon answers and sends events.

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
use crate::events::Changed;
use crate::events::{Event, Events};
use crate::lifecycle::{ContainerState, Role, SandboxState};
use crate::store::{Component, ContainerRec, SandboxRec, Store};
use crate::{jail, memory, mounts, supervisor};

mod components;
mod containers;
mod sandboxes;
mod vm;
mod watch;

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

use bulkhead_dbus::{ContainerOptions, SandboxOptions};

/// What `CreateContainer` asks for.
pub struct NewContainer {
    pub id: String,
    pub spec_json: String,
    /// A host directory.
    pub rootfs: String,
    pub options: ContainerOptions,
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

    /// Move the sandbox to `next` (where allowed), save it and publish the change.
    async fn move_sandbox(&self, sb: &Arc<Sandbox>, next: SandboxState) {
        let what = Changed {
            state: true,
            ..Default::default()
        };
        self.update(sb, what, |r| {
            r.move_to(next);
        })
        .await;
    }

    async fn notify(&self, sb: &Arc<Sandbox>, what: Changed) {
        self.events
            .emit(Event::Changed {
                sb: sb.clone(),
                what,
            })
            .await;
    }
}
