//! What a VM is made of: from a JSON file (how bulkheadd drives us) or command-line flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::layout;
use crate::memory::{Backing, HugePages};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read config {path}: {msg}")]
    File { path: String, msg: String },
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SerialOut {
    Stdout,
    File(PathBuf),
    #[default]
    None,
}

/// How `kernel` is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// A Linux kernel, ELF vmlinux or bzImage, through the 64-bit boot protocol.
    #[default]
    Linux,
    /// An ELF kernel through its PVH entry note (32-bit protected mode, paging off); a
    /// bzImage has none and still takes the 64-bit protocol.
    Pvh,
    /// A flat binary loaded at 0x1000 and entered in real mode at 0000:1000 (toy guests).
    Raw16,
    /// A flat binary loaded at 1 MiB and entered in flat 32-bit protected mode (toy guests).
    Raw32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    #[serde(default = "default_fs_queue")]
    pub queue_size: u16,
}

/// A virtio-net device served by a vhost-user back end (`bulkhead-net`). The VMM listens
/// on `socket`; the back end connects, and connects again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub socket: PathBuf,
    pub mac: [u8; 6],
    #[serde(default)]
    pub mtu: Option<u16>,
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

fn default_fs_queue() -> u16 {
    1024
}

fn default_cpus() -> u8 {
    1
}
fn default_mem() -> u64 {
    256
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub boot: BootMode,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    #[serde(default = "default_mem")]
    pub memory_mib: u64,
    #[serde(default)]
    pub serial: SerialOut,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub rng: bool,
    /// virtio-console output file.
    #[serde(default)]
    pub console: Option<PathBuf>,
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Also describe virtio-mmio devices with `virtio_mmio.device=` on the command line,
    /// for kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and no ACPI.
    #[serde(default)]
    pub legacy_mmio_cmdline: bool,
    /// Skip the check that refuses PVM KVM (which cannot run stock kernels).
    #[serde(default)]
    pub allow_pvm: bool,
    /// What a thread's seccomp filter does with a call outside its allow list.
    #[serde(default, with = "seccomp_mode")]
    pub seccomp: crate::seccomp::Mode,
    /// Private or shared guest RAM (see [`crate::memory`]); auto: shared only when a
    /// vhost-user device must map it.
    #[serde(default)]
    pub memory_backing: Backing,
    #[serde(default)]
    pub hugepages: HugePages,
    /// A virtio-balloon with free page reporting and deflate-on-OOM.
    #[serde(default)]
    pub balloon: bool,
    /// A virtio-mem device over this many MiB above boot RAM (0: none). The guest boots
    /// with `memory_mib` and gets more when the control socket asks for it.
    #[serde(default)]
    pub hotplug_mib: u64,
}

mod seccomp_mode {
    use crate::seccomp::Mode;

