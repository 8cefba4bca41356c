//! `bulkhead`: the user-facing command.
//!
//! - `bulkhead check`: can this host run bulkhead-vmm, and with which backend?
//! - `bulkhead probe`: talk to a guest agent (optionally spawning the VMM first and
//!   timing exec to the agent's first answer); used by the test node and benchmarks.

mod probe;

use anyhow::Result;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("check") => check(),
        Some("probe") => probe::run(&args[1..]),
        _ => {
            eprintln!(
                "usage: bulkhead check | bulkhead probe [options] [-- VMM COMMAND...]\n{}",
                probe::USAGE
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("bulkhead: {e:#}");
        std::process::exit(1);
    }
}

fn check() -> Result<()> {
    use bulkhead_host::KvmKind;
    let kind = bulkhead_host::kvm_kind();
    let (backend, why) = match kind {
        KvmKind::Vmx | KvmKind::Svm => ("bulkhead-vmm", "hardware virtualization present"),
        KvmKind::Pvm => ("nested", "/dev/kvm is PVM (kvm_pvm): no stock kernels; bulkhead-vmm runs inside a nested QEMU TCG node"),
        KvmKind::Missing => ("nested", "no /dev/kvm: bulkhead-vmm runs inside a nested QEMU TCG node"),
        KvmKind::Unknown => ("nested", "/dev/kvm present but neither vmx nor svm in the CPU flags"),
    };
    println!("kvm: {kind:?}");
    println!("backend: {backend}");
    println!("reason: {why}");
    Ok(())
}
