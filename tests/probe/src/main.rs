//! `bulkhead-probe`: spawn a VMM (optional), wait for the agent's health answer, run
//! checks, report. Test and benchmark tooling (the nested node, ab.py), not part of the
//! user's CLI: it talks to a guest agent directly, past bulkheadd.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_protocol::client::{connect_hybrid_vsock, AgentClient, ClientError};
use bulkhead_protocol::{Request, AGENT_VSOCK_PORT};

pub const USAGE: &str = "bulkhead-probe [options] [-- VMM ARGS...]:
  --socket PATH          the VMM's hybrid vsock socket
  --cid N                AF_VSOCK cid instead (kernel vhost-vsock, e.g. QEMU)
  --timeout SECS         give up waiting for the agent (default 120)
  --mount TAG:TARGET     ask the agent to mount a virtio-fs share
  --read PATH[:EXPECT]   read a guest file (first 64 bytes); fail unless it starts with EXPECT
  --stream PATH:MIB      read a guest file over and over through the agent until MIB
                         MiB have come; report the rate (and the VM's exits meanwhile,
                         as --guest-mib's counts)
  --shutdown             power the guest off at the end and wait for the VMM to exit
  --guest-mib N          report the spawned VMM's RSS outside guest memory (mappings
                         smaller than N MiB) and its CPU time at the first answer
                         (under bulkhead-jailer: the jailed VMM's, not the jailer's),
                         and where debugfs is mounted, KVM's exit counts for its VM
  -- CMD ARGS...         spawn this VMM first; time is measured from its exec

A running bulkhead-vmm's control interface: busctl --address=unix:path=SOCKET ...
(org.bulkhead.Vmm1; see docs/dbus-api.md), or `bulkhead vm SANDBOX` through bulkheadd.";

enum Target {
    Hybrid(PathBuf),
    Cid(u32),
}

enum Stream {
    Unix(UnixStream),
    Vsock(std::fs::File),
}

