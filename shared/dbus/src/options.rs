//! The `a{sv}` options of `CreateSandbox` and `CreateContainer` as types: each has one
//! conversion to the dictionary a client sends and one from the dictionary bulkheadd
//! receives, which refuses unknown keys and wrong types with the key's name. The key
//! names live here and nowhere else.

use std::collections::HashMap;

use zbus::zvariant::{OwnedValue, Value};

use crate::{known_options, option, Error};

/// A dictionary as a client sends it.
pub type Dict = HashMap<&'static str, Value<'static>>;

/// `CreateSandbox`'s options; `None` takes bulkheadd's configured default.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SandboxOptions {
    /// `bulkhead-vmm` or `qemu`.
    pub backend: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// A virtio-mem region of this many MiB (bulkhead-vmm only; a multiple of 128).
    pub hotplug_mib: Option<u32>,
    /// The pod's hostname (its UTS namespace, shared by its containers); the sandbox id
    /// when unset.
    pub hostname: Option<String>,
    /// The pod's network namespace (a path, as CNI makes them): its interfaces are
    /// mirrored into the VM. `None`: the pod has loopback only.
    pub netns: Option<String>,
    /// `bulkhead-net` (default) or `vhost-net` (the QEMU backend only).
    pub net_backend: Option<String>,
    /// The creator's word that every file system it will share is one the kernel can
    /// idmap (directories, images; not overlay mounts, which containerd, podman and
    /// docker hand over): virtiofsd may then run in the sandbox's user namespace.
    pub virtiofsd_userns: Option<bool>,
    /// What the guest may write into its containers' writable layers, MiB.
    pub layers_mib: Option<u32>,
    /// `cpus` and `memory_mib` are raised to bulkheadd's configured defaults where they
    /// are below them: a pod sized by its containers' limits (the shim) is never smaller
    /// than a VM made unasked, without the client reading bulkheadd's configuration.
    pub at_least_defaults: Option<bool>,
}

impl SandboxOptions {
    pub const KEYS: &'static [&'static str] = &[
        "backend",
        "cpus",
        "memory_mib",
        "hotplug_mib",
        "hostname",
        "netns",
        "net_backend",
        "virtiofsd_userns",
        "layers_mib",
        "at_least_defaults",
    ];

    /// The dictionary a client sends: only the options that are set.
    pub fn to_dict(&self) -> Dict {
        let mut d = Dict::new();
        put(&mut d, "backend", self.backend.clone());
        put(&mut d, "cpus", self.cpus);
        put(&mut d, "memory_mib", self.memory_mib);
        put(&mut d, "hotplug_mib", self.hotplug_mib);
        put(&mut d, "hostname", self.hostname.clone());
        put(&mut d, "netns", self.netns.clone());
        put(&mut d, "net_backend", self.net_backend.clone());
        put(&mut d, "virtiofsd_userns", self.virtiofsd_userns);
        put(&mut d, "layers_mib", self.layers_mib);
        put(&mut d, "at_least_defaults", self.at_least_defaults);
        d
    }

    /// What bulkheadd received; an unknown key or a wrong type is `InvalidArgument`.
    pub fn from_dict(d: &HashMap<String, OwnedValue>) -> Result<Self, Error> {
        known_options(d, Self::KEYS)?;
        Ok(SandboxOptions {
            backend: option(d, "backend")?,
            cpus: option(d, "cpus")?,
            memory_mib: option(d, "memory_mib")?,
            hotplug_mib: option(d, "hotplug_mib")?,
            hostname: option(d, "hostname")?,
            netns: option(d, "netns")?,
            net_backend: option(d, "net_backend")?,
            virtiofsd_userns: option(d, "virtiofsd_userns")?,
            layers_mib: option(d, "layers_mib")?,
            at_least_defaults: option(d, "at_least_defaults")?,
        })
    }
}

