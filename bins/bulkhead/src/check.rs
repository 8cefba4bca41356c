//! `bulkhead check`: what this host can run, why not, and which bus is in use.

use anyhow::Result;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

pub fn check(a: CheckArgs) -> Result<i32> {
    let cfg = bulkhead_host::config::Config::load()?;
    let r = bulkhead_host::check::check(&cfg);
    let state = crate::client::state_dir();
    let bus = bulkhead_dbus::bus::choose(&state);
    let jailer = cfg.binary(bulkhead_host::config::Binary::BulkheadJailer);
    let jail_on = cfg.jail.enabled();
    let jail_ok = !jail_on || jailer.is_some();
    // What `jail.virtiofsd_userns = auto` would give here (bulkheadd tries the same).
    let userns = if !jail_on || cfg.jail.virtiofsd_userns == bulkhead_host::config::Toggle::Off {
        Err("off".to_string())
    } else {
        let run = state.join("run");
        bulkhead_host::private_dir(&run)
            .map_err(|e| e.to_string())
            .and_then(|()| bulkhead_jail::idmap::probe(&run, cfg.jail.uid_base))
    };
    let jail = json!({
        "virtiofsd_userns": userns.as_ref().map(|()| "on".to_string()).unwrap_or_else(|e| format!("root: {e}")),
        "enabled": jail_on,
        "jailer": jailer,
        "landlock_abi": bulkhead_jail::landlock_abi(),
        "uid_base": cfg.jail.uid_base,
        "uid_count": cfg.jail.uid_count,
    });
    let pages = bulkhead_host::hugepages::HostPages::read();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["bus_address"] = json!(bus.address);
        v["bus_kind"] = json!(bus.kind.as_str());
        v["state_dir"] = json!(state);
        v["guest_kernel"] = json!(cfg.kernel());
        v["guest_initrd"] = json!(cfg.initrd());
        v["jail"] = jail;
        v["guest_memory"] = json!({
            "summary": pages.summary(),
            "hint": pages.shared_hint(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("kvm: {}", r.kvm);
        println!("backend: {}", r.backend.unwrap_or("none"));
        for b in &r.backends {
            let how = b.accel.map(|a| format!(" ({a})")).unwrap_or_default();
            println!(
                "  {}{how}: {}",
                b.name,
                if b.usable { "usable" } else { "not usable" }
            );
            for why in &b.reasons {
                println!("    - {why}");
            }
        }
        for p in &r.problems {
            println!("problem: {p}");
        }
        for n in &r.notes {
            println!("note: {n}");
        }
        if !jail_ok {
            println!(
                "problem: jailing is on but bulkhead-jailer is not found: no sandbox can start"
            );
        }
        println!(
            "jail: {}",
            if jail_on {
                format!(
                    "on (landlock ABI {}, uids {}..{}; see docs/security.md)",
                    jail["landlock_abi"],
                    cfg.jail.uid_base,
                    cfg.jail.uid_base as u64 + cfg.jail.uid_count as u64
                )
            } else {
                "off (bulkheadd is not root, or jail.enabled is false): components run unjailed"
                    .to_string()
            }
        );
        if jail_on {
            println!(
                "virtiofsd: {}",
                match &userns {
                    Ok(()) => "root of its sandbox's user namespace over idmapped mounts, for \
                               sandboxes that share no overlay mount (bulkhead run); the \
                               host's root with a capability list for the others"
                        .into(),
                    Err(e) => format!("the host's root with a capability list ({e})"),
                }
            );
        }
        println!("guest memory: {}", pages.summary());
        if let Some(h) = pages.shared_hint() {
            println!("note: {h}");
        }
        println!("bus: {} ({})", bus.address, bus.kind.as_str());
        println!(
            "guest image: {} + {}",
            cfg.kernel().display(),
            cfg.initrd().display()
        );
    }
    Ok(if r.backend.is_some() && jail_ok { 0 } else { 1 })
}