impl std::io::Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Vsock(s) => s.read(b),
        }
    }
}
impl std::io::Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Vsock(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn connect_cid(cid: u32, port: u32) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours from here on.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_vm is valid; fields set below.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    // SAFETY: a is a valid sockaddr_vm of the given length.
    let rc = unsafe {
        libc::connect(
            fd,
            (&a as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

fn open(target: &Target) -> Result<Stream, ClientError> {
    match target {
        Target::Hybrid(p) => {
            connect_hybrid_vsock(p, AGENT_VSOCK_PORT, Duration::from_secs(10)).map(Stream::Unix)
        }
        Target::Cid(c) => connect_cid(*c, AGENT_VSOCK_PORT)
            .map(Stream::Vsock)
            .map_err(|e| ClientError::Handshake(e.to_string())),
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let (opts, cmd) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &args[..0]),
    };
    let mut target = None;
    let mut timeout = Duration::from_secs(120);
    let mut mounts = vec![];
    let mut reads = vec![];
    let mut shutdown = false;
    let mut streams = vec![];
    let mut guest_mib: Option<u64> = None;
    let mut it = opts.iter();
    while let Some(o) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{o} needs a value"))
        };
        match o.as_str() {
            "--socket" => target = Some(Target::Hybrid(val()?.into())),
            "--cid" => target = Some(Target::Cid(val()?.parse().context("--cid")?)),
            "--timeout" => timeout = Duration::from_secs(val()?.parse().context("--timeout")?),
            "--mount" => mounts.push(val()?),
            "--read" => reads.push(val()?),
            "--shutdown" => shutdown = true,
            "--stream" => streams.push(val()?),
            "--guest-mib" => guest_mib = Some(val()?.parse().context("--guest-mib")?),
            other => bail!("unknown probe option {other:?}\n{USAGE}"),
        }
    }
    let target = target.context("--socket or --cid is required")?;
    let start = Instant::now();
    let mut child: Option<Child> = match cmd.split_first() {
        Some((prog, rest)) => Some(
            Command::new(prog)
                .args(rest)
                .spawn()
                .with_context(|| format!("cannot start {prog}"))?,
        ),
        None => None,
    };
    // Wait for the first health answer.
    let (mut client, health) = loop {
        if let Some(c) = child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("VMM exited with {st} before the agent answered");
            }
        }
        let attempt = open(&target).map_err(anyhow::Error::from).and_then(|s| {
            let mut c = AgentClient::handshake(s)?;
            let h = c.health()?;
            Ok((c, h))
        });
        match attempt {
            Ok(x) => break x,
            Err(e) if start.elapsed() > timeout => {
                if let Some(c) = child.as_mut() {
                    let _ = c.kill();
                }
                bail!("agent did not answer within {timeout:?}: {e:#}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let first_answer = start.elapsed();
    println!(
        "PROBE health ok first_answer_ms={} agent={} protocol={} kernel={} guest_uptime_ms={} modules={}/{}",
        first_answer.as_millis(),
        health.agent_version,
        health.protocol_version,
        health.kernel_release,
        health.uptime_ms,
        health.modules_loaded,
        health.modules_loaded + health.modules_failed
    );
    match client.guest_details() {
        Ok(d) => println!(
            "PROBE details cpus={} mem_total_kib={} kernel={}",
            d.cpus_online, d.mem_total_kib, d.kernel_release
        ),
        Err(e) => println!("PROBE details FAILED {e}"),
    }
    if let (Some(g), Some(c)) = (guest_mib, child.as_ref()) {
        let vmm = past_jailer(c.id());
        let (non_guest, anon, total) = rss_kib(vmm, g << 10).unwrap_or((0, 0, 0));
        println!(
            "PROBE rss non_guest_kib={non_guest} total_kib={total} cpu_ms={} faults={} non_guest_anon_kib={anon}",
            cpu_ms(vmm).unwrap_or(0),
            faults(vmm).unwrap_or(0)
        );
        if let Some(counts) = kvm_exits(vmm) {
            let fields: Vec<String> = counts.iter().map(|(n, v)| format!("{n}={v}")).collect();
            println!("PROBE kvm {}", fields.join(" "));
        }
    }
    let mut failed = false;
    for m in &mounts {
        let (tag, target) = m.split_once(':').context("--mount wants TAG:TARGET")?;
        match client.expect_ok(&Request::MountVirtiofs {
            tag: tag.into(),
            target: target.into(),
        }) {
            Ok(()) => println!("PROBE mount {tag} ok"),
            Err(e) => {
                failed = true;
                println!("PROBE mount {tag} FAILED {e}");
            }
        }
    }
    for r in &reads {
        let (path, expect) = r.split_once(':').unwrap_or((r, ""));
        match client.read_file(path, 0, 64) {
            Ok(d) if d.starts_with(expect.as_bytes()) => {
                println!(
                    "PROBE read {path} ok {:?}",
                    String::from_utf8_lossy(&d[..d.len().min(32)])
                )
            }
            Ok(d) => {
                failed = true;
                println!(
                    "PROBE read {path} FAILED got {:?} want prefix {expect:?}",
                    String::from_utf8_lossy(&d)
                );
            }
            Err(e) => {
                failed = true;
                println!("PROBE read {path} FAILED {e}");
            }
        }
    }
    let vmm = child.as_ref().map(|c| past_jailer(c.id()));
    for st in &streams {
        let (path, mib) = st.split_once(':').context("--stream wants PATH:MIB")?;
        let want = mib.parse::<u64>().context("--stream MIB")? << 20;
        let before = vmm.and_then(kvm_exits);
        match stream(&mut client, path, want) {
            Ok((bytes, took)) => {
                let after = vmm.and_then(kvm_exits);
                let exits = match (before, after) {
                    (Some(b), Some(a)) => b
                        .iter()
                        .zip(&a)
                        .map(|((n, x), (_, y))| format!(" {n}={}", y.saturating_sub(*x)))
                        .collect(),
                    _ => String::new(),
                };
                println!(
                    "PROBE stream {path} bytes={bytes} ms={} mib_per_s={:.1}{exits}",
                    took.as_millis(),
                    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64().max(1e-9)
                );
            }
            Err(e) => {
                failed = true;
                println!("PROBE stream {path} FAILED {e:#}");
            }
        }
    }
    if shutdown {
        let _ = client.expect_ok(&Request::Shutdown);
        if let Some(c) = child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(st) = c.try_wait()? {
                    println!("PROBE vmm-exit status={}", st.code().unwrap_or(-1));
                    if st.code() != Some(0) {
                        failed = true;
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    println!("PROBE vmm-exit FAILED did not exit after guest power-off");
                    failed = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    } else if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    if failed {
        bail!("probe failed");
    }
    Ok(())
}

/// Read guest file `path` from its start, again and again, in the largest pieces the
/// agent serves, until `want` bytes have come: (bytes, time taken).
fn stream(client: &mut AgentClient<Stream>, path: &str, want: u64) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let (mut got, mut offset) = (0u64, 0u64);
    while got < want {
        let d = client.read_file(path, offset, bulkhead_protocol::MAX_READ)?;
        if d.is_empty() {
            if offset == 0 {
                bail!("{path} is empty");
            }
            offset = 0;
            continue;
        }
        got += d.len() as u64;
        offset += d.len() as u64;
    }
    Ok((got, start.elapsed()))
}

/// `pid`, or when it is bulkhead-jailer, the component it runs (its one child).
fn past_jailer(pid: u32) -> u32 {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    // comm holds 15 characters of the name.
    if !"bulkhead-jailer".starts_with(comm.trim_end()) || comm.trim_end().len() < 15 {
        return pid;
    }
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|k| k.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

/// RSS outside guest RAM (mappings smaller than the guest), the anonymous part of it
/// (this VMM's own memory; the rest is code shared through the page cache), and total.
fn rss_kib(pid: u32, guest_kib: u64) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut size, mut non_guest, mut anon, mut total) = (0u64, 0u64, 0u64, 0u64);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("Size:") => size = f.next()?.parse().ok()?,
            Some("Rss:") => {
                let rss: u64 = f.next()?.parse().ok()?;
                total += rss;
                if size < guest_kib {
                    non_guest += rss;
                }
            }
            Some("Anonymous:") if size < guest_kib => anon += f.next()?.parse::<u64>().ok()?,
            _ => {}
        }
    }
    Some((non_guest, anon, total))
}

/// The fields of `/proc/<pid>/stat` after the command name (the first is the state).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// Minor plus major page faults of the whole process.
pub fn faults(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(7)? + f.get(9)?)
}

/// User + system CPU time of a process, in milliseconds.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    let ticks = f.get(11)? + f.get(12)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1000 / hz)
}

/// KVM's exit counters to this point for the VM that process `pid` runs, summed over
/// its vCPUs (`/sys/kernel/debug/kvm/<pid>-<fd>/`): what the guest's boot cost its host
/// in exits, a count that, unlike times, does not move with the host's load. None where
/// debugfs is not mounted or the process has no VM.
fn kvm_exits(pid: u32) -> Option<Vec<(&'static str, u64)>> {
    const COUNTERS: [&str; 5] = ["exits", "mmio_exits", "io_exits", "irq_exits", "halt_exits"];
    let prefix = format!("{pid}-");
    let dir = std::fs::read_dir("/sys/kernel/debug/kvm")
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?
        .path();
    let counts: Vec<_> = COUNTERS
        .iter()
        .filter_map(|n| {
            let v = std::fs::read_to_string(dir.join(n)).ok()?;
            Some((*n, v.trim().parse().ok()?))
        })
        .collect();
    (!counts.is_empty()).then_some(counts)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("bulkhead-probe: {e:#}");
        std::process::exit(1);
    }
}
