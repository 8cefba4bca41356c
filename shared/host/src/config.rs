//! The runtime's configuration: where the guest image and the component binaries are,
//! and the defaults for a new sandbox.
//!
//! Read from `$BULKHEAD_CONFIG`, else `/etc/bulkhead/config.json`, else built-in defaults.
//! `BULKHEAD_GUEST_DIR` names a directory holding `vmlinux` and `initramfs.cpio` (the
//! guest image builder's output). A binary not named in the file is looked for beside the
//! running executable, then on `PATH`, then where our installers put it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/bulkhead/config.json";
pub const DEFAULT_GUEST_DIR: &str = "/usr/share/bulkhead/guest";
pub const DEFAULT_STATE_DIR: &str = "/run/bulkhead";

/// MiB a pod's VM needs beside its containers' memory limits: the guest kernel and the
/// agent. A pod sized by its limits gets this much more; a VM grown by them too.
pub const GUEST_OVERHEAD_MIB: u64 = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Uncompressed guest kernel (ELF vmlinux with a PVH note).
    pub guest_kernel: Option<PathBuf>,
    pub guest_initrd: Option<PathBuf>,
    /// `bulkhead-vmm` or `qemu`; unset: the best this host can run.
    pub default_backend: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// A virtio-mem region of this many MiB (a multiple of 128) for every bulkhead-vmm
    /// sandbox whose creator did not ask for one: its VM boots with `memory_mib` and
    /// grows into the region as its containers' memory limits need (see bulkheadd's
    /// `memory.rs`). 0 (the default): none. The QEMU backend has no virtio-mem and
    /// ignores it.
    pub hotplug_mib: u32,
    /// How long a guest may take to answer after its VMM starts.
    pub boot_timeout_s: u64,
    /// Let the guest kernel log its boot to the serial console (`<run>/serial.log`).
    pub guest_debug: bool,
    pub bulkhead_vmm: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vhost_device_vsock: Option<PathBuf>,
    pub bulkhead_net: Option<PathBuf>,
    pub bulkhead_jailer: Option<PathBuf>,
    /// MiB a sandbox's guest may write into its containers' writable layers on the
    /// host (`bulkhead run IMAGE`, `CreateContainer` with `overlay`): a tmpfs of this size
    /// per sandbox under the state directory. Past it the pod gets ENOSPC, the host's
    /// `/run` keeps its room. containerd's and podman's root file systems live in their
    /// own stores.
    pub layers_mib: u64,
    /// How host components are jailed.
    pub jail: JailConfig,
    /// How long bulkheadd waits on a guest's agent, and how many calls it lets wait.
    pub agent: AgentConfig,
    /// How often a caller who is not root may make the calls open to everyone.
    pub api: ApiConfig,
}

/// The calls open to every local user that make bulkheadd work (`Stats`, `Processes`,
/// `Security`, `NetworkStats`, `VmStatus`: an agent call, `/proc` reads or a peer
/// call each) are held per caller uid to a token bucket: `open_calls_burst` at once,
/// refilled at `open_calls_per_s`. Beyond it a call is refused at once with
/// `LimitsExceeded`. Root, bulkheadd's own uid and `unlimited_uids` are not counted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub open_calls_per_s: u32,
    pub open_calls_burst: u32,
    /// Uids not counted, such as a metrics exporter's that polls every container.
    pub unlimited_uids: Vec<u32>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            open_calls_per_s: 20,
            open_calls_burst: 100,
            unlimited_uids: vec![],
        }
    }
}

/// Deadlines on calls to a guest's agent, by kind, and a cap on the calls in flight to
/// one sandbox: a guest that stops answering holds no more than `max_in_flight` of
/// bulkheadd's threads, each for at most its call's deadline, and is marked unhealthy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Reads: `Stats`, `Processes`, signals, health (what kubelet and exporters poll).
    pub read_timeout_s: u64,
    /// Changes: create, start, exec, update, pause, delete of a container.
    pub change_timeout_s: u64,
    /// Calls to one sandbox's agent at once (waits for exits excepted); a call beyond
    /// is refused at once.
    pub max_in_flight: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            read_timeout_s: 10,
            change_timeout_s: 120,
            max_in_flight: 32,
        }
    }
}

/// Host ids each sandbox owns: its components run as the first, and virtiofsd's user
/// namespace maps the guest's 0..65535 onto all of them.
pub const IDS_PER_SANDBOX: u32 = 65536;

