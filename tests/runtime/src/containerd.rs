//! containerd 1.6 with private roots and our shim on its PATH, driven by `ctr`: the
//! runtime `io.containerd.bulkhead.v2` as containerd's users reach it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::cases::{component_pid, find, leftovers, ls_json, run_dir, wait_for};
use crate::Case;
use bulkhead_runtime_tests::ctrd::{start, Containerd, IMAGE, RUNTIME};
use bulkhead_runtime_tests::env::{every_thread_filtered, procs, run_cmd, Env, Out};

pub fn list() -> Vec<Case> {
    vec![
        (
            "containerd: ctr run exit code, stdout, stdin, a tty",
            ctr_run,
        ),
        (
            "containerd: detached task: exec, ps, pause/resume, metrics, update, OOM event, kill, delete",
            ctr_task,
        ),
        (
            "containerd: two containers in one pod VM (CRI annotations)",
            ctr_pod,
        ),
        (
            "containerd: kill -9 the VMM, the shim, bulkheadd",
            ctr_faults,
        ),
        ("containerd: bad input gets a clear error", ctr_bad_input),
        (
            "CRI: a pod through containerd's CRI plugin, CNI address, exec, stats, logs",
            crate::cri::cri,
        ),
    ]
}

/// Run a case against a fresh containerd; on failure, print what containerd logged.
fn with(e: &mut Env, f: impl FnOnce(&Env, &Containerd) -> Result<()>) -> Result<()> {
    let c = start(e)?;
    let r = f(e, &c);
    if r.is_err() {
        println!("--- containerd errors (last lines)\n{}", c.log_tail());
    }
    r
}

fn guest_kernel(e: &Env) -> Result<String> {
    Ok(std::fs::read_to_string(e.guest.join("kernel-release"))?
        .trim()
        .to_string())
}

fn ctr_run(e: &mut Env) -> Result<()> {
    with(e, |e, c| {
        let o = c.run_rm(
            "r1",
            &[],
            &["sh", "-c", "uname -r; echo to-err >&2; exit 7"],
            None,
        )?;
        ensure!(o.code == 7, "exit code {} (want 7): {o:?}", o.code);
        ensure!(
            o.stdout.trim() == guest_kernel(e)?,
            "the guest's kernel: {o:?}"
        );
        ensure!(o.stderr.contains("to-err"), "stderr apart: {o:?}");
        let o = c.run_rm(
            "r2",
            &[],
            &["sh", "-c", "cat; echo done"],
            Some(b"through the shim\n"),
        )?;
        ensure!(
            o.code == 0 && o.stdout == "through the shim\ndone\n",
            "ctr run with stdin: {o:?}"
        );
        // A terminal: ctr needs one of its own, so `script` gives it a pty.
        let cmd = format!(
            "ctr --address {} run --rm -t --runtime {RUNTIME} {IMAGE} r3 sh -c 'tty; [ -t 0 ] && echo is-a-tty; exit 3'",
            c.socket().display()
        );
        let mut s = Command::new("script");
        s.args(["-qec", &cmd, "/dev/null"]);
        let o = run_cmd(&mut s, None, Duration::from_secs(180))?;
        ensure!(
            o.code == 3 && o.stdout.contains("/dev/pts/") && o.stdout.contains("is-a-tty"),
            "ctr run -t: {o:?}"
        );
        ensure!(ls_json(e)?.is_empty(), "sandboxes left after --rm");
        Ok(())
    })
}

fn exec(c: &Containerd, id: &str, exec_id: &str, cmd: &[&str]) -> Result<Out> {
    let mut a = vec!["task", "exec", "--exec-id", exec_id, id];
    a.extend(cmd);
    c.run(&a, None)
}

