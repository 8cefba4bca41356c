//! Pod networking, end to end on real parts: network namespaces, veths and a bridge the
//! test makes, `bulkhead run --netns`, the tap and tc filters bulkheadd makes, bulkhead-net,
//! QEMU's virtio-net, the guest's own stack. Servers and clients live only in the
//! namespaces made here.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cases::{component_pid, find, leftovers, ls_json, run_dir, wait_for};
use crate::Case;
use bulkhead_runtime_tests::env::{run_cmd, Env, Out};

pub fn list() -> Vec<Case> {
    vec![
        (
            "net: a pod's VM reaches a server and serves one (tap, tc mirred, bulkhead-net)",
            reach_and_serve,
        ),
        (
            "net: kill -9 bulkhead-net mid-stream: restarted, the same TCP connection goes on",
            kill_backend_mid_stream,
        ),
        (
            "net: two pods on one bridge talk to each other",
            two_pods_one_bridge,
        ),
        (
            "net: podman --network bridge -p: a client reaches the container in its VM",
            podman_bridge,
        ),
        (
            "net: bad netns and net-backend options are refused, nothing left",
            bad_netns,
        ),
    ]
}

/// A network namespace made for the test, deleted (with what is in it) on drop.
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Netns> {
        let name = format!("bh{tag}{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
    fn ip(&self, args: &str) -> Result<()> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend(args.split_whitespace());
        ip(&a)
    }
    /// A command run inside the namespace.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Result<Out> {
        run_cmd(&mut self.cmd(args), None, Duration::from_secs(60))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = run_cmd(Command::new("ip").args(args), None, Duration::from_secs(20))?;
    ensure!(o.code == 0, "ip {}: {}", args.join(" "), o.stderr.trim());
    Ok(())
}

/// A server namespace and a pod namespace joined by a veth, as a CNI plugin leaves a pod:
/// the pod side has an address, an MTU below 1500 and a default route.
pub(crate) fn server_and_pod(tag: &str, net: u8) -> Result<(Netns, Netns)> {
    let srv = Netns::new(&format!("s{tag}"))?;
    let pod = Netns::new(&format!("p{tag}"))?;
    srv.ip(&format!(
        "link add s0 type veth peer name eth0 netns {}",
        pod.name
    ))?;
    srv.ip(&format!("addr add 10.{net}.0.1/24 dev s0"))?;
    srv.ip("link set s0 mtu 1400 up")?;
    pod.ip(&format!("addr add 10.{net}.0.2/24 dev eth0"))?;
    pod.ip("link set eth0 mtu 1400 up")?;
    pod.ip(&format!("route add default via 10.{net}.0.1"))?;
    Ok((srv, pod))
}

/// `busybox httpd` serving `body` at /index.html inside `ns`, on `addr:port`.
fn serve_http(ns: &Netns, dir: &std::path::Path, addr: &str, body: &str) -> Result<Child> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("index.html"), body)?;
    let child = ns
        .cmd(&[
            "busybox",
            "httpd",
            "-f",
            "-p",
            addr,
            "-h",
            &dir.display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child)
}

/// Start a detached pod `name` in `netns` running `cmd`.
pub(crate) fn pod(e: &Env, name: &str, netns: &Netns, cmd: &[&str]) -> Result<()> {
    let rootfs = e.rootfs.display().to_string();
    let path = netns.path();
    let mut a = vec![
        "run",
        "-d",
        "--name",
        name,
        "--backend",
        "qemu",
        "--netns",
        &path,
        "--rootfs",
        &rootfs,
    ];
    a.extend(cmd);
    e.bh(&a)?.ok()?;
    Ok(())
}

pub(crate) fn exec(e: &Env, name: &str, script: &str) -> Result<Out> {
    e.bh(&["exec", name, "sh", "-c", script])
}

/// Fetch `url` from inside `ns` until it answers `want` (a server in a VM starts a moment
/// after the command that started it returns).
fn fetch(ns: &Netns, url: &str, want: &str) -> Result<()> {
    let mut last = None;
    wait_for(url, Duration::from_secs(30), || {
        let o = ns.run(&["busybox", "wget", "-q", "-O-", url])?;
        let ok = o.code == 0 && o.stdout == want;
        last = Some(o);
        Ok(ok)
    })
    .with_context(|| format!("last answer: {last:?}"))
}

// busybox 1.35's `wget -T` crashes (SIGSEGV) in these images: the harness's own
// deadline bounds every wget instead.

