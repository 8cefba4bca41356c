//! The two hypervisor backends behind one interface: each turns a sandbox into the
//! ordered list of component processes that run it. Both give the guest the same
//! devices (vsock for the agent, virtio-fs for the shared directory), so the same guest
//! image and agent run on either.
//!
//! - `bulkhead-vmm`: virtiofsd, a `bulkhead-net` per pod interface, then our VMM (vsock
//!   in process; it serves each vhost-user-net socket).
//! - `qemu`: virtiofsd and vhost-device-vsock (vhost-user back ends), then QEMU
//!   `-M microvm,acpi=on` on KVM, or on TCG where KVM cannot boot a stock kernel.

use crate::lifecycle::Role;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead_protocol::net::format_mac;

use bulkhead_host::config::{Backend, Binary, Config, NetBackend};

use crate::store::SandboxRec;

/// Guest vsock context id; every VM has its own vsock device, so one number serves all.
pub const GUEST_CID: u32 = 3;
/// virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "bulkhead";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED: &str = "/run/bulkhead/shared";

/// One process to start, and the socket it must have created before the next starts.
/// `command` names the program and its arguments only: [`crate::jail::command`] turns
/// it into what is run (the program under `bulkhead-jailer`, or as it is).
pub struct ComponentSpec {
    pub name: String,
    pub command: Command,
    pub ready_socket: Option<PathBuf>,
    /// Descriptors handed to the child at the given numbers; held until it has started.
    pub fds: Vec<(OwnedFd, i32)>,
    /// One of `fds` that is the jailer's start gate, not the component's.
    pub start_gate: Option<i32>,
    /// What its jail must hold besides the sandbox's `vm/` directory and system libraries.
    pub needs: Needs,
}

/// What a component needs in its jail.
#[derive(Debug, Default, Clone)]
pub struct Needs {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    /// `/dev/kvm`.
    pub kvm: bool,
    /// Run as root with these capabilities (and no others): only for a component that
    /// must act as any user, which is virtiofsd's job.
    pub root_caps: Vec<&'static str>,
    /// RLIMIT_NOFILE, when the jail's default (4096) is too few.
    pub max_files: Option<u64>,
    /// It builds a sandbox of its own with mount(2) and pivot_root(2), which a landlock
    /// ruleset would forbid: no landlock.
    pub sandboxes_itself: bool,
    /// With `root_caps`: be root of a user namespace of the sandbox's ids instead of the
    /// host's root, the capabilities holding only inside it.
    pub own_userns: bool,
    /// A program that installs no seccomp filter of its own gets the jailer's allow
    /// list of this name (jailer/seccomp/).
    pub allow_list: Option<&'static str>,
}

impl ComponentSpec {
    fn new(role: Role, command: Command, ready_socket: Option<PathBuf>, needs: Needs) -> Self {
        ComponentSpec {
            name: role.name(),
            command,
            ready_socket,
            fds: vec![],
            start_gate: None,
            needs,
        }
    }
}

/// The vhost-user socket of interface `i`: the VMM listens, `bulkhead-net` connects.
pub fn net_socket(rec: &SandboxRec, i: usize) -> PathBuf {
    rec.vm_dir().join(format!("net{i}.sock"))
}

/// Where bulkhead-vmm serves `org.bulkhead.Vmm1` (peer to peer).
pub fn vmm_api_socket(rec: &SandboxRec) -> PathBuf {
    rec.vm_dir().join("api.sock")
}

/// Where `bulkhead-net` for interface `i` serves `org.bulkhead.Net1` (peer to peer).
pub fn net_dbus_socket(rec: &SandboxRec, i: usize) -> PathBuf {
    rec.vm_dir().join(format!("net{i}.dbus"))
}

/// `bulkhead-net` for the pod's interface `i`, handed its tap (opened here, in the pod's
/// namespace) as descriptor 3.
pub fn bulkhead_net(cfg: &Config, rec: &SandboxRec, i: usize) -> Result<ComponentSpec, PlanError> {
    let net = rec
        .network
        .as_ref()
        .and_then(|n| n.links.get(i).map(|l| (n, l)))
        .ok_or_else(|| PlanError(format!("sandbox has no interface {i}")))?;
    let tap = crate::net::open_tap(&net.0.netns, &net.1.tap)
        .map_err(|e| PlanError(format!("cannot open the pod's tap: {e}")))?;
    let mut c = Command::new(need(cfg, Binary::BulkheadNet)?);
    c.arg("--socket")
        .arg(net_socket(rec, i))
        .arg("--dbus-socket")
        .arg(net_dbus_socket(rec, i))
        .args(["--tap-fd", "3"]);
    let mut spec = ComponentSpec::new(Role::Net(i as u32), c, None, Needs::default());
    spec.fds.push((tap, 3));
    Ok(spec)
}

