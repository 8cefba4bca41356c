//! Netfilter inside a pod: what a service mesh's init container does before the app
//! starts (iptables NAT REDIRECT by owner, TPROXY in mangle), with the host's own
//! iptables binaries (legacy and nft) copied into a busybox root. The guest kernel must
//! carry netfilter for this; a kernel without it fails the first rule.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use crate::Case;
use bulkhead_runtime_tests::env::{run_cmd, Env};

pub fn list() -> Vec<Case> {
    vec![(
        "netfilter: a pod's own iptables (legacy and nft): NAT REDIRECT by owner carries a connection, TPROXY is taken",
        iptables_in_a_pod,
    )]
}

/// Where the host keeps iptables' extensions (Debian's multiarch path).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";
const MULTI: [&str; 2] = [
    "/usr/sbin/xtables-legacy-multi",
    "/usr/sbin/xtables-nft-multi",
];

/// The libraries `ldd` says `file` loads, the loader included.
fn libraries(file: &Path) -> Result<Vec<PathBuf>> {
    let o = run_cmd(Command::new("ldd").arg(file), None, Duration::from_secs(20))?;
    Ok(o.stdout
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// `host` copied to the same path under `root` (a link is followed).
fn copy_in(root: &Path, host: &Path) -> Result<()> {
    let dest = root.join(host.strip_prefix("/")?);
    std::fs::create_dir_all(dest.parent().context("no parent")?)?;
    std::fs::copy(host, &dest).with_context(|| format!("copy {}", host.display()))?;
    Ok(())
}

/// The busybox root plus both iptables front ends, their libraries and extensions.
fn iptables_root(e: &Env) -> Result<PathBuf> {
    let root = e.dir.join("iptables-rootfs");
    let _ = std::fs::remove_dir_all(&root);
    let o = run_cmd(
        Command::new("cp").arg("-a").arg(&e.rootfs).arg(&root),
        None,
        Duration::from_secs(60),
    )?;
    ensure!(o.code == 0, "cp the busybox root: {}", o.stderr);
    let mut files: Vec<PathBuf> = MULTI.iter().map(PathBuf::from).collect();
    for f in &files {
        if !f.exists() {
            bail!("{} missing (apt-get install iptables)", f.display());
        }
    }
    for ext in std::fs::read_dir(XTABLES_DIR).with_context(|| XTABLES_DIR.to_string())? {
        files.push(ext?.path());
    }
    let mut libs = vec![];
    for f in &files {
        libs.extend(libraries(f)?);
    }
    libs.sort();
    libs.dedup();
    for f in files.iter().chain(&libs) {
        copy_in(&root, f)?;
    }
    for (name, multi) in [
        ("iptables-legacy", MULTI[0]),
        ("ip6tables-legacy", MULTI[0]),
        ("iptables-nft", MULTI[1]),
    ] {
        std::os::unix::fs::symlink(multi, root.join("usr/sbin").join(name))?;
    }
    Ok(root)
}

/// runc's default spec, with the capabilities a mesh's init container asks for.
fn spec(root: &Path, script: &str) -> serde_json::Value {
    let caps = json!([
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", script],
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "noNewPrivileges": true
        },
        "root": {"path": root, "readonly": false},
        "hostname": "mesh-init",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ]
        }
    })
}

/// In the container: loopback up; a web server on 15001 as `nobody` (standing for the
/// mesh's proxy, which Istio runs as uid 1337); legacy iptables redirects port 80 to it
/// for every other uid, so root's fetch of port 80 reaches it, and the proxy's own fetch
/// of port 80 is not redirected and is refused. Then IPv6 NAT, and the nft front end
/// takes a TPROXY rule. (busybox 1.35's `wget -T` crashes: no -T.)
const SCRIPT: &str = r#"set -e
ip link set lo up
mkdir -p /www && echo through-the-redirect > /www/x
httpd -u nobody -p 127.0.0.1:15001 -h /www
iptables-legacy -t nat -A OUTPUT -p tcp --dport 80 -m owner ! --uid-owner 65534 -j REDIRECT --to-ports 15001
echo "app: $(wget -q -O- http://127.0.0.1/x)"
if su -s /bin/sh nobody -c "wget -q -O- http://127.0.0.1/x" 2>/dev/null; then echo "proxy: redirected"; else echo "proxy: not redirected"; fi
iptables-legacy -t nat -S OUTPUT
ip6tables-legacy -t nat -A OUTPUT -p tcp --dport 80 -j REDIRECT --to-ports 15001
iptables-nft -t mangle -A PREROUTING -p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1
iptables-nft -t mangle -S PREROUTING
"#;

fn iptables_in_a_pod(e: &mut Env) -> Result<()> {
    let root = iptables_root(e)?;
    let bundle = e.dir.join("mesh-init-bundle");
    std::fs::create_dir_all(&bundle)?;
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec(&root, SCRIPT))?,
    )?;
    let o = e.bh(&[
        "run",
        "--bundle",
        &bundle.display().to_string(),
        "mesh-init",
    ])?;
    ensure!(o.code == 0, "the mesh's init failed: {o:?}");
    for want in [
        "app: through-the-redirect",
        "proxy: not redirected",
        "-A OUTPUT -p tcp -m tcp --dport 80 -m owner ! --uid-owner 65534 -j REDIRECT --to-ports 15001",
        "-A PREROUTING -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1",
    ] {
        ensure!(o.stdout.contains(want), "want {want:?} in {o:?}");
    }
    Ok(())
}
