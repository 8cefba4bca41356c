//! The runc-compatible OCI runtime CLI, so podman (`--runtime`) and dockerd (through
//! containerd's runc shim) run containers in VMs. Each container gets its own sandbox
//! (same id), except in a podman pod: a container whose spec names the namespaces of
//! one of ours by pid (`/proc/<pid>/ns/...`, how podman points a pod's members at its
//! infra container) joins that container's VM, sharing the pod's UTS and IPC there.
//! What runc keeps in its state directory we keep in `--root` (default `<state>/oci`):
//! the bundle, the creation time and the monitor's pid, which is the container's pid as
//! callers see it (see `monitor.rs`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bulkhead_client::NewPod;
use bulkhead_dbus::{ContainerOptions, SandboxOptions};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zbus::zvariant::Value as V;

use crate::client::{explain, state_dir, Client};
use crate::{attach, monitor, stdio};

/// runc's global flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Where container state is kept.
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Write errors here (runc's callers read it on failure).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    /// Accepted for compatibility: cgroups are the guest's.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for compatibility.
    #[arg(long, global = true)]
    pub debug: bool,
}

impl Global {
    fn root(&self) -> PathBuf {
        self.root.clone().unwrap_or_else(|| state_dir().join("oci"))
    }

    /// Record an error where runc would (`--log`), in its format.
    pub fn log_error(&self, e: &anyhow::Error) {
        let Some(p) = &self.log else { return };
        let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        else {
            return;
        };
        let msg = format!("{e:#}");
        let _ = if self.log_format == "json" {
            writeln!(
                f,
                "{}",
                json!({"level": "error", "msg": msg, "time": now_rfc3339()})
            )
        } else {
            writeln!(f, "level=error msg={msg:?}")
        };
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Record {
    id: String,
    sandbox: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    created: String,
    pid: u32,
    annotations: HashMap<String, String>,
    /// The spec's hooks: run here, on the host, never in the guest.
    #[serde(default)]
    hooks: Value,
}

fn record_path(g: &Global, id: &str) -> PathBuf {
    g.root().join(id).join("state.json")
}

fn load(g: &Global, id: &str) -> Result<Record> {
    bulkhead_dbus::valid_id(id).map_err(anyhow::Error::msg)?;
    let p = record_path(g, id);
    let text = std::fs::read(&p).map_err(|_| anyhow!("container {id:?} does not exist"))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: corrupt state", p.display()))
}

fn save(g: &Global, r: &Record) -> Result<()> {
    let p = record_path(g, &r.id);
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)?;
    std::fs::rename(tmp, p)?;
    Ok(())
}

fn now_rfc3339() -> String {
    // RFC 3339 in UTC from the epoch seconds, without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The bundle directory (config.json and the rootfs).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Host fds cannot cross into a VM: accepted, and refused if not 0.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

/// Read and check a bundle: its spec (as JSON text) and its rootfs directory.
fn read_bundle(bundle: &Path) -> Result<(Value, PathBuf)> {
    let bundle = std::fs::canonicalize(bundle)
        .with_context(|| format!("bundle {}: no such directory", bundle.display()))?;
    let cfg = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&cfg).with_context(|| format!("cannot read {}", cfg.display()))?;
    let spec: oci_spec::runtime::Spec = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid OCI runtime spec", cfg.display()))?;
    if spec.process().is_none() {
        bail!("{}: the spec has no process", cfg.display());
    }
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or_else(|| anyhow!("{}: the spec has no root", cfg.display()))?;
    let rootfs = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    if !rootfs.is_dir() {
        bail!(
            "rootfs {} does not exist or is not a directory",
            rootfs.display()
        );
    }
    Ok((serde_json::from_str(&text)?, rootfs))
}

pub async fn create(g: &Global, a: CreateArgs) -> Result<i32> {
    bulkhead_dbus::valid_id(&a.id).map_err(anyhow::Error::msg)?;
    if a.preserve_fds != 0 {
        bail!(
            "--preserve-fds {}: host file descriptors cannot be passed into a VM",
            a.preserve_fds
        );
    }
    let (spec, rootfs) = read_bundle(&a.bundle)?;
    let dir = g.root().join(&a.id);
    std::fs::create_dir_all(g.root())?;
    if std::fs::create_dir(&dir).is_err() {
        bail!("container {:?} already exists", a.id);
    }
    let r = create_in(g, &a, spec, rootfs).await;
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

async fn create_in(g: &Global, a: &CreateArgs, mut spec: Value, rootfs: PathBuf) -> Result<i32> {
    let hooks = spec
        .as_object_mut()
        .and_then(|o| o.remove("hooks"))
        .unwrap_or(Value::Null);
    let tty = spec["process"]["terminal"].as_bool().unwrap_or(false);
    if tty && a.console_socket.is_none() {
        bail!("the spec asks for a terminal: --console-socket is required");
    }
    let annotations: HashMap<String, String> =
        serde_json::from_value(spec["annotations"].clone()).unwrap_or_default();
    let client = Client::connect().await?;
    // A podman pod's member names its infra container's namespaces by the pid podman
    // knows for it, which is that container's monitor: it joins that container's VM.
    let joined = pod_owner(g, &spec);
    let (sandbox, own) = match &joined {
        Some(owner) => {
            tracing::info!(container = %a.id, sandbox = %owner.sandbox, "joining the pod's VM");
            bulkhead_host::pod::host_paths_to_guest(&mut spec);
            bulkhead_host::pod::join_pod_namespaces(&mut spec);
            (owner.sandbox.clone(), None)
        }
        None => {
            let sopts = SandboxOptions {
                // podman (netavark, CNI) hands the container a network namespace it
                // made: the pod's network, mirrored into the VM.
                netns: bulkhead_host::pod::network_namespace(&spec),
                // The pod's hostname, which containers that join later see too.
                hostname: spec["hostname"].as_str().map(str::to_owned),
                ..Default::default()
            };
            (a.id.clone(), Some(sopts))
        }
    };
    let pod = client
        .create_pod(NewPod {
            sandbox: &sandbox,
            own,
            container: &a.id,
            spec_json: &spec.to_string(),
            rootfs: &rootfs.display().to_string(),
            options: ContainerOptions {
                stdin: true,
                ..Default::default()
            },
        })
        .await
        .map_err(explain)?;
    let made = async {
        let mut margs = vec![
            "--sandbox".to_string(),
            sandbox.clone(),
            "--container".into(),
            a.id.clone(),
            "--exit-file".into(),
            g.root().join(&a.id).join("exit").display().to_string(),
        ];
        if let Some(s) = &a.console_socket {
            margs.extend(["--console-socket".into(), s.display().to_string()]);
        }
        let pid = monitor::spawn(&margs, true)?;
        let bundle = std::fs::canonicalize(&a.bundle)?;
        let rec = Record {
            id: a.id.clone(),
            sandbox: sandbox.clone(),
            bundle,
            rootfs: rootfs.clone(),
            created: now_rfc3339(),
            pid,
            annotations,
            hooks,
        };
        save(g, &rec)?;
        // runc runs these between create and start; a failing one fails the create.
        for stage in ["createRuntime", "prestart"] {
            crate::hooks::run_stage(&rec.hooks, stage, &state_json(&rec, "created"))?;
        }
        if let Some(p) = &a.pid_file {
            write_pid_file(p, pid)?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = made {
        // Undo what this create made: its own sandbox, or only its container in a pod's.
        client.undo(&pod).await;
        return Err(e);
    }
    Ok(0)
}

/// The container whose VM a new container must join: one of ours whose pid (its
/// monitor's, as written to `--pid-file`) the spec names in a `/proc/<pid>/ns/...`
/// namespace path, the way podman points a pod's containers at its infra container.
fn pod_owner(g: &Global, spec: &Value) -> Option<Record> {
    let pids: Vec<u32> = spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .filter_map(|ns| ns["path"].as_str())
        .filter_map(|p| p.strip_prefix("/proc/")?.split_once("/ns/")?.0.parse().ok())
        .collect();
    if pids.is_empty() {
        return None;
    }
    std::fs::read_dir(g.root())
        .ok()?
        .flatten()
        .filter_map(|e| load(g, &e.file_name().to_string_lossy()).ok())
        .find(|r| pids.contains(&r.pid) && crate::ls::alive(r.pid))
}

fn write_pid_file(p: &Path, pid: u32) -> Result<()> {
    let tmp = p.with_extension("tmp-bulkhead");
    std::fs::write(&tmp, pid.to_string())?;
    std::fs::rename(&tmp, p).with_context(|| format!("cannot write {}", p.display()))
}

/// The container's status as runc reports it.
async fn status(client: &Client, r: &Record) -> String {
    let Ok(sb) = client.sandbox(&r.sandbox).await else {
        return "stopped".into();
    };
    let containers = sb.containers().await.unwrap_or_default();
    match containers
        .iter()
        .find(|(id, _)| *id == r.id)
        .map(|x| x.1.as_str())
    {
        Some("created") => "created",
        Some("running") => "running",
        Some("paused") => "paused",
        _ => "stopped",
    }
    .into()
}

fn state_json(r: &Record, status: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "id": r.id,
        "status": status,
        "pid": if status == "stopped" { 0 } else { r.pid },
        "bundle": r.bundle,
        "rootfs": r.rootfs,
        "created": r.created,
        "owner": "",
        "annotations": r.annotations,
    })
}

pub async fn state(g: &Global, id: &str) -> Result<i32> {
    let r = load(g, id)?;
    let client = Client::connect().await?;
    let st = status(&client, &r).await;
    println!("{}", serde_json::to_string_pretty(&state_json(&r, &st))?);
    Ok(0)
}

pub async fn start(g: &Global, id: &str) -> Result<i32> {
    let r = load(g, id)?;
    let client = Client::connect().await?;
    let sb = client.sandbox(&r.sandbox).await?;
    sb.start_container(&r.id).await.map_err(explain)?;
    // Poststart failures are reported, not fatal (the container already runs).
    if let Err(e) = crate::hooks::run_stage(&r.hooks, "poststart", &state_json(&r, "running")) {
        tracing::warn!("{e:#}");
    }
    Ok(0)
}

/// A signal by number or name (`9`, `KILL`, `SIGKILL`).
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal {s}: out of range");
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| anyhow!("unknown signal {s:?}"))
}

