//! How a planned component is started: under `bulkhead-jailer` with its sandbox's uid
//! (the default when bulkheadd is root), or as it is when jailing is off.
//!
//! Each jail holds the component's program, the host's system libraries, the sandbox's
//! `vm/` directory (read-write: its sockets and the serial log) and what the component
//! declared in its [`Needs`]; nothing else of the host is in its mount namespace.

use std::path::PathBuf;
use std::process::Command;

use bulkhead_host::config::{Binary, Config, Toggle, IDS_PER_SANDBOX};
use bulkhead_jail::{Device, Jail, Net};

use crate::backend::{ComponentSpec, PlanError};
use crate::store::SandboxRec;

/// Environment passed into a jail; nothing else of bulkheadd's is.
const PASSED_ENV: &[&str] = &["BULKHEAD_LOG", "RUST_LOG"];

/// The cgroup of a sandbox, below bulkheadd's own in every hierarchy.
pub fn cgroup(rec: &SandboxRec) -> String {
    format!("bulkhead/{}", rec.id)
}

/// The host directory that becomes the component's `/`.
pub fn root(rec: &SandboxRec, name: &str) -> PathBuf {
    rec.run_dir.join("jail").join(name)
}

/// Where the jailer writes what it enforced for `name`.
pub fn report_path(rec: &SandboxRec, name: &str) -> PathBuf {
    rec.run_dir.join(format!("{name}.jail.json"))
}

/// The jail `spec` runs in, or `None` when the sandbox is not jailed.
pub fn jail_for(rec: &SandboxRec, spec: &ComponentSpec) -> Option<Jail> {
    let uid = rec.jail_uid?;
    let program = PathBuf::from(spec.command.get_program());
    let mut j = Jail::new(&rec.id, &spec.name, root(rec, &spec.name), program.clone());
    if spec.needs.root_caps.is_empty() {
        j.uid = uid;
        j.gid = uid;
    } else if spec.needs.own_userns {
        // Root of a namespace whose ids are the sandbox's: its capabilities hold over
        // what those ids own, which the idmapped mounts make the container files.
        j.uid = uid;
        j.gid = uid;
        j.userns = Some(IDS_PER_SANDBOX);
        j.keep_caps = spec.needs.root_caps.iter().map(|c| c.to_string()).collect();
    } else {
        j.uid = 0;
        j.gid = 0;
        j.keep_caps = spec.needs.root_caps.iter().map(|c| c.to_string()).collect();
    }
    j.read_only = bulkhead_jail::loader_paths(&program);
    j.read_only.push(program);
    j.read_only.extend(spec.needs.read_only.iter().cloned());
    j.read_write.push(rec.vm_dir());
    j.read_write.extend(spec.needs.read_write.iter().cloned());
    if spec.needs.kvm {
        j.devices.push(Device::Kvm);
    }
    j.net = Net::None;
    j.landlock = !spec.needs.sandboxes_itself;
    j.allow_list = spec.needs.allow_list.map(str::to_string);
    if let Some(n) = spec.needs.max_files {
        j.max_files = n;
    }
    j.cgroup = Some(cgroup(rec));
    j.keep_fds = spec
        .fds
        .iter()
        .map(|(_, n)| *n)
        .filter(|n| Some(*n) != spec.start_gate)
        .collect();
    j.start_gate = spec.start_gate;
    j.env = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    j.report = Some(report_path(rec, &spec.name));
    j.args = spec.command.get_args().map(Into::into).collect();
    Some(j)
}

/// The command that starts `spec`: the jailer, or the program itself (its descriptors
/// are handed on by [`crate::supervisor::spawn`]).
pub fn command(cfg: &Config, rec: &SandboxRec, spec: &ComponentSpec) -> Result<Command, PlanError> {
    Ok(match jail_for(rec, spec) {
        Some(j) => {
            let jailer = cfg.binary(Binary::BulkheadJailer).ok_or_else(|| {
                PlanError("bulkhead-jailer not found (see `bulkhead check`)".into())
            })?;
            let root = root(rec, &spec.name);
            std::fs::create_dir_all(&root)
                .map_err(|e| PlanError(format!("{}: {e}", root.display())))?;
            let mut c = Command::new(jailer);
            c.args(j.to_args());
            c
        }
        None => {
            let mut c = Command::new(spec.command.get_program());
            c.args(spec.command.get_args());
            c
        }
    })
}

