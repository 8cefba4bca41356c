//! The runtime's end-to-end test list, against real parts: the `bulkhead` CLI, a private
//! dbus-daemon and bulkheadd it starts itself, the QEMU backend (TCG here), virtiofsd,
//! vhost-device-vsock, the guest kernel and agent, podman with conmon, a local
//! docker-registry, busctl. Prints one line per case and a summary.
//!
//!   runtime-tests --bin-dir target/x86_64-unknown-linux-gnu/release --guest DIR [--only SUBSTRING]

mod bad_input;
mod cases;
mod containerd;
mod cri;
mod hostile;
mod jail;
mod metrics;
mod net;
mod netfilter;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

pub type Case = (
    &'static str,
    fn(&mut bulkhead_runtime_tests::env::Env) -> Result<()>,
);

fn main() {
    // The eavesdropper of the bus-monitor case, run by that case as another uid.
    if std::env::args().nth(1).as_deref() == Some("--eavesdrop") {
        let a: Vec<String> = std::env::args().skip(2).collect();
        let secs = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
        std::process::exit(match hostile::eavesdrop(&a[0], secs) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("eavesdrop: {e:#}");
                1
            }
        });
    }
    // The flooder of the open-call case, run by that case as another uid.
    if std::env::args().nth(1).as_deref() == Some("--flood") {
        let a: Vec<String> = std::env::args().skip(2).collect();
        let secs = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
        std::process::exit(match hostile::flood(&a[0], &a[1], secs) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("flood: {e:#}");
                1
            }
        });
    }
    let mut bin = PathBuf::from("target/x86_64-unknown-linux-gnu/release");
    let mut guest = None;
    let mut only: Option<String> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin-dir" => bin = it.next().expect("--bin-dir DIR").into(),
            "--guest" => guest = it.next().map(PathBuf::from),
            "--only" => only = it.next(),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let r = (|| -> Result<(usize, usize)> {
        let guest = guest.context("--guest DIR (the guest image builder's output) is required")?;
        let bin = std::fs::canonicalize(&bin)?;
        let guest = std::fs::canonicalize(&guest)
            .with_context(|| format!("guest image {}", guest.display()))?;
        let mut e = bulkhead_runtime_tests::env::Env::new(bin, guest)?;
        let list: Vec<Case> = cases::list();
        let (mut passed, mut failed) = (0, 0);
        for (name, f) in list {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let t = Instant::now();
            let mut r = f(&mut e);
            // A guest that never answers on TCG is the emulator's lost wake-up (see
            // docs/testing.md), not a runtime bug: one retry, said out loud.
            if let Err(err) = &r {
                let text = format!("{err:#}");
                if text.contains("guest agent did not answer within") {
                    println!("RETRY  {name}: guest boot stalled: {text}");
                    cases::shutdown_sandboxes(&e);
                    r = f(&mut e);
                }
            }
            match r {
                Ok(()) => {
                    passed += 1;
                    println!("ok     {name} ({:.1}s)", t.elapsed().as_secs_f64());
                }
                Err(err) => {
                    failed += 1;
                    println!("FAILED {name} ({:.1}s): {err:#}", t.elapsed().as_secs_f64());
                    cases::dump_logs(&e);
                }
            }
        }
        if only.as_deref().is_none_or(|o| "bad input".contains(o)) {
            for (name, res) in bad_input::run(&e) {
                match res {
                    Ok(()) => {
                        passed += 1;
                        println!("ok     {name}");
                    }
                    Err(err) => {
                        failed += 1;
                        println!("FAILED {name}: {err:#}");
                    }
                }
            }
        }
        cases::shutdown(&e);
        // A failed run keeps its scratch directory (state, logs, bundles) to be read.
        let dir = e.dir.clone();
        if failed > 0 {
            println!("runtime: kept {} for inspection", dir.display());
        } else if let Err(err) = e.remove_scratch() {
            println!("runtime: kept {}: {err:#}", dir.display());
        }
        Ok((passed, failed))
    })();
    match r {
        Ok((p, f)) => {
            println!("runtime: {p} passed, {f} failed");
            std::process::exit(if f == 0 { 0 } else { 1 });
        }
        Err(e) => {
            println!("runtime: setup failed: {e:#}");
            std::process::exit(1);
        }
    }
}
