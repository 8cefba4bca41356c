//! The agent in host mode: the real binary on a unix socket, in fresh mount, PID, network,
//! IPC and UTS namespaces, with a private cgroup2 mount at /sys/fs/cgroup (on a host whose
//! controllers sit in v1 hierarchies, the v2 tree has no controllers: limits and memory
//! figures are then guest-only).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_protocol::client::Endpoint;

pub struct HostAgent {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl HostAgent {
    /// Start `agent` and wait until it answers a health request.
    pub fn start(agent: &Path) -> Result<HostAgent> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("host mode creates namespaces and containers: run as root");
        }
        let dir = std::env::temp_dir().join(format!(
            "bh-hostmode-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("agent.sock");
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let script = format!(
            "set -e; mount --make-rprivate /; \
             umount -l /sys/fs/cgroup 2>/dev/null || true; \
             mount -t cgroup2 none /sys/fs/cgroup; \
             ip link set lo up 2>/dev/null || true; \
             exec {} --listen-unix {} --state-dir {}",
            agent.display(),
            socket.display(),
            dir.join("state").display()
        );
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--net",
                "--ipc",
                "--uts",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("unshare (util-linux)")?;
        let mut a = HostAgent { child, dir, socket };
        let ep = a.endpoint();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = ep.client(Duration::from_secs(2)) {
                if c.health().is_ok() {
                    return Ok(a);
                }
            }
            if let Some(st) = a.child.try_wait()? {
                bail!("agent exited ({st}); log:\n{}", a.log());
            }
            if Instant::now() > deadline {
                bail!("agent did not answer in 20 s; log:\n{}", a.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Is the agent process still alive?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
