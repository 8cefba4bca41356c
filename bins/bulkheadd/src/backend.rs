//! The two hypervisor backends behind one interface: each turns a sandbox into the
//! ordered list of component processes that run it. Both give the guest the same
//! devices (vsock for the agent, virtio-fs for the shared directory), so the same guest
//! image and agent run on either.
//!
//! - `bulkhead-vmm`: virtiofsd, then our VMM (vsock in process).
//! - `qemu`: virtiofsd and vhost-device-vsock (vhost-user back ends), then QEMU
//!   `-M microvm,acpi=on` on KVM, or on TCG where KVM cannot boot a stock kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead_host::config::{Backend, Binary, Config};

use crate::store::SandboxRec;

/// Guest vsock context id; every VM has its own vsock device, so one number serves all.
pub const GUEST_CID: u32 = 3;
/// virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "bulkhead";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED: &str = "/run/bulkhead/shared";

/// One process to start, and the socket it must have created before the next starts.
pub struct ComponentSpec {
    pub name: &'static str,
    pub command: Command,
    pub ready_socket: Option<PathBuf>,
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
    let mut c = String::from("console=ttyS0 panic=-1 pci=off");
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

fn virtiofsd(cfg: &Config, rec: &SandboxRec) -> Result<ComponentSpec, PlanError> {
    let sock = rec.run_dir.join("fs.sock");
    let mut c = Command::new(need(cfg, Binary::Virtiofsd)?);
    c.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", rec.shared_dir().display()))
        // Jailing virtiofsd (namespace sandbox, seccomp) is the jailer's work.
        .args(["--sandbox=none", "--cache=never", "--announce-submounts"]);
    Ok(ComponentSpec {
        name: "virtiofsd",
        command: c,
        ready_socket: Some(sock),
    })
}

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
    let run = &rec.run_dir;
    let serial = run.join("serial.log");
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
                    run.join("fs.sock").display()
                ))
                .arg("--rng");
            out.push(ComponentSpec {
                name: "vmm",
                command: c,
                ready_socket: None,
            });
        }
        Backend::Qemu => {
            let vu = run.join("vsock-vu.sock");
            let mut v = Command::new(need(cfg, Binary::VhostDeviceVsock)?);
            v.arg("--vm").arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vu.display(),
                rec.vsock_socket().display()
            ));
            out.push(ComponentSpec {
                name: "vhost-device-vsock",
                command: v,
                ready_socket: Some(vu.clone()),
            });
            out.push(ComponentSpec {
                name: "vmm",
                command: qemu_command(cfg, rec, &kernel, &initrd, &serial, &vu, tcg)?,
                ready_socket: None,
            });
        }
    }
    Ok(out)
}

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
            rec.run_dir.join("fs.sock").display()
        ))
        .args([
            "-device",
            &format!("vhost-user-fs-device,chardev=fs,tag={SHARE_TAG}"),
        ])
        .args(["-device", "virtio-rng-device"])
        // For operators: `info registers`, `info lapic` on a guest that seems stuck.
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            rec.run_dir.join("qemu-monitor.sock").display()
        ));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

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
