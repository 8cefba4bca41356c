//! The agent API test list. The same cases run against an agent in host mode (a real
//! `bulkhead-agent` on a unix socket, inside fresh namespaces on this machine) and against
//! an agent in a guest (behind the VMM's hybrid vsock socket); only [`Env`] differs.

pub mod cases;
pub mod hostmode;
pub mod rootfs;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulkhead_protocol::client::{AgentClient, Endpoint};
use bulkhead_protocol::{CreateContainer, ExitStatus, Rootfs, StdioStream};
use serde_json::{json, Value};

/// What a test run talks to.
pub struct Env {
    pub endpoint: Endpoint,
    /// A busybox rootfs directory as the agent sees it.
    pub rootfs: String,
    /// The agent runs in a guest (SetTime allowed, cgroup controllers present).
    pub in_guest: bool,
    /// A block device holding an ext4 copy of the rootfs, as the agent sees it.
    pub block_rootfs: Option<String>,
    /// A writable host directory and the path the agent sees it at (the same path in
    /// host mode; a virtio-fs share in a guest). Writes through one must show in the other.
    pub share: Option<(std::path::PathBuf, String)>,
}

pub const TIMEOUT: Duration = Duration::from_secs(30);

impl Env {
    pub fn client(&self) -> Result<AgentClient<UnixStream>> {
        Ok(self.endpoint.client(TIMEOUT)?)
    }

    /// Has this agent's cgroup tree a memory controller for containers?
    pub fn has_memory_controller(&self) -> bool {
        self.in_guest
    }
}

/// A runc-style default spec (oci-spec's defaults: namespaces, mounts, masked and
/// read-only paths, capabilities, rlimits, no_new_privileges) running `args`.
pub fn spec(args: &[&str]) -> Value {
    let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("default spec");
    v["process"]["args"] = json!(args);
    v["process"]["terminal"] = json!(false);
    v["root"] = json!({"path": "rootfs", "readonly": true});
    v
}

/// Add a tmpfs at `target` (writable scratch space in a read-only rootfs).
pub fn with_tmpfs(mut v: Value, target: &str) -> Value {
    v["mounts"].as_array_mut().expect("mounts").push(
        json!({"destination": target, "type": "tmpfs", "source": "tmpfs",
                     "options": ["nosuid", "nodev", "mode=1777"]}),
    );
    v
}

pub fn create_req(env: &Env, id: &str, spec: &Value, stdin: bool) -> CreateContainer {
    CreateContainer {
        id: id.into(),
        spec_json: spec.to_string(),
        rootfs: Rootfs::Path(env.rootfs.clone()),
        stdin,
    }
}

/// Read a stream to its end on a thread.
pub fn collect(mut s: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        v
    })
}

/// What one container run gave.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Create, attach, start, wait and delete one container.
pub fn run_container(env: &Env, id: &str, spec: &Value, stdin: Option<&[u8]>) -> Result<Output> {
    let mut c = env.client()?;
    c.create_container(create_req(env, id, spec, stdin.is_some()))
        .with_context(|| format!("create {id}"))?;
    let out = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stdout, TIMEOUT)?,
    );
    let err = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stderr, TIMEOUT)?,
    );
    if let Some(data) = stdin {
        let mut s = env.endpoint.attach(id, None, StdioStream::Stdin, TIMEOUT)?;
        std::io::Write::write_all(&mut s, data)?;
        // Closing our side closes the process's stdin.
    }
    c.start(id).with_context(|| format!("start {id}"))?;
    let status = env.client()?.wait(id, None)?;
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    c.delete(id, false)
        .with_context(|| format!("delete {id}"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Fail with both streams shown unless the run exited 0.
pub fn expect_success(o: &Output) -> Result<()> {
    if o.status.code != 0 {
        bail!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            o.status,
            o.stdout,
            o.stderr
        );
    }
    Ok(())
}

/// The benchmark's spec: `/bin/true` on `rootfs`, no network namespace (the agent never
/// makes one), a cgroup of its own.
pub fn bench_spec(rootfs: &str, id: &str) -> Value {
    let mut s = spec(&["/bin/true"]);
    s["root"] = json!({"path": rootfs, "readonly": true});
    s["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
    ]);
    s["linux"]["cgroupsPath"] = json!(format!("/bulkhead-bench/{id}"));
    s
}

/// One benchmark iteration through the agent: create, start, wait (on a second
/// connection, as a shim would), delete. Returns the wall time.
pub fn bench_once(ep: &Endpoint, rootfs: &str, id: &str) -> Result<Duration> {
    let spec_json = bench_spec(rootfs, id).to_string();
    let t = std::time::Instant::now();
    let mut c = ep.client(TIMEOUT)?;
    let mut w = ep.client(TIMEOUT)?;
    c.create_container(CreateContainer {
        id: id.into(),
        spec_json,
        rootfs: Rootfs::Path(rootfs.into()),
        stdin: false,
    })?;
    c.start(id)?;
    let st = w.wait(id, None)?;
    c.delete(id, false)?;
    let d = t.elapsed();
    if st.code != 0 {
        bail!("agent run {id}: {st:?}");
    }
    Ok(d)
}

/// Median of a sample (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
