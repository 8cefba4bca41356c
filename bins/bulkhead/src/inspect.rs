//! `bulkhead inspect SANDBOX`: how each host process of a sandbox is jailed, read live
//! from `/proc` by bulkheadd (`Sandbox1.Security`) beside what its jailer reported.

use anyhow::{Context, Result};
use bulkhead_jail::posture::{cap_names, Live};
use serde_json::Value;

use crate::client::{explain, Client};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Print bulkheadd's JSON as it is.
    #[arg(long)]
    json: bool,
    /// Exit 1, naming each problem, if a component is not jailed as bulkhead jails it
    /// (docs/security.md): for monitoring, and the nested node's test.
    #[arg(long)]
    check: bool,
    sandbox: String,
}

pub async fn inspect(a: InspectArgs) -> Result<i32> {
    let c = Client::connect().await?;
    let sb = c.sandbox(&a.sandbox).await?;
    let text = sb.security().await.map_err(explain)?;
    let v: Value = serde_json::from_str(&text).context("bulkheadd's answer")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:>7} {:>11} {:<4} {:<12} {:<18} {:<12} {:<22} ROOT",
        "PROCESS", "PID", "UID", "NNP", "SECCOMP", "LANDLOCK", "SHARED NS", "CAPABILITIES"
    );
    for comp in v.as_array().into_iter().flatten() {
        let name = comp["name"].as_str().unwrap_or("?");
        let landlock =
            comp["report"]["landlock"]["status"]
                .as_str()
                .unwrap_or(if comp["jailed"] == true {
                    "?"
                } else {
                    "not jailed"
                });
        let rows = std::iter::once((name.to_string(), &comp["process"])).chain(
            comp["children"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|ch| (format!("{name} (child)"), ch)),
        );
        for (label, p) in rows {
            let Ok(live) = serde_json::from_value::<Live>(p.clone()) else {
                println!("{label:<20} {:>7}", "gone");
                continue;
            };
            let filtered = live.threads.iter().filter(|t| t.seccomp == 2).count();
            let caps = cap_names(live.cap_eff | live.cap_prm | live.cap_amb);
            let caps = if caps.is_empty() {
                "none".to_string()
            } else if caps.len() > 2 {
                format!("{} ({}, ...)", caps.len(), caps[0])
            } else {
                caps.join(",")
            };
            let host_ns = if live.host_namespaces.is_empty() {
                "none".to_string()
            } else {
                live.host_namespaces.join(",")
            };
            println!(
                "{:<20} {:>7} {:>11} {:<4} {:<12} {:<18} {:<12} {:<22} {}",
                label,
                live.pid,
                live.uids[1],
                if live.no_new_privs { "yes" } else { "no" },
                format!("{filtered}/{} thr", live.threads.len()),
                landlock,
                host_ns,
                caps,
                live.root_entries.join(" ")
            );
        }
    }
    if a.check {
        let problems = problems(&v);
        for p in &problems {
            println!("not as jailed as it should be: {p}");
        }
        return Ok(if problems.is_empty() { 0 } else { 1 });
    }
    Ok(0)
}

/// Namespaces every jailed component has of its own.
const OWN_NAMESPACES: &[&str] = &["mnt", "pid", "net", "ipc", "uts"];

/// What differs from the posture bulkhead promises. virtiofsd is held to what it can
/// have: root with its listed capabilities, its own sandbox and seccomp in its worker.
pub fn problems(v: &Value) -> Vec<String> {
    let mut out = vec![];
    for comp in v.as_array().into_iter().flatten() {
        let name = comp["name"].as_str().unwrap_or("?");
        if comp["jailed"] != true {
            out.push(format!("{name}: not started by the jailer"));
            continue;
        }
        let Ok(live) = serde_json::from_value::<Live>(comp["process"].clone()) else {
            out.push(format!("{name}: its process is gone"));
            continue;
        };
        for ns in OWN_NAMESPACES {
            if live.host_namespaces.iter().any(|h| h == ns) {
                out.push(format!("{name}: shares the host's {ns} namespace"));
            }
        }
        if !live.no_new_privs {
            out.push(format!("{name}: no_new_privs is off"));
        }
        if name == "virtiofsd" {
            if !comp["children"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| serde_json::from_value::<Live>(c.clone()).ok())
                .any(|w| w.all_filtered() && cap_names(w.cap_eff).len() <= 8)
            {
                out.push(format!(
                    "{name}: no worker under seccomp with its 8 capabilities"
                ));
            }
            continue;
        }
        if live.uids.contains(&0) || live.gids.contains(&0) {
            out.push(format!("{name}: runs with uid/gid 0 ({:?})", live.uids));
        }
        if !live.no_caps() {
            out.push(format!(
                "{name}: holds capabilities {:?}",
                cap_names(live.cap_prm | live.cap_eff | live.cap_bnd | live.cap_amb)
            ));
        }
        if !live.all_filtered() {
            out.push(format!("{name}: a thread has no seccomp filter"));
        }
        let abi = comp["report"]["landlock"]["kernel_abi"]
            .as_i64()
            .unwrap_or(0);
        if abi >= 1 && comp["report"]["landlock"]["status"] == "not enforced" {
            out.push(format!(
                "{name}: landlock not enforced on a kernel that has it"
            ));
        }
    }
    out
}