pub async fn kill(g: &Global, id: &str, sig: &str, all: bool) -> Result<i32> {
    let sig = parse_signal(sig)?;
    let client = Client::connect().await?;
    let sb = client.sandbox(&locate(g, &client, id).await?).await?;
    sb.signal(id, "", sig, all).await.map_err(explain)?;
    Ok(0)
}

pub async fn delete(g: &Global, id: &str, force: bool) -> Result<i32> {
    let r = load(g, id)?;
    let client = Client::connect().await?;
    let st = status(&client, &r).await;
    if !force && (st == "running" || st == "paused") {
        bail!("container {id} is {st}: stop it first or use --force");
    }
    // A pod member leaves the pod's VM running; the container that made the sandbox
    // takes it down (podman removes a pod's infra container last).
    let gone = if r.sandbox == r.id {
        client.manager.remove_sandbox(&r.sandbox, true).await
    } else {
        match client.sandbox(&r.sandbox).await {
            Ok(sb) => sb.delete_container(&r.id, true).await,
            Err(_) => Ok(()),
        }
    };
    match gone {
        Err(zbus::Error::MethodError(n, _, _)) if n.as_str().ends_with(".NotFound") => {}
        Err(e) => return Err(explain(e)),
        Ok(()) => {}
    }
    if let Err(e) = crate::hooks::run_stage(&r.hooks, "poststop", &state_json(&r, "stopped")) {
        tracing::warn!("{e:#}");
    }
    std::fs::remove_dir_all(g.root().join(id))?;
    Ok(0)
}

