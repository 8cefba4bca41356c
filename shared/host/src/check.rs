//! What this host can run, and why not: the facts behind `bulkhead check` and the
//! manager's list of backends. Every problem is said in words an operator can act on.

use std::path::Path;

use serde::Serialize;

use crate::config::{Backend, Binary, Config};
use crate::{kvm_kind, KvmKind};

#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub name: &'static str,
    pub usable: bool,
    /// `kvm` or `tcg` for QEMU; `kvm` for bulkhead-vmm.
    pub accel: Option<&'static str>,
    /// Why it cannot run here (empty when usable), or notes when it can.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kvm: String,
    /// The backend a new sandbox gets by default; `None` when nothing can run.
    pub backend: Option<&'static str>,
    pub backends: Vec<BackendStatus>,
    /// `unified` (cgroup v2 only), `hybrid` (v1 plus a v2 mount) or `legacy` (v1 only).
    pub cgroup_layout: &'static str,
    /// Problems shared by every backend (guest image, dbus-daemon).
    pub problems: Vec<String>,
    /// Notes that are not problems.
    pub notes: Vec<String>,
}

impl HostReport {
    pub fn chosen(&self) -> Option<Backend> {
        self.backend.and_then(Backend::parse)
    }
}

/// The accelerator QEMU would use here.
pub fn qemu_accel(kind: KvmKind) -> &'static str {
    if kind.boots_stock_kernels() {
        "kvm"
    } else {
        "tcg"
    }
}

pub fn cgroup_layout() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "unified"
    } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        "hybrid"
    } else {
        "legacy"
    }
}

pub fn check(cfg: &Config) -> HostReport {
    let kind = kvm_kind();
    let mut problems = vec![];
    let mut notes = vec![];
    for (what, p) in [
        ("guest kernel", cfg.kernel()),
        ("guest initramfs", cfg.initrd()),
    ] {
        if !p.exists() {
            problems.push(format!(
                "{what} {} is missing: build the guest image (python3 packaging/guest/build.py) \
                 and set BULKHEAD_GUEST_DIR, or guest_kernel/guest_initrd in the config",
                p.display()
            ));
        }
    }
    if crate::config::find_binary("dbus-daemon", &[]).is_none() {
        problems
            .push("dbus-daemon not found: the embedded bus needs it (apt-get install dbus)".into());
    }
    if crate::config::find_binary("virtiofsd", &["/opt/virtiofsd/bin", "/usr/libexec"]).is_none()
        && cfg.binary(Binary::Virtiofsd).is_none()
    {
        problems.push(
            "virtiofsd not found: container root file systems reach the guest through it \
             (scripts/install-deps.sh installs it under /opt/virtiofsd)"
                .into(),
        );
    }
    let layout = cgroup_layout();
    if layout != "unified" {
        notes.push(format!(
            "cgroup layout is {layout}: containers' cgroups live in the guest, so VMs run; \
             host-side limits per sandbox want cgroup v2 (systemd.unified_cgroup_hierarchy=1)"
        ));
    }

    let mut vmm = BackendStatus {
        name: Backend::BulkheadVmm.as_str(),
        usable: false,
        accel: Some("kvm"),
        reasons: vec![],
    };
    match kind {
        KvmKind::Vmx | KvmKind::Svm => {}
        KvmKind::Missing if !Path::new("/sys/module/kvm").exists() => vmm.reasons.push(
            "no /dev/kvm and the kvm module is not loaded: modprobe kvm_intel (or kvm_amd), \
             and enable virtualization in the firmware"
                .into(),
        ),
        KvmKind::Missing => vmm.reasons.push(
            "no /dev/kvm although kvm is loaded: create it (mknod /dev/kvm c 10 232) or give \
             this container the device"
                .into(),
        ),
        KvmKind::Pvm => vmm.reasons.push(
            "/dev/kvm is a PVM KVM (kvm_pvm, no VT-x/AMD-V): it cannot boot a stock kernel; \
             use the qemu backend here, or a node with hardware virtualization"
                .into(),
        ),
        KvmKind::Unknown => vmm.reasons.push(
            "/dev/kvm exists but the CPU shows neither vmx nor svm: enable nested or \
             hardware virtualization"
                .into(),
        ),
    }
    if kind.boots_stock_kernels() && !crate::dev_kvm_accessible() {
        vmm.reasons
            .push("/dev/kvm is not readable and writable by this user".into());
    }
    if cfg.binary(Binary::BulkheadVmm).is_none() {
        vmm.reasons
            .push("bulkhead-vmm not found beside bulkhead or on PATH".into());
    }
    vmm.usable = vmm.reasons.is_empty();

    let accel = qemu_accel(kind);
    let mut qemu = BackendStatus {
        name: Backend::Qemu.as_str(),
        usable: false,
        accel: Some(accel),
        reasons: vec![],
    };
    if cfg.binary(Binary::Qemu).is_none() {
        qemu.reasons
            .push("qemu-system-x86_64 not found: apt-get install qemu-system-x86".into());
    }
    if cfg.binary(Binary::VhostDeviceVsock).is_none() {
        qemu.reasons.push(
            "vhost-device-vsock not found: the qemu backend's vsock back end \
             (scripts/install-deps.sh installs it under /opt/vhost-device-vsock)"
                .into(),
        );
    }
    qemu.usable = qemu.reasons.is_empty();
    if qemu.usable && accel == "tcg" {
        qemu.reasons.push(
            "runs on TCG (software emulation): a few seconds to boot, slow guest code".into(),
        );
    }

    let usable_now = problems.is_empty();
    let pick = |b: &BackendStatus| usable_now && b.usable;
    let preferred = cfg.default_backend.as_deref();
    let backend = [&vmm, &qemu]
        .into_iter()
        .filter(|b| pick(b))
        .find(|b| preferred == Some(b.name))
        .or_else(|| [&vmm, &qemu].into_iter().find(|b| pick(b)))
        .map(|b| b.name);
    HostReport {
        kvm: format!("{kind:?}"),
        backend,
        backends: vec![vmm, qemu],
        cgroup_layout: layout,
        problems,
        notes,
    }
}