/// `CreateContainer`'s options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContainerOptions {
    /// Keep the init's stdin open for `Attach`.
    pub stdin: bool,
    /// Overrides the spec's `process.terminal`.
    pub terminal: Option<bool>,
    /// Keep `rootfs` read-only under a private writable layer.
    pub overlay: bool,
    /// The root as a snapshotter's overlay, in containerd's mount options
    /// (`lowerdir=A:B,upperdir=U,workdir=W`); `rootfs` is then empty.
    pub rootfs_overlay: Option<String>,
}

impl ContainerOptions {
    pub const KEYS: &'static [&'static str] = &["stdin", "terminal", "overlay", "rootfs_overlay"];

    pub fn to_dict(&self) -> Dict {
        let mut d = Dict::new();
        d.insert("stdin", Value::from(self.stdin));
        put(&mut d, "terminal", self.terminal);
        d.insert("overlay", Value::from(self.overlay));
        put(&mut d, "rootfs_overlay", self.rootfs_overlay.clone());
        d
    }

    pub fn from_dict(d: &HashMap<String, OwnedValue>) -> Result<Self, Error> {
        known_options(d, Self::KEYS)?;
        Ok(ContainerOptions {
            stdin: option(d, "stdin")?.unwrap_or(false),
            terminal: option(d, "terminal")?,
            overlay: option(d, "overlay")?.unwrap_or(false),
            rootfs_overlay: option(d, "rootfs_overlay")?,
        })
    }
}

fn put<T: Into<Value<'static>>>(d: &mut Dict, key: &'static str, v: Option<T>) {
    if let Some(v) = v {
        d.insert(key, v.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client sends, as bulkheadd receives it.
    fn received(d: Dict) -> HashMap<String, OwnedValue> {
        d.into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect()
    }

    #[test]
    fn sandbox_options_round_trip() {
        let all = SandboxOptions {
            backend: Some("qemu".into()),
            cpus: Some(2),
            memory_mib: Some(512),
            hotplug_mib: Some(1024),
            hostname: Some("web".into()),
            netns: Some("/run/netns/p".into()),
            net_backend: Some("vhost-net".into()),
            virtiofsd_userns: Some(true),
            layers_mib: Some(64),
            at_least_defaults: Some(true),
        };
        let d = all.to_dict();
        assert_eq!(d.len(), SandboxOptions::KEYS.len(), "every key is sent");
        assert_eq!(SandboxOptions::from_dict(&received(d)).unwrap(), all);
        let none = SandboxOptions::default();
        assert!(none.to_dict().is_empty());
        assert_eq!(
            SandboxOptions::from_dict(&received(none.to_dict())).unwrap(),
            none
        );
    }

    #[test]
    fn container_options_round_trip() {
        let all = ContainerOptions {
            stdin: true,
            terminal: Some(false),
            overlay: true,
            rootfs_overlay: Some("lowerdir=/a,upperdir=/b/u,workdir=/b/w".into()),
        };
        let d = all.to_dict();
        assert_eq!(d.len(), ContainerOptions::KEYS.len());
        assert_eq!(ContainerOptions::from_dict(&received(d)).unwrap(), all);
        let plain = ContainerOptions::default();
        assert_eq!(
            ContainerOptions::from_dict(&received(plain.to_dict())).unwrap(),
            plain
        );
        assert_eq!(ContainerOptions::from_dict(&HashMap::new()).unwrap(), plain);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let mut d = SandboxOptions::default().to_dict();
        d.insert("cpu", Value::from(2u32));
        let e = SandboxOptions::from_dict(&received(d)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("\"cpu\"")),
            "{e:?}"
        );
        let mut d = Dict::new();
        d.insert("cpus", Value::from("two"));
        let e = SandboxOptions::from_dict(&received(d)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("cpus")),
            "{e:?}"
        );
        let mut d = Dict::new();
        d.insert("stdin", Value::from(1u32));
        let e = ContainerOptions::from_dict(&received(d)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("stdin")),
            "{e:?}"
        );
    }
}
