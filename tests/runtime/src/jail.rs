//! The jail, seen on the live processes of a running pod (QEMU backend, with a pod
//! network so every kind of component is there): `bulkhead inspect` against what the
//! test reads from `/proc` itself.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::cases::{component_pid, supervisor_pid, wait_for};
use crate::net::{exec, pod, server_and_pod};
use crate::Case;
use bulkhead_runtime_tests::env::{every_thread_filtered, Env};

pub fn list() -> Vec<Case> {
    vec![
        (
            "jail: every host process of a pod runs jailed (bulkhead inspect and /proc agree)",
            every_component_jailed,
        ),
        (
            "jail: a component that dies of SIGSYS is reported as a security event",
            sigsys_is_a_security_event,
        ),
    ]
}

/// What virtiofsd may hold (docs/security.md): root's file powers, and for building its
/// own namespace sandbox SYS_ADMIN and SETPCAP, which its worker drops.
const VIRTIOFSD_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_MKNOD",
    "CAP_SETFCAP",
    "CAP_SYS_ADMIN",
    "CAP_SETPCAP",
];

fn inspect(e: &Env, id: &str) -> Result<Vec<Value>> {
    let o = e.bh(&["inspect", id, "--json"])?;
    o.ok()?;
    let v: Value = serde_json::from_str(&o.stdout).context("inspect --json")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn status_field(pid: u64, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn caps(mask: &str) -> u64 {
    u64::from_str_radix(mask, 16).unwrap_or(u64::MAX)
}

fn cap_bit(name: &str) -> u64 {
    let n = match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_FOWNER" => 3,
        "CAP_FSETID" => 4,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_SETPCAP" => 8,
        "CAP_SYS_ADMIN" => 21,
        "CAP_MKNOD" => 27,
        "CAP_SETFCAP" => 31,
        _ => 63,
    };
    1 << n
}

/// virtiofsd acts for every owner in the guest. Where the host can idmap (as bulkheadd
/// found at its start, which this checks by the same probe), it is root only of a user
/// namespace mapping 0..65535 to its sandbox's ids, and its uid is the sandbox's; else
/// it is the host's root with a stated list of capabilities.
fn virtiofsd_ids(e: &Env, pid: u64, uid: &str, report: &Value) -> Result<()> {
    let scratch = e.state().join("probe");
    std::fs::create_dir_all(&scratch)?;
    let host_can = bulkhead_jail::idmap::probe(&scratch, 1_999_200_000);
    let _ = std::fs::remove_dir_all(&scratch);
    let ids: Vec<&str> = uid.split_whitespace().collect();
    match (&host_can, report["userns"].as_str()) {
        (Ok(()), Some(ns)) => {
            let u: u64 = ids.first().context("no uid")?.parse()?;
            ensure!(
                u != 0 && ids.iter().all(|i| *i == ids[0]),
                "virtiofsd uid {uid}"
            );
            ensure!(report["uid"].as_u64() == Some(u), "virtiofsd: {report}");
            ensure!(ns == format!("0:{u}:65536 uids, 0:{u}:65536 gids"), "{ns}");
            let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map"))?;
            let map: Vec<&str> = map.split_whitespace().collect();
            ensure!(
                map == ["0", &u.to_string(), "65536"],
                "virtiofsd's uid_map {map:?}"
            );
            ensure!(
                std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()
                    != std::fs::read_link("/proc/self/ns/user").ok(),
                "virtiofsd is in the host's user namespace"
            );
        }
        (Err(why), None) => {
            println!("note: virtiofsd runs as root here ({why})");
            ensure!(ids.iter().all(|u| *u == "0"), "virtiofsd uid {uid}");
        }
        (can, ns) => {
            anyhow::bail!("the host can idmap: {can:?}, but virtiofsd's user namespace is {ns:?}")
        }
    }
    Ok(())
}

fn every_component_jailed(e: &mut Env) -> Result<()> {
    let (_srv, podns) = server_and_pod("j", 203)?;
    pod(e, "jl", &podns, &["sleep", "600"])?;
    let r = (|| -> Result<()> {
        let comps = inspect(e, "jl")?;
        let names: BTreeSet<&str> = comps.iter().filter_map(|c| c["name"].as_str()).collect();
        ensure!(
            names == BTreeSet::from(["net0", "vhost-device-vsock", "virtiofsd", "vmm"]),
            "components: {names:?}"
        );
        let allowed_caps: u64 = VIRTIOFSD_CAPS.iter().map(|c| cap_bit(c)).sum();
        let mut jail_uid = None;
        for c in &comps {
            let name = c["name"].as_str().unwrap_or("");
            ensure!(c["jailed"] == true, "{name} is not jailed: {c}");
            // `ls --json` gives the component's own process and, apart, the jailer that
            // supervises it (its parent); Security() says the same.
            let pid = component_pid(e, "jl", name)?;
            let jailer = supervisor_pid(e, "jl", name)?;
            ensure!(c["jailer_pid"].as_u64() == Some(jailer), "{name}: {c}");
            ensure!(c["pid"].as_u64() == Some(pid), "{name}: ls says {pid}: {c}");
            let kids = std::fs::read_to_string(format!("/proc/{jailer}/task/{jailer}/children"))?;
            ensure!(
                kids.split_whitespace().any(|k| k == pid.to_string()),
                "{name}: {pid} is not the jailer's child ({kids})"
            );
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            ensure!(
                !exe.ends_with("bulkhead-jailer"),
                "{name}: ls --json gives the jailer ({}) as the component",
                exe.display()
            );
            // Read /proc here, not only what bulkheadd says.
            let uid = status_field(pid, "Uid");
            let nnp = status_field(pid, "NoNewPrivs");
            ensure!(nnp == "1", "{name}: NoNewPrivs {nnp}");
            let own_ns = |ns: &str| {
                std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok()
                    != std::fs::read_link(format!("/proc/self/ns/{ns}")).ok()
            };
            for ns in ["mnt", "pid", "net", "ipc", "uts"] {
                ensure!(own_ns(ns), "{name} shares the host's {ns} namespace");
            }
            // Born in the sandbox's cgroup (v2 through clone3, each v1 hierarchy joined),
            // wherever the host could place it.
            let placed = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
            let refused = c["report"]["cgroups"].to_string().contains("not joined");
            for line in placed.lines() {
                ensure!(
                    line.ends_with("/bulkhead/jl") || (refused && !line.starts_with("0::")),
                    "{name} is not in the sandbox's cgroup: {line:?} ({placed:?})"
                );
            }
            let root: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root"))?
                .flatten()
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .collect();
            for host_only in ["home", "root", "var", "sys", "boot", "srv", "mnt", "sbin"] {
                ensure!(
                    !root.contains(host_only),
                    "{name} sees /{host_only}: {root:?}"
                );
            }
            // virtiofsd's own sandbox has pivoted it into the shared directory.
            ensure!(
                name == "virtiofsd" || (root.contains("dev") && root.contains("proc")),
                "{name}: {root:?}"
            );
            if let Ok(etc) = std::fs::read_dir(format!("/proc/{pid}/root/etc")) {
                let etc: Vec<String> = etc
                    .flatten()
                    .map(|d| d.file_name().to_string_lossy().into_owned())
                    .collect();
                ensure!(
                    etc.iter().all(|f| f == "ld.so.cache"),
                    "{name}'s /etc: {etc:?}"
                );
            }
            let report = &c["report"];
            if report["landlock"]["kernel_abi"].as_i64() >= Some(1) && name != "virtiofsd" {
                ensure!(
                    report["landlock"]["status"] != "not enforced",
                    "{name}: landlock {report}"
                );
            }
            let threads: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/task"))?
                .flatten()
                .filter_map(|t| t.file_name().to_string_lossy().parse().ok())
                .collect();
            ensure!(!threads.is_empty());
            if name == "virtiofsd" {
                virtiofsd_ids(e, pid, &uid, report)?;
                let prm = caps(&status_field(pid, "CapPrm")) | caps(&status_field(pid, "CapBnd"));
                ensure!(
                    prm & !allowed_caps == 0,
                    "virtiofsd holds capabilities beyond its list: {prm:x}"
                );
                // Its worker (pivoted into the shared directory) serves under its own
                // seccomp filter, with only the file capabilities.
                let worker = c["children"]
                    .as_array()
                    .and_then(|k| k.first())
                    .and_then(|k| k["pid"].as_u64())
                    .context("virtiofsd has no worker")?;
                let wcaps = caps(&status_field(worker, "CapEff"));
                ensure!(
                    wcaps & (cap_bit("CAP_SYS_ADMIN") | cap_bit("CAP_SETPCAP")) == 0,
                    "virtiofsd's worker kept SYS_ADMIN or SETPCAP: {wcaps:x}"
                );
                ensure!(
                    status_field(worker, "Seccomp") == "2",
                    "virtiofsd's worker has no seccomp filter"
                );
                continue;
            }
            let ids: Vec<&str> = uid.split_whitespace().collect();
            ensure!(
                ids.len() == 4 && ids.iter().all(|u| *u == ids[0]),
                "{name}: Uid {uid}"
            );
            let u: u32 = ids[0].parse()?;
            ensure!(u != 0, "{name} runs as root");
            ensure!(report["uid"].as_u64() == Some(u as u64), "{name}: {report}");
            if name == "vhost-device-vsock" {
                ensure!(
                    report["seccomp"]
                        .as_str()
                        .is_some_and(|s| s.contains("allow list vhost-device-vsock")),
                    "vhost-device-vsock has no allow list: {report}"
                );
            }
            match jail_uid {
                None => jail_uid = Some(u),
                Some(j) => ensure!(j == u, "{name} has uid {u}, another component {j}"),
            }
            for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                let v = status_field(pid, set);
                ensure!(caps(&v) == 0, "{name}: {set} {v}");
            }
            // The jail's baseline on every thread; bulkhead-net's own allow list,
            // QEMU's -sandbox and the jailer's list for vhost-device-vsock on top of it.
            let want_filters = 2;
            for t in &threads {
                let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")) else {
                    continue; // the thread ended
                };
                ensure!(
                    st.lines().any(|l| l == "Seccomp:\t2"),
                    "{name} thread {t} has no seccomp filter"
                );
                let filters: u32 = st
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                ensure!(
                    filters >= want_filters,
                    "{name} thread {t}: {filters} seccomp filters, want {want_filters}"
                );
            }
        }
        // bulkheadd itself: its allow list on every thread. The components were started
        // by its spawner (the jailer's parent), which holds no filter, since every
        // component would inherit one.
        let bhd = e.bulkheadd_pid().context("no bulkheadd")?;
        every_thread_filtered(bhd, "bulkheadd")?;
        let spawner = e.spawner_pid().context("no spawner")?;
        ensure!(
            status_field(spawner.into(), "PPid") == bhd.to_string()
                && status_field(spawner.into(), "Seccomp") == "0",
            "spawner {spawner}: PPid {} Seccomp {}",
            status_field(spawner.into(), "PPid"),
            status_field(spawner.into(), "Seccomp")
        );
        let jailer = supervisor_pid(e, "jl", "vmm")?;
        ensure!(
            status_field(jailer, "PPid") == spawner.to_string(),
            "the VMM's jailer is not the spawner's child"
        );
        // virtiofsd's user namespace (or root) and the shared files: an image file
        // reads as root's, and what the guest's uid 1000 makes is 1000:1001 on the
        // host's disk.
        let probe = e.rootfs.join("jail-idmap-probe");
        let process = e.state().join("as-1000.json");
        std::fs::write(
            &process,
            serde_json::json!({
                "user": {"uid": 1000, "gid": 1001},
                "args": ["sh", "-c", "touch /jail-idmap-probe/f && stat -c %u:%g /jail-idmap-probe/f"],
                "cwd": "/",
                "env": ["PATH=/bin"],
            })
            .to_string(),
        )?;
        let made = exec(
            e,
            "jl",
            "stat -c %u:%g /bin/busybox; mkdir /jail-idmap-probe && chmod 777 /jail-idmap-probe",
        )
        .and_then(|root| {
            let user = e.bh(&["exec", "-p", &process.display().to_string(), "jl"])?;
            Ok((root, user))
        });
        let on_disk = std::fs::metadata(probe.join("f")).map(|m| (m.uid(), m.gid()));
        let _ = std::fs::remove_dir_all(&probe);
        let (root, user) = made?;
        ensure!(
            root.code == 0 && root.stdout == "0:0\n",
            "as root in the guest: {root:?}"
        );
        ensure!(
            user.code == 0 && user.stdout == "1000:1001\n",
            "as 1000: {user:?}"
        );
        let on_disk = on_disk?;
        ensure!(on_disk == (1000, 1001), "on the host: {on_disk:?}");
        // The pod still works with all of that in place.
        let o = exec(e, "jl", "echo jailed-ok")?;
        ensure!(o.stdout.trim() == "jailed-ok", "{o:?}");
        // And the human view says the same.
        let table = e.bh(&["inspect", "jl"])?;
        table.ok()?;
        ensure!(
            table.stdout.contains("vmm") && table.stdout.contains("none"),
            "{}",
            table.stdout
        );
        Ok(())
    })();
    let _ = e.bh(&["rm", "-f", "jl"]);
    r
}

fn sigsys_is_a_security_event(e: &mut Env) -> Result<()> {
    let rootfs = e.rootfs.display().to_string();
    e.bh(&[
        "run",
        "-d",
        "--name",
        "sx",
        "--backend",
        "qemu",
        "--rootfs",
        &rootfs,
        "sleep",
        "600",
    ])?
    .ok()?;
    // What the kernel does to a process whose seccomp filter kills it, here to the
    // component's supervisor (under its own filter since #38). The component itself is
    // its PID namespace's init, which ignores a SIGSYS sent from outside; a filter's
    // SIGSYS is forced, and the supervisor passes the status on.
    let pid = supervisor_pid(e, "sx", "vhost-device-vsock")?;
    // SAFETY: kill(2) on a component's supervisor.
    unsafe { libc::kill(pid as i32, libc::SIGSYS) };
    let log = e.state().join("bulkheadd.log");
    let mut text = String::new();
    wait_for("the security event", Duration::from_secs(10), || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.lines().any(|l| {
            l.contains("security event") && l.contains("sx") && l.contains("vhost-device-vsock")
        }))
    })?;
    let _ = e.bh(&["rm", "-f", "sx"]);
    Ok(())
}
