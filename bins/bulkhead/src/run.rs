//! `bulkhead run`: one container in its own VM (or in an existing sandbox), from an
//! image or a root directory, with the container's exit status as ours.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulkhead_client::NewPod;
use bulkhead_dbus::{ContainerOptions, SandboxOptions};
use serde_json::{json, Value};

use crate::attach;
use crate::client::{explain, Client};
use crate::image;
use crate::stdio;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Start the container and print its sandbox id; do not wait. Its output goes to
    /// <state>/logs/<sandbox>/<container>.log.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the sandbox when the container exits.
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open and copy it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// The container's id (and its sandbox's, unless --sandbox); random if unset.
    #[arg(long)]
    pub name: Option<String>,
    /// Run in this existing sandbox instead of a new VM.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// A host directory to use as the root file system instead of an image.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Registry credentials (an auth.json as `podman login` writes it); by default
    /// $REGISTRY_AUTH_FILE, podman's and docker's usual files.
    #[arg(long, value_name = "PATH")]
    pub authfile: Option<PathBuf>,
    /// Hypervisor backend: bulkhead-vmm or qemu (default: what `bulkhead check` picks).
    #[arg(long)]
    pub backend: Option<String>,
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// More guest memory, in MiB (a multiple of 128), that the VM can be given while it
    /// runs (`bulkhead vm SANDBOX --hotplug MIB`); bulkhead-vmm's virtio-mem.
    #[arg(long, value_name = "MIB")]
    pub hotplug: Option<u32>,
    /// The container's memory limit in MiB (its cgroup in the guest). A VM with
    /// hot-plug memory grows to fit its containers' limits.
    #[arg(long, value_name = "MIB")]
    pub container_memory: Option<u64>,
    /// The pod's network: a network namespace (e.g. /run/netns/NAME) whose interfaces
    /// the VM gets. Without it, the container has loopback only.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// What carries the pod network's frames: bulkhead-net (default; restartable on its
    /// own) or vhost-net (the host kernel's; qemu backend only).
    #[arg(long, value_name = "NAME")]
    pub net_backend: Option<String>,
    /// Environment variable for the process (KEY=VALUE).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Bind a host directory into the container (HOST:CONTAINER[:ro]).
    #[arg(short, long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volume: Vec<String>,
    /// runc's `run`: the OCI bundle to run (the container id is the first argument).
    #[arg(short, long)]
    pub bundle: Option<PathBuf>,
    /// With --bundle: where to write the container's pid.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// With --bundle: runc's console socket.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// IMAGE [COMMAND [ARG...]], or COMMAND [ARG...] with --rootfs, or ID with --bundle.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

impl RunArgs {
    /// runc's `run --bundle B ID`.
    pub fn into_oci(self, bundle: PathBuf) -> crate::oci::OciRunArgs {
        crate::oci::OciRunArgs {
            create: crate::oci::CreateArgs {
                bundle,
                pid_file: self.pid_file,
                console_socket: self.console_socket,
                no_pivot: false,
                no_new_keyring: false,
                preserve_fds: 0,
                id: self
                    .name
                    .or_else(|| self.args.first().cloned())
                    .unwrap_or_default(),
            },
            detach: self.detach,
        }
    }
}

/// A runc-style default spec running `args`.
pub fn default_spec(
    args: &[String],
    tty: bool,
    env: &[String],
    cwd: &str,
    hostname: &str,
) -> Value {
    let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("default spec");
    v["process"]["args"] = json!(args);
    v["process"]["terminal"] = json!(tty);
    v["process"]["cwd"] = json!(cwd);
    let mut all_env: Vec<String> =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    if tty {
        all_env.push("TERM=xterm".into());
    }
    for e in env {
        let key = e.split('=').next().unwrap_or_default();
        all_env.retain(|x| x.split('=').next() != Some(key));
        all_env.push(e.clone());
    }
    v["process"]["env"] = json!(all_env);
    v["hostname"] = json!(hostname);
    v["root"] = json!({"path": "rootfs", "readonly": false});
    v
}