/// Taps and ingress qdiscs in a pod namespace (what bulkheadd must remove).
fn plumbing_left(pod: &Netns) -> Result<Vec<String>> {
    let mut left = vec![];
    let links = pod.run(&["ip", "-o", "link", "show"])?;
    for l in links.stdout.lines().filter(|l| l.contains("bhtap")) {
        left.push(format!("tap: {l}"));
    }
    let q = pod.run(&["tc", "qdisc", "show", "dev", "eth0", "ingress"])?;
    for l in q.stdout.lines().filter(|l| l.contains("ingress")) {
        left.push(format!("qdisc: {l}"));
    }
    Ok(left)
}

fn reach_and_serve(e: &mut Env) -> Result<()> {
    let (srv, podns) = server_and_pod("a", 201)?;
    let www = e.dir.join("www-a");
    let mut httpd = serve_http(&srv, &www, "10.201.0.1:8080", "hello from the server ns\n")?;
    let r = (|| -> Result<()> {
        pod(
            e,
            "na",
            &podns,
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/w && echo served from the VM > /tmp/w/index.html && \
                 exec httpd -f -p 8080 -h /tmp/w",
            ],
        )?;
        // The guest got the pod's interface: MAC, address, MTU, route.
        let o = exec(
            e,
            "na",
            "ip -o addr show eth0; ip -o link show eth0; ip route",
        )?;
        o.ok()?;
        let mac = podns.run(&["cat", "/sys/class/net/eth0/address"])?;
        ensure!(o.stdout.contains("10.201.0.2/24"), "guest address: {o:?}");
        ensure!(o.stdout.contains("mtu 1400"), "guest MTU: {o:?}");
        ensure!(
            o.stdout.contains(mac.stdout.trim()),
            "guest MAC is the pod interface's {}: {o:?}",
            mac.stdout.trim()
        );
        ensure!(
            o.stdout.contains("default via 10.201.0.1 dev eth0"),
            "guest route: {o:?}"
        );
        // Out of the VM to the server...
        let o = exec(e, "na", "wget -q -O- http://10.201.0.1:8080/index.html")?;
        ensure!(
            o.code == 0 && o.stdout == "hello from the server ns\n",
            "pod -> server: {o:?}"
        );
        // ...and into it from the server's namespace.
        fetch(
            &srv,
            "http://10.201.0.2:8080/index.html",
            "served from the VM\n",
        )?;
        // The mirroring is in place while the pod runs.
        let f = podns.run(&["tc", "filter", "show", "dev", "eth0", "ingress"])?;
        ensure!(
            f.stdout.contains("mirred") && f.stdout.contains("bhtap0"),
            "tc filter on eth0: {f:?}"
        );
        let run = run_dir(e, "na")?;
        e.bh(&["rm", "-f", "na"])?.ok()?;
        let left = plumbing_left(&podns)?;
        ensure!(left.is_empty(), "left in the pod namespace: {left:#?}");
        let left = leftovers(e, "na", &run);
        ensure!(left.is_empty(), "left behind: {left:#?}");
        Ok(())
    })();
    let _ = httpd.kill();
    let _ = httpd.wait();
    if r.is_err() {
        let _ = e.bh(&["rm", "-f", "na"]);
    }
    r
}

/// What the server in the test's namespace saw of one TCP stream.
struct Stream {
    connections: u32,
    lines: Vec<u64>,
    /// (seconds since the first byte, gap in seconds) for every pause over 50 ms.
    gaps: Vec<(f64, f64)>,
    first: Option<Instant>,
}

