//! VMM start cost on the host's own KVM, with a toy guest whose first instruction after
//! entry is an I/O port write: the VMM's CPU time (user + system, from wait4's rusage)
//! from exec to exit is its cost to reach the guest's first I/O exit, plus teardown.
//! Measured side by side with QEMU (`-M microvm`, the same code as its BIOS), and with
//! bulkhead-vmm under `bulkhead-jailer` (the jail bulkheadd gives it: own root and
//! namespaces, a uid, no capabilities, landlock, seccomp), alternating runs, medians
//! reported. The jailed row's CPU includes the jailer's.
//!
//! cargo bench -p bulkhead-vmm --bench toy_start [-- RUNS]

use std::process::Command;
use std::time::Instant;

const VMM: &str = env!("CARGO_BIN_EXE_bulkhead-vmm");

/// out 0xf4 (QEMU's isa-debug-exit ends QEMU here), then ACPI S5 (ends bulkhead-vmm), hlt.
const CODE: &[u8] = &[
    0xb0, 0x41, 0xe6, 0xf4, 0xba, 0xc0, 0x03, 0xb0, 0x34, 0xee, 0xf4,
];

struct Sample {
    wall_ms: f64,
    cpu_ms: f64,
    max_rss_kib: i64,
}

fn run(cmd: &mut Command) -> Option<Sample> {
    let t = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child's pid with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
    if pid <= 0 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Some(Sample {
        wall_ms,
        cpu_ms: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(21);
    let dir = std::env::temp_dir().join(format!("bh-toybench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("toy.bin");
    std::fs::write(&bin, CODE).unwrap();
    let mut rom = vec![0xf4u8; 65536];
    rom[..CODE.len()].copy_from_slice(CODE);
    rom[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]); // jmp f000:0000
    let romp = dir.join("toy.rom");
    std::fs::write(&romp, &rom).unwrap();
    let qemu = which("qemu-system-x86_64");

    let vmm_args = [
        "--boot",
        "raw16",
        "--kernel",
        bin.to_str().unwrap(),
        "--memory",
        "128",
    ];
    // The jailer is built beside the VMM (cargo build --release builds both).
    let jailer = std::path::Path::new(VMM).with_file_name("bulkhead-jailer");
    // SAFETY: geteuid has no preconditions.
    let jail = (jailer.exists() && unsafe { libc::geteuid() } == 0).then(|| {
        let root = dir.join("jail");
        std::fs::create_dir_all(&root).unwrap();
        let mut j = bulkhead_jail::Jail::new("bench", "vmm", root, VMM.into());
        j.uid = 1_999_000_300;
        j.gid = 1_999_000_300;
        j.read_only = bulkhead_jail::system_paths();
        j.read_only
            .extend([std::path::PathBuf::from(VMM), bin.clone()]);
        j.devices.push(bulkhead_jail::Device::Kvm);
        j.cgroup = Some("bulkhead-bench/toy".into());
        j.args = vmm_args.iter().map(Into::into).collect();
        j.to_args()
    });
    let (mut ours, mut jailed, mut theirs) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        ours.extend(run(Command::new(VMM).args(vmm_args)));
        if let Some(a) = &jail {
            jailed.extend(run(Command::new(&jailer).args(a)));
        }
        if let Some(q) = &qemu {
            let mut c = Command::new(q);
            c.args([
                "-accel",
                "kvm",
                "-M",
                "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=off",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-m",
                "128",
            ])
            .args([
                "-bios",
                romp.to_str().unwrap(),
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
            ]);
            theirs.extend(run(&mut c));
        }
    }
    println!(
        "toy guest on this host's KVM ({}), 128 MiB, 1 vCPU; {runs} alternating runs, medians",
        kvm_kind()
    );
    println!(
        "{:<24}{:>8}{:>16}{:>20}{:>18}",
        "VMM", "runs", "wall exec->exit", "CPU exec->exit", "max RSS (MiB)"
    );
    let row = |name: &str, s: &[Sample]| {
        if s.is_empty() {
            println!("{name:<24}{:>8}", "n/a");
            return (f64::NAN, f64::NAN);
        }
        let w = median(s.iter().map(|x| x.wall_ms).collect());
        let c = median(s.iter().map(|x| x.cpu_ms).collect());
        let r = median(s.iter().map(|x| x.max_rss_kib as f64).collect());
        println!(
            "{name:<24}{:>8}{:>13.2} ms{:>17.2} ms{:>18.1}",
            s.len(),
            w,
            c,
            r / 1024.0
        );
        (w, c)
    };
    let (ow, oc) = row("bulkhead-vmm", &ours);
    let (jw, jc) = row("bulkhead-vmm, jailed", &jailed);
    let (qw, qc) = row("qemu -M microvm", &theirs);
    if !jailed.is_empty() {
        println!(
            "the jail's cost: wall +{:.2} ms, CPU +{:.2} ms",
            jw - ow,
            jc - oc
        );
    }
    if !theirs.is_empty() {
        println!(
            "ratio (QEMU / bulkhead-vmm): wall {:.1}x, CPU {:.1}x",
            qw / ow,
            qc / oc
        );
    }
    bulkhead_jail::remove_cgroup("bulkhead-bench");
    let _ = std::fs::remove_dir_all(&dir);
}

fn which(name: &str) -> Option<String> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

fn kvm_kind() -> String {
    format!("{:?}", bulkhead_host::kvm_kind())
}
