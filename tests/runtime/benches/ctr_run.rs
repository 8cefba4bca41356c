//! `ctr run --rm` of a busybox `echo` through our shim beside containerd's runc shim,
//! interleaved, medians; bulkhead's time split into phases from the shim's `timings`
//! log lines: before the VMM is exec'd (ctr, containerd, shim start, bus, manager),
//! VMM exec to agent ready, agent ready to the container's exit, teardown.
//!
//! Then the host-side footprint of a running busybox pod: PSS summed over every host
//! process the pod owns (its shim, VMM, virtiofsd, vhost-device-vsock) plus its share of
//! bulkheadd, averaged over 10 pods running at once.
//!
//!   cargo bench -p bulkhead-runtime-tests --bench ctr_run -- [--runs N] [--guest DIR]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bulkhead_runtime_tests::bench::{field, median, setup};
use bulkhead_runtime_tests::ctrd::{start, Containerd, IMAGE, RUNTIME};
use bulkhead_runtime_tests::env::{procs, run_cmd, Env};

fn unix_us() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as f64)
        .unwrap_or(0.0)
}

/// One `ctr run --rm`; (start, end) in µs since the epoch.
fn once(c: &Containerd, runtime: &str, id: &str) -> Result<(f64, f64)> {
    let t0 = unix_us();
    let o = run_cmd(
        &mut c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            runtime,
            IMAGE,
            id,
            "echo",
            "hello",
        ]),
        None,
        Duration::from_secs(180),
    )?;
    let t1 = unix_us();
    if o.code != 0 || o.stdout != "hello\n" {
        bail!("ctr run --runtime {runtime}: {o:?}");
    }
    Ok((t0, t1))
}

struct Phases {
    to_shim: f64,
    pre_vmm: f64,
    boot: f64,
    run: f64,
    teardown: f64,
    total: f64,
}

/// bulkhead's phases for run `id`, from the shim's timings lines in containerd's log.
fn phases(log: &str, id: &str, t0: f64, t1: f64) -> Result<Phases> {
    let sb = log
        .lines()
        .find(|l| l.contains(&format!("timings sandbox={id} ")))
        .context("no sandbox timings line from the shim")?;
    let ex = log
        .lines()
        .find(|l| l.contains(&format!("timings exited id={id} ")))
        .context("no exit timings line from the shim")?;
    let received = field(sb, "create_received_unix_us=").context("create_received_unix_us")?;
    let called = field(sb, "create_sandbox_unix_us=").context("create_sandbox_unix_us")?;
    let vmm = called + field(sb, "vmm_exec_us=").context("vmm_exec_us")?;
    let ready = called + field(sb, "agent_ready_us=").context("agent_ready_us")?;
    let exited = field(ex, "unix_us=").context("unix_us")?;
    let ms = |a: f64, b: f64| (b - a) / 1e3;
    Ok(Phases {
        to_shim: ms(t0, received),
        pre_vmm: ms(t0, vmm),
        boot: ms(vmm, ready),
        run: ms(ready, exited),
        teardown: ms(exited, t1),
        total: ms(t0, t1),
    })
}