fn kill_backend_mid_stream(e: &mut Env) -> Result<()> {
    let (srv, podns) = server_and_pod("k", 202)?;
    // The server is ours: a listener made inside the server namespace (the namespace is
    // entered on a helper thread, the socket stays bound to it).
    let listener = in_netns(&srv.path(), || TcpListener::bind("10.202.0.1:9000"))??;
    listener.set_nonblocking(false)?;
    pod(e, "nk", &podns, &["sleep", "600"])?;
    let r = (|| -> Result<()> {
        let before = component_pid(e, "nk", "net0")?;
        // The client: one line every 20 ms over one connection, 400 lines.
        let mut client = e
            .cmd(&[
                "exec",
                "nk",
                "sh",
                "-c",
                "i=0; while [ $i -lt 400 ]; do echo $i; i=$((i+1)); usleep 20000; done \
                 | nc 10.202.0.1 9000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let (conn, _) = listener.accept().context("the client connected")?;
        let reader = std::thread::spawn(move || read_stream(conn, listener));
        std::thread::sleep(Duration::from_secs(2));
        // The back end's counters, through Sandbox1.NetworkStats (bulkheadd reads them
        // from bulkhead-net's org.bulkhead.Net1 over a peer connection).
        let stats = net_stats(e, "nk")?;
        let eth0 = &stats["eth0"];
        ensure!(
            eth0["tx_frames"].as_u64() > Some(10) && eth0["rx_frames"].as_u64() > Some(10),
            "NetworkStats mid-stream: {stats}"
        );
        ensure!(eth0["tx_malformed"] == 0, "NetworkStats: {stats}");
        let killed = Instant::now();
        // SAFETY: kill(2) on bulkhead-net's pid.
        unsafe { libc::kill(before as i32, libc::SIGKILL) };
        wait_for("net0 to be started again", Duration::from_secs(10), || {
            Ok(component_pid(e, "nk", "net0").is_ok_and(|p| p != before))
        })?;
        let stream = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        let _ = client.wait();
        ensure!(
            stream.connections == 1,
            "{} connections",
            stream.connections
        );
        let want: Vec<u64> = (0..400).collect();
        ensure!(
            stream.lines == want,
            "lines lost or out of order: got {} lines, first gap at {:?}",
            stream.lines.len(),
            stream
                .lines
                .iter()
                .enumerate()
                .find(|(i, l)| **l != *i as u64)
        );
        let since_first = killed
            .duration_since(stream.first.context("no data")?)
            .as_secs_f64();
        // The longest pause that ends within 1.5 s after the kill (lines are 20 ms apart,
        // so a pause under 50 ms is not seen at all).
        let gap = stream
            .gaps
            .iter()
            .filter(|(at, len)| at + len >= since_first && *at <= since_first + 1.5)
            .map(|g| g.1)
            .fold(0.0, f64::max);
        println!(
            "       (longest pause within 1.5 s of the kill: {:.0} ms, 0 = under 50 ms; \
             pauses over 50 ms at (s, s): {:?})",
            gap * 1e3,
            stream.gaps
        );
        ensure!(
            find(&ls_json(e)?, "nk").is_some_and(|s| s["state"] == "running"),
            "the pod did not stay running"
        );
        let o = exec(e, "nk", "echo still here")?;
        ensure!(o.stdout == "still here\n", "exec after the restart: {o:?}");
        Ok(())
    })();
    let _ = e.bh(&["rm", "-f", "nk"]);
    r
}

/// `Sandbox1.NetworkStats` of a sandbox, as busctl prints it.
fn net_stats(e: &Env, id: &str) -> Result<serde_json::Value> {
    let o = e.busctl(&[
        "--json=short",
        "call",
        "org.bulkhead.Manager1",
        &format!("/org/bulkhead/Manager1/sandbox/{id}"),
        "org.bulkhead.Sandbox1",
        "NetworkStats",
    ])?;
    o.ok()?;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).context("busctl --json")?;
    Ok(v["data"][0].clone())
}

fn read_stream(conn: std::net::TcpStream, listener: TcpListener) -> Result<Stream> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut s = Stream {
        connections: 1,
        lines: vec![],
        gaps: vec![],
        first: None,
    };
    let mut r = BufReader::new(conn);
    let mut last = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => bail!("stream read: {e}"),
        }
        let now = Instant::now();
        let first = *s.first.get_or_insert(now);
        if now.duration_since(last) > Duration::from_millis(50) && !s.lines.is_empty() {
            s.gaps.push((
                last.duration_since(first).as_secs_f64(),
                now.duration_since(last).as_secs_f64(),
            ));
        }
        last = now;
        s.lines
            .push(line.trim().parse().context("a line of the stream")?);
    }
    let mut rest = vec![];
    let _ = r.read_to_end(&mut rest);
    listener.set_nonblocking(true)?;
    if listener.accept().is_ok() {
        s.connections += 1;
    }
    Ok(s)
}

/// Run `f` on a thread inside the network namespace at `path`.
fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we hold; only this scoped thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

fn two_pods_one_bridge(e: &mut Env) -> Result<()> {
    let sw = Netns::new("sw")?;
    sw.ip("link add br0 type bridge")?;
    sw.ip("link set br0 up")?;
    let mut pods = vec![];
    for (i, tag) in ["x", "y"].iter().enumerate() {
        let p = Netns::new(&format!("p{tag}"))?;
        sw.ip(&format!(
            "link add v{tag} type veth peer name eth0 netns {}",
            p.name
        ))?;
        sw.ip(&format!("link set v{tag} master br0 up"))?;
        p.ip(&format!("addr add 10.203.0.{}/24 dev eth0", 10 + i))?;
        p.ip("link set eth0 up")?;
        pods.push(p);
    }
    let r = (|| -> Result<()> {
        pod(
            e,
            "nx",
            &pods[0],
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/w && echo pod x > /tmp/w/index.html && \
                 exec httpd -f -p 80 -h /tmp/w",
            ],
        )?;
        pod(e, "ny", &pods[1], &["sleep", "600"])?;
        let o = exec(e, "ny", "wget -q -O- http://10.203.0.10/index.html")?;
        ensure!(
            o.code == 0 && o.stdout == "pod x\n",
            "pod y -> pod x: {o:?}"
        );
        Ok(())
    })();
    let _ = e.bh(&["rm", "-f", "nx"]);
    let _ = e.bh(&["rm", "-f", "ny"]);
    r
}