/// Make the sandbox's run directory, root's and 0700, in `<state>/run` (made 0700 by
/// [`crate::confine`]): containers' root file systems, volumes (Kubernetes secrets are
/// 0644 inside) and set-uid files a container made are mounted below it, and no other
/// host user may reach them. Jailed components see only the paths bound into their own
/// roots.
pub fn make_run_dir(rec: &SandboxRec) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(&rec.run_dir)
}

/// MiB of the sandbox's `vm/` directory: sockets and the consoles' logs, which the guest
/// fills as it likes (bulkhead-vmm caps each at 16 MiB, QEMU's `-serial file:` has no
/// cap of its own: the file system's size is it).
pub const VM_DIR_MIB: u64 = 40;

/// Make the sandbox's `vm/` directory, owned by its jail uid (0700), so jailed
/// components can create their sockets and nothing else of the run directory: a tmpfs
/// of [`VM_DIR_MIB`] where bulkheadd can mount (as root), so a guest writing its console
/// without end fills its own directory and not the host's `/run`.
pub fn make_vm_dir(rec: &SandboxRec) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let vm = rec.vm_dir();
    std::fs::create_dir_all(&vm)?;
    if is_root() {
        // The tmpfs's own top carries the owner and the mode.
        crate::mounts::bounded_tmpfs(&vm, VM_DIR_MIB, 0o700, rec.jail_uid.unwrap_or(0))
    } else if let Some(uid) = rec.jail_uid {
        std::os::unix::fs::chown(&vm, Some(uid), Some(uid))?;
        std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o700))
    } else {
        Ok(())
    }
}

