//! `bulkhead ls` and `bulkhead rm`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::json;

use crate::client::{explain, Client};

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Remove even if containers still run.
    #[arg(short, long)]
    force: bool,
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Where detached containers' output is kept, per sandbox.
pub fn log_dir(sandbox: &str) -> std::path::PathBuf {
    crate::client::state_dir().join("logs").join(sandbox)
}

/// Is `pid` a live process (not a zombie)?
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| !s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

pub async fn ls(a: LsArgs) -> Result<()> {
    let c = Client::connect().await?;
    let rows = c.manager.list_sandboxes().await.map_err(explain)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let mut out = vec![];
    for (id, state, backend, _) in rows {
        let Ok(sb) = c.sandbox(&id).await else {
            continue;
        };
        let containers = sb.containers().await.unwrap_or_default();
        let components = sb.components().await.unwrap_or_default();
        let created = sb.created_at().await.unwrap_or(now);
        let (cpu_ms, rss_kib) = components
            .iter()
            // The supervisor's tree holds the component: count both.
            .map(|(_, pid, sup)| bulkhead_proctree::tree_usage(if *sup != 0 { *sup } else { *pid }))
            .fold((0, 0), |a, b| (a.0 + b.cpu_ms, a.1 + b.rss_kib));
        out.push(json!({
            "id": id,
            "state": state,
            "backend": backend,
            "containers": containers.iter().map(|(id, st)| json!({"id": id, "state": st})).collect::<Vec<_>>(),
            "uptime_s": now.saturating_sub(created) / 1_000_000,
            "cpu_ms": cpu_ms,
            "memory_kib": rss_kib,
            "cpus": sb.cpus().await.unwrap_or(0),
            "memory_mib": sb.memory_mib().await.unwrap_or(0),
            "components": components
                .iter()
                .map(|(n, p, sup)| {
                    // null, not 0, where there is none (a jailer whose child is starting).
                    json!({"name": n, "pid": (*p != 0).then_some(p), "supervisor_pid": (*sup != 0).then_some(sup)})
                })
                .collect::<Vec<_>>(),
        }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:<13} {:>8} {:>9} {:>9}  CONTAINERS",
        "ID", "STATE", "BACKEND", "UPTIME", "CPU", "MEMORY"
    );
    for s in out {
        let containers: Vec<String> = s["containers"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|c| {
                        format!(
                            "{}({})",
                            c["id"].as_str().unwrap_or(""),
                            c["state"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<9} {:<13} {:>7}s {:>7}ms {:>7}Mi  {}",
            s["id"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["backend"].as_str().unwrap_or(""),
            s["uptime_s"],
            s["cpu_ms"],
            s["memory_kib"].as_u64().unwrap_or(0) / 1024,
            containers.join(",")
        );
    }
    Ok(())
}

pub async fn rm(a: RmArgs) -> Result<i32> {
    let c = Client::connect().await?;
    let mut code = 0;
    for id in &a.ids {
        match c.manager.remove_sandbox(id, a.force).await {
            Ok(()) => {
                if bulkhead_dbus::valid_id(id).is_ok() {
                    let _ = std::fs::remove_dir_all(log_dir(id));
                }
                println!("{id}");
            }
            Err(e) => {
                eprintln!("bulkhead: rm {id}: {}", explain(e));
                code = 1;
            }
        }
    }
    Ok(code)
}
