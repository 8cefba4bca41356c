//! What the jail costs a component's start: a program run as it is beside the same
//! program under `bulkhead-jailer` with the jail bulkheadd gives a VMM (own root, /dev/kvm,
//! cgroup, uid, landlock, seccomp), interleaved, medians. Wall time from spawn to exit
//! and CPU time of everything the start ran (jailer parent and child included).
//!
//!   cargo bench -p bulkhead-jailer --bench jail_cost -- [--runs N]
//!
//! Needs root, as the jailer does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use jailer::{Device, Jail};

const UID: u32 = 1_999_000_200;

fn children_cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN counts waited-for children.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

fn time(cmd: &mut Command) -> (f64, f64) {
    let cpu0 = children_cpu_ms();
    let t = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn");
    let wall = t.elapsed().as_secs_f64() * 1e3;
    assert!(st.success(), "{cmd:?}: {st:?}");
    (wall, children_cpu_ms() - cpu0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn jail(dir: &Path, program: &Path, args: &[&str]) -> Jail {
    let mut j = Jail::new("bench", "vmm", dir.join("root"), program.into());
    j.uid = UID;
    j.gid = UID;
    j.read_only = jailer::loader_paths(program);
    j.read_only.push(program.into());
    j.read_write = vec![dir.join("vm")];
    if Path::new("/dev/kvm").exists() {
        j.devices.push(Device::Kvm);
    }
    j.cgroup = Some("bulkhead-bench/vmm".into());
    j.report = Some(dir.join("report.json"));
    j.args = args.iter().map(Into::into).collect();
    j
}

fn main() {
    let mut runs = 20usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--runs" {
            runs = it.next().and_then(|n| n.parse().ok()).expect("--runs N");
        }
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jail needs root");
    let jailer = PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-jailer"));
    let vmm = jailer.with_file_name("bulkhead-vmm");
    let dir = std::env::temp_dir().join(format!("bh-jail-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::create_dir_all(dir.join("vm")).unwrap();
    let mut programs: Vec<(String, PathBuf, Vec<&str>)> =
        vec![("/bin/true".into(), "/bin/true".into(), vec![])];
    if vmm.exists() {
        programs.push(("bulkhead-vmm --help".into(), vmm, vec!["--help"]));
    }
    println!("jail cost: {runs} runs each, interleaved, medians (ms)");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "program", "wall", "jailed", "cost", "cpu", "jailed", "cost"
    );
    for (label, prog, args) in &programs {
        let j = jail(&dir, prog, args);
        let (mut w0, mut w1, mut c0, mut c1) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let (w, c) = time(Command::new(prog).args(args));
            w0.push(w);
            c0.push(c);
            let (w, c) = time(Command::new(&jailer).args(j.to_args()));
            w1.push(w);
            c1.push(c);
        }
        let (w0, w1, c0, c1) = (
            median(&mut w0),
            median(&mut w1),
            median(&mut c0),
            median(&mut c1),
        );
        println!(
            "{label:<22} {w0:>10.2} {w1:>10.2} {:>10.2} {c0:>10.2} {c1:>10.2} {:>10.2}",
            w1 - w0,
            c1 - c0
        );
    }
    jailer::remove_cgroup("bulkhead-bench");
    let _ = std::fs::remove_dir_all(&dir);
}