/// For `net_backend = vhost-net`: interface `i`'s tap at descriptor [`vhost_net_fd`]`(i).0`
/// and a vhost-net descriptor at `.1`, opened here (the VMM's jail has neither).
fn vhost_net_fds(rec: &SandboxRec) -> Result<Vec<(OwnedFd, i32)>, PlanError> {
    let Some(net) = &rec.network else {
        return Ok(vec![]);
    };
    let mut fds = vec![];
    for (i, l) in net.links.iter().enumerate() {
        let tap = crate::net::open_tap(&net.netns, &l.tap)
            .map_err(|e| PlanError(format!("cannot open the pod's tap: {e}")))?;
        let vhost = crate::net::open_vhost_net().map_err(|e| PlanError(e.to_string()))?;
        let (t, v) = vhost_net_fd(i);
        fds.push((tap, t));
        fds.push((vhost, v));
    }
    Ok(fds)
}

/// The descriptor numbers QEMU gets interface `i`'s tap and vhost-net device at.
fn vhost_net_fd(i: usize) -> (i32, i32) {
    let base = 3 + 2 * i as i32;
    (base, base + 1)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

fn need(cfg: &Config, b: Binary) -> Result<PathBuf, PlanError> {
    cfg.binary(b).ok_or_else(|| {
        PlanError(format!(
            "{} not found (see `bulkhead check`)",
            b.file_name()
        ))
    })
}

/// The kernel command line both backends give the guest.
pub fn kernel_cmdline(tcg: bool, debug: bool) -> String {
    // Memory a virtio-mem device plugs goes to ZONE_MOVABLE as far as the default ratio
    // (3:1 to the boot RAM) allows, so the guest can give it back: in the kernel's own
    // zone, a few pages it pinned keep whole blocks plugged.
    let mut c =
        String::from("console=ttyS0 panic=-1 pci=off memory_hotplug.online_policy=auto-movable");
    if !debug {
        c.push_str(" quiet");
    }
    if tcg {
        // Under TCG the guest's TSC calibration can hang when the host is busy; hand it
        // the host's TSC frequency.
        if let Some(khz) = host_tsc_khz() {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    c
}

fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// What virtiofsd needs: to serve files as their owners (it creates files for any uid,
/// changes owners and modes), and, to build its namespace sandbox, CAP_SYS_ADMIN and
/// CAP_SETPCAP, which it drops itself before it serves the guest (it keeps the first
/// eight).
const VIRTIOFSD_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_MKNOD",
    "CAP_SETFCAP",
    "CAP_SYS_ADMIN",
    "CAP_SETPCAP",
];

fn virtiofsd(cfg: &Config, rec: &SandboxRec) -> Result<ComponentSpec, PlanError> {
    let sock = rec.vm_dir().join("fs.sock");
    let mut c = Command::new(need(cfg, Binary::Virtiofsd)?);
    c.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", rec.shared_dir().display()))
        // Inside the jail, its own namespace sandbox (pivoted into the shared directory)
        // and its own seccomp filter.
        .args(["--sandbox=namespace", "--seccomp=kill"])
        // File handles would need CAP_DAC_READ_SEARCH (open_by_handle_at reads any file).
        .args([
            "--inode-file-handles=never",
            "--cache=never",
            "--announce-submounts",
        ]);
    Ok(ComponentSpec::new(
        Role::Virtiofsd,
        c,
        Some(sock),
        Needs {
            read_write: vec![rec.shared_dir()],
            root_caps: VIRTIOFSD_CAPS.to_vec(),
            // One descriptor per inode the guest holds open.
            max_files: Some(1_000_000),
            sandboxes_itself: true,
            own_userns: rec.fs_userns,
            ..Needs::default()
        },
    ))
}

/// The host's huge page policy, read by bulkhead-vmm to choose guest RAM's backing and
/// report why (see bulkhead-vmm's memory.rs).
const HUGE_PAGE_POLICY: [&str; 2] = [
    "/sys/kernel/mm/transparent_hugepage",
    "/sys/kernel/mm/hugepages/hugepages-2048kB",
];

/// The components of `rec` on its backend, in start order.
pub fn plan(cfg: &Config, rec: &SandboxRec, tcg: bool) -> Result<Vec<ComponentSpec>, PlanError> {
    let backend = Backend::parse(&rec.backend)
        .ok_or_else(|| PlanError(format!("unknown backend {:?}", rec.backend)))?;
    let kernel = cfg.kernel();
    let initrd = cfg.initrd();
    for p in [&kernel, &initrd] {
        if !p.exists() {
            return Err(PlanError(format!(
                "guest image file {} is missing (see `bulkhead check`)",
                p.display()
            )));
        }
    }
    let vm = rec.vm_dir();
    let serial = vm.join("serial.log");
    let image = vec![kernel.clone(), initrd.clone()];
    let nics = rec.network.as_ref().map_or(0, |n| n.links.len());
    let mut out = vec![virtiofsd(cfg, rec)?];
    match backend {
        Backend::BulkheadVmm => {
            let mut c = Command::new(need(cfg, Binary::BulkheadVmm)?);
            c.arg("--kernel")
                .arg(&kernel)
                .arg("--initrd")
                .arg(&initrd)
                .arg("--cmdline")
                .arg(kernel_cmdline(false, cfg.guest_debug))
                .args(["--cpus", &rec.cpus.to_string()])
                .args(["--memory", &rec.memory_mib.to_string()])
                .arg("--serial")
                .arg(format!("file:{}", serial.display()))
                .arg("--vsock")
                .arg(format!(
                    "cid={GUEST_CID},socket={}",
                    rec.vsock_socket().display()
                ))
                .arg("--fs")
                .arg(format!(
                    "tag={SHARE_TAG},socket={}",
                    vm.join("fs.sock").display()
                ))
                .arg("--rng")
                // Free pages the guest reports go back to the host; Vmm1 on the API
                // socket sets a balloon target and reads the figures.
                .arg("--balloon")
                .arg("--api-socket")
                .arg(vmm_api_socket(rec));
            if rec.hotplug_mib > 0 {
                // virtio-mem: the guest boots with memory_mib and gets up to this much
                // more when Sandbox1.SetHotplugMemory asks.
                c.args(["--hotplug", &rec.hotplug_mib.to_string()]);
            }
            for (i, l) in rec.network.iter().flat_map(|n| n.links.iter()).enumerate() {
                out.push(bulkhead_net(cfg, rec, i)?);
                c.arg("--net").arg(format!(
                    "socket={},mac={},mtu={}",
                    net_socket(rec, i).display(),
                    format_mac(&l.guest.mac),
                    l.guest.mtu.min(65535)
                ));
            }
            out.push(ComponentSpec::new(
                Role::Vmm,
                c,
                None,
                Needs {
                    read_only: image
                        .into_iter()
                        .chain(
                            HUGE_PAGE_POLICY
                                .iter()
                                .map(PathBuf::from)
                                .filter(|p| p.exists()),
                        )
                        .collect(),
                    kvm: true,
                    ..Needs::default()
                },
            ));
        }
        Backend::Qemu => {
            let vu = vm.join("vsock-vu.sock");
            let mut v = Command::new(need(cfg, Binary::VhostDeviceVsock)?);
            v.arg("--vm").arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vu.display(),
                rec.vsock_socket().display()
            ));
            out.push(ComponentSpec::new(
                Role::VsockBackend,
                v,
                Some(vu.clone()),
                Needs {
                    allow_list: Some("vhost-device-vsock"),
                    ..Needs::default()
                },
            ));
            let mut fds = vec![];
            match rec.net_backend {
                NetBackend::BulkheadNet => {
                    for i in 0..nics {
                        out.push(bulkhead_net(cfg, rec, i)?);
                    }
                }
                NetBackend::VhostNet => fds = vhost_net_fds(rec)?,
            }
            let mut read_only = image;
            read_only.push(QEMU_FIRMWARE.into());
            let mut spec = ComponentSpec::new(
                Role::Vmm,
                qemu_command(cfg, rec, &kernel, &initrd, &serial, &vu, tcg)?,
                None,
                Needs {
                    read_only,
                    kvm: !tcg,
                    ..Needs::default()
                },
            );
            spec.fds = fds;
            out.push(spec);
        }
    }
    Ok(out)
}

