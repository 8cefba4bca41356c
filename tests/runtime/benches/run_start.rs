//! `bulkhead run --rm IMAGE echo` beside `podman run --runtime runc` of the same image,
//! interleaved, medians; bulkhead's time split into phases; bulkheadd's RSS idle and with
//! 10 sandboxes, and its CPU time per sandbox created.
//!
//!   cargo bench -p bulkhead-runtime-tests --bench run_start -- [--runs N] [--guest DIR]
//!
//! The guest image defaults to what packaging/guest/build.py prints for the release
//! agent. Prints a table.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_runtime_tests::bench::{field, median, setup};
use bulkhead_runtime_tests::env::{run_cmd, Env};

/// The phases `bulkhead run` reports with BULKHEAD_TIMINGS=1, in ms.
struct Phases {
    pre_vmm: f64,
    boot: f64,
    run: f64,
    teardown: f64,
    total: f64,
}

fn bulkhead_once(e: &Env, image: &str) -> Result<Phases> {
    let mut c = e.cmd(&["run", "--rm", image, "echo", "hello"]);
    c.env("BULKHEAD_TIMINGS", "1");
    let o = run_cmd(&mut c, None, Duration::from_secs(180))?;
    if o.code != 0 || o.stdout != "hello\n" {
        bail!("bulkhead run: {o:?}");
    }
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("timings ms"))
        .context("no timings line")?;
    let bus = field(line, "bus+manager").context("bus+manager")?;
    let vmm_exec = field(line, "vmm exec").context("vmm exec")?;
    let agent = field(line, "agent ready").context("agent ready")?;
    let exited = field(line, "exited").context("exited")?;
    let total = o.took.as_secs_f64() * 1e3;
    Ok(Phases {
        pre_vmm: bus + vmm_exec,
        boot: agent - vmm_exec,
        run: exited - (bus + agent),
        teardown: total - exited,
        total,
    })
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rfind(')')
        .map(|i| stat[i + 2..].split_whitespace().collect())
        .unwrap_or_default();
    let t: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    t as f64 * 1000.0 / hz
}

fn main() -> Result<()> {
    let (runs, e) = setup(10)?;
    let image = e.layout.display().to_string();
    // podman with runc, same image, its own store.
    let pm = e.dir.join("podman");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.arg(format!("--root={}", pm.join("root").display()))
            .arg(format!("--runroot={}", pm.join("run").display()))
            .args([
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
                "--runtime=runc",
            ])
            .args(args);
        run_cmd(&mut c, None, Duration::from_secs(120))
    };
    podman(&["load", "-i", &e.archive.display().to_string()])?.ok()?;
    // Warm both: image unpack, bus, manager, page cache.
    bulkhead_once(&e, &image)?;
    let podman_once = || -> Result<f64> {
        let o = podman(&[
            "run",
            "--rm",
            "--network=none",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
            "localhost/latest:latest",
            "echo",
            "hello",
        ])?;
        if o.code != 0 || o.stdout != "hello\n" {
            bail!("podman run: {o:?}");
        }
        Ok(o.took.as_secs_f64() * 1e3)
    };
    podman_once()?;
    let (mut pre, mut boot, mut run, mut down, mut total, mut pod) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let p = bulkhead_once(&e, &image)?;
        pre.push(p.pre_vmm);
        boot.push(p.boot);
        run.push(p.run);
        down.push(p.teardown);
        total.push(p.total);
        pod.push(podman_once()?);
    }
    let backend = {
        let o = e.bh(&["check", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&o.stdout)?;
        let b = v["backend"].as_str().unwrap_or("?").to_string();
        let accel = v["backends"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == b.as_str()))
            .and_then(|x| x["accel"].as_str())
            .unwrap_or("?")
            .to_string();
        format!("{b} ({accel})")
    };
    let (mt, mp) = (median(&mut total), median(&mut pod));
    println!("bulkhead run --rm vs podman run --runtime runc, busybox echo, {runs} runs each, interleaved, medians");
    println!("bulkhead backend: {backend}");
    println!("{:<44} {:>10}", "phase", "median ms");
    println!(
        "{:<44} {:>10.1}",
        "bulkhead: CLI + bus + manager, before VMM exec",
        median(&mut pre)
    );
    println!(
        "{:<44} {:>10.1}",
        "bulkhead: VMM exec to agent ready",
        median(&mut boot)
    );
    println!(
        "{:<44} {:>10.1}",
        "bulkhead: agent ready to container exit",
        median(&mut run)
    );
    println!(
        "{:<44} {:>10.1}",
        "bulkhead: teardown (rm of the sandbox)",
        median(&mut down)
    );
    println!("{:<44} {:>10.1}", "bulkhead run --rm, whole", mt);
    println!(
        "{:<44} {:>10.1}",
        "podman run --rm --runtime runc, whole", mp
    );
    println!("ratio bulkhead / podman+runc: {:.2}x", mt / mp);

    // bulkheadd's footprint.
    let pid = e.bulkheadd_pid().context("no bulkheadd")?;
    let idle = proc_field(pid, "VmRSS:");
    let cpu0 = cpu_ms(pid);
    let n = 10;
    let r = e.rootfs.display().to_string();
    let t = Instant::now();
    for i in 0..n {
        e.bh(&[
            "run",
            "-d",
            "--name",
            &format!("fp{i}"),
            "--memory",
            "128",
            "--rootfs",
            &r,
            "sleep",
            "600",
        ])?
        .ok()?;
    }
    let created = t.elapsed();
    let loaded = proc_field(pid, "VmRSS:");
    let per = (cpu_ms(pid) - cpu0) / n as f64;
    for i in 0..n {
        e.bh(&["rm", "-f", &format!("fp{i}")])?.ok()?;
    }
    println!();
    println!(
        "bulkheadd RSS idle: {:.1} MiB; with {n} sandboxes: {:.1} MiB",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0
    );
    println!(
        "bulkheadd CPU per sandbox created: {per:.1} ms ({n} created in {:.1} s, sequentially)",
        created.as_secs_f64()
    );
    e.stop_daemons();
    Ok(())
}