/// Every host component (VMM, vhost-user back ends) starts under `bulkhead-jailer` with
/// host ids of its sandbox's own: sandbox k owns the [`IDS_PER_SANDBOX`] uids (and the
/// same gids) from `uid_base + k * IDS_PER_SANDBOX`, within `uid_base .. uid_base +
/// uid_count`. The range must be used by nothing else on the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// Unset: on when bulkheadd runs as root (jailing needs it), off otherwise.
    pub enabled: Option<bool>,
    pub uid_base: u32,
    pub uid_count: u32,
    /// virtiofsd as root of a user namespace of its sandbox's ids, serving the shared
    /// directory through idmapped mounts (on: every sandbox, and a file system the kernel
    /// cannot idmap is refused), or as the host's root with a stated list of
    /// capabilities (off). `auto` (the default): on for sandboxes whose creator shares
    /// only what can be idmapped (`bulkhead run`: directories and images), where the host
    /// can idmap an image under an overlay (`bulkhead check` says); containerd's, podman's
    /// and docker's root file systems are overlay mounts, which no kernel can idmap yet.
    pub virtiofsd_userns: Toggle,
}

/// on, off, or auto (decided by what the host can do).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    #[default]
    Auto,
    On,
    Off,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: None,
            uid_base: 1_000_000_000,
            // 16384 sandboxes.
            uid_count: 1 << 30,
            virtiofsd_userns: Toggle::Auto,
        }
    }
}

impl JailConfig {
    /// How many sandboxes the id range holds.
    pub fn sandboxes(&self) -> u32 {
        self.uid_count / IDS_PER_SANDBOX
    }
}

impl JailConfig {
    pub fn enabled(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        self.enabled
            .unwrap_or_else(|| unsafe { libc::geteuid() } == 0)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            guest_kernel: None,
            guest_initrd: None,
            default_backend: None,
            cpus: 1,
            memory_mib: 256,
            hotplug_mib: 0,
            boot_timeout_s: 120,
            guest_debug: false,
            bulkhead_vmm: None,
            qemu: None,
            virtiofsd: None,
            vhost_device_vsock: None,
            bulkhead_net: None,
            bulkhead_jailer: None,
            layers_mib: 2048,
            jail: JailConfig::default(),
            agent: AgentConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Load from `$BULKHEAD_CONFIG` or the default path (absent: defaults).
    pub fn load() -> Result<Config, ConfigError> {
        let explicit = std::env::var_os("BULKHEAD_CONFIG").filter(|v| !v.is_empty());
        let path = explicit
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_CONFIG.into());
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|e| match e {
                ConfigError::Parse { source, .. } => ConfigError::Parse {
                    path: path.display().to_string(),
                    source,
                },
                other => other,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
                Config::default()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        if let Some(dir) = std::env::var_os("BULKHEAD_GUEST_DIR").filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(dir);
            cfg.guest_kernel = Some(dir.join("vmlinux"));
            cfg.guest_initrd = Some(dir.join("initramfs.cpio"));
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: "config".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.cpus) {
            return Err(ConfigError::Invalid(format!(
                "cpus = {}: want 1 to 64",
                self.cpus
            )));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return Err(ConfigError::Invalid(format!(
                "memory_mib = {}: want 64 to 65536",
                self.memory_mib
            )));
        }
        if !self.hotplug_mib.is_multiple_of(128) || self.hotplug_mib > 65536 {
            return Err(ConfigError::Invalid(format!(
                "hotplug_mib = {}: want a multiple of 128 up to 65536",
                self.hotplug_mib
            )));
        }
        let j = &self.jail;
        if j.uid_base == 0
            || j.uid_count < IDS_PER_SANDBOX
            || j.uid_base.checked_add(j.uid_count).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "jail uid range {} + {}: want at least {IDS_PER_SANDBOX} ids (one sandbox's), \
                 above 0, within 32 bits",
                j.uid_base, j.uid_count
            )));
        }
        if !(16..=1 << 20).contains(&self.layers_mib) {
            return Err(ConfigError::Invalid(format!(
                "layers_mib = {}: want 16 to 1048576",
                self.layers_mib
            )));
        }
        let a = &self.agent;
        for (name, v) in [
            ("agent.read_timeout_s", a.read_timeout_s),
            ("agent.change_timeout_s", a.change_timeout_s),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "{name} = {v}: want 1 to 3600 seconds"
                )));
            }
        }
        if !(1..=1024).contains(&a.max_in_flight) {
            return Err(ConfigError::Invalid(format!(
                "agent.max_in_flight = {}: want 1 to 1024",
                a.max_in_flight
            )));
        }
        let api = &self.api;
        if api.open_calls_per_s == 0 || api.open_calls_burst == 0 {
            return Err(ConfigError::Invalid(format!(
                "api.open_calls_per_s = {}, api.open_calls_burst = {}: want both above 0 \
                 (list a uid in api.unlimited_uids to exempt it)",
                api.open_calls_per_s, api.open_calls_burst
            )));
        }
        if let Some(b) = &self.default_backend {
            if Backend::parse(b).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "default_backend = {b:?}: want bulkhead-vmm or qemu"
                )));
            }
        }
        Ok(())
    }

    pub fn kernel(&self) -> PathBuf {
        self.guest_kernel
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_GUEST_DIR).join("vmlinux"))
    }

    pub fn initrd(&self) -> PathBuf {
        self.guest_initrd
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_GUEST_DIR).join("initramfs.cpio"))
    }

    /// Where a component binary is, or `None` if it cannot be found.
    pub fn binary(&self, which: Binary) -> Option<PathBuf> {
        let configured = match which {
            Binary::BulkheadVmm => &self.bulkhead_vmm,
            Binary::Qemu => &self.qemu,
            Binary::Virtiofsd => &self.virtiofsd,
            Binary::VhostDeviceVsock => &self.vhost_device_vsock,
            Binary::BulkheadNet => &self.bulkhead_net,
            Binary::BulkheadJailer => &self.bulkhead_jailer,
            Binary::Bulkheadd | Binary::Bulkhead => &None,
        };
        if let Some(p) = configured {
            return p.exists().then(|| p.clone());
        }
        find_binary(which.file_name(), which.extra_dirs())
    }
}

