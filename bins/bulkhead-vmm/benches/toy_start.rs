//! VMM start cost on the host's own KVM, with a toy guest whose first instruction after
//! entry is an I/O port write: the VMM's CPU time (user + system, from wait4's rusage)
//! from exec to exit is its cost to reach the guest's first I/O exit, plus teardown.
//! Measured side by side with QEMU (`-M microvm`, the same code as its BIOS), and with
//! bulkhead-vmm under `bulkhead-jailer` (the jail bulkheadd gives it: own root and
//! namespaces, a uid, no capabilities, landlock, seccomp), alternating runs, medians
//! reported. The jailed row's CPU includes the jailer's.
//!
//! Then the VMM's non-guest RSS (everything resident but guest RAM, from
//! /proc/PID/smaps) in a toy guest that spins, before and after one peer reads `State`
//! on its `org.bulkhead.Vmm1` socket (the D-Bus code maps in with the first peer), plain
//! and jailed.
//!
//! cargo bench -p bulkhead-vmm --bench toy_start [-- RUNS]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
    let jailer = jailer_beside_vmm();
    let jail = jailer
        .as_ref()
        .map(|_| jail_args(&dir.join("jail"), "toy", &bin, &vmm_args, None));
    let (mut ours, mut jailed, mut theirs) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        ours.extend(run(Command::new(VMM).args(vmm_args)));
        if let (Some(j), Some(a)) = (&jailer, &jail) {
            jailed.extend(run(Command::new(j).args(a)));
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
    rss_table(&dir, jailer.as_deref(), runs.clamp(1, 5));
    // The last jailed VMM dies of its parent-death signal after the jailer's kill, and
    // closing its VM waits for an RCU grace period: its group is busy until then.
    std::thread::sleep(Duration::from_millis(300));
    bulkhead_jail::remove_cgroup("bulkhead-bench");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The jailer built beside the VMM (`cargo build --release` builds both), when we are
/// root and may use it.
fn jailer_beside_vmm() -> Option<PathBuf> {
    let jailer = Path::new(VMM).with_file_name("bulkhead-jailer");
    // SAFETY: geteuid has no preconditions.
    (jailer.exists() && unsafe { libc::geteuid() } == 0).then_some(jailer)
}

/// The jailer's arguments for the VMM with `args`, in the jail bulkheadd gives it, rooted
/// at `root`, with `kernel` bound read-only and `rw` read-write.
fn jail_args(
    root: &Path,
    group: &str,
    kernel: &Path,
    args: &[&str],
    rw: Option<&Path>,
) -> Vec<OsString> {
    std::fs::create_dir_all(root).unwrap();
    let mut j = bulkhead_jail::Jail::new("bench", "vmm", root.into(), VMM.into());
    j.uid = 1_999_000_300;
    j.gid = 1_999_000_300;
    j.read_only = bulkhead_jail::loader_paths(Path::new(VMM));
    j.read_only.extend([PathBuf::from(VMM), kernel.into()]);
    j.read_write.extend(rw.map(PathBuf::from));
    j.devices.push(bulkhead_jail::Device::Kvm);
    j.cgroup = Some(format!("bulkhead-bench/{group}"));
    j.args = args.iter().map(Into::into).collect();
    j.to_args()
}

/// Resident KiB of `pid` outside guest RAM (its one mapping of `guest_mib` or more).
fn non_guest_rss_kib(pid: u32, guest_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut size) = (0, 0);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("Size:"), Some(kib)) => size = kib,
            (Some("Rss:"), Some(kib)) if size < guest_mib * 1024 => total += kib,
            _ => {}
        }
    }
    Some(total)
}

/// The VMM's pid: `child` itself, or under a jailer, the jailer's one child.
fn vmm_pid(child: u32, jailed: bool) -> Option<u32> {
    if !jailed {
        return Some(child);
    }
    let kids = std::fs::read_to_string(format!("/proc/{child}/task/{child}/children")).ok()?;
    kids.split_whitespace().next()?.parse().ok()
}

/// Non-guest RSS (KiB) of one spinning toy VM before and after a peer reads `State`.
fn rss_once(cmd: &mut Command, sock: &Path, jailed: bool) -> Option<(u64, u64)> {
    const MIB: u64 = 128;
    let _ = std::fs::remove_file(sock);
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let measured = (|| {
        let t = Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Settled: the vCPU spins in the guest, the event loop waits.
        std::thread::sleep(Duration::from_millis(300));
        let pid = vmm_pid(child.id(), jailed)?;
        let before = non_guest_rss_kib(pid, MIB)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let state = rt.block_on(async {
            let vmm = bulkhead_dbus::vmm::connect(sock, Duration::from_secs(5)).await?;
            vmm.state().await
        });
        if state.ok()? != "running" {
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
        Some((before, non_guest_rss_kib(pid, MIB)?))
    })();
    let _ = child.kill();
    let _ = child.wait();
    measured
}

fn rss_table(dir: &Path, jailer: Option<&Path>, runs: usize) {
    let spin = dir.join("spin.bin");
    std::fs::write(&spin, [0xeb, 0xfe]).unwrap(); // jmp $
    let rw = dir.join("vm");
    std::fs::create_dir_all(&rw).unwrap();
    // The jail's uid must be able to make its socket there.
    let _ = std::os::unix::fs::chown(&rw, Some(1_999_000_300), Some(1_999_000_300));
    let sock = rw.join("api.sock");
    let args = [
        "--boot",
        "raw16",
        "--kernel",
        spin.to_str().unwrap(),
        "--memory",
        "128",
        "--hugepages",
        "off",
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    let jail = jailer.map(|j| {
        (
            j,
            jail_args(&dir.join("jail-rss"), "rss", &spin, &args, Some(&rw)),
        )
    });
    let (mut plain, mut jailed) = (vec![], vec![]);
    for _ in 0..runs {
        plain.extend(rss_once(Command::new(VMM).args(args), &sock, false));
        if let Some((j, a)) = &jail {
            jailed.extend(rss_once(Command::new(j).args(a), &sock, true));
        }
    }
    println!();
    println!("non-guest RSS, toy guest spinning, 128 MiB, --hugepages off; {runs} runs, medians");
    println!(
        "{:<24}{:>8}{:>18}{:>18}",
        "VMM", "runs", "before a peer", "with a peer"
    );
    for (name, s) in [("bulkhead-vmm", &plain), ("bulkhead-vmm, jailed", &jailed)] {
        if s.is_empty() {
            println!("{name:<24}{:>8}", "n/a");
            continue;
        }
        let b = median(s.iter().map(|x| x.0 as f64).collect());
        let a = median(s.iter().map(|x| x.1 as f64).collect());
        println!(
            "{name:<24}{:>8}{:>14.2} MiB{:>14.2} MiB",
            s.len(),
            b / 1024.0,
            a / 1024.0
        );
    }
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