/// Proportional set size of a process, in KiB (0 if it is gone).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// PSS (KiB) of the mappings of a process that are exactly `size_kib` big: the guest's
/// RAM in a VMM.
fn pss_of_size_kib(pid: u32, size_kib: u64) -> u64 {
    let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let (mut in_ram, mut sum) = (false, 0);
    for l in t.lines() {
        let mut f = l.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => in_ram = v.parse::<u64>().ok() == Some(size_kib),
            (Some("Pss:"), Some(v)) if in_ram => sum += v.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    sum
}

/// Average per-pod PSS (MiB) by process kind, over `pods` pods running at once.
fn footprint(e: &Env, c: &Containerd, pods: usize) -> Result<Vec<(String, f64)>> {
    let ids: Vec<String> = (0..pods).map(|i| format!("fp{i}")).collect();
    for id in &ids {
        c.run_d(id, &[], &["sleep", "600"])?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let ls: serde_json::Value = serde_json::from_str(&e.bh(&["ls", "--json"])?.stdout)?;
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    for id in &ids {
        let sb = ls
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == id.as_str()))
            .with_context(|| format!("pod {id} not listed"))?;
        for comp in sb["components"].as_array().into_iter().flatten() {
            let (Some(name), Some(pid)) = (comp["name"].as_str(), comp["pid"].as_u64()) else {
                continue;
            };
            let pss = pss_kib(pid as u32);
            if name == "vmm" {
                let ram_kib = sb["memory_mib"].as_u64().unwrap_or(0) * 1024;
                let ram = pss_of_size_kib(pid as u32, ram_kib);
                *sums
                    .entry("vmm: guest RAM the guest touched".into())
                    .or_default() += ram;
                *sums.entry("vmm: outside guest RAM".into()).or_default() += pss - ram.min(pss);
            } else {
                *sums.entry(name.to_string()).or_default() += pss;
            }
        }
        let shim = procs()
            .into_iter()
            .find(|(_, cmd)| {
                cmd.contains(&format!(
                    "containerd-shim-bulkhead-v2 -namespace default -id {id} "
                ))
            })
            .map(|(p, _)| p)
            .context("no shim")?;
        *sums.entry("shim".into()).or_default() += pss_kib(shim);
    }
    let daemon = e.bulkheadd_pid().context("no bulkheadd")?;
    *sums.entry("bulkheadd (share)".into()).or_default() += pss_kib(daemon);
    for id in &ids {
        c.kill_and_remove(id)?;
    }
    Ok(sums
        .into_iter()
        .map(|(k, v)| (k, v as f64 / 1024.0 / pods as f64))
        .collect())
}

fn main() -> Result<()> {
    let (runs, e) = setup(10)?;
    let c = start(&e)?;
    // Warm both paths once (image unpacked, binaries in the page cache).
    once(&c, RUNTIME, "warm-b")?;
    once(&c, "io.containerd.runc.v2", "warm-r")?;
    let (mut to_shim, mut pre, mut boot, mut run, mut down, mut total, mut runc) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let id = format!("b{i}");
        let (t0, t1) = once(&c, RUNTIME, &id)?;
        let p = phases(&c.log(), &id, t0, t1)?;
        to_shim.push(p.to_shim);
        pre.push(p.pre_vmm);
        boot.push(p.boot);
        run.push(p.run);
        down.push(p.teardown);
        total.push(p.total);
        let (r0, r1) = once(&c, "io.containerd.runc.v2", &format!("r{i}"))?;
        runc.push((r1 - r0) / 1e3);
    }
    let (mt, mr) = (median(&mut total), median(&mut runc));
    println!(
        "ctr run --rm busybox echo: {RUNTIME} vs io.containerd.runc.v2, {runs} runs each, interleaved, medians"
    );
    println!("{:<64} {:>10}", "phase (bulkhead)", "median ms");
    for (name, v) in [
        (
            "before the VMM is exec'd (ctr, containerd, shim, bus, manager)",
            &mut pre,
        ),
        (
            "  of which ctr + containerd + shim start, to the shim's Create",
            &mut to_shim,
        ),
        ("VMM exec -> agent ready", &mut boot),
        ("agent ready -> container exit", &mut run),
        ("teardown (exit -> ctr returns)", &mut down),
    ] {
        println!("{name:<64} {:>10.1}", median(v));
    }
    println!("{:<64} {:>10.1}", "whole ctr run --rm, bulkhead", mt);
    println!("{:<64} {:>10.1}", "whole ctr run --rm, runc", mr);
    println!("ratio bulkhead / runc: {:.1}x", mt / mr);

    let pods = 10;
    let rows = footprint(&e, &c, pods)?;
    println!();
    println!("host-side PSS of one running busybox pod, average of {pods} pods at once");
    let (mut total, mut host) = (0.0, 0.0);
    for (name, mib) in &rows {
        println!("{name:<64} {mib:>8.1} MiB");
        total += mib;
        if !name.contains("guest RAM the guest touched") {
            host += mib;
        }
    }
    println!("{:<64} {total:>8.1} MiB", "total per pod");
    println!("{:<64} {host:>8.1} MiB", "total per pod outside guest RAM");
    Ok(())
}
