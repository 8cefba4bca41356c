//! Sandbox records on disk, so a bulkheadd that was killed and started again finds every
//! sandbox still running. One JSON file per sandbox, `<state>/sandboxes/<id>.json`,
//! replaced atomically (write, fsync, rename) on every change.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bulkhead_host::config::NetBackend;
use serde::{Deserialize, Serialize};

use crate::lifecycle::{ContainerState, SandboxState};

/// A host process that belongs to a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    /// The process bulkheadd started and watches: the component's jailer (its
    /// supervisor) when jailed, else the component itself. See [`Component::pids`].
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid,
    /// it names one process even after the pid is reused.
    pub start_time: u64,
}

impl ContainerRec {
    /// Move to `next` where [`ContainerState::may_become`] allows it; otherwise stay
    /// (a pause that completes after the init exited leaves it stopped) and say so.
    pub fn move_to(&mut self, next: ContainerState) -> bool {
        crate::lifecycle::step(&mut self.state, next, &self.id)
    }
}

impl Component {
    /// The component's own process and, when it runs under a jailer, that supervisor:
    /// what users are shown (`Sandbox1.Components`, `Security()`). The own pid is
    /// `None` while a jailer has no child (starting, or its component gone).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        if bulkhead_jail::posture::is_jailer(self.pid) {
            (
                bulkhead_jail::posture::jailed_child(self.pid),
                Some(self.pid),
            )
        } else {
            (Some(self.pid), None)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRec {
    pub id: String,
    /// Changed only through [`ContainerRec::move_to`].
    pub state: ContainerState,
    /// Where its rootfs is bind-mounted in the shared directory.
    pub rootfs_mount: PathBuf,
    pub exit_code: Option<i32>,
    /// Its memory limit (`linux.resources.memory.limit`, MiB rounded up), as created or
    /// last updated; what the VM's hot-plug memory is sized by.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRec {
    pub id: String,
    pub backend: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The VM's virtio-mem region (bulkhead-vmm), MiB beyond `memory_mib` the guest is
    /// given when `SetHotplugMemory` asks; 0: none.
    #[serde(default)]
    pub hotplug_mib: u32,
    /// What `SetHotplugMemory` last asked for by hand: the containers' limits can plug
    /// more, never less.
    #[serde(default)]
    pub hotplug_floor_mib: u64,
    pub created_at_us: u64,
    /// Changed only through [`SandboxRec::move_to`].
    pub state: SandboxState,
    /// Sockets, logs and the shared directory; short, so socket paths fit in 108 bytes.
    pub run_dir: PathBuf,
    pub components: Vec<Component>,
    pub containers: Vec<ContainerRec>,
    pub timings: BTreeMap<String, u64>,
    /// The pod's hostname, when the creator set one.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The pod's network namespace as plumbed for the guest; `None` without a network.
    #[serde(default)]
    pub network: Option<crate::net::NetRec>,
    /// The uid (and gid) its jailed components run as, the first of the sandbox's
    /// range of host ids; `None` when not jailed.
    #[serde(default)]
    pub jail_uid: Option<u32>,
    /// virtiofsd runs as root of a user namespace of the sandbox's ids, and what the
    /// shared directory serves is mounted idmapped (`jail.virtiofsd_userns`).
    #[serde(default)]
    pub fs_userns: bool,
    /// What carries the pod interfaces' frames.
    #[serde(default)]
    pub net_backend: NetBackend,
}

impl SandboxRec {
    /// Move to `next` where [`SandboxState::may_become`] allows it; otherwise stay and
    /// say so.
    pub fn move_to(&mut self, next: SandboxState) -> bool {
        crate::lifecycle::step(&mut self.state, next, &self.id)
    }

    /// What the jailed components may write: their sockets and the serial log. Owned
    /// by the sandbox's jail uid; the rest of the run directory is not theirs.
    pub fn vm_dir(&self) -> PathBuf {
        self.run_dir.join("vm")
    }

    /// The hybrid vsock socket through which the agent is reached.
    pub fn vsock_socket(&self) -> PathBuf {
        self.vm_dir().join("vsock.sock")
    }

    /// The directory virtiofsd shares with the guest: a bind of [`Self::staging_dir`]
    /// whose own mount is read-only, so the guest can write inside the containers'
    /// root file systems and volumes mounted below it, and nowhere in the tree that
    /// bulkheadd builds (`<cid>/`, `<cid>/mounts/`, the mount points).
    pub fn shared_dir(&self) -> PathBuf {
        self.run_dir.join("shared")
    }

    /// The host-only side of the shared directory, where bulkheadd makes the
    /// containers' directories and mount points and mounts into them. No guest and no
    /// jailed process can write its directories, so no path bulkheadd follows there can
    /// have been planted.
    pub fn staging_dir(&self) -> PathBuf {
        self.run_dir.join("staging")
    }

    pub fn container(&self, id: &str) -> Option<&ContainerRec> {
        self.containers.iter().find(|c| c.id == id)
    }

    pub fn container_mut(&mut self, id: &str) -> Option<&mut ContainerRec> {
        self.containers.iter_mut().find(|c| c.id == id)
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> std::io::Result<Store> {
        let dir = state_dir.join("sandboxes");
        std::fs::create_dir_all(&dir)?;
        Ok(Store { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn save(&self, rec: &SandboxRec) -> std::io::Result<()> {
        let path = self.path(&rec.id);
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }

    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record; a file that cannot be read or parsed is reported, not fatal.
    pub fn load_all(&self) -> Vec<Result<SandboxRec, String>> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        rd.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| {
                std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .collect()
    }
}

/// A running sandbox's record with one VMM, for tests.
#[cfg(test)]
pub(crate) fn test_rec(id: &str) -> SandboxRec {
    SandboxRec {
        id: id.into(),
        backend: "qemu".into(),
        cpus: 1,
        memory_mib: 256,
        hotplug_mib: 0,
        hotplug_floor_mib: 0,
        created_at_us: 1,
        state: SandboxState::Running,
        run_dir: "/run/x".into(),
        jail_uid: None,
        fs_userns: false,
        net_backend: NetBackend::default(),
        components: vec![Component {
            name: "vmm".into(),
            pid: 42,
            start_time: 7,
        }],
        containers: vec![],
        timings: BTreeMap::new(),
        hostname: None,
        network: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> SandboxRec {
        test_rec(id)
    }

    #[test]
    fn a_record_from_before_net_backend_loads_with_bulkhead_net() {
        let mut v = serde_json::to_value(rec("old")).unwrap();
        v.as_object_mut().unwrap().remove("net_backend");
        let r: SandboxRec = serde_json::from_value(v).unwrap();
        assert_eq!(r.net_backend, NetBackend::BulkheadNet);
        let mut v = serde_json::to_value(rec("new")).unwrap();
        v["net_backend"] = "vhost-net".into();
        let r: SandboxRec = serde_json::from_value(v).unwrap();
        assert_eq!(r.net_backend, NetBackend::VhostNet);
    }

    #[test]
    fn save_load_remove() {
        let dir = std::env::temp_dir().join(format!("bh-store-{}", std::process::id()));
        let s = Store::new(&dir).unwrap();
        s.save(&rec("a")).unwrap();
        s.save(&rec("b")).unwrap();
        std::fs::write(dir.join("sandboxes/bad.json"), b"{not json").unwrap();
        let mut all = s.load_all();
        all.sort_by_key(|r| r.as_ref().map(|r| r.id.clone()).unwrap_or_default());
        assert_eq!(all.len(), 3);
        assert!(all[0].is_err(), "the corrupt file is reported");
        assert_eq!(all[1].as_ref().unwrap(), &rec("a"));
        s.remove("a").unwrap();
        s.remove("a").unwrap();
        assert_eq!(s.load_all().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