/// Make the sandbox's `layers/` directory, where the containers' writable layers live
/// (`bulkhead run IMAGE`, `CreateContainer` with `overlay`): root's, 0700, and a tmpfs of
/// `layers_mib` where bulkheadd can mount, so what the guest writes into its root file
/// systems is bounded per sandbox and the pod, not the host, gets ENOSPC.
pub fn make_layers_dir(rec: &SandboxRec, layers_mib: u64) -> std::io::Result<()> {
    let layers = rec.run_dir.join("layers");
    bulkhead_host::private_dir(&layers)?;
    if is_root() {
        crate::mounts::bounded_tmpfs(&layers, layers_mib, 0o700, 0)?;
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Give a directory bulkheadd makes in the shared directory to the sandbox's first id
/// when virtiofsd runs in the sandbox's user namespace, where that id is root: the guest
/// sees it owned by root, as without the namespace.
pub fn own_shared_dir(rec: &SandboxRec, dir: &std::path::Path) -> std::io::Result<()> {
    match rec.jail_uid.filter(|_| rec.fs_userns) {
        Some(uid) => std::os::unix::fs::chown(dir, Some(uid), Some(uid)),
        None => Ok(()),
    }
}

/// virtiofsd's user namespace, to idmap what is mounted into the shared directory
/// with: opened from the live process and checked to map exactly the sandbox's ids.
/// `None` when the sandbox's virtiofsd has none.
pub fn fs_userns_fd(rec: &SandboxRec) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    let Some(uid) = rec.jail_uid.filter(|_| rec.fs_userns) else {
        return Ok(None);
    };
    let pid = rec
        .components
        .iter()
        .find(|c| crate::lifecycle::Role::of(&c.name) == Some(crate::lifecycle::Role::Virtiofsd))
        .and_then(|c| c.pids().0)
        .ok_or_else(|| std::io::Error::other("the sandbox's virtiofsd is not running"))?;
    bulkhead_jail::idmap::userns_of(pid, uid, IDS_PER_SANDBOX).map(Some)
}

/// The user namespace a writable layer is idmapped through for a sandbox whose
/// virtiofsd has one (`bulkhead_jail::idmap::layer_extents`). bulkheadd may not fork or
/// unshare under its allow list, so its spawner holds the namespace while it is opened.
pub fn layer_userns(rec: &SandboxRec) -> std::io::Result<std::os::fd::OwnedFd> {
    let base = rec
        .jail_uid
        .ok_or_else(|| std::io::Error::other("the sandbox has no ids of its own"))?;
    let extents = bulkhead_jail::idmap::layer_extents(base, IDS_PER_SANDBOX);
    match crate::spawner::get() {
        Some(s) => s.userns(&extents),
        None => {
            let pid = bulkhead_jail::idmap::hold_userns(&extents)?;
            let ns = bulkhead_jail::idmap::userns_of_extents(pid, &extents);
            bulkhead_jail::idmap::release_holder(pid);
            ns
        }
    }
}

/// The first id of the lowest free sandbox range in the configured ids, given the
/// sandboxes' uids in use (a range is taken by any uid in it).
pub fn allocate_uid(cfg: &Config, used: &[u32]) -> Option<u32> {
    let base = cfg.jail.uid_base;
    (0..cfg.jail.sandboxes())
        .map(|k| base + k * IDS_PER_SANDBOX)
        .find(|u| !used.iter().any(|x| (*u..*u + IDS_PER_SANDBOX).contains(x)))
}

/// What this host can do for `jail.virtiofsd_userns = auto`, found once by bulkheadd
/// at its start ([`probe_userns`]).
static USERNS_PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Try what a virtiofsd in its own user namespace needs (see
/// `bulkhead_jail::idmap::probe`) under `run_dir`. Forks: call it while bulkheadd
/// still has one thread and no filter.
pub fn probe_userns(cfg: &Config, run_dir: &std::path::Path) {
    if cfg.jail.enabled() && cfg.jail.virtiofsd_userns != Toggle::Off {
        let r = bulkhead_jail::idmap::probe(run_dir, cfg.jail.uid_base);
        match &r {
            Ok(()) => tracing::info!("virtiofsd: own user namespace, idmapped mounts"),
            Err(e) => tracing::info!("virtiofsd: as root (no idmapped layers here: {e})"),
        }
        let _ = USERNS_PROBE.set(r);
    }
}

/// Whether a new sandbox's virtiofsd gets its own user namespace: with `auto`, when its
/// creator says it will share only what can be idmapped (`asked`) and the host can; an
/// error when the configuration demands one this host cannot give.
pub fn fs_userns(cfg: &Config, asked: bool) -> Result<bool, String> {
    let probed = || {
        USERNS_PROBE
            .get()
            .cloned()
            .unwrap_or_else(|| Err("not tried".into()))
    };
    match cfg.jail.virtiofsd_userns {
        Toggle::Off => Ok(false),
        Toggle::Auto => Ok(asked && probed().is_ok()),
        Toggle::On => probed()
            .map(|()| true)
            .map_err(|e| format!("jail.virtiofsd_userns = on, but this host cannot: {e}")),
    }
}

/// Forget a sandbox's cgroups (its processes are gone).
pub fn remove_cgroup(rec: &SandboxRec) {
    if rec.jail_uid.is_some() {
        bulkhead_jail::remove_cgroup(&cgroup(rec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_come_from_the_range_lowest_first() {
        let mut cfg = Config::default();
        cfg.jail.uid_base = 5000;
        cfg.jail.uid_count = 3 * IDS_PER_SANDBOX + 7;
        let r = |k: u32| 5000 + k * IDS_PER_SANDBOX;
        assert_eq!(allocate_uid(&cfg, &[]), Some(r(0)));
        assert_eq!(allocate_uid(&cfg, &[r(0), r(2)]), Some(r(1)));
        // A uid inside a range (a record from an older layout) takes that range.
        assert_eq!(allocate_uid(&cfg, &[r(0), r(1) + 5]), Some(r(2)));
        assert_eq!(allocate_uid(&cfg, &[r(0), r(1), r(2)]), None);
    }
}