/// podman with its own network stack (CNI bridge, portmap) inside a namespace the test
/// makes: `nsenter --net` only, so podman's netns files are visible to bulkheadd (an
/// `ip netns exec` would give podman a private mount namespace).
fn podman_bridge(e: &mut Env) -> Result<()> {
    let ns = Netns::new("pm")?;
    let pm = e.dir.join("podman-net");
    let _ = std::fs::remove_dir_all(&pm);
    let base: Vec<String> = vec![
        format!("--net={}", ns.path()),
        "podman".into(),
        format!("--root={}", pm.join("root").display()),
        format!("--runroot={}", pm.join("run").display()),
        "--cgroup-manager=cgroupfs".into(),
        "--events-backend=file".into(),
        format!("--runtime={}", e.runtime_wrapper.display()),
    ];
    let podman = |args: &[&str]| -> Result<Out> {
        let mut c = Command::new("nsenter");
        c.args(&base).args(args);
        run_cmd(&mut c, None, Duration::from_secs(180))
    };
    podman(&["load", "-i", &e.archive.display().to_string()])?.ok()?;
    let r = (|| -> Result<()> {
        podman(&[
            "run",
            "-d",
            "--name",
            "pweb",
            "--network",
            "bridge",
            "-p",
            "18080:80",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
            "localhost/latest:latest",
            "sh",
            "-c",
            "mkdir -p /tmp/w && echo from a podman VM > /tmp/w/index.html && \
             exec httpd -f -p 80 -h /tmp/w",
        ])?
        .ok()?;
        let ip = podman(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            "pweb",
        ])?;
        let ip = ip.stdout.trim().to_string();
        ensure!(
            ip.starts_with("10.88."),
            "podman's address for the container: {ip:?}"
        );
        // Straight to the container, and through the port podman published on its
        // bridge's address (podman's default network is 10.88.0.0/16).
        for url in [
            format!("http://{ip}/index.html"),
            "http://10.88.0.1:18080/index.html".to_string(),
        ] {
            fetch(&ns, &url, "from a podman VM\n")?;
        }
        // The address podman gave is the guest's own.
        let o = podman(&["exec", "pweb", "ip", "-o", "addr", "show", "eth0"])?;
        ensure!(o.stdout.contains(&format!("{ip}/")), "in the VM: {o:?}");
        Ok(())
    })();
    let _ = podman(&["rm", "-f", "pweb"]);
    r
}

fn bad_netns(e: &mut Env) -> Result<()> {
    let rootfs = e.rootfs.display().to_string();
    let file = e.dir.join("not-a-netns");
    std::fs::write(&file, "x")?;
    let pod = Netns::new("nb")?;
    let good = pod.path();
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--netns".into(), "/run/netns/bh-no-such-namespace".into()],
            "netns",
        ),
        (
            vec!["--netns".into(), file.display().to_string()],
            "network namespace",
        ),
        (
            vec![
                "--netns".into(),
                good.clone(),
                "--net-backend".into(),
                "vhost-user".into(),
            ],
            "want bulkhead-net or vhost-net",
        ),
    ];
    // Where the kernel has no vhost-net, asking for it is refused by name.
    if !Path::new("/dev/vhost-net").exists() {
        cases.push((
            vec![
                "--netns".into(),
                good.clone(),
                "--net-backend".into(),
                "vhost-net".into(),
            ],
            "/dev/vhost-net is missing",
        ));
    }
    for (opts, want) in cases {
        let mut args = vec!["run", "--rm", "--backend", "qemu"];
        args.extend(opts.iter().map(String::as_str));
        args.extend(["--rootfs", &rootfs, "true"]);
        let o = e.bh(&args)?;
        ensure!(
            o.code != 0 && o.stderr.contains(want),
            "{opts:?}: want an error naming {want:?}, got {o:?}"
        );
    }
    let left: Vec<PathBuf> = std::fs::read_dir(e.state().join("run"))
        .map(|d| d.filter_map(|x| x.ok().map(|x| x.path())).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "run directories left: {left:?}");
    Ok(())
}
