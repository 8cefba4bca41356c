//! containerd 1.6 with private roots and our shim on its PATH, for the test list and
//! the `ctr_run` bench: start it (optionally with the CRI plugin, in a network
//! namespace), import images, run `ctr`, call the shim's ttrpc socket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::env::{run_cmd, Env, Out};

pub const RUNTIME: &str = "io.containerd.bulkhead.v2";
pub const IMAGE: &str = "docker.io/test/busybox:latest";

pub struct Containerd {
    dir: PathBuf,
    proc: Child,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the containerd we started.
        unsafe { libc::kill(self.proc.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.proc.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

impl Containerd {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.socket()).args(args);
        c
    }

    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Out> {
        run_cmd(&mut self.ctr(args), stdin, Duration::from_secs(180))
    }

    /// `ctr run --rm --runtime bulkhead IMAGE ID CMD...`
    pub fn run_rm(
        &self,
        id: &str,
        extra: &[&str],
        cmd: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Out> {
        let mut a = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend(extra);
        a.extend([IMAGE, id]);
        a.extend(cmd);
        self.run(&a, stdin)
    }

    /// `ctr run -d --runtime bulkhead [EXTRA] IMAGE ID CMD...`, which must succeed.
    pub fn run_d(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Result<()> {
        let mut a = vec!["run", "-d", "--runtime", RUNTIME];
        a.extend(extra);
        a.extend([IMAGE, id]);
        a.extend(cmd);
        self.run(&a, None)?.ok()?;
        Ok(())
    }

    /// SIGKILL a task, wait until containerd reports it stopped, delete it and its
    /// container.
    pub fn kill_and_remove(&self, id: &str) -> Result<()> {
        self.run(&["task", "kill", "-s", "SIGKILL", id], None)?
            .ok()?;
        let t = Instant::now();
        while self.task(id)?.map(|t| t.0) != Some("STOPPED".into()) {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("{id} not stopped 10 s after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.run(&["task", "delete", id], None)?.ok()?;
        self.run(&["container", "rm", id], None)?.ok()?;
        Ok(())
    }

    /// (status, pid) of a task from `ctr task ls`.
    pub fn task(&self, id: &str) -> Result<Option<(String, u32)>> {
        let o = self.run(&["task", "ls"], None)?;
        o.ok()?;
        Ok(o.stdout.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [task, pid, status, ..] if task == id => {
                    Some((status.to_string(), pid.parse().unwrap_or(0)))
                }
                _ => None,
            }
        }))
    }

    /// The shim's Update call, as containerd makes it, on the shim's own socket.
    pub fn update(&self, id: &str, resources_json: &str) -> Result<()> {
        use containerd_shim_protos::protobuf::well_known_types::any::Any;
        use containerd_shim_protos::protobuf::MessageField;
        let bundle = self
            .dir
            .join("state/io.containerd.runtime.v2.task/default")
            .join(id);
        let address = std::fs::read_to_string(bundle.join("address"))
            .with_context(|| format!("{}/address", bundle.display()))?;
        let client = containerd_shim_protos::ttrpc::Client::connect(address.trim())?;
        let task = containerd_shim_protos::shim_sync::TaskClient::new(client);
        let req = containerd_shim_protos::api::UpdateTaskRequest {
            id: id.into(),
            resources: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: resources_json.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        task.update(
            containerd_shim_protos::ttrpc::context::with_timeout(10_000_000_000),
            &req,
        )
        .map_err(|e| anyhow::anyhow!("shim Update: {e}"))?;
        Ok(())
    }

    /// Import an OCI archive into a containerd namespace under `base`:<tag>.
    pub fn import(&self, archive: &std::path::Path, base: &str, ns: &str) -> Result<()> {
        let a = archive.display().to_string();
        self.run(
            &[
                "-n",
                ns,
                "images",
                "import",
                "--base-name",
                base,
                "--digests",
                &a,
            ],
            None,
        )?
        .ok()?;
        Ok(())
    }

    /// Everything containerd (and the shims, through it) logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = t
            .lines()
            .filter(|l| l.contains("level=error") || l.contains("level=warn"))
            .collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// A containerd of this environment: private root, state and socket, the CRI plugin
/// off, our shim first on its PATH; the busybox image imported.
pub fn start(e: &Env) -> Result<Containerd> {
    start_with(e, None)
}

/// What the CRI plugin needs: its config section (TOML) and the network namespace
/// containerd runs in (CNI's bridge is made there, never in the host's namespace).
pub struct CriSetup {
    pub toml: String,
    pub netns: String,
}

pub fn start_with(e: &Env, cri: Option<&CriSetup>) -> Result<Containerd> {
    let dir = e.dir.join("containerd");
    // Fresh each time: a case retried after a stalled boot must not meet the
    // containers its first try left.
    let _ = std::fs::remove_dir_all(dir.join("state"));
    let _ = std::fs::remove_dir_all(dir.join("root"));
    std::fs::create_dir_all(&dir)?;
    let mut cfg = format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n",
        root = dir.join("root").display(),
        state = dir.join("state").display(),
    );
    if cri.is_none() {
        cfg.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
    }
    cfg.push_str(&format!(
        "[grpc]\n  address = \"{}\"\n",
        dir.join("containerd.sock").display()
    ));
    if let Some(c) = cri {
        cfg.push_str(&c.toml);
    }
    std::fs::write(dir.join("config.toml"), cfg)?;
    let path = format!(
        "{}:{}",
        e.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = match cri {
        // Only the network namespace: `ip netns exec` would also give containerd (and
        // its shims) a mount namespace of their own, where the rootfs a shim mounts is
        // invisible to bulkheadd.
        Some(s) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", s.netns))
                .arg("containerd");
            c
        }
        None => Command::new("containerd"),
    };
    e.env_on(&mut c);
    c.arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("containerd.log"))?);
    let proc = c
        .spawn()
        .context("containerd (apt-get install containerd)")?;
    let ctd = Containerd {
        dir: dir.clone(),
        proc,
    };
    let t = Instant::now();
    while ctd.run(&["version"], None)?.code != 0 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("containerd did not answer within 30 s: {}", ctd.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ctd.import(&e.archive, "docker.io/test/busybox", "default")?;
    let o = ctd.run(&["images", "ls", "-q"], None)?;
    ensure!(o.stdout.contains(IMAGE), "image not imported: {o:?}");
    Ok(ctd)
}