    pub fn serialize<S: serde::Serializer>(m: &Mode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match m {
            Mode::Kill => "kill",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub const USAGE: &str = "usage: bulkhead-vmm (--config FILE.json | --kernel PATH [options])
  --kernel PATH            ELF vmlinux or bzImage
  --boot linux|pvh|raw16|raw32  how to enter it: linux, the 64-bit boot protocol
                           (default); pvh, an ELF kernel's PVH note; raw, a flat
                           binary, for toy guests
  --initrd PATH            initramfs
  --cmdline STR            kernel command line
  --cpus N                 vCPUs (default 1)
  --memory MIB             guest RAM in MiB (default 256)
  --memory-backing auto|private|shared
                           private anonymous RAM, or a shared memfd that vhost-user
                           back ends can map (auto: shared only when --fs/--net need it)
  --hugepages auto|thp|hugetlb|off
                           auto: hugetlbfs 2 MiB pages for shared RAM when enough are
                           reserved, else transparent huge pages advised
  --serial stdout|none|file:PATH
  --vsock cid=N,socket=PATH
  --disk path=PATH[,readonly]      (repeatable)
  --rng                    virtio-rng fed from the host's getrandom
  --balloon                virtio-balloon: free pages the guest reports go back to the
                           host; a target is set on the control socket
  --hotplug MIB            virtio-mem: this much more RAM (a multiple of 128 MiB) the
                           guest is given in 2 MiB blocks when the control socket asks
  --console PATH           virtio-console output file
  --fs tag=TAG,socket=PATH (repeatable) vhost-user-fs front end
  --net socket=PATH,mac=MAC[,mtu=N] (repeatable) virtio-net; a vhost-user back end
                           (bulkhead-net) connects to PATH, and again after a restart
  --api-socket PATH        serve org.bulkhead.Vmm1 (peer-to-peer D-Bus) on this socket
  --legacy-mmio-cmdline    also describe devices on the kernel command line
  --allow-pvm              try to boot even on a PVM /dev/kvm
  --seccomp kill|log|off   per-thread allow lists (seccomp/x86_64.json): a call outside
                           them kills the VMM (default), is logged by the kernel, or no
                           filter is installed
exit status: 0 the guest powered off, 1 VMM error, 2 bad configuration, 3 the guest
  rebooted, 4 the guest crashed, 5 stopped through the control socket, 6 every vCPU
  halted with interrupts off (the guest can never run again)";

fn kv_pairs(s: &str) -> Vec<(&str, Option<&str>)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
        .collect()
}

impl VmConfig {
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let c: VmConfig =
            serde_json::from_str(text).map_err(|e| ConfigError::Invalid(format!("config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_args(args: &[String]) -> Result<Self, ConfigError> {
        let mut it = args.iter();
        let mut c = VmConfig {
            kernel: PathBuf::new(),
            boot: BootMode::Linux,
            initrd: None,
            cmdline: String::new(),
            cpus: default_cpus(),
            memory_mib: default_mem(),
            serial: SerialOut::None,
            vsock: None,
            disks: vec![],
            rng: false,
            console: None,
            fs: vec![],
            net: vec![],
            api_socket: None,
            legacy_mmio_cmdline: false,
            allow_pvm: false,
            seccomp: Default::default(),
            memory_backing: Backing::Auto,
            hugepages: HugePages::Auto,
            balloon: false,
            hotplug_mib: 0,
        };
        while let Some(flag) = it.next() {
            let mut val = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| ConfigError::Invalid(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--config" => {
                    let path = val()?;
                    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
                        path: path.clone(),
                        msg: e.to_string(),
                    })?;
                    return Self::from_json(&text);
                }
                "--kernel" => c.kernel = val()?.into(),
                "--boot" => {
                    let v = val()?;
                    c.boot = match v.as_str() {
                        "linux" => BootMode::Linux,
                        "pvh" => BootMode::Pvh,
                        "raw16" => BootMode::Raw16,
                        "raw32" => BootMode::Raw32,
                        _ => {
                            return invalid(format!("--boot {v}: want linux, pvh, raw16 or raw32"))
                        }
                    }
                }
                "--initrd" => c.initrd = Some(val()?.into()),
                "--cmdline" => c.cmdline = val()?,
                "--cpus" => {
                    let v = val()?;
                    c.cpus = v.parse().map_err(|_| {
                        ConfigError::Invalid(format!("--cpus {v}: not a number 0-255"))
                    })?
                }
                "--memory" => {
                    let v = val()?;
                    c.memory_mib = v.parse().map_err(|_| {
                        ConfigError::Invalid(format!("--memory {v}: not a number of MiB"))
                    })?
                }
                "--serial" => {
                    let v = val()?;
                    c.serial = match v.as_str() {
                        "stdout" => SerialOut::Stdout,
                        "none" => SerialOut::None,
                        s => match s.strip_prefix("file:") {
                            Some(p) => SerialOut::File(p.into()),
                            None => {
                                return invalid(format!(
                                    "--serial {v}: want stdout, none or file:PATH"
                                ))
                            }
                        },
                    }
                }
                "--vsock" => {
                    let v = val()?;
                    let (mut cid, mut socket) = (None, None);
                    for (k, x) in kv_pairs(&v) {
                        match (k, x) {
                            ("cid", Some(x)) => cid = x.parse().ok(),
                            ("socket", Some(x)) => socket = Some(PathBuf::from(x)),
                            _ => return invalid(format!("--vsock: unknown part {k:?}")),
                        }
                    }
                    match (cid, socket) {
                        (Some(cid), Some(socket)) => c.vsock = Some(VsockConfig { cid, socket }),
                        _ => return invalid("--vsock needs cid=N,socket=PATH"),
                    }
                }
                "--disk" => {
                    let v = val()?;
                    let (mut path, mut readonly) = (None, false);
                    for (k, x) in kv_pairs(&v) {
                        match (k, x) {
                            ("path", Some(x)) => path = Some(PathBuf::from(x)),
                            ("readonly", None) | ("ro", None) => readonly = true,
                            _ => return invalid(format!("--disk: unknown part {k:?}")),
                        }
                    }
                    let path =
                        path.ok_or_else(|| ConfigError::Invalid("--disk needs path=PATH".into()))?;
                    c.disks.push(DiskConfig { path, readonly });
                }
                "--rng" => c.rng = true,
                "--balloon" => c.balloon = true,
                "--hotplug" => {
                    let v = val()?;
                    c.hotplug_mib = v.parse().map_err(|_| {
                        ConfigError::Invalid(format!("--hotplug {v}: not a number of MiB"))
                    })?
                }
                "--console" => c.console = Some(val()?.into()),
                "--fs" => {
                    let v = val()?;
                    let (mut tag, mut socket) = (None, None);
                    for (k, x) in kv_pairs(&v) {
                        match (k, x) {
                            ("tag", Some(x)) => tag = Some(x.to_owned()),
                            ("socket", Some(x)) => socket = Some(PathBuf::from(x)),
                            _ => return invalid(format!("--fs: unknown part {k:?}")),
                        }
                    }
                    match (tag, socket) {
                        (Some(tag), Some(socket)) => c.fs.push(FsConfig {
                            tag,
                            socket,
                            queue_size: default_fs_queue(),
                        }),
                        _ => return invalid("--fs needs tag=TAG,socket=PATH"),
                    }
                }
                "--net" => {
                    let v = val()?;
                    let (mut socket, mut mac, mut mtu) = (None, None, None);
                    for (k, x) in kv_pairs(&v) {
                        match (k, x) {
                            ("socket", Some(x)) => socket = Some(PathBuf::from(x)),
                            ("mac", Some(x)) => match parse_mac(x) {
                                Some(m) => mac = Some(m),
                                None => return invalid(format!("--net: mac {x:?}")),
                            },
                            ("mtu", Some(x)) => match x.parse() {
                                Ok(m) => mtu = Some(m),
                                Err(_) => return invalid(format!("--net: mtu {x:?}")),
                            },
                            _ => return invalid(format!("--net: unknown part {k:?}")),
                        }
                    }
                    match (socket, mac) {
                        (Some(socket), Some(mac)) => c.net.push(NetConfig { socket, mac, mtu }),
                        _ => return invalid("--net needs socket=PATH,mac=XX:XX:XX:XX:XX:XX"),
                    }
                }
                "--api-socket" => c.api_socket = Some(val()?.into()),
                "--legacy-mmio-cmdline" => c.legacy_mmio_cmdline = true,
                "--allow-pvm" => c.allow_pvm = true,
                "--seccomp" => c.seccomp = val()?.parse().map_err(ConfigError::Invalid)?,
                "--memory-backing" => {
                    c.memory_backing = val()?.parse().map_err(ConfigError::Invalid)?
                }
                "--hugepages" => c.hugepages = val()?.parse().map_err(ConfigError::Invalid)?,
                other => return invalid(format!("unknown flag {other:?}\n{USAGE}")),
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Reject what cannot work, with a message that names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return invalid(format!("no --kernel given\n{USAGE}"));
        }
        if self.cpus == 0 || self.cpus > layout::MAX_VCPUS {
            return invalid(format!(
                "cpus = {}: must be between 1 and {}",
                self.cpus,
                layout::MAX_VCPUS
            ));
        }
        if self.memory_mib < layout::MIN_MEMORY_MIB || self.memory_mib > layout::MAX_MEMORY_MIB {
            return invalid(format!(
                "memory = {} MiB: must be between {} MiB and {} MiB",
                self.memory_mib,
                layout::MIN_MEMORY_MIB,
                layout::MAX_MEMORY_MIB
            ));
        }
        // Linux adds hot-plugged memory in whole memory blocks: 128 MiB on a small guest.
        if !self.hotplug_mib.is_multiple_of(128)
            || self.hotplug_mib > layout::MAX_MEMORY_MIB - self.memory_mib
        {
            return invalid(format!(
                "hotplug = {} MiB: must be a multiple of 128 MiB, with memory at most {} MiB",
                self.hotplug_mib,
                layout::MAX_MEMORY_MIB
            ));
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX {
            return invalid(format!(
                "kernel command line is {} bytes; the limit is {}",
                self.cmdline.len(),
                layout::CMDLINE_MAX - 1
            ));
        }
        if let Some(v) = &self.vsock {
            // 0, 1 and 2 are the hypervisor, local and host; u32::MAX is "any".
            if v.cid < 3 || v.cid == u32::MAX {
                return invalid(format!("vsock cid {}: must be between 3 and 2^32-2", v.cid));
            }
        }
        for f in &self.fs {
            if f.tag.is_empty() || f.tag.len() > 36 {
                return invalid(format!("fs tag {:?}: must be 1 to 36 bytes", f.tag));
            }
            if !f.queue_size.is_power_of_two() || f.queue_size > 32768 {
                return invalid(format!(
                    "fs queue_size {}: must be a power of two <= 32768",
                    f.queue_size
                ));
            }
        }
        if self.memory_backing == Backing::Private && !(self.fs.is_empty() && self.net.is_empty()) {
            return invalid(
                "memory backing private: virtio-fs and virtio-net back ends map guest RAM, \
                 which needs shared (or auto)",
            );
        }
        for n in &self.net {
            if n.mac[0] & 1 != 0 || n.mac == [0; 6] {
                return invalid(format!("net mac {:02x?}: must be a unicast address", n.mac));
            }
            if n.mtu.is_some_and(|m| m < 68) {
                return invalid(format!("net mtu {:?}: at least 68", n.mtu));
            }
        }
        let devices = self.disks.len()
            + self.fs.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon)
            + usize::from(self.hotplug_mib > 0)
            + usize::from(self.console.is_some());
        if devices > layout::MAX_VIRTIO_DEVICES {
            return invalid(format!(
                "{devices} virtio devices: at most {} fit",
                layout::MAX_VIRTIO_DEVICES
            ));
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    pub fn hotplug_bytes(&self) -> u64 {
        self.hotplug_mib << 20
    }

    /// A device in another process (vhost-user) maps guest RAM.
    pub fn shared_memory_needed(&self) -> bool {
        !self.fs.is_empty() || !self.net.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_parse() {
        let c = VmConfig::from_args(&args(
            "--kernel /k --initrd /i --cpus 2 --memory 512 --serial file:/tmp/s \
             --vsock cid=3,socket=/v --disk path=/d,readonly --disk path=/e --rng \
             --fs tag=share,socket=/f --api-socket /a \
             --net socket=/n0,mac=02:00:0a:00:00:05,mtu=1400",
        ))
        .unwrap();
        assert_eq!(c.net[0].mac, [2, 0, 10, 0, 0, 5]);
        assert_eq!(c.net[0].mtu, Some(1400));
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory_bytes(), 512 << 20);
        assert_eq!(c.serial, SerialOut::File("/tmp/s".into()));
        assert_eq!(c.vsock.as_ref().unwrap().cid, 3);
        assert!(c.disks[0].readonly && !c.disks[1].readonly);
        assert!(c.rng);
        assert_eq!(c.fs[0].tag, "share");
        assert_eq!(c.memory_backing, Backing::Auto);
        assert!(c.shared_memory_needed());
    }

    #[test]
    fn boot_modes_parse_and_default_to_the_64_bit_protocol() {
        let boot = |s: &str| VmConfig::from_args(&args(s)).map(|c| c.boot);
        assert_eq!(boot("--kernel /k").unwrap(), BootMode::Linux);
        assert_eq!(boot("--kernel /k --boot pvh").unwrap(), BootMode::Pvh);
        assert_eq!(boot("--kernel /k --boot raw32").unwrap(), BootMode::Raw32);
        let e = boot("--kernel /k --boot xen").unwrap_err().to_string();
        assert!(e.contains("want linux, pvh, raw16 or raw32"), "{e}");
        let json: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "boot": "pvh"}"#).unwrap();
        assert_eq!(json.boot, BootMode::Pvh);
    }

    #[test]
    fn memory_backing_flags() {
        let c = VmConfig::from_args(&args(
            "--kernel /k --memory-backing private --hugepages off",
        ))
        .unwrap();
        assert_eq!(
            (c.memory_backing, c.hugepages),
            (Backing::Private, HugePages::Off)
        );
        let e = VmConfig::from_args(&args("--kernel /k --hugepages big")).unwrap_err();
        assert!(
            e.to_string().contains("want auto, thp, hugetlb or off"),
            "{e}"
        );
        let e = VmConfig::from_args(&args(
            "--kernel /k --memory-backing private --fs tag=a,socket=/f",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("needs shared"), "{e}");
        let j = VmConfig::from_json(
            r#"{"kernel":"/k","memory_backing":"shared","hugepages":"hugetlb"}"#,
        )
        .unwrap();
        assert_eq!(
            (j.memory_backing, j.hugepages),
            (Backing::Shared, HugePages::Hugetlb)
        );
    }

    #[test]
    fn bad_net_options_are_refused() {
        for (a, want) in [
            ("--net socket=/n", "needs socket=PATH,mac="),
            ("--net socket=/n,mac=02:00:00:00:00", "mac"),
            ("--net socket=/n,mac=02:00:00:00:00:zz", "mac"),
            ("--net socket=/n,mac=02:00:00:00:00:01,mtu=x", "mtu"),
            (
                "--net socket=/n,mac=02:00:00:00:00:01,speed=9",
                "unknown part",
            ),
            ("--net socket=/n,mac=01:00:00:00:00:01", "unicast"),
            ("--net socket=/n,mac=02:00:00:00:00:01,mtu=10", "mtu"),
        ] {
            let e = VmConfig::from_args(&args(&format!("--kernel /k {a}"))).unwrap_err();
            assert!(e.to_string().contains(want), "{a}: {e}");
        }
    }

    #[test]
    fn impossible_sizes_are_refused_with_the_field_named() {
        for (a, want) in [
            ("--kernel /k --cpus 0", "cpus = 0"),
            ("--kernel /k --cpus 255", "cpus = 255"),
            ("--kernel /k --memory 1", "memory = 1 MiB"),
            (
                "--kernel /k --memory 99999999999",
                "memory = 99999999999 MiB",
            ),
            ("--kernel /k --memory lots", "--memory lots"),
            ("--kernel /k --vsock cid=2,socket=/v", "vsock cid 2"),
            ("--kernel /k --hotplug 100", "hotplug = 100 MiB"),
            (
                "--kernel /k --memory 1048576 --hotplug 128",
                "hotplug = 128 MiB",
            ),
            ("--kernel /k --hotplug 1G", "--hotplug 1G"),
            ("--cpus 1", "no --kernel"),
            ("--kernel /k --bogus", "unknown flag"),
        ] {
            let e = VmConfig::from_args(&args(a)).unwrap_err().to_string();
            assert!(e.contains(want), "{a}: {e}");
        }
        let c = VmConfig::from_args(&args("--kernel /k --memory 256 --hotplug 1024")).unwrap();
        assert_eq!((c.memory_bytes(), c.hotplug_bytes()), (256 << 20, 1 << 30));
    }

    #[test]
    fn json_rejects_unknown_fields_and_bad_values() {
        assert!(VmConfig::from_json(r#"{"kernel":"/k","memory_mib":128}"#).is_ok());
        let e = VmConfig::from_json(r#"{"kernel":"/k","memroy_mib":128}"#).unwrap_err();
        assert!(e.to_string().contains("memroy_mib"), "{e}");
        let e = VmConfig::from_json(r#"{"kernel":"/k","cpus":0}"#).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
        assert!(VmConfig::from_json("{not json").is_err());
    }

    #[test]
    fn too_long_cmdline_is_refused() {
        let mut c = VmConfig::from_args(&args("--kernel /k")).unwrap();
        c.cmdline = "x".repeat(layout::CMDLINE_MAX);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("command line"));
    }
}
