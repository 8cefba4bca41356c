//! `bulkhead-metrics` against a live pod (QEMU backend, with a pod network): what a
//! Prometheus server would scrape, a client that misbehaves, a manager killed under it,
//! and a sandbox that goes away.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cases::wait_for;
use crate::net::{exec, pod, server_and_pod};
use crate::Case;
use bulkhead_runtime_tests::env::Env;

pub fn list() -> Vec<Case> {
    vec![(
        "metrics: bulkhead-metrics scrapes a live pod, survives bad clients and a killed manager",
        live_pod,
    )]
}

/// The exporter, killed when dropped.
struct Exporter {
    child: Child,
    addr: String,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_exporter(e: &Env) -> Result<Exporter> {
    let mut c = Command::new(e.bin.join("bulkhead-metrics"));
    e.env_on(&mut c);
    c.args(["--listen", "127.0.0.1:0", "--min-interval-ms", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(e.dir.join("metrics.err"))?);
    let mut child = c.spawn().context("cannot start bulkhead-metrics")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .with_context(|| format!("bulkhead-metrics printed {line:?}"))?
        .to_string();
    Ok(Exporter { child, addr })
}

/// One HTTP/1.1 request, `Connection: close`: the status and the body.
fn request(addr: &str, head: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(head.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not HTTP: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_string()))
}

fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// A scrape, parsed: `name{labels}` → value. Every line must be a comment or a
/// sample, and the exposition must end with `# EOF`.
fn scrape(addr: &str) -> Result<BTreeMap<String, f64>> {
    let (status, body) = get(addr, "/metrics")?;
    ensure!(status == 200, "GET /metrics: {status} {body:?}");
    ensure!(body.ends_with("# EOF\n"), "no # EOF: {body:?}");
    let mut out = BTreeMap::new();
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = l.rsplit_once(' ').with_context(|| format!("line {l:?}"))?;
        let v: f64 = value.parse().with_context(|| format!("value in {l:?}"))?;
        ensure!(
            out.insert(series.to_string(), v).is_none(),
            "series twice: {l:?}"
        );
    }
    Ok(out)
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    m.get(series)
        .copied()
        .with_context(|| format!("no series {series} in {:#?}", m.keys().collect::<Vec<_>>()))
}

fn live_pod(e: &mut Env) -> Result<()> {
    let ex = start_exporter(e)?;
    let (_srv, podns) = server_and_pod("m", 204)?;
    pod(e, "mx", &podns, &["sleep", "600"])?;
    let r = (|| -> Result<()> {
        // Traffic both ways: ARP, a SYN and the RST of a closed port.
        exec(
            e,
            "mx",
            "wget -q -O- http://10.204.0.1:9/ 2>/dev/null; true",
        )?
        .ok()?;
        let m = scrape(&ex.addr)?;
        ensure!(value(&m, "bulkhead_up")? == 1.0);
        ensure!(
            value(
                &m,
                r#"bulkhead_sandbox_info{sandbox="mx",backend="qemu",state="running"}"#
            )? == 1.0
        );
        ensure!(value(&m, r#"bulkhead_sandbox_vcpus{sandbox="mx"}"#)? >= 1.0);
        ensure!(value(&m, r#"bulkhead_sandbox_memory_bytes{sandbox="mx"}"#)? >= 64.0 * 1048576.0);
        ensure!(
            value(
                &m,
                r#"bulkhead_sandbox_start_seconds{sandbox="mx",step="agent_ready"}"#
            )? > 0.0
        );
        for c in ["vmm", "virtiofsd", "vhost-device-vsock", "net0"] {
            let l = format!(r#"{{sandbox="mx",component="{c}"}}"#);
            ensure!(
                value(&m, &format!("bulkhead_component_up{l}"))? == 1.0,
                "{c} up"
            );
            ensure!(
                value(&m, &format!("bulkhead_component_resident_memory_bytes{l}"))? > 0.0,
                "{c} RSS"
            );
        }
        // The VMM's resident set holds the guest RAM it touched: tens of MiB at least.
        let vmm_rss = value(
            &m,
            r#"bulkhead_component_resident_memory_bytes{sandbox="mx",component="vmm"}"#,
        )?;
        ensure!(vmm_rss > 16.0 * 1048576.0, "VMM RSS {vmm_rss}");
        let k = r#"{sandbox="mx",container="mx"}"#;
        ensure!(value(&m, &format!("bulkhead_container_memory_usage_bytes{k}"))? > 0.0);
        ensure!(value(&m, &format!("bulkhead_container_pids{k}"))? >= 1.0);
        ensure!(
            value(
                &m,
                &format!("bulkhead_container_cpu_usage_seconds_total{k}")
            )? > 0.0
        );
        let i = r#"{sandbox="mx",interface="eth0"}"#;
        ensure!(value(&m, &format!("bulkhead_network_transmit_frames_total{i}"))? >= 2.0);
        ensure!(value(&m, &format!("bulkhead_network_receive_frames_total{i}"))? >= 2.0);
        ensure!(value(&m, &format!("bulkhead_network_receive_bytes_total{i}"))? > 0.0);
        ensure!(value(&m, "bulkhead_scrape_failed_calls_total")? == 0.0);

        // Clients that misbehave get an answer and cost nothing.
        let (s, _) = get(&ex.addr, "/nope")?;
        ensure!(s == 404, "GET /nope: {s}");
        let (s, _) = request(
            &ex.addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        ensure!(s == 405, "POST /metrics: {s}");
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(64 << 10)
        );
        let s = request(&ex.addr, &big).map(|r| r.0).unwrap_or(0);
        ensure!(s == 431 || s == 0, "a 64 KiB header: {s}");
        // More idle connections than the exporter serves at once: they time out and a
        // scrape still gets through.
        let idle: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(&ex.addr))
            .collect::<std::io::Result<_>>()?;
        let t = Instant::now();
        scrape(&ex.addr)?;
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "a scrape behind 40 idle connections took {:?}",
            t.elapsed()
        );
        drop(idle);

        // The manager killed: the exporter says so and carries on; the next command
        // brings bulkheadd back, which adopts the pod, and the series come back.
        let pid = e.bulkheadd_pid().context("no bulkheadd")?;
        // SAFETY: kill(2) on this environment's bulkheadd.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_for("bulkheadd to go", Duration::from_secs(5), || {
            Ok(e.bulkheadd_pid().is_none())
        })?;
        let m = scrape(&ex.addr)?;
        ensure!(value(&m, "bulkhead_up")? == 0.0, "up with no manager");
        ensure!(
            !m.keys().any(|k| k.contains("sandbox=")),
            "sandbox series with no manager"
        );
        e.bh(&["ls"])?.ok()?;
        let m = scrape(&ex.addr)?;
        ensure!(value(&m, "bulkhead_up")? == 1.0);
        ensure!(
            value(
                &m,
                r#"bulkhead_container_info{sandbox="mx",container="mx",state="running"}"#
            )? == 1.0
        );

        let status = std::fs::read_to_string(format!("/proc/{}/status", ex.child.id()))
            .context("bulkhead-metrics is gone")?;
        ensure!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "bulkhead-metrics runs without its seccomp filter"
        );
        Ok(())
    })();
    let _ = e.bh(&["rm", "-f", "mx"]);
    r?;
    let m = scrape(&ex.addr)?;
    if m.keys().any(|k| k.contains(r#"sandbox="mx""#)) {
        bail!(
            "series of a removed sandbox: {:?}",
            m.keys().filter(|k| k.contains("mx")).collect::<Vec<_>>()
        );
    }
    Ok(())
}