pub async fn pause(g: &Global, id: &str, pause: bool) -> Result<i32> {
    let client = Client::connect().await?;
    let sb = client.sandbox(&locate(g, &client, id).await?).await?;
    if pause {
        sb.pause(id).await
    } else {
        sb.resume(id).await
    }
    .map_err(explain)?;
    Ok(0)
}

pub async fn ps(g: &Global, id: &str, json_out: bool) -> Result<i32> {
    let client = Client::connect().await?;
    let sb = client.sandbox(&locate(g, &client, id).await?).await?;
    let pids = sb.processes(id).await.map_err(explain)?;
    if json_out {
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        println!("PID");
        for p in pids {
            println!("{p}");
        }
    }
    Ok(0)
}

pub async fn list(g: &Global, quiet: bool, json_out: bool) -> Result<i32> {
    let client = Client::connect().await?;
    let mut rows = vec![];
    if let Ok(rd) = std::fs::read_dir(g.root()) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(r) = load(g, &id) {
                let st = status(&client, &r).await;
                rows.push(state_json(&r, &st));
            }
        }
    }
    if json_out {
        println!("{}", serde_json::to_string(&rows)?);
    } else if quiet {
        for r in rows {
            println!("{}", r["id"].as_str().unwrap_or(""));
        }
    } else {
        println!(
            "{:<20} {:<8} {:<10} {:<40} CREATED",
            "ID", "PID", "STATUS", "BUNDLE"
        );
        for r in rows {
            println!(
                "{:<20} {:<8} {:<10} {:<40} {}",
                r["id"].as_str().unwrap_or(""),
                r["pid"],
                r["status"].as_str().unwrap_or(""),
                r["bundle"].as_str().unwrap_or(""),
                r["created"].as_str().unwrap_or("")
            );
        }
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// OCI linux.resources JSON file ("-" for stdin).
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory: Option<i64>,
    /// CPU quota in microseconds per period.
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// For a container `bulkhead run` made (no OCI state): the sandbox it runs in; by
    /// default the sandbox of the same id, as `bulkhead run --name` makes them.
    #[arg(long)]
    pub sandbox: Option<String>,
    pub id: String,
}

