//! `bulkhead vm SANDBOX [--balloon MIB] [--hotplug MIB] [--json]`: the VM as its VMM
//! reports it (`Sandbox1.VmStatus`, which bulkheadd reads from the VMM's
//! `org.bulkhead.Vmm1`): how guest RAM is backed, the start phases, the balloon and
//! hot-plug memory. `--balloon` sets the balloon's target, `--hotplug` how much of the
//! hot-plug region is plugged.

use anyhow::Result;
use serde_json::{json, Map, Value as Json};
use zbus::zvariant::Value;

use crate::client::{explain, Client};

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// First ask the guest to give this many MiB back to the host (0 deflates).
    #[arg(long, value_name = "MIB")]
    balloon: Option<u64>,
    /// First ask the guest to have this many MiB of its hot-plug region plugged
    /// (sandboxes created with `--hotplug`; 0 takes it all back).
    #[arg(long, value_name = "MIB")]
    hotplug: Option<u64>,
    sandbox: String,
}

pub async fn vm(a: VmArgs) -> Result<i32> {
    let c = Client::connect().await?;
    let sb = c.sandbox(&a.sandbox).await?;
    if let Some(mib) = a.balloon {
        sb.set_balloon_target(mib).await.map_err(explain)?;
    }
    if let Some(mib) = a.hotplug {
        sb.set_hotplug_memory(mib).await.map_err(explain)?;
    }
    let status = sb.vm_status().await.map_err(explain)?;
    let v = Json::Object(
        status
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect::<Map<_, _>>(),
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let s = |v: &Json| v.as_str().unwrap_or("?").to_string();
    println!("state     {}", s(&v["state"]));
    let m = &v["memory"];
    println!(
        "memory    {} RAM, {} pages (asked {}, hugepages {}): {}",
        s(&m["backing"]),
        s(&m["pages"]),
        s(&m["asked_backing"]),
        s(&m["asked_hugepages"]),
        s(&m["why"])
    );
    println!("start     phase                ms      faults  cpu ms");
    for p in v["start_phases"].as_array().into_iter().flatten() {
        println!(
            "          {:<18} {:>8.1} {:>8} {:>7.1}",
            s(&p[0]),
            p[1].as_f64().unwrap_or(0.0),
            p[2].as_u64().unwrap_or(0) + p[3].as_u64().unwrap_or(0),
            p[4].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(b) = v.get("balloon") {
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        println!(
            "balloon   target {} MiB, given {} MiB; freed {} MiB inflated + {} MiB reported; {} refused",
            n("target_mib"),
            n("actual_mib"),
            n("inflated_bytes") >> 20,
            n("reported_bytes") >> 20,
            n("refused")
        );
    }
    if let Some(h) = v.get("hotplug") {
        let n = |k: &str| h[k].as_u64().unwrap_or(0);
        println!(
            "hotplug   {} of {} MiB plugged, {} asked for; {} plugs, {} unplugs, {} refused",
            n("plugged_mib"),
            n("region_mib"),
            n("requested_mib"),
            n("plugs"),
            n("unplugs"),
            n("refused")
        );
        println!(
            "          containers' limits {} MiB, floor {} MiB{}",
            n("limits_mib"),
            n("floor_mib"),
            match n("short_mib") {
                0 => String::new(),
                m => format!("; {m} MiB more than the region holds"),
            }
        );
    }
    Ok(0)
}

/// A D-Bus value as JSON: structures become arrays, dictionaries objects.
fn to_json(v: &Value<'_>) -> Json {
    match v {
        Value::Bool(b) => json!(b),
        Value::U8(n) => json!(n),
        Value::U16(n) => json!(n),
        Value::U32(n) => json!(n),
        Value::U64(n) => json!(n),
        Value::I16(n) => json!(n),
        Value::I32(n) => json!(n),
        Value::I64(n) => json!(n),
        Value::F64(n) => json!(n),
        Value::Str(s) => json!(s.as_str()),
        Value::Value(inner) => to_json(inner),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Structure(s) => Json::Array(s.fields().iter().map(to_json).collect()),
        Value::Dict(d) => Json::Object(
            d.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::Str(s) => s.to_string(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        other => json!(other.to_string()),
    }
}