fn parse_volume(s: &str) -> Result<(PathBuf, String, bool)> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, ctr, ro) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        _ => bail!("volume {s:?}: want HOST:CONTAINER[:ro]"),
    };
    let host = PathBuf::from(host);
    if !host.is_absolute() || !ctr.starts_with('/') {
        bail!("volume {s:?}: both paths must be absolute");
    }
    if !host.is_dir() {
        bail!("volume {s:?}: {} is not a directory", host.display());
    }
    Ok((host, ctr.to_string(), ro))
}

pub async fn run(a: RunArgs) -> Result<i32> {
    let t0 = Instant::now();
    for e in &a.env {
        if !e.contains('=') {
            bail!("--env {e:?}: want KEY=VALUE");
        }
    }
    let volumes = a
        .volume
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<Vec<_>>>()?;
    let overlay = a.rootfs.is_none();
    let (rootfs, image_cfg, cmd) = match &a.rootfs {
        Some(dir) => {
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("--rootfs {}", dir.display()))?;
            if !dir.is_dir() {
                bail!("--rootfs {}: not a directory", dir.display());
            }
            (dir, image::ImageConfig::default(), a.args.clone())
        }
        None => {
            let Some((reference, rest)) = a.args.split_first() else {
                bail!("bulkhead run: give an IMAGE, or --rootfs DIR and a command");
            };
            let img = image::prepare(reference, a.authfile.as_deref()).await?;
            (img.rootfs, img.config, rest.to_vec())
        }
    };
    let args = image_cfg.command(&cmd);
    if args.is_empty() {
        bail!("no command given and the image has none");
    }
    let id = a.name.clone().unwrap_or_else(bulkhead_dbus::random_id);
    bulkhead_dbus::valid_id(&id).map_err(anyhow::Error::msg)?;
    let mut env = image_cfg.env.clone();
    env.extend(a.env.iter().cloned());
    let cwd = a
        .workdir
        .clone()
        .or(image_cfg.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    let mut spec = default_spec(&args, a.tty, &env, &cwd, &id);
    if let Some(m) = a.container_memory {
        let bytes = m
            .checked_mul(1 << 20)
            .filter(|b| *b > 0 && *b <= i64::MAX as u64)
            .ok_or_else(|| {
                anyhow::anyhow!("--container-memory {m}: want 1 MiB or more, under 2^63 bytes")
            })?;
        spec["linux"]["resources"]["memory"] = json!({ "limit": bytes });
    }
    if a.sandbox.is_some() {
        bulkhead_host::pod::join_pod_namespaces(&mut spec);
    }
    if let Some(user) = &image_cfg.user {
        image::apply_user(&mut spec, user, &rootfs)?;
    }
    let client = Client::connect().await?;
    let t_bus = t0.elapsed();
    for (host, ctr, ro) in &volumes {
        add_volume(&mut spec, host, ctr, *ro)?;
    }
    let own = match &a.sandbox {
        Some(_) => None,
        None => {
            let netns = match &a.netns {
                Some(p) => Some(
                    std::path::absolute(p)
                        .with_context(|| format!("--netns {}", p.display()))?
                        .to_string_lossy()
                        .into_owned(),
                ),
                None => None,
            };
            Some(SandboxOptions {
                backend: a.backend.clone(),
                cpus: a.cpus,
                memory_mib: a.memory,
                hotplug_mib: a.hotplug,
                netns,
                net_backend: a.net_backend.clone(),
                // An image's layer or a plain directory can be idmapped; an overlay
                // mount (a root file system another tool mounted) cannot.
                virtiofsd_userns: Some(!overlay_mounted(&rootfs)),
                ..Default::default()
            })
        }
    };
    let sandbox_id = a.sandbox.clone().unwrap_or_else(|| id.clone());
    let pod = client
        .create_pod(NewPod {
            sandbox: &sandbox_id,
            own,
            container: &id,
            spec_json: &spec.to_string(),
            rootfs: &rootfs.display().to_string(),
            options: ContainerOptions {
                stdin: a.interactive,
                terminal: Some(a.tty),
                overlay,
                ..Default::default()
            },
        })
        .await
        .map_err(explain)?;
    let t_sandbox = t0.elapsed();
    let sb = pod.sandbox.clone();
    let result = async {
        if a.detach {
            // Nobody reads a detached container's output: a monitor keeps it in a log
            // (<state>/logs/<sandbox>/<container>.log), so it never blocks on a full pipe.
            let log = crate::ls::log_dir(&sandbox_id).join(format!("{id}.log"));
            std::fs::create_dir_all(log.parent().unwrap_or(&log))?;
            let margs: Vec<String> = [
                "--sandbox",
                &sandbox_id,
                "--container",
                &id,
                "--log",
                &log.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            crate::monitor::spawn(&margs, false)?;
            sb.start_container(&id).await.map_err(explain)?;
            println!("{sandbox_id}");
            return Ok(0);
        }
        let attached = attach::attach(&sb, &id, "", a.interactive, a.tty).await?;
        let _raw = if a.tty { stdio::RawTerminal::enter() } else { None };
        sb.start_container(&id).await.map_err(explain)?;
        let t_started = t0.elapsed();
        if a.tty {
            if let Some((rows, cols)) = stdio::window_size(std::os::fd::AsFd::as_fd(&std::io::stdin())) {
                let _ = sb.resize_pty(&id, "", rows, cols).await;
            }
        }
        let forward = forward_signals(sb.clone(), id.clone());
        let status = tokio::task::spawn_blocking(move || attached.finish()).await??;
        forward.abort();
        if std::env::var_os("BULKHEAD_TIMINGS").is_some() {
            let timings = sb.timings().await.unwrap_or_default();
            eprintln!(
                "bulkhead: timings ms: bus+manager {:.1}, sandbox and container made {:.1} (manager: vmm exec {:.1}, back ends ready {:.1}, agent ready {:.1}), started {:.1}, exited {:.1}",
                t_bus.as_secs_f64() * 1e3,
                t_sandbox.as_secs_f64() * 1e3,
                timings.get("vmm_exec").copied().unwrap_or(0) as f64 / 1e3,
                timings.get("components_started").copied().unwrap_or(0) as f64 / 1e3,
                timings.get("agent_ready").copied().unwrap_or(0) as f64 / 1e3,
                t_started.as_secs_f64() * 1e3,
                t0.elapsed().as_secs_f64() * 1e3,
            );
        }
        Ok(status.code)
    }
    .await;
    if a.rm && !a.detach {
        let removed = if a.sandbox.is_some() {
            sb.delete_container(&id, true).await
        } else {
            client.manager.remove_sandbox(&sandbox_id, true).await
        };
        if let Err(e) = removed {
            // Gone already (its VM died) is fine; anything else is worth saying.
            if !matches!(&e, zbus::Error::MethodError(n, _, _) if n.as_str().ends_with("NotFound"))
            {
                eprintln!("bulkhead: cannot remove {sandbox_id}: {}", explain(e));
            }
        }
    } else if result.is_err() && a.sandbox.is_none() {
        // The container never ran: leave nothing behind.
        let _ = client.manager.remove_sandbox(&sandbox_id, true).await;
    }
    result
}

/// Bind a host directory into the container. The manager carries every host bind
/// source into the guest over virtio-fs (see `Sandbox1.CreateContainer`).
fn add_volume(spec: &mut Value, host: &std::path::Path, ctr: &str, ro: bool) -> Result<()> {
    let mut opts = vec!["rbind"];
    if ro {
        opts.push("ro");
    }
    spec["mounts"].as_array_mut().context("spec mounts")?.push(
        json!({"destination": ctr, "type": "bind", "source": host.display().to_string(), "options": opts}),
    );
    Ok(())
}

/// Pass SIGINT, SIGTERM and SIGHUP on to the container while we follow it.
fn forward_signals(
    sb: bulkhead_dbus::Sandbox1Proxy<'static>,
    id: String,
) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            let sig = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
                _ = hup.recv() => libc::SIGHUP,
            };
            let _ = sb.signal(&id, "", sig, false).await;
        }
    })
}

/// Is `dir` the root of an overlay mount?
fn overlay_mounted(dir: &std::path::Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct behind the pointer, which lives across the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `c` is NUL-terminated.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC }
}