pub async fn update(g: &Global, a: UpdateArgs) -> Result<i32> {
    // An OCI container's record names its sandbox; any other container is found by
    // the sandbox it was put in.
    let (sandbox, cid) = match (&a.sandbox, load(g, &a.id)) {
        (None, Ok(r)) => (r.sandbox, r.id),
        (Some(s), _) => (s.clone(), a.id.clone()),
        // A record that is there but unreadable is reported, not taken for none.
        (None, Err(e)) if record_path(g, &a.id).exists() => return Err(e),
        (None, Err(_)) => (a.id.clone(), a.id.clone()),
    };
    bulkhead_dbus::valid_id(&sandbox).map_err(anyhow::Error::msg)?;
    bulkhead_dbus::valid_id(&cid).map_err(anyhow::Error::msg)?;
    let mut res: Value = match &a.resources {
        Some(p) if p.as_os_str() == "-" => serde_json::from_reader(std::io::stdin())?,
        Some(p) => serde_json::from_slice(&std::fs::read(p)?)
            .with_context(|| format!("{}: not JSON", p.display()))?,
        None => json!({}),
    };
    if let Some(m) = a.memory {
        res["memory"] = json!({"limit": m});
    }
    if a.cpu_quota.is_some() || a.cpu_period.is_some() {
        res["cpu"] = json!({"quota": a.cpu_quota, "period": a.cpu_period});
    }
    if let Some(p) = a.pids_limit {
        res["pids"] = json!({"limit": p});
    }
    let client = Client::connect().await?;
    let sb = client.sandbox(&sandbox).await?;
    sb.update(&cid, &res.to_string()).await.map_err(explain)?;
    Ok(0)
}

pub async fn events(g: &Global, id: &str, stats: bool, interval_s: u64) -> Result<i32> {
    let r = load(g, id)?;
    let client = Client::connect().await?;
    let sb = client.sandbox(&r.sandbox).await?;
    loop {
        let s = sb.stats(&r.id).await.map_err(explain)?;
        let get = |k: &str| s.get(k).copied().unwrap_or(0);
        let ev = json!({
            "type": "stats",
            "id": r.id,
            "data": {
                "cpu": {"usage": {"total": get("cpu_usage_usec") * 1000,
                                   "user": get("cpu_user_usec") * 1000,
                                   "kernel": get("cpu_system_usec") * 1000}},
                "memory": {"usage": {"usage": get("memory_current"), "limit": get("memory_limit")}},
                "pids": {"current": get("pids_current"), "limit": get("pids_limit")},
            }
        });
        println!("{ev}");
        if stats {
            return Ok(0);
        }
        tokio::time::sleep(std::time::Duration::from_secs(interval_s.max(1))).await;
    }
}

