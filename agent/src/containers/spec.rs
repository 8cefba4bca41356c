//! The container's OCI spec as the guest runs it, and its root filesystem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bulkhead_protocol::{AgentError, Rootfs};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::{io_err, Runtime};

impl Runtime {
    /// The spec as the guest runs it.
    pub(super) fn rewrite_spec(
        &self,
        id: &str,
        mut spec: Spec,
        root: &Path,
    ) -> Result<Spec, AgentError> {
        let t = self.tables();
        let sb = t.sandbox.as_ref();
        let mut root_cfg = spec.root().clone().unwrap_or_default();
        root_cfg.set_path(root.to_path_buf());
        spec.set_root(Some(root_cfg));
        let linux = spec.linux_mut().get_or_insert_with(Default::default);
        let mut out = Vec::new();
        for ns in linux.namespaces().clone().unwrap_or_default() {
            let typ = ns.typ();
            let mut ns = ns;
            match (typ, ns.path().is_some()) {
                // The VM is the network boundary: every container uses the guest's.
                (LinuxNamespaceType::Network, _) => continue,
                (_, false) => {}
                (LinuxNamespaceType::Ipc, true) | (LinuxNamespaceType::Uts, true) => {
                    let sb = sb.ok_or_else(|| {
                        AgentError::InvalidArgument(format!(
                            "spec joins a {typ:?} namespace by path but there is no sandbox"
                        ))
                    })?;
                    let p = if typ == LinuxNamespaceType::Ipc {
                        &sb.ipc
                    } else {
                        &sb.uts
                    };
                    ns.set_path(Some(p.clone()));
                }
                (LinuxNamespaceType::Pid, true) => {
                    match sb.and_then(|s| s.pid.clone()) {
                        Some(p) => ns.set_path(Some(p)),
                        // The pod does not share its PID namespace: a new one.
                        None => ns.set_path(None),
                    };
                }
                (other, true) => {
                    return Err(AgentError::InvalidArgument(format!(
                        "cannot join a {other:?} namespace by path inside the sandbox"
                    )))
                }
            }
            out.push(ns);
        }
        linux.set_namespaces(Some(out));
        linux.set_cgroups_path(Some(PathBuf::from(Self::cgroup_rel(id))));
        // The pod's network namespace is the VM's: its net.* sysctls are set there (the
        // container runtime would refuse them without a namespace of the container's own).
        if let Some(sysctls) = linux.sysctl().clone() {
            let (net, rest): (HashMap<_, _>, HashMap<_, _>) = sysctls
                .into_iter()
                .partition(|(k, _)| k.starts_with("net."));
            if !net.is_empty() && !self.in_guest {
                return Err(AgentError::Unsupported(
                    "net.* sysctls outside a guest would change the host's network".into(),
                ));
            }
            for (k, v) in &net {
                set_net_sysctl(k, v)?;
            }
            linux.set_sysctl(Some(rest));
        }
        Ok(spec)
    }

    pub(super) fn prepare_rootfs(
        &self,
        id: &str,
        rootfs: &Rootfs,
    ) -> Result<(PathBuf, Option<PathBuf>), AgentError> {
        match rootfs {
            Rootfs::Path(p) => {
                let p = PathBuf::from(p);
                if !p.is_absolute() || !p.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs {} is not an existing directory",
                        p.display()
                    )));
                }
                Ok((p, None))
            }
            Rootfs::Block {
                device,
                fstype,
                readonly,
            } => {
                if !device.starts_with("/dev/") || !Path::new(device).exists() {
                    return Err(AgentError::InvalidArgument(format!(
                        "block rootfs {device:?} is not a device under /dev"
                    )));
                }
                if !matches!(
                    fstype.as_str(),
                    "ext4" | "erofs" | "xfs" | "btrfs" | "squashfs"
                ) {
                    return Err(AgentError::InvalidArgument(format!(
                        "block rootfs fstype {fstype:?}"
                    )));
                }
                let target = self.state.join("rootfs").join(id);
                std::fs::create_dir_all(&target).map_err(io_err("rootfs mountpoint"))?;
                let flags = if *readonly || fstype == "erofs" || fstype == "squashfs" {
                    libc::MS_RDONLY
                } else {
                    0
                };
                crate::sys::mount(device, &target.to_string_lossy(), fstype, flags, "")
                    .map_err(|e| AgentError::Io(format!("mount {device} ({fstype}): {e}")))?;
                Ok((target.clone(), Some(target)))
            }
        }
    }
}

/// Set one `net.*` sysctl in the guest (the pod's network namespace).
fn set_net_sysctl(key: &str, value: &str) -> Result<(), AgentError> {
    let ok = key.len() <= 128
        && key.starts_with("net.")
        && key.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if !ok || value.len() > 256 || value.contains('\n') {
        return Err(AgentError::InvalidArgument(format!(
            "sysctl {key}={value:?}: malformed"
        )));
    }
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value)
        .map_err(|e| AgentError::InvalidArgument(format!("sysctl {key}={value}: {e}")))
}