/// The programs bulkhead runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Bulkheadd,
    Bulkhead,
    BulkheadVmm,
    Qemu,
    Virtiofsd,
    VhostDeviceVsock,
    BulkheadNet,
    BulkheadJailer,
}

impl Binary {
    pub fn file_name(self) -> &'static str {
        match self {
            Binary::Bulkheadd => "bulkheadd",
            Binary::Bulkhead => "bulkhead",
            Binary::BulkheadVmm => "bulkhead-vmm",
            Binary::Qemu => "qemu-system-x86_64",
            Binary::Virtiofsd => "virtiofsd",
            Binary::VhostDeviceVsock => "vhost-device-vsock",
            Binary::BulkheadNet => "bulkhead-net",
            Binary::BulkheadJailer => "bulkhead-jailer",
        }
    }

    fn extra_dirs(self) -> &'static [&'static str] {
        match self {
            Binary::Virtiofsd => &["/opt/virtiofsd/bin", "/usr/libexec", "/usr/lib/qemu"],
            Binary::VhostDeviceVsock => &["/opt/vhost-device-vsock/bin", "/usr/libexec"],
            Binary::Bulkheadd
            | Binary::BulkheadVmm
            | Binary::BulkheadNet
            | Binary::BulkheadJailer => &["/usr/libexec/bulkhead"],
            _ => &[],
        }
    }
}

/// Look for `name` beside the running executable, on `PATH`, then in `extra`.
pub fn find_binary(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .chain(extra.iter().map(|d| Path::new(d).join(name)))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A hypervisor backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    BulkheadVmm,
    Qemu,
}

impl Backend {
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "bulkhead-vmm" => Some(Backend::BulkheadVmm),
            "qemu" => Some(Backend::Qemu),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::BulkheadVmm => "bulkhead-vmm",
            Backend::Qemu => "qemu",
        }
    }
}

/// What carries a pod interface's frames between its tap and the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetBackend {
    /// `bulkhead-net`, a vhost-user-net back end in its own jailed process: restarted on
    /// its own, without the pod noticing more than a pause (the default).
    #[default]
    BulkheadNet,
    /// The host kernel's vhost-net, on the QEMU backend only: no process of ours in the
    /// data path and no restart of its own (it lives and dies with the VMM). For
    /// operators who want the kernel's data path, and the benchmark's reference.
    VhostNet,
}

impl NetBackend {
    pub fn parse(s: &str) -> Option<NetBackend> {
        match s {
            "bulkhead-net" => Some(NetBackend::BulkheadNet),
            "vhost-net" => Some(NetBackend::VhostNet),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetBackend::BulkheadNet => "bulkhead-net",
            NetBackend::VhostNet => "vhost-net",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        let c = Config::parse(r#"{"cpus": 2, "default_backend": "qemu"}"#).unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert!(Config::parse(r#"{"cpus": 0}"#).is_err());
        assert!(Config::parse(r#"{"memory_mib": 1}"#).is_err());
        assert_eq!(c.hotplug_mib, 0);
        assert!(Config::parse(r#"{"hotplug_mib": 1000}"#).is_err());
        assert_eq!(
            Config::parse(r#"{"hotplug_mib": 1024}"#)
                .unwrap()
                .hotplug_mib,
            1024
        );
        assert!(Config::parse(r#"{"default_backend": "xen"}"#).is_err());
        let e = Config::parse(r#"{"cpu": 2}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        assert!(Config::parse("{").is_err());
    }

    #[test]
    fn backends_by_name() {
        for b in [Backend::BulkheadVmm, Backend::Qemu] {
            assert_eq!(Backend::parse(b.as_str()), Some(b));
        }
        assert_eq!(Backend::parse("firecracker"), None);
        for n in [NetBackend::BulkheadNet, NetBackend::VhostNet] {
            assert_eq!(NetBackend::parse(n.as_str()), Some(n));
        }
        assert_eq!(NetBackend::parse("vhost-user"), None);
    }

    #[test]
    fn finds_binaries_on_path_only_when_executable() {
        assert!(find_binary("sh", &[]).is_some());
        assert!(find_binary("no-such-binary-bulkhead", &["/nonexistent"]).is_none());
    }
}