pub fn features() -> Result<i32> {
    let v = json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {"org.bulkhead.runtime": "vm"}
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// An OCI process JSON file instead of COMMAND.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    #[arg(short, long)]
    pub tty: bool,
    /// Copy stdin to the process.
    #[arg(short, long)]
    pub interactive: bool,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub cwd: Option<String>,
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// uid[:gid]
    #[arg(short, long)]
    pub user: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub process_label: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// The container an id names: an OCI container in `--root`, else a container in some
/// sandbox (a `bulkhead run` container).
async fn locate(g: &Global, client: &Client, id: &str) -> Result<String> {
    if let Ok(r) = load(g, id) {
        return Ok(r.sandbox);
    }
    bulkhead_dbus::valid_id(id).map_err(anyhow::Error::msg)?;
    if client.manager.get_sandbox(id).await.is_ok() {
        return Ok(id.to_string());
    }
    for (sid, _, _, _) in client.manager.list_sandboxes().await.map_err(explain)? {
        if let Ok(sb) = client.sandbox(&sid).await {
            if sb
                .containers()
                .await
                .unwrap_or_default()
                .iter()
                .any(|(c, _)| c == id)
            {
                return Ok(sid);
            }
        }
    }
    bail!("container {id:?} does not exist")
}

pub async fn exec(g: &Global, a: ExecArgs) -> Result<i32> {
    if a.preserve_fds != 0 {
        bail!("--preserve-fds: host file descriptors cannot be passed into a VM");
    }
    let mut process: Value = match &a.process {
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{}: not a valid OCI process", p.display()))?,
        None => {
            if a.command.is_empty() {
                bail!("exec: give a COMMAND or --process");
            }
            let mut p = serde_json::to_value(oci_spec::runtime::Process::default())?;
            p["args"] = json!(a.command);
            p
        }
    };
    if a.tty {
        process["terminal"] = json!(true);
    }
    if let Some(c) = &a.cwd {
        process["cwd"] = json!(c);
    }
    if !a.env.is_empty() {
        let mut env: Vec<Value> = process["env"].as_array().cloned().unwrap_or_default();
        env.extend(a.env.iter().map(|e| json!(e)));
        process["env"] = json!(env);
    }
    if let Some(u) = &a.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        let (uid, gid): (u32, u32) = (
            uid.parse()
                .map_err(|_| anyhow!("--user {u}: want uid[:gid]"))?,
            gid.parse()
                .map_err(|_| anyhow!("--user {u}: want uid[:gid]"))?,
        );
        process["user"] = json!({"uid": uid, "gid": gid});
    }
    let tty = process["terminal"].as_bool().unwrap_or(false);
    if tty && a.detach && a.console_socket.is_none() {
        bail!("a detached exec with a terminal needs --console-socket");
    }
    let client = Client::connect().await?;
    let sandbox = locate(g, &client, &a.id).await?;
    let sb = client.sandbox(&sandbox).await?;
    let exec_id = format!("exec-{}", bulkhead_dbus::random_id());
    let mut opts: HashMap<&str, V<'_>> = HashMap::new();
    opts.insert("stdin", V::from(true));
    sb.exec(&a.id, &exec_id, &process.to_string(), opts)
        .await
        .map_err(explain)?;
    if a.detach {
        let mut margs = vec![
            "--sandbox".to_string(),
            sandbox,
            "--container".into(),
            a.id.clone(),
            "--exec-id".into(),
            exec_id,
        ];
        if let Some(s) = &a.console_socket {
            margs.extend(["--console-socket".into(), s.display().to_string()]);
        } else if tty {
            margs.push("--tty".into());
        }
        let pid = monitor::spawn(&margs, true)?;
        if let Some(p) = &a.pid_file {
            write_pid_file(p, pid)?;
        }
        return Ok(0);
    }
    let attached = attach::attach(&sb, &a.id, &exec_id, a.interactive || tty, tty).await?;
    let _raw = if tty {
        stdio::RawTerminal::enter()
    } else {
        None
    };
    if tty {
        if let Some((rows, cols)) = stdio::window_size(std::os::fd::AsFd::as_fd(&std::io::stdin()))
        {
            let _ = sb.resize_pty(&a.id, &exec_id, rows, cols).await;
        }
    }
    let status = tokio::task::spawn_blocking(move || attached.finish()).await??;
    Ok(status.code)
}

#[derive(clap::Args, Debug)]
pub struct OciRunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    #[arg(short, long)]
    pub detach: bool,
}

/// `run --bundle`: create, start, and (unless detached) follow the monitor to the end.
pub async fn run(g: &Global, a: OciRunArgs) -> Result<i32> {
    let id = a.create.id.clone();
    create(g, a.create).await?;
    start(g, &id).await?;
    if a.detach {
        return Ok(0);
    }
    let r = load(g, &id)?;
    let exit = g.root().join(&id).join("exit");
    while crate::ls::alive(r.pid) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let code = std::fs::read_to_string(&exit)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(137);
    delete(g, &id, true).await?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_number_and_name() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn rfc3339_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T');
        assert!(t.starts_with("20"));
    }
}
