//! Containers in the guest, on youki's libcontainer.
//!
//! The agent keeps, per container, what libcontainer does not: the stdio ends, the exit
//! cells the reaper fills, the exec'd processes. libcontainer keeps the OCI state under
//! `<state>/lc/<id>`; the spec as rewritten for the guest sits in `<state>/bundles/<id>`.
//!
//! libcontainer calls are serialized (one create, start, kill or delete at a time): they
//! fork, and a fork taken in the middle of another create would carry that create's pipe
//! ends into an unrelated container until it execs. Waits never take that lock.

//!
//! One concern per file: this one holds the table of containers and their processes;
//! `sandbox` the pod's shared namespaces, `spec` the spec and rootfs as the guest runs
//! them, `spawn` starting a process with its stdio, `lifecycle` create to delete, `exec`
//! exec'd processes and stdio calls, `resources` the cgroup, `oom` OOM kill events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bulkhead_protocol::{AgentError, ContainerInfo, ContainerState, MAX_ID_LEN};
use libcontainer::container::{Container, ContainerStatus};

use crate::reaper::{ExitCell, Reaper};
use crate::stdio::ProcIo;

mod exec;
mod lifecycle;
mod oom;
mod resources;
mod sandbox;
mod spawn;
mod spec;

use oom::OomQueue;

/// Cgroup (v2) directory under which every container's cgroup is made.
const CGROUP_PARENT: &str = "bulkhead";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Most containers one agent keeps.
const MAX_CONTAINERS: usize = 1024;

struct Proc {
    pid: u32,
    exit: Arc<ExitCell>,
    io: Arc<ProcIo>,
}

/// How many collected execs' stdio a container keeps reachable (see [`Ctr::collected_io`]).
const KEPT_COLLECTED_IO: usize = 16;

struct Ctr {
    init: Proc,
    execs: HashMap<String, Proc>,
    /// The stdio of the latest execs whose exit was collected (and which were therefore
    /// forgotten): a host that opens its wait stream before the output streams (the CLI
    /// does) can collect a quick exec's exit first and still attach its output after.
    collected_io: std::collections::VecDeque<(String, Arc<ProcIo>)>,
    block_mount: Option<PathBuf>,
    oom_kills: u64,
}

struct Sandbox {
    holder: std::process::Child,
    ipc: PathBuf,
    uts: PathBuf,
    pid: Option<PathBuf>,
}

pub struct Runtime {
    state: PathBuf,
    /// In a guest: SetTime may set the clock.
    in_guest: bool,
    reaper: Arc<Reaper>,
    tables: Mutex<Tables>,
    lc: Mutex<()>,
    oom: OomQueue,
}

#[derive(Default)]
struct Tables {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Ctr>,
}

fn runtime_err(e: impl std::error::Error) -> AgentError {
    // libcontainer wraps errors transparently; the chain holds the useful part.
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.contains(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = s.source();
    }
    AgentError::Runtime(msg)
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::Io(format!("{what}: {e}"))
}

pub fn validate_id(id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "id {:?}: 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], not starting with '.'",
            id.chars().take(MAX_ID_LEN + 1).collect::<String>()
        )))
    }
}

fn not_found(id: &str) -> AgentError {
    AgentError::NotFound(format!("container {id}"))
}

impl Runtime {
    pub fn new(state: PathBuf, in_guest: bool, reaper: Arc<Reaper>) -> Arc<Self> {
        let rt = Arc::new(Runtime {
            state,
            in_guest,
            reaper,
            tables: Mutex::new(Tables::default()),
            lc: Mutex::new(()),
            oom: OomQueue::default(),
        });
        let weak = Arc::downgrade(&rt);
        crate::spawn("oom-watch", move || oom::oom_watch(weak));
        rt
    }

    /// Running as a guest's PID 1 (calls that would change a host are allowed).
    pub fn in_guest(&self) -> bool {
        self.in_guest
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lc_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lc_root(&self) -> PathBuf {
        self.state.join("lc")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.state.join("bundles").join(id)
    }

    fn cgroup_rel(id: &str) -> String {
        format!("/{CGROUP_PARENT}/{id}")
    }

    fn cgroup_dir(id: &str) -> PathBuf {
        Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(id)
    }

    fn load(&self, id: &str) -> Result<Container, AgentError> {
        Container::load(self.lc_root().join(id)).map_err(runtime_err)
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: Option<&str>,
        f: impl FnOnce(&Proc) -> T,
    ) -> Result<T, AgentError> {
        let t = self.tables();
        let c = t.containers.get(id).ok_or_else(|| not_found(id))?;
        match exec_id {
            None => Ok(f(&c.init)),
            Some(e) => c
                .execs
                .get(e)
                .map(f)
                .ok_or_else(|| AgentError::NotFound(format!("exec {e} in container {id}"))),
        }
    }

    fn get_init(&self, id: &str) -> Result<u32, AgentError> {
        self.with_proc(id, None, |p| p.pid)
    }

    pub fn list(&self) -> Vec<ContainerInfo> {
        let ids: Vec<(String, u32, bool)> = self
            .tables()
            .containers
            .iter()
            .map(|(id, c)| (id.clone(), c.init.pid, c.init.exit.get().is_some()))
            .collect();
        let mut out: Vec<ContainerInfo> = ids
            .into_iter()
            .map(|(id, pid, exited)| {
                let state = if exited {
                    ContainerState::Stopped
                } else {
                    match self.load(&id).map(|c| c.status()) {
                        Ok(ContainerStatus::Created) | Ok(ContainerStatus::Creating) => {
                            ContainerState::Created
                        }
                        Ok(ContainerStatus::Paused) => ContainerState::Paused,
                        Ok(ContainerStatus::Running) => ContainerState::Running,
                        _ => ContainerState::Stopped,
                    }
                };
                ContainerInfo {
                    id,
                    state,
                    pid: Some(pid),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}
