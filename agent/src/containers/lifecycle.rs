//! A container's life: create, start, signal, wait, pause and resume, delete.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_protocol::{AgentError, CreateContainer, ExitStatus};
use libcontainer::container::ContainerStatus;
use oci_spec::runtime::Spec;

use super::{io_err, runtime_err, validate_id, Ctr, Proc, Runtime, MAX_CONTAINERS};

/// How long a delete waits for SIGKILLed processes to leave their cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl Runtime {
    pub fn create(&self, req: CreateContainer) -> Result<u32, AgentError> {
        validate_id(&req.id)?;
        let id = req.id.clone();
        {
            let t = self.tables();
            if t.containers.contains_key(&id) {
                return Err(AgentError::AlreadyExists(format!("container {id}")));
            }
            if t.containers.len() >= MAX_CONTAINERS {
                return Err(AgentError::InvalidArgument(format!(
                    "more than {MAX_CONTAINERS} containers"
                )));
            }
        }
        let spec: Spec = serde_json::from_str(&req.spec_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI spec: {e}")))?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let (root, block_mount) = self.prepare_rootfs(&id, &req.rootfs)?;
        let undo_mount = |m: &Option<PathBuf>| {
            if let Some(m) = m {
                crate::sys::umount(m);
            }
        };
        let spec = match self.rewrite_spec(&id, spec, &root) {
            Ok(s) => s,
            Err(e) => {
                undo_mount(&block_mount);
                return Err(e);
            }
        };
        let bundle = self.bundle(&id);
        let res = (|| {
            std::fs::create_dir_all(&bundle).map_err(io_err("bundle"))?;
            std::fs::write(
                bundle.join("config.json"),
                serde_json::to_vec(&spec).map_err(|e| AgentError::Io(e.to_string()))?,
            )
            .map_err(io_err("config.json"))?;
            let _lc = self.lc_lock();
            let since = Instant::now();
            let (io, pid) = self.spawn_with_stdio(&id, terminal, req.stdin, |b| {
                let c = b
                    .as_init(&bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .map_err(runtime_err)?;
                c.pid()
                    .map(|p| p.as_raw())
                    .ok_or_else(|| AgentError::Runtime("container has no pid".into()))
            })?;
            let exit = self.reaper.watch(pid, since);
            Ok(Proc {
                pid: pid as u32,
                exit,
                io,
            })
        })();
        match res {
            Ok(init) => {
                let pid = init.pid;
                self.tables().containers.insert(
                    id,
                    Ctr {
                        init,
                        execs: HashMap::new(),
                        collected_io: Default::default(),
                        block_mount,
                        oom_kills: 0,
                    },
                );
                Ok(pid)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                undo_mount(&block_mount);
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<(), AgentError> {
        self.get_init(id)?;
        let _lc = self.lc_lock();
        let mut c = self.load(id)?;
        if !c.can_start() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is {:?}",
                c.status()
            )));
        }
        c.start().map_err(runtime_err)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        sig: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let signal = libcontainer::signal::Signal::try_from(sig)
            .map_err(|_| AgentError::InvalidArgument(format!("signal {sig}")))?;
        let (pid, exited) = self.with_proc(id, exec_id, |p| (p.pid, p.exit.get().is_some()))?;
        if exec_id.is_some() || !all {
            if exited {
                return Err(AgentError::FailedPrecondition(format!(
                    "process {pid} has exited"
                )));
            }
            if exec_id.is_some() {
                // The pid is still ours: its exit has not been recorded, so it is not
                // reaped and cannot have been reused.
                let sig = nix::sys::signal::Signal::try_from(sig)
                    .map_err(|_| AgentError::InvalidArgument(format!("signal {sig}")))?;
                return nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
                    .map_err(|e| AgentError::Io(format!("kill {pid}: {e}")));
            }
        }
        let _lc = self.lc_lock();
        let mut c = self.load(id)?;
        c.kill(signal, all).map_err(runtime_err)
    }

    /// Wait for a process to exit. An exec whose exit has been collected is forgotten
    /// (its id free again), so execs never pile up in a long-lived container.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus, AgentError> {
        let cell = self.with_proc(id, exec_id, |p| p.exit.clone())?;
        let status = cell.wait();
        if let Some(e) = exec_id {
            let mut t = self.tables();
            if let Some(c) = t.containers.get_mut(id) {
                if c.execs.get(e).is_some_and(|p| Arc::ptr_eq(&p.exit, &cell)) {
                    if let Some(p) = c.execs.remove(e) {
                        c.collected_io.push_back((e.to_string(), p.io));
                        if c.collected_io.len() > super::KEPT_COLLECTED_IO {
                            c.collected_io.pop_front();
                        }
                    }
                }
            }
        }
        Ok(status)
    }

    pub fn delete(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let init_exit = self.with_proc(id, None, |p| p.exit.clone())?;
        let exited = init_exit.get().is_some();
        {
            let _lc = self.lc_lock();
            match self.load(id) {
                Ok(mut c) => {
                    if !force && !exited && c.status() == ContainerStatus::Running {
                        return Err(AgentError::FailedPrecondition(format!(
                            "container {id} is running; stop it or delete with force"
                        )));
                    }
                    // Kill here rather than in libcontainer: it gives the processes
                    // about 100 ms to leave the cgroup, too short for a loaded TCG
                    // guest. Then wait for the reaper to collect the init, so that
                    // libcontainer finds it gone instead of racing the reaper for
                    // /proc/<pid>/stat.
                    if !crate::cgroupfs::kill_all(&Self::cgroup_dir(id), KILL_TIMEOUT) {
                        crate::log(&format!("delete {id}: cgroup not empty after SIGKILL"));
                    }
                    if init_exit.wait_timeout(KILL_TIMEOUT).is_none() {
                        crate::log(&format!("delete {id}: init not reaped after SIGKILL"));
                    }
                    c.delete(true).map_err(runtime_err)?;
                }
                // State already gone (a half-finished delete): finish the rest.
                Err(e) => crate::log(&format!("delete {id}: {e}; cleaning up")),
            }
        }
        let ctr = self.tables().containers.remove(id);
        let _ = std::fs::remove_dir_all(self.bundle(id));
        if let Some(Ctr {
            block_mount: Some(m),
            ..
        }) = ctr
        {
            crate::sys::umount(&m);
        }
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<(), AgentError> {
        self.get_init(id)?;
        let _lc = self.lc_lock();
        self.load(id)?.pause().map_err(runtime_err)
    }

    pub fn resume(&self, id: &str) -> Result<(), AgentError> {
        self.get_init(id)?;
        let _lc = self.lc_lock();
        self.load(id)?.resume().map_err(runtime_err)
    }
}
