//! agent-api-tests: run the agent API test list against one agent.
//!
//!   agent-api-tests --host-mode AGENT_BIN            start AGENT_BIN in fresh namespaces
//!   agent-api-tests --unix SOCK --rootfs DIR         an agent already on a unix socket
//!   agent-api-tests --vsock SOCK [--port N] --rootfs DIR [--in-guest] [--block-rootfs DEV]
//!                                                    an agent in a guest, via hybrid vsock
//!   --share HOSTDIR:AGENTDIR                         a writable host dir the agent sees at AGENTDIR
//!   --filter SUBSTR                                  only cases whose name contains it
//!   --wait-agent SECS                                retry the first connection (guest booting)
//!   --mount-virtiofs TAG:TARGET                      have the agent mount a share first
//!   --bench N                                        instead of the cases: N container
//!                                                    create+start+wait(/bin/true)+delete runs
//!   --shutdown                                       power the guest off at the end
//!
//! Prints one line per case and `summary: N passed, N skipped, N failed`; exits 1 on any
//! failure.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulkhead_agent_tests::cases::{self, Outcome};
use bulkhead_agent_tests::hostmode::HostAgent;
use bulkhead_agent_tests::{rootfs, Env};
use bulkhead_protocol::client::Endpoint;
use bulkhead_protocol::AGENT_VSOCK_PORT;

fn value(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter = value(&args, "--filter").unwrap_or_default();
    let mut host = None;
    let mut _loop_dev = None;
    let env = if let Some(agent) = value(&args, "--host-mode") {
        let rootfs = rootfs::busybox_rootfs()?;
        // The block-device rootfs case runs on a loop device where the host allows one.
        let block = match rootfs::ext4_image(&rootfs).and_then(|img| rootfs::LoopDev::attach(&img))
        {
            Ok(d) => Some(d),
            Err(e) => {
                println!("note: no loop device for the block rootfs case: {e:#}");
                None
            }
        };
        let a = HostAgent::start(&PathBuf::from(agent)).context("host-mode agent")?;
        let env = Env {
            endpoint: a.endpoint(),
            rootfs: rootfs.display().to_string(),
            in_guest: false,
            block_rootfs: block.as_ref().map(|d| d.0.clone()),
            share: Some((
                a.dir.join("share"),
                a.dir.join("share").display().to_string(),
            )),
        };
        _loop_dev = block;
        host = Some(a);
        env
    } else {
        let rootfs = value(&args, "--rootfs").context("--rootfs DIR (as the agent sees it)")?;
        let endpoint = if let Some(sock) = value(&args, "--unix") {
            Endpoint::Unix(sock.into())
        } else if let Some(sock) = value(&args, "--vsock") {
            let port = match value(&args, "--port") {
                Some(p) => p.parse().context("--port")?,
                None => AGENT_VSOCK_PORT,
            };
            Endpoint::HybridVsock {
                socket: sock.into(),
                port,
            }
        } else {
            bail!("one of --host-mode AGENT, --unix SOCK, --vsock SOCK");
        };
        Env {
            endpoint,
            rootfs,
            in_guest: args.iter().any(|a| a == "--in-guest"),
            block_rootfs: value(&args, "--block-rootfs"),
            share: value(&args, "--share")
                .map(|v| -> Result<_> {
                    let (host, guest) = v.split_once(':').context("--share HOSTDIR:AGENTDIR")?;
                    Ok((PathBuf::from(host), guest.to_string()))
                })
                .transpose()?,
        }
    };

    if let Some(secs) = value(&args, "--wait-agent") {
        let deadline = Instant::now() + std::time::Duration::from_secs(secs.parse()?);
        loop {
            match env.client().and_then(|mut c| Ok(c.health()?)) {
                Ok(h) => {
                    println!(
                        "agent up: {} protocol {} on {}",
                        h.agent_version, h.protocol_version, h.kernel_release
                    );
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("agent never answered"))
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    }
    if let Some(m) = value(&args, "--mount-virtiofs") {
        let (tag, target) = m.split_once(':').context("--mount-virtiofs TAG:TARGET")?;
        env.client()?
            .expect_ok(&bulkhead_protocol::Request::MountVirtiofs {
                tag: tag.into(),
                target: target.into(),
            })?;
    }

    if let Some(n) = value(&args, "--bench") {
        let n: usize = n.parse().context("--bench N")?;
        anyhow::ensure!(n > 0, "--bench N needs N > 0");
        bulkhead_agent_tests::bench_once(&env.endpoint, &env.rootfs, "warm")?;
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let d = bulkhead_agent_tests::bench_once(&env.endpoint, &env.rootfs, &format!("b{i}"))?;
            v.push(d.as_secs_f64() * 1e3);
        }
        let m = bulkhead_agent_tests::median(&mut v);
        println!(
            "bench: container create+start+wait(/bin/true)+delete via the agent, {n} runs: median {m:.2} ms, min {:.2}, max {:.2}",
            v[0],
            v[n - 1]
        );
        if args.iter().any(|a| a == "--shutdown") {
            env.client()?
                .expect_ok(&bulkhead_protocol::Request::Shutdown)?;
        }
        return Ok(());
    }

    let (mut passed, mut skipped, mut failed) = (0, 0, 0);
    for (name, case) in cases::all() {
        if !name.contains(&filter) {
            continue;
        }
        let t = Instant::now();
        let r = case(&env);
        let ms = t.elapsed().as_millis();
        match r {
            Ok(Outcome::Passed) => {
                passed += 1;
                println!("ok   {name} ({ms} ms)");
            }
            Ok(Outcome::Skipped(why)) => {
                skipped += 1;
                println!("skip {name}: {why}");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name} ({ms} ms): {e:#}");
                // Leave nothing behind for the next case.
                if let Ok(mut c) = env.client() {
                    for info in c.containers().unwrap_or_default() {
                        let _ = c.delete(&info.id, true);
                    }
                    let _ = c.expect_ok(&bulkhead_protocol::Request::DestroySandbox);
                }
            }
        }
    }
    if let Some(a) = host.as_mut() {
        if !a.alive() {
            failed += 1;
            println!("FAIL agent_still_running: the agent exited\n{}", a.log());
        } else if failed > 0 {
            println!("--- agent log ---\n{}", a.log());
        }
    }
    println!("summary: {passed} passed, {skipped} skipped, {failed} failed");
    if args.iter().any(|a| a == "--shutdown") {
        env.client()?
            .expect_ok(&bulkhead_protocol::Request::Shutdown)?;
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
