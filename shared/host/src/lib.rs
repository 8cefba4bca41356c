//! Host capability probes and runtime configuration shared by `bulkhead-vmm`, bulkheadd
//! and the `bulkhead` CLI.

pub mod check;
pub mod config;
pub mod hugepages;
pub mod logging;
pub mod overlay;
pub mod pod;
pub mod threads;
pub mod untrusted;

use std::path::Path;

/// Create `dir` (and its parents) if missing, then make it 0700: for a directory above
/// what a container or an image owns, which no other host user may reach. One an older
/// version made 0755 is closed too.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// What kind of KVM `/dev/kvm` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization (VT-x): boots stock kernels.
    Vmx,
    /// Hardware virtualization (AMD-V): boots stock kernels.
    Svm,
    /// Pagetable-based KVM without VT-x/AMD-V: runs toy guests, not stock kernels.
    Pvm,
    /// No /dev/kvm at all.
    Missing,
    /// /dev/kvm exists but the CPU flags show neither vmx nor svm.
    Unknown,
}

impl KvmKind {
    pub fn boots_stock_kernels(self) -> bool {
        matches!(self, KvmKind::Vmx | KvmKind::Svm)
    }
}

/// Classify from the pieces, so the logic is testable without a host.
pub fn classify(dev_kvm: bool, pvm_module: bool, cpu_flags: &str) -> KvmKind {
    if !dev_kvm {
        return KvmKind::Missing;
    }
    if pvm_module {
        return KvmKind::Pvm;
    }
    let has = |f: &str| cpu_flags.split_whitespace().any(|x| x == f);
    if has("vmx") {
        KvmKind::Vmx
    } else if has("svm") {
        KvmKind::Svm
    } else {
        KvmKind::Unknown
    }
}

pub fn cpu_flags() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.split_once(':').map(|x| x.1).unwrap_or("").to_owned())
        })
        .unwrap_or_default()
}

/// Can this process open /dev/kvm for reading and writing?
pub fn dev_kvm_accessible() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

pub fn kvm_kind() -> KvmKind {
    classify(
        Path::new("/dev/kvm").exists(),
        Path::new("/sys/module/kvm_pvm").exists(),
        &cpu_flags(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(false, false, "vmx"), KvmKind::Missing);
        assert_eq!(classify(true, true, "fpu"), KvmKind::Pvm);
        assert_eq!(classify(true, false, "fpu vmx sse"), KvmKind::Vmx);
        assert_eq!(classify(true, false, "fpu svm"), KvmKind::Svm);
        assert_eq!(classify(true, false, "fpu svmx"), KvmKind::Unknown);
        assert!(KvmKind::Svm.boots_stock_kernels() && !KvmKind::Pvm.boots_stock_kernels());
    }
}