/// QEMU's firmware (microvm's qboot) and keymaps.
const QEMU_FIRMWARE: &str = "/usr/share/qemu";

fn qemu_command(
    cfg: &Config,
    rec: &SandboxRec,
    kernel: &Path,
    initrd: &Path,
    serial: &Path,
    vsock_vu: &Path,
    tcg: bool,
) -> Result<Command, PlanError> {
    let mem = rec.memory_mib;
    let mut c = Command::new(need(cfg, Binary::Qemu)?);
    c.args(["-name", &format!("bulkhead-{}", rec.id)])
        .args([
            "-M",
            "microvm,acpi=on,x-option-roms=off,rtc=on,memory-backend=mem",
        ])
        .args(["-accel", if tcg { "tcg" } else { "kvm" }])
        .args(["-cpu", if tcg { "max" } else { "host" }])
        .args(["-smp", &rec.cpus.to_string()])
        .args(["-m", &format!("{mem}M")])
        // vhost-user back ends map guest RAM: it must be shared memory.
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        // QEMU's own seccomp filter, under the jail's: no spawning, no privilege
        // changes, no obsolete calls, no scheduler or resource changes.
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(kernel_cmdline(tcg, cfg.guest_debug))
        .arg("-chardev")
        .arg(format!("socket,id=vsock,path={}", vsock_vu.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=fs,path={}",
            rec.vm_dir().join("fs.sock").display()
        ))
        .args([
            "-device",
            &format!("vhost-user-fs-device,chardev=fs,tag={SHARE_TAG}"),
        ])
        .args(["-device", "virtio-rng-device"])
        .args([
            "-device",
            "virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on",
        ]);
    // One virtio-net device per pod interface, its back end a `bulkhead-net` that
    // connects to QEMU's socket (QEMU serves it, so a restarted back end reconnects at
    // once; QEMU waits for the first connection before the guest starts).
    //
    // With `vhost-net`, the tap and a vhost-net descriptor are QEMU's from the start
    // and the kernel moves the frames.
    for (i, l) in rec.network.iter().flat_map(|n| n.links.iter()).enumerate() {
        match rec.net_backend {
            NetBackend::BulkheadNet => c
                .arg("-chardev")
                .arg(format!(
                    "socket,id=net{i},path={},server=on,wait=off",
                    net_socket(rec, i).display()
                ))
                .arg("-netdev")
                .arg(format!("vhost-user,id=nd{i},chardev=net{i}")),
            NetBackend::VhostNet => {
                let (tap, vhost) = vhost_net_fd(i);
                c.arg("-netdev")
                    .arg(format!("tap,id=nd{i},fd={tap},vhost=on,vhostfd={vhost}"))
            }
        };
        c.arg("-device").arg(format!(
            "virtio-net-device,netdev=nd{i},mac={}",
            format_mac(&l.guest.mac)
        ));
    }
    c
        // For operators: `info registers`, `info lapic` on a guest that seems stuck.
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            rec.vm_dir().join("qemu-monitor.sock").display()
        ));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::net::NetInterface;

    fn qemu_args(net_backend: NetBackend) -> Option<Vec<String>> {
        let mut rec: SandboxRec =
            serde_json::from_str(r#"{"id":"n1","backend":"qemu","cpus":1,"memory_mib":128,"created_at_us":1,"state":"creating","run_dir":"/run/bh/x","components":[],"containers":[],"timings":{}}"#)
                .unwrap();
        rec.net_backend = net_backend;
        let link = |i: u8| crate::net::PlumbedLink {
            link: format!("eth{i}"),
            tap: format!("bhtap{i}"),
            guest: NetInterface {
                name: format!("eth{i}"),
                mac: [2, 0, 0, 0, 0, i],
                mtu: 1500,
                addresses: vec![],
            },
        };
        rec.network = Some(crate::net::NetRec {
            netns: "/run/netns/p".into(),
            links: vec![link(0), link(1)],
            routes: vec![],
        });
        let cfg = Config::default();
        cfg.binary(Binary::Qemu)?;
        let p = Path::new("/x");
        let c = qemu_command(&cfg, &rec, p, p, p, p, false).unwrap();
        Some(
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        )
    }

    #[test]
    fn each_interface_reaches_qemu_through_its_net_backend() {
        let Some(user) = qemu_args(NetBackend::BulkheadNet) else {
            eprintln!("skipped: no qemu-system-x86_64 here");
            return;
        };
        let netdevs = |args: &[String]| -> Vec<String> {
            args.windows(2)
                .filter(|w| w[0] == "-netdev")
                .map(|w| w[1].clone())
                .collect()
        };
        assert_eq!(
            netdevs(&user),
            [
                "vhost-user,id=nd0,chardev=net0",
                "vhost-user,id=nd1,chardev=net1"
            ]
        );
        assert!(user
            .iter()
            .any(|a| a.ends_with("/vm/net1.sock,server=on,wait=off")));
        let kernel = qemu_args(NetBackend::VhostNet).unwrap();
        // Tap and vhost-net descriptors in pairs, above stdio, as vhost_net_fds hands them.
        assert_eq!(
            netdevs(&kernel),
            [
                "tap,id=nd0,fd=3,vhost=on,vhostfd=4",
                "tap,id=nd1,fd=5,vhost=on,vhostfd=6"
            ]
        );
        assert!(!kernel.iter().any(|a| a.contains("net0.sock")));
        assert!(kernel
            .iter()
            .any(|a| a == "virtio-net-device,netdev=nd1,mac=02:00:00:00:00:01"));
    }

    #[test]
    fn tcg_cmdline_carries_tsc() {
        let c = kernel_cmdline(true, false);
        assert!(c.starts_with("console=ttyS0") && c.contains(" quiet"));
        assert!(!kernel_cmdline(false, true).contains("quiet"));
        if host_tsc_khz().is_some() {
            assert!(c.contains("tsc_early_khz="), "{c}");
        }
        assert!(!kernel_cmdline(false, false).contains("tsc_early_khz"));
    }
}
