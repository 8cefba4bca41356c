//! Container create + start + wait for `/bin/true`, then delete: bulkhead-agent in host
//! mode beside runc and crun, on the same busybox rootfs and the same spec, interleaved
//! in one run. Prints a table of medians and the ratio to runc.
//!
//!   sudo cargo bench -p bulkhead-agent-tests --bench container_start [-- --runs N]
//!
//! Everything runs in one private mount namespace whose /sys/fs/cgroup is a cgroup2
//! mount (crun refuses this host's hybrid layout otherwise), so the three runtimes see
//! the same cgroup tree. No network namespace in the spec: the agent never makes one
//! (the VM is the boundary), so neither do the peers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_agent_tests::hostmode::HostAgent;
use bulkhead_agent_tests::{bench_once, bench_spec, median, rootfs};

fn private_cgroup2() -> Result<()> {
    let sh = |script: &str| -> Result<()> {
        let st = Command::new("sh").args(["-c", script]).status()?;
        if !st.success() {
            bail!("{script}: {st}");
        }
        Ok(())
    };
    // SAFETY: unshare(CLONE_NEWNS) before any thread is started.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        bail!(
            "unshare mount namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    sh("mount --make-rprivate / && (umount -l /sys/fs/cgroup 2>/dev/null || true) && mount -t cgroup2 none /sys/fs/cgroup")
}

fn run_peer(bin: &str, bundle: &Path, rootfs: &Path, id: &str) -> Result<Duration> {
    std::fs::write(
        bundle.join("config.json"),
        bench_spec(&rootfs.display().to_string(), id).to_string(),
    )?;
    let t = Instant::now();
    let st = Command::new(bin)
        .args(["--root", "/run/bulkhead-bench-state", "run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()?;
    let d = t.elapsed();
    if !st.success() {
        bail!("{bin} run {id}: {st}");
    }
    Ok(d)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(25);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the bench creates containers");
    }
    private_cgroup2()?;
    let rootfs = rootfs::busybox_rootfs()?;
    let agent_bin = std::env::var_os("BULKHEAD_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/release/bulkhead-agent")
        });
    if !agent_bin.exists() {
        bail!(
            "{} missing: cargo build --release -p bulkhead-agent",
            agent_bin.display()
        );
    }
    let agent = HostAgent::start(&agent_bin).context("host-mode agent")?;
    let bundle = std::env::temp_dir().join(format!("bh-bench-{}", std::process::id()));
    std::fs::create_dir_all(&bundle)?;

    let mut peers: Vec<&str> = Vec::new();
    for p in ["runc", "crun"] {
        if Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
        {
            peers.push(p);
        } else {
            println!("note: {p} not installed; left out");
        }
    }
    let mut samples: Vec<(String, Vec<f64>)> = vec![("bulkhead-agent (host mode)".into(), vec![])];
    for p in &peers {
        samples.push(((*p).into(), vec![]));
    }
    // Warm-up (page cache, first cgroup creation), not counted.
    let rootfs_s = rootfs.display().to_string();
    bench_once(&agent.endpoint(), &rootfs_s, "warm-agent")?;
    for p in &peers {
        run_peer(p, &bundle, &rootfs, &format!("warm-{p}"))?;
    }
    for i in 0..runs {
        let d = bench_once(&agent.endpoint(), &rootfs_s, &format!("a{i}"))?;
        samples[0].1.push(d.as_secs_f64() * 1e3);
        for (k, p) in peers.iter().enumerate() {
            let d = run_peer(p, &bundle, &rootfs, &format!("{p}{i}"))?;
            samples[k + 1].1.push(d.as_secs_f64() * 1e3);
        }
    }
    let runc_median = samples
        .iter()
        .find(|(n, _)| n == "runc")
        .map(|(_, v)| median(&mut v.clone()));
    println!("container create+start+wait(/bin/true)+delete, {runs} runs each, interleaved");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12}",
        "runtime", "median ms", "min ms", "max ms", "vs runc"
    );
    for (name, v) in samples.iter_mut() {
        let m = median(v);
        let ratio = runc_median
            .map(|r| format!("{:.2}x", m / r))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2} {:>12}",
            name,
            m,
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0),
            ratio
        );
    }
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(())
}