fn ctr_task(e: &mut Env) -> Result<()> {
    with(e, |e, c| {
        c.run_d("t1", &["--memory-limit", "268435456"], &["sleep", "600"])?;
        let (st, pid) = c.task("t1")?.context("t1 not listed")?;
        ensure!(st == "RUNNING" && pid > 0, "task ls: {st} {pid}");
        // Sized from the spec's memory limit, plus the guest's own share.
        let sb = find(&ls_json(e)?, "t1").cloned().context("no sandbox t1")?;
        ensure!(sb["memory_mib"] == 256 + 64, "VM memory: {sb}");

        // The shim serves under its own seccomp allow list, on every thread.
        let shim = pid_of("containerd-shim-bulkhead-v2 -namespace default -id t1")
            .context("no shim for t1")?;
        every_thread_filtered(shim, "shim")?;

        snapshot_owners(e, c)?;

        let o = exec(c, "t1", "e1", &["sh", "-c", "echo $((6*7)); exit 5"])?;
        ensure!(o.code == 5 && o.stdout == "42\n", "exec: {o:?}");
        // The same exec id again: the first was collected, so it may be reused.
        let o = exec(c, "t1", "e1", &["true"])?;
        ensure!(o.code == 0, "exec id reused: {o:?}");

        let o = c.run(&["task", "ps", "t1"], None)?;
        o.ok()?;
        ensure!(
            o.stdout
                .lines()
                .skip(1)
                .any(|l| l.split_whitespace().next() == Some(&pid.to_string())),
            "task ps lists the init pid {pid}: {o:?}"
        );

        c.run(&["task", "pause", "t1"], None)?.ok()?;
        ensure!(
            c.task("t1")?.map(|t| t.0) == Some("PAUSED".into()),
            "not paused"
        );
        c.run(&["task", "resume", "t1"], None)?.ok()?;
        ensure!(
            c.task("t1")?.map(|t| t.0) == Some("RUNNING".into()),
            "not resumed"
        );

        let o = c.run(&["task", "metrics", "--format", "json", "t1"], None)?;
        o.ok()?;
        let m: Value = serde_json::from_str(&o.stdout).context("metrics JSON")?;
        let usage = m["memory"]["usage"]["usage"].as_u64().unwrap_or(0);
        let limit = m["memory"]["usage"]["limit"].as_u64().unwrap_or(0);
        let pids = m["pids"]["current"].as_u64().unwrap_or(0);
        ensure!(usage > 0 && limit == 268435456 && pids >= 1, "metrics: {m}");

        // ctr 1.6 has no `task update`: the call containerd makes (CRI's
        // UpdateContainerResources) goes straight to the shim over its ttrpc socket.
        c.update("t1", r#"{"memory": {"limit": 134217728}}"#)?;
        // The guest cgroup took the new limit: metrics read it back from there.
        let o = c.run(&["task", "metrics", "--format", "json", "t1"], None)?;
        let m: Value = serde_json::from_str(&o.stdout).context("metrics JSON")?;
        ensure!(
            m["memory"]["usage"]["limit"] == 134217728,
            "update did not reach the guest cgroup: {m}"
        );

        // An OOM kill in the container's guest cgroup reaches containerd as /tasks/oom.
        let events_log = e.dir.join("ctr-events.log");
        let mut events = c
            .ctr(&["events"])
            .stdout(std::fs::File::create(&events_log)?)
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        // Three kills milliseconds apart (three processes filling a small limit at once):
        // one event each, none merged.
        c.update("t1", r#"{"memory": {"limit": 16777216}}"#)?;
        let o = exec(
            c,
            "t1",
            "oom",
            &[
                "sh",
                "-c",
                "tail /dev/zero & tail /dev/zero & tail /dev/zero & wait",
            ],
        )?;
        let got = wait_for(
            "three /tasks/oom events for t1",
            Duration::from_secs(15),
            || {
                let text = std::fs::read_to_string(&events_log).unwrap_or_default();
                let n = text
                    .lines()
                    .filter(|l| l.contains("/tasks/oom") && l.contains("\"t1\""))
                    .count();
                Ok(n >= 3)
            },
        );
        let _ = events.kill();
        let _ = events.wait();
        got.with_context(|| {
            format!(
                "exec of three OOM kills: {o:?}; events: {}",
                std::fs::read_to_string(&events_log).unwrap_or_default()
            )
        })?;
        ensure!(
            o.code == 0 || o.code == 137,
            "the exec that was OOM-killed three times: {o:?}"
        );

        let run = run_dir(e, "t1")?;
        c.kill_and_remove("t1")?;
        no_leftovers(e, "t1", &run)
    })
}

/// containerd's overlay reaches the guest layer by layer: where the host can idmap,
/// virtiofsd serves it as the sandbox's ids, never root's, and what a container's user
/// writes keeps that user's owner in containerd's own snapshot, ready to commit.
fn snapshot_owners(e: &Env, c: &Containerd) -> Result<()> {
    let mkdir = "mkdir -p /home/u && chown 1000:1000 /home/u";
    let o = exec(c, "t1", "own", &["sh", "-c", mkdir])?;
    ensure!(o.code == 0, "mkdir and chown as root: {o:?}");
    let a = [
        "task",
        "exec",
        "--exec-id",
        "own",
        "--user",
        "1000:1000",
        "t1",
    ];
    let mut a = a.to_vec();
    a.extend(["sh", "-c", "echo x > /home/u/owned && ls -ln /bin/busybox"]);
    let o = c.run(&a, None)?;
    ensure!(o.code == 0, "exec as 1000: {o:?}");
    ensure!(
        o.stdout.split_whitespace().nth(2) == Some("0"),
        "the image's root-owned file as the guest sees it: {o:?}"
    );
    let o = c.run(&["snapshots", "mounts", "/unused", "t1"], None)?;
    o.ok()?;
    let upper = o
        .stdout
        .split([',', ' ', '\n'])
        .find_map(|w| w.strip_prefix("upperdir="))
        .with_context(|| format!("no upperdir in {o:?}"))?;
    let made = std::fs::metadata(std::path::Path::new(upper).join("home/u/owned"))?;
    use std::os::unix::fs::MetadataExt;
    ensure!(
        (made.uid(), made.gid()) == (1000, 1000),
        "the container's file is {}:{} in the snapshot",
        made.uid(),
        made.gid()
    );
    let scratch = e.state().join("probe");
    std::fs::create_dir_all(&scratch)?;
    let host_can = bulkhead_jail::idmap::probe(&scratch, 1_999_200_000);
    let _ = std::fs::remove_dir_all(&scratch);
    let pid = component_pid(e, "t1", "virtiofsd")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .context("no Uid line")?;
    match host_can {
        Ok(()) => ensure!(
            uid != "0",
            "virtiofsd runs as root for containerd's overlay"
        ),
        Err(why) => println!("note: virtiofsd runs as root here ({why})"),
    }
    Ok(())
}

fn no_leftovers(e: &Env, id: &str, run: &std::path::Path) -> Result<()> {
    let mut left = vec![];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        left = leftovers(e, id, run);
        if left.is_empty() && find(&ls_json(e)?, id).is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("left behind by {id}: {left:#?}")
}

fn ctr_pod(e: &mut Env) -> Result<()> {
    with(e, |e, c| {
        let ann = |kind: &str| {
            let mut a = vec![
                format!("--annotation=io.kubernetes.cri.container-type={kind}"),
                "--annotation=io.kubernetes.cri.sandbox-id=pod1".to_string(),
            ];
            if kind == "sandbox" {
                // What CRI puts on the pause container: the sum of the pod's containers'
                // memory limits (600 MiB), which the pause container itself does not have.
                a.push("--annotation=io.kubernetes.cri.sandbox-memory=629145600".into());
            }
            a
        };
        let run_d = |id: &str, kind: &str, cmd: &[&str]| -> Result<Out> {
            let mut a: Vec<String> = vec![
                "run".into(),
                "-d".into(),
                "--runtime".into(),
                RUNTIME.into(),
            ];
            a.extend(ann(kind));
            a.extend([IMAGE.to_string(), id.to_string()]);
            a.extend(cmd.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            c.run(&refs, None)
        };
        run_d("pod1", "sandbox", &["sleep", "600"])?.ok()?;
        run_d(
            "app1",
            "container",
            &[
                "sh",
                "-c",
                "echo shared > /dev/shm/x 2>/dev/null; sleep 600",
            ],
        )?
        .ok()?;
        // One VM: the pod's sandbox holds both containers, and no sandbox app1 exists.
        let all = ls_json(e)?;
        ensure!(find(&all, "app1").is_none(), "app1 got a VM of its own");
        let pod = find(&all, "pod1").context("no sandbox pod1")?;
        let names: Vec<&str> = pod["containers"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["id"].as_str()).collect())
            .unwrap_or_default();
        ensure!(
            names.contains(&"pod1") && names.contains(&"app1"),
            "containers: {pod}"
        );
        // Sized for the whole pod, plus the guest's own share.
        ensure!(pod["memory_mib"] == 600 + 64, "pod VM memory: {pod}");
        // Both see the same kernel instance: the boot id is the VM's.
        let a = exec(c, "pod1", "b1", &["cat", "/proc/sys/kernel/random/boot_id"])?;
        let b = exec(c, "app1", "b2", &["cat", "/proc/sys/kernel/random/boot_id"])?;
        ensure!(a.code == 0 && a.stdout == b.stdout, "boot ids {a:?} {b:?}");
        // A second container with the same id in the pod is refused.
        let o = run_d("app1", "container", &["true"])?;
        ensure!(o.code != 0, "duplicate container accepted: {o:?}");
        for id in ["app1", "pod1"] {
            c.kill_and_remove(id)?;
        }
        ensure!(find(&ls_json(e)?, "pod1").is_none(), "pod VM left");
        Ok(())
    })
}

fn pid_of(pattern: &str) -> Option<u32> {
    procs()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(pattern))
        .map(|(p, _)| p)
}

fn ctr_faults(e: &mut Env) -> Result<()> {
    with(e, |e, c| {
        // kill -9 the VMM: containerd sees the task exit, and nothing is left.
        c.run_d("f1", &[], &["sleep", "600"])?;
        let run = run_dir(e, "f1")?;
        let vmm = component_pid(e, "f1", "vmm")?;
        let t = Instant::now();
        // SAFETY: kill(2) on the sandbox's VMM.
        unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
        wait_for("containerd to see f1 exit", Duration::from_secs(10), || {
            Ok(c.task("f1")?.map(|t| t.0) == Some("STOPPED".into()))
        })?;
        let took = t.elapsed();
        ensure!(
            took < Duration::from_secs(1),
            "containerd saw the exit after {took:?}"
        );
        c.run(&["task", "delete", "f1"], None)?.ok()?;
        c.run(&["container", "rm", "f1"], None)?.ok()?;
        no_leftovers(e, "f1", &run)?;
        println!(
            "       (containerd saw the exit {:.0} ms after kill -9 of the VMM)",
            took.as_secs_f64() * 1e3
        );

        // kill -9 the shim: containerd cleans up through `shim delete`, which takes
        // the sandbox down; never half alive.
        c.run_d("f2", &[], &["sleep", "600"])?;
        let run = run_dir(e, "f2")?;
        let shim = pid_of("containerd-shim-bulkhead-v2 -namespace default -id f2")
            .context("no shim for f2")?;
        // SAFETY: kill(2) on the shim.
        unsafe { libc::kill(shim as i32, libc::SIGKILL) };
        wait_for(
            "f2 to be reported stopped or gone",
            Duration::from_secs(30),
            || Ok(c.task("f2")?.is_none_or(|t| t.0 == "STOPPED")),
        )?;
        let _ = c.run(&["task", "delete", "f2"], None)?;
        c.run(&["container", "rm", "f2"], None)?.ok()?;
        no_leftovers(e, "f2", &run)?;

        // kill -9 bulkheadd during `ctr run`: the task carries on, its real status comes.
        let child = c
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "f3",
                "sh",
                "-c",
                "sleep 4; echo after; exit 5",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        wait_for("f3 to run", Duration::from_secs(120), || {
            Ok(c.task("f3")?.map(|t| t.0) == Some("RUNNING".into()))
        })?;
        let d = e.bulkheadd_pid().context("no bulkheadd")?;
        // SAFETY: kill(2) on this environment's bulkheadd.
        unsafe { libc::kill(d as i32, libc::SIGKILL) };
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.code() == Some(5) && stdout == "after\n",
            "ctr run across a manager restart: {:?} {stdout:?} {:?}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(find(&ls_json(e)?, "f3").is_none(), "f3's VM left");
        Ok(())
    })
}

fn ctr_bad_input(e: &mut Env) -> Result<()> {
    with(e, |e, c| {
        // A spec with no process: refused by the shim with a clear reason.
        let bad = e.dir.join("ctr-bad-spec.json");
        std::fs::write(
            &bad,
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#,
        )?;
        let o = c.run(
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--config",
                &bad.display().to_string(),
                "b1",
            ],
            None,
        )?;
        ensure!(
            o.code != 0 && o.stderr.contains("no process"),
            "a spec without a process: {o:?}"
        );
        let _ = c.run(&["container", "rm", "b1"], None);
        ensure!(find(&ls_json(e)?, "b1").is_none(), "b1 left a VM");

        c.run_d("b2", &[], &["sh", "-c", "exit 0"])?;
        wait_for("b2 to stop", Duration::from_secs(30), || {
            Ok(c.task("b2")?.map(|t| t.0) == Some("STOPPED".into()))
        })?;
        let o = exec(c, "b2", "x1", &["true"])?;
        ensure!(
            o.code != 0 && o.stderr.contains("not running"),
            "exec into a stopped task: {o:?}"
        );
        let o = c.run(&["task", "kill", "--exec-id", "nope", "b2"], None)?;
        ensure!(
            o.code != 0 && o.stderr.contains("does not exist"),
            "unknown exec id: {o:?}"
        );
        let o = c.run(&["task", "pause", "b2"], None)?;
        ensure!(
            o.code != 0 && o.stderr.contains("not running"),
            "pause a stopped task: {o:?}"
        );
        c.run(&["task", "delete", "b2"], None)?.ok()?;
        c.run(&["container", "rm", "b2"], None)?.ok()?;
        ensure!(find(&ls_json(e)?, "b2").is_none(), "b2 left a VM");

        // An option bulkhead does not have: refused, and the task runs on.
        c.run_d("b3", &[], &["sleep", "600"])?;
        let o = c.run(&["task", "checkpoint", "b3"], None)?;
        ensure!(
            o.code != 0 && o.stderr.contains("not supported"),
            "checkpoint: {o:?}"
        );
        c.kill_and_remove("b3")?;
        ensure!(ls_json(e)?.is_empty(), "VMs left: {:?}", ls_json(e)?);
        Ok(())
    })
}
