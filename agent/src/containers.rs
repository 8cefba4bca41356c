//! Containers in the guest, on youki's libcontainer.
//!
//! The agent keeps, per container, what libcontainer does not: the stdio ends, the exit
//! cells the reaper fills, the exec'd processes. libcontainer keeps the OCI state under
//! `<state>/lc/<id>`; the spec as rewritten for the guest sits in `<state>/bundles/<id>`.
//!
//! libcontainer calls are serialized (one create, start, kill or delete at a time): they
//! fork, and a fork taken in the middle of another create would carry that create's pipe
//! ends into an unrelated container until it execs. Waits never take that lock.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulkhead_protocol::{
    AgentError, ContainerInfo, ContainerState, ContainerStats, CreateContainer, ExecProcess,
    ExitStatus, Rootfs, SandboxConfig, StdioStream, MAX_ID_LEN,
};
use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

use crate::reaper::{ExitCell, Reaper};
use crate::stdio::{ChildIo, ProcIo};

/// Cgroup (v2) directory under which every container's cgroup is made.
const CGROUP_PARENT: &str = "bulkhead";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Most containers, and execs per container, one agent keeps.
const MAX_CONTAINERS: usize = 1024;
/// How long a delete waits for SIGKILLed processes to leave their cgroup.
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_EXECS: usize = 1024;
/// OOM kills queued for [`Runtime::wait_oom`] before the oldest are dropped.
const MAX_OOM_QUEUE: usize = 256;

struct Proc {
    pid: u32,
    exit: Arc<ExitCell>,
    io: Arc<ProcIo>,
}

struct Ctr {
    init: Proc,
    execs: HashMap<String, Proc>,
    block_mount: Option<PathBuf>,
    oom_kills: u64,
}

struct Sandbox {
    holder: std::process::Child,
    ipc: PathBuf,
    uts: PathBuf,
    pid: Option<PathBuf>,
}

#[derive(Default)]
struct OomQueue {
    ids: Mutex<VecDeque<String>>,
    cv: Condvar,
}

pub struct Runtime {
    state: PathBuf,
    /// In a guest: SetTime may set the clock.
    in_guest: bool,
    reaper: Arc<Reaper>,
    tables: Mutex<Tables>,
    lc: Mutex<()>,
    oom: OomQueue,
}

#[derive(Default)]
struct Tables {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Ctr>,
}

fn runtime_err(e: impl std::error::Error) -> AgentError {
    // libcontainer wraps errors transparently; the chain holds the useful part.
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.contains(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = s.source();
    }
    AgentError::Runtime(msg)
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::Io(format!("{what}: {e}"))
}

pub fn validate_id(id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "id {:?}: 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], not starting with '.'",
            id.chars().take(MAX_ID_LEN + 1).collect::<String>()
        )))
    }
}

fn not_found(id: &str) -> AgentError {
    AgentError::NotFound(format!("container {id}"))
}

impl Runtime {
    pub fn new(state: PathBuf, in_guest: bool, reaper: Arc<Reaper>) -> Arc<Self> {
        let rt = Arc::new(Runtime {
            state,
            in_guest,
            reaper,
            tables: Mutex::new(Tables::default()),
            lc: Mutex::new(()),
            oom: OomQueue::default(),
        });
        let weak = Arc::downgrade(&rt);
        let _ = std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || oom_watch(weak));
        rt
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lc_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lc_root(&self) -> PathBuf {
        self.state.join("lc")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.state.join("bundles").join(id)
    }

    fn cgroup_rel(id: &str) -> String {
        format!("/{CGROUP_PARENT}/{id}")
    }

    fn cgroup_dir(id: &str) -> PathBuf {
        Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(id)
    }

    fn load(&self, id: &str) -> Result<Container, AgentError> {
        Container::load(self.lc_root().join(id)).map_err(runtime_err)
    }

    // ---- sandbox ----

    pub fn create_sandbox(&self, cfg: SandboxConfig) -> Result<(), AgentError> {
        if let Some(h) = &cfg.hostname {
            if h.is_empty() || h.len() > 64 || h.contains('\0') {
                return Err(AgentError::InvalidArgument(format!("hostname {h:?}")));
            }
        }
        let mut t = self.tables();
        if t.sandbox.is_some() {
            return Err(AgentError::AlreadyExists("sandbox".into()));
        }
        let exe = std::env::current_exe().map_err(io_err("own executable"))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--ns-holder");
        if cfg.share_pid {
            cmd.arg("--pid");
        }
        if let Some(h) = &cfg.hostname {
            cmd.arg("--hostname").arg(h);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if cfg.share_pid {
            flags |= libc::CLONE_NEWPID;
        }
        use std::os::unix::process::CommandExt;
        // SAFETY: unshare is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let since = Instant::now();
        let mut child = cmd.spawn().map_err(io_err("sandbox namespace holder"))?;
        // The holder prints one line once its namespaces are ready: its pid-namespace
        // init's pid (0 without a shared PID namespace).
        let mut line = String::new();
        {
            use std::io::BufRead;
            let out = child
                .stdout
                .take()
                .ok_or_else(|| AgentError::Io("holder stdout".into()))?;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        // The holder's exit, if it ever comes, is the reaper's to collect.
        let _ = self.reaper.watch(child.id() as i32, since);
        let pid_init: u32 = line.trim().parse().map_err(|_| {
            let _ = child.kill();
            AgentError::Io(format!(
                "sandbox holder failed to start ({:?})",
                line.trim()
            ))
        })?;
        let ns = |n: &str| PathBuf::from(format!("/proc/{}/ns/{n}", child.id()));
        t.sandbox = Some(Sandbox {
            ipc: ns("ipc"),
            uts: ns("uts"),
            pid: cfg
                .share_pid
                .then(|| PathBuf::from(format!("/proc/{pid_init}/ns/pid"))),
            holder: child,
        });
        Ok(())
    }

    pub fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let ids: Vec<String> = self.tables().containers.keys().cloned().collect();
        let mut failed = Vec::new();
        for id in ids {
            if let Err(e) = self.delete(&id, true) {
                crate::log(&format!("destroy sandbox: delete {id}: {e}"));
                failed.push(format!("{id}: {e}"));
            }
        }
        let sb = self.tables().sandbox.take();
        match sb {
            Some(mut sb) => {
                let _ = sb.holder.kill();
                if failed.is_empty() {
                    Ok(())
                } else {
                    // The sandbox is gone either way; the caller learns what is left.
                    Err(AgentError::Runtime(format!(
                        "sandbox destroyed, containers not deleted: {}",
                        failed.join("; ")
                    )))
                }
            }
            None => Err(AgentError::NotFound("sandbox".into())),
        }
    }

    // ---- containers ----

    /// The spec as the guest runs it.
    fn rewrite_spec(&self, id: &str, mut spec: Spec, root: &Path) -> Result<Spec, AgentError> {
        let t = self.tables();
        let sb = t.sandbox.as_ref();
        let mut root_cfg = spec.root().clone().unwrap_or_default();
        root_cfg.set_path(root.to_path_buf());
        spec.set_root(Some(root_cfg));
        let linux = spec.linux_mut().get_or_insert_with(Default::default);
        let mut out = Vec::new();
        for ns in linux.namespaces().clone().unwrap_or_default() {
            let typ = ns.typ();
            let mut ns = ns;
            match (typ, ns.path().is_some()) {
                // The VM is the network boundary: every container uses the guest's.
                (LinuxNamespaceType::Network, _) => continue,
                (_, false) => {}
                (LinuxNamespaceType::Ipc, true) | (LinuxNamespaceType::Uts, true) => {
                    let sb = sb.ok_or_else(|| {
                        AgentError::InvalidArgument(format!(
                            "spec joins a {typ:?} namespace by path but there is no sandbox"
                        ))
                    })?;
                    let p = if typ == LinuxNamespaceType::Ipc {
                        &sb.ipc
                    } else {
                        &sb.uts
                    };
                    ns.set_path(Some(p.clone()));
                }
                (LinuxNamespaceType::Pid, true) => {
                    match sb.and_then(|s| s.pid.clone()) {
                        Some(p) => ns.set_path(Some(p)),
                        // The pod does not share its PID namespace: a new one.
                        None => ns.set_path(None),
                    };
                }
                (other, true) => {
                    return Err(AgentError::InvalidArgument(format!(
                        "cannot join a {other:?} namespace by path inside the sandbox"
                    )))
                }
            }
            out.push(ns);
        }
        linux.set_namespaces(Some(out));
        linux.set_cgroups_path(Some(PathBuf::from(Self::cgroup_rel(id))));
        // The pod's network namespace is the VM's: its net.* sysctls are set there (the
        // container runtime would refuse them without a namespace of the container's own).
        if let Some(sysctls) = linux.sysctl().clone() {
            let (net, rest): (HashMap<_, _>, HashMap<_, _>) = sysctls
                .into_iter()
                .partition(|(k, _)| k.starts_with("net."));
            if !net.is_empty() && !self.in_guest {
                return Err(AgentError::Unsupported(
                    "net.* sysctls outside a guest would change the host's network".into(),
                ));
            }
            for (k, v) in &net {
                set_net_sysctl(k, v)?;
            }
            linux.set_sysctl(Some(rest));
        }
        Ok(spec)
    }

    fn prepare_rootfs(
        &self,
        id: &str,
        rootfs: &Rootfs,
    ) -> Result<(PathBuf, Option<PathBuf>), AgentError> {
        match rootfs {
            Rootfs::Path(p) => {
                let p = PathBuf::from(p);
                if !p.is_absolute() || !p.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs {} is not an existing directory",
                        p.display()
                    )));
                }
                Ok((p, None))
            }
            Rootfs::Block {
                device,
                fstype,
                readonly,
            } => {
                if !device.starts_with("/dev/") || !Path::new(device).exists() {
                    return Err(AgentError::InvalidArgument(format!(
                        "block rootfs {device:?} is not a device under /dev"
                    )));
                }
                if !matches!(
                    fstype.as_str(),
                    "ext4" | "erofs" | "xfs" | "btrfs" | "squashfs"
                ) {
                    return Err(AgentError::InvalidArgument(format!(
                        "block rootfs fstype {fstype:?}"
                    )));
                }
                let target = self.state.join("rootfs").join(id);
                std::fs::create_dir_all(&target).map_err(io_err("rootfs mountpoint"))?;
                let flags = if *readonly || fstype == "erofs" || fstype == "squashfs" {
                    libc::MS_RDONLY
                } else {
                    0
                };
                crate::sys::mount(device, &target.to_string_lossy(), fstype, flags, "")
                    .map_err(|e| AgentError::Io(format!("mount {device} ({fstype}): {e}")))?;
                Ok((target.clone(), Some(target)))
            }
        }
    }

    pub fn create(&self, req: CreateContainer) -> Result<u32, AgentError> {
        validate_id(&req.id)?;
        let id = req.id.clone();
        {
            let t = self.tables();
            if t.containers.contains_key(&id) {
                return Err(AgentError::AlreadyExists(format!("container {id}")));
            }
            if t.containers.len() >= MAX_CONTAINERS {
                return Err(AgentError::InvalidArgument(format!(
                    "more than {MAX_CONTAINERS} containers"
                )));
            }
        }
        let spec: Spec = serde_json::from_str(&req.spec_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI spec: {e}")))?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let (root, block_mount) = self.prepare_rootfs(&id, &req.rootfs)?;
        let undo_mount = |m: &Option<PathBuf>| {
            if let Some(m) = m {
                crate::sys::umount(m);
            }
        };
        let spec = match self.rewrite_spec(&id, spec, &root) {
            Ok(s) => s,
            Err(e) => {
                undo_mount(&block_mount);
                return Err(e);
            }
        };
        let bundle = self.bundle(&id);
        let res = (|| {
            std::fs::create_dir_all(&bundle).map_err(io_err("bundle"))?;
            std::fs::write(
                bundle.join("config.json"),
                serde_json::to_vec(&spec).map_err(|e| AgentError::Io(e.to_string()))?,
            )
            .map_err(io_err("config.json"))?;
            let _lc = self.lc_lock();
            let since = Instant::now();
            let (io, pid) = self.spawn_with_stdio(&id, terminal, req.stdin, |b| {
                let c = b
                    .as_init(&bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .map_err(runtime_err)?;
                c.pid()
                    .map(|p| p.as_raw())
                    .ok_or_else(|| AgentError::Runtime("container has no pid".into()))
            })?;
            let exit = self.reaper.watch(pid, since);
            Ok(Proc {
                pid: pid as u32,
                exit,
                io,
            })
        })();
        match res {
            Ok(init) => {
                let pid = init.pid;
                self.tables().containers.insert(
                    id,
                    Ctr {
                        init,
                        execs: HashMap::new(),
                        block_mount,
                        oom_kills: 0,
                    },
                );
                Ok(pid)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                undo_mount(&block_mount);
                Err(e)
            }
        }
    }

    /// Run a libcontainer build with fresh stdio (pipes, or a terminal received over a
    /// console socket). Returns the agent's stdio ends and the new process's pid.
    fn spawn_with_stdio(
        &self,
        id: &str,
        terminal: bool,
        stdin: bool,
        build: impl FnOnce(ContainerBuilder) -> Result<i32, AgentError>,
    ) -> Result<(Arc<ProcIo>, i32), AgentError> {
        let base = ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(self.lc_root())
            .map_err(runtime_err)?;
        if !terminal {
            let (io, child) = ProcIo::pipes(stdin)?;
            let ChildIo {
                stdin,
                stdout,
                stderr,
            } = child;
            let mut b = base;
            if let Some(f) = stdin {
                b = b.with_stdin(f);
            }
            if let Some(f) = stdout {
                b = b.with_stdout(f);
            }
            if let Some(f) = stderr {
                b = b.with_stderr(f);
            }
            let pid = build(b)?;
            return Ok((Arc::new(io), pid));
        }
        let dir = self.state.join("console");
        std::fs::create_dir_all(&dir).map_err(io_err("console dir"))?;
        // Builds run one at a time (the lc lock), so a counter keeps names apart.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let sock = dir.join(format!("{}.sock", SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io_err("console socket"))?;
        let receiver = std::thread::Builder::new()
            .name("console-recv".into())
            .spawn(move || receive_master(listener))
            .map_err(io_err("console receiver thread"))?;
        let built = build(base.with_console_socket(Some(&sock)));
        if built.is_err() {
            // Unblock the receiver if libcontainer never connected.
            let _ = std::os::unix::net::UnixStream::connect(&sock);
        }
        let master = receiver
            .join()
            .map_err(|_| AgentError::Io("console receiver panicked".into()))?;
        let _ = std::fs::remove_file(&sock);
        let pid = built?;
        let master = master?;
        Ok((Arc::new(ProcIo::terminal(master)?), pid))
    }

    pub fn start(&self, id: &str) -> Result<(), AgentError> {
        self.get_init(id)?;
        let _lc = self.lc_lock();
        let mut c = self.load(id)?;
        if !c.can_start() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is {:?}",
                c.status()
            )));
        }
        c.start().map_err(runtime_err)
    }

    pub fn exec(&self, req: ExecProcess) -> Result<u32, AgentError> {
        validate_id(&req.id)?;
        validate_id(&req.exec_id)?;
        let process: Process = serde_json::from_str(&req.process_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI process: {e}")))?;
        {
            let t = self.tables();
            let c = t
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            // An exec id whose process has exited may be used again (containerd reuses
            // them once the exec is deleted); a live one may not.
            if c.execs
                .get(&req.exec_id)
                .is_some_and(|p| p.exit.get().is_none())
            {
                return Err(AgentError::AlreadyExists(format!("exec {}", req.exec_id)));
            }
            // The cap is on live execs: a probe that execs every 10 s must run forever.
            let live = c.execs.values().filter(|p| p.exit.get().is_none()).count();
            if live >= MAX_EXECS {
                return Err(AgentError::InvalidArgument(format!(
                    "more than {MAX_EXECS} live execs"
                )));
            }
            if c.init.exit.get().is_some() {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {} has stopped",
                    req.id
                )));
            }
        }
        let _lc = self.lc_lock();
        let st = self.load(&req.id)?.status();
        if st != ContainerStatus::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {} is {st:?}",
                req.id
            )));
        }
        let path = self
            .bundle(&req.id)
            .join(format!("exec-{}.json", req.exec_id));
        std::fs::write(
            &path,
            serde_json::to_vec(&process).map_err(|e| AgentError::Io(e.to_string()))?,
        )
        .map_err(io_err("exec process.json"))?;
        let since = Instant::now();
        let terminal = process.terminal().unwrap_or(false);
        let res = self.spawn_with_stdio(&req.id, terminal, req.stdin, |b| {
            b.as_tenant()
                .with_detach(true)
                .with_process(Some(&path))
                .build()
                .map(|p| p.as_raw())
                .map_err(runtime_err)
        });
        let _ = std::fs::remove_file(&path);
        let (io, pid) = res?;
        let exit = self.reaper.watch(pid, since);
        let mut t = self.tables();
        let c = t
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        c.execs.insert(
            req.exec_id,
            Proc {
                pid: pid as u32,
                exit,
                io,
            },
        );
        Ok(pid as u32)
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: Option<&str>,
        f: impl FnOnce(&Proc) -> T,
    ) -> Result<T, AgentError> {
        let t = self.tables();
        let c = t.containers.get(id).ok_or_else(|| not_found(id))?;
        match exec_id {
            None => Ok(f(&c.init)),
            Some(e) => c
                .execs
                .get(e)
                .map(f)
                .ok_or_else(|| AgentError::NotFound(format!("exec {e} in container {id}"))),
        }
    }

    fn get_init(&self, id: &str) -> Result<u32, AgentError> {
        self.with_proc(id, None, |p| p.pid)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        sig: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let signal = libcontainer::signal::Signal::try_from(sig)
            .map_err(|_| AgentError::InvalidArgument(format!("signal {sig}")))?;
        let (pid, exited) = self.with_proc(id, exec_id, |p| (p.pid, p.exit.get().is_some()))?;
        if exec_id.is_some() || !all {
            if exited {
                return Err(AgentError::FailedPrecondition(format!(
                    "process {pid} has exited"
                )));
            }
            if exec_id.is_some() {
                // The pid is still ours: its exit has not been recorded, so it is not
                // reaped and cannot have been reused.
                let sig = nix::sys::signal::Signal::try_from(sig)
                    .map_err(|_| AgentError::InvalidArgument(format!("signal {sig}")))?;
                return nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
                    .map_err(|e| AgentError::Io(format!("kill {pid}: {e}")));
            }
        }
        let _lc = self.lc_lock();
        let mut c = self.load(id)?;
        c.kill(signal, all).map_err(runtime_err)
    }

    /// Wait for a process to exit. An exec whose exit has been collected is forgotten
    /// (its id free again), so execs never pile up in a long-lived container.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus, AgentError> {
        let cell = self.with_proc(id, exec_id, |p| p.exit.clone())?;
        let status = cell.wait();
        if let Some(e) = exec_id {
            let mut t = self.tables();
            if let Some(c) = t.containers.get_mut(id) {
                if c.execs.get(e).is_some_and(|p| Arc::ptr_eq(&p.exit, &cell)) {
                    c.execs.remove(e);
                }
            }
        }
        Ok(status)
    }

    pub fn delete(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let init_exit = self.with_proc(id, None, |p| p.exit.clone())?;
        let exited = init_exit.get().is_some();
        {
            let _lc = self.lc_lock();
            match self.load(id) {
                Ok(mut c) => {
                    if !force && !exited && c.status() == ContainerStatus::Running {
                        return Err(AgentError::FailedPrecondition(format!(
                            "container {id} is running; stop it or delete with force"
                        )));
                    }
                    // Kill here rather than in libcontainer: it gives the processes
                    // about 100 ms to leave the cgroup, too short for a loaded TCG
                    // guest. Then wait for the reaper to collect the init, so that
                    // libcontainer finds it gone instead of racing the reaper for
                    // /proc/<pid>/stat.
                    if !crate::cgroupfs::kill_all(&Self::cgroup_dir(id), KILL_TIMEOUT) {
                        crate::log(&format!("delete {id}: cgroup not empty after SIGKILL"));
                    }
                    if init_exit.wait_timeout(KILL_TIMEOUT).is_none() {
                        crate::log(&format!("delete {id}: init not reaped after SIGKILL"));
                    }
                    c.delete(true).map_err(runtime_err)?;
                }
                // State already gone (a half-finished delete): finish the rest.
                Err(e) => crate::log(&format!("delete {id}: {e}; cleaning up")),
            }
        }
        let ctr = self.tables().containers.remove(id);
        let _ = std::fs::remove_dir_all(self.bundle(id));
        if let Some(Ctr {
            block_mount: Some(m),
            ..
        }) = ctr
        {
            crate::sys::umount(&m);
        }
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<(), AgentError> {
        self.get_init(id)?;
        let _lc = self.lc_lock();
        self.load(id)?.pause().map_err(runtime_err)
    }

    pub fn resume(&self, id: &str) -> Result<(), AgentError> {
        self.get_init(id)?;
        let _lc = self.lc_lock();
        self.load(id)?.resume().map_err(runtime_err)
    }

    fn cgroup(&self, id: &str) -> Result<AnyCgroupManager, AgentError> {
        self.get_init(id)?;
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: PathBuf::from(Self::cgroup_rel(id)),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(runtime_err)
    }

    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), AgentError> {
        let res: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI resources: {e}")))?;
        let m = self.cgroup(id)?;
        m.apply(&ControllerOpt {
            resources: &res,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(runtime_err)
    }

    pub fn processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let m = self.cgroup(id)?;
        let mut pids: Vec<u32> = m
            .get_all_pids()
            .map_err(runtime_err)?
            .into_iter()
            .map(|p| p.as_raw() as u32)
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStats, AgentError> {
        self.get_init(id)?;
        Ok(crate::cgroupfs::stats(&Self::cgroup_dir(id)))
    }

    pub fn list(&self) -> Vec<ContainerInfo> {
        let ids: Vec<(String, u32, bool)> = self
            .tables()
            .containers
            .iter()
            .map(|(id, c)| (id.clone(), c.init.pid, c.init.exit.get().is_some()))
            .collect();
        let mut out: Vec<ContainerInfo> = ids
            .into_iter()
            .map(|(id, pid, exited)| {
                let state = if exited {
                    ContainerState::Stopped
                } else {
                    match self.load(&id).map(|c| c.status()) {
                        Ok(ContainerStatus::Created) | Ok(ContainerStatus::Creating) => {
                            ContainerState::Created
                        }
                        Ok(ContainerStatus::Paused) => ContainerState::Paused,
                        Ok(ContainerStatus::Running) => ContainerState::Running,
                        _ => ContainerState::Stopped,
                    }
                };
                ContainerInfo {
                    id,
                    state,
                    pid: Some(pid),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn attach<C>(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
        conn: C,
        ready: impl FnOnce(&mut C) -> std::io::Result<()>,
    ) -> Result<(), AgentError>
    where
        C: std::io::Read + std::io::Write + Send + 'static,
    {
        let io = self.with_proc(id, exec_id, |p| p.io.clone())?;
        io.attach(stream, conn, ready)
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        self.with_proc(id, exec_id, |p| p.io.clone())?
            .resize(rows, cols)
    }

    pub fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<(), AgentError> {
        self.with_proc(id, exec_id, |p| p.io.close_stdin())
    }

    pub fn set_time(&self, unix_nanos: u64) -> Result<(), AgentError> {
        if !self.in_guest {
            return Err(AgentError::Unsupported(
                "SetTime outside a guest would set the host's clock".into(),
            ));
        }
        let ts = libc::timespec {
            tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(AgentError::Io(format!(
                "clock_settime: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    // ---- OOM events ----

    fn poll_oom(&self) {
        // Read the cgroup files without the tables lock: every call takes that lock.
        let ids: Vec<String> = self.tables().containers.keys().cloned().collect();
        let counts: Vec<(String, u64)> = ids
            .into_iter()
            .filter_map(|id| crate::cgroupfs::oom_kills(&Self::cgroup_dir(&id)).map(|n| (id, n)))
            .collect();
        let mut hits = Vec::new();
        {
            let mut t = self.tables();
            for (id, n) in counts {
                // A container deleted meanwhile is simply not found.
                if let Some(c) = t.containers.get_mut(&id) {
                    // One event per kill: a counter that moved by three is three kills.
                    if n > c.oom_kills {
                        let kills = (n - c.oom_kills).min(MAX_OOM_QUEUE as u64);
                        c.oom_kills = n;
                        hits.extend(std::iter::repeat_n(id, kills as usize));
                    }
                }
            }
        }
        if hits.is_empty() {
            return;
        }
        let mut q = self.oom.ids.lock().unwrap_or_else(|p| p.into_inner());
        for id in hits {
            if q.len() >= MAX_OOM_QUEUE {
                q.pop_front();
            }
            q.push_back(id);
        }
        self.oom.cv.notify_one();
    }

    /// The containers' `memory.events` files, to watch for changes.
    fn memory_events_files(&self) -> Vec<(String, PathBuf)> {
        self.tables()
            .containers
            .keys()
            .map(|id| (id.clone(), Self::cgroup_dir(id).join("memory.events")))
            .collect()
    }

    pub fn wait_oom(&self) -> String {
        let mut q = self.oom.ids.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.oom.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Accept libcontainer's connection on the console socket and take the terminal master
/// it sends.
fn receive_master(listener: UnixListener) -> Result<File, AgentError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (conn, _) = listener.accept().map_err(io_err("console accept"))?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| AgentError::Io(format!("console recvmsg: {e}")))?;
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| AgentError::Io(format!("console cmsgs: {e}")))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(fds) = c {
            let mut it = fds.into_iter();
            if let Some(fd) = it.next() {
                for extra in it {
                    // SAFETY: received descriptors are ours to close.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: the descriptor was just received and is owned by nobody else.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(AgentError::Runtime(
        "no terminal received on the console socket".into(),
    ))
}

/// Set one `net.*` sysctl in the guest (the pod's network namespace).
fn set_net_sysctl(key: &str, value: &str) -> Result<(), AgentError> {
    let ok = key.len() <= 128
        && key.starts_with("net.")
        && key.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if !ok || value.len() > 256 || value.contains('\n') {
        return Err(AgentError::InvalidArgument(format!(
            "sysctl {key}={value:?}: malformed"
        )));
    }
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value)
        .map_err(|e| AgentError::InvalidArgument(format!("sysctl {key}={value}: {e}")))
}

/// Follow OOM kills: every container's `memory.events` is watched with inotify (the
/// cgroup v2 file changes when its counters do), and every change is read at once. The
/// watches are brought in line with the container table on every wake-up, and at least
/// once a second, so a container created meanwhile is covered; counts are compared with
/// what was last seen, so a kill that came before its watch is still counted.
fn oom_watch(rt: std::sync::Weak<Runtime>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
    use std::os::fd::AsFd;

    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok();
    let mut watched: HashMap<String, WatchDescriptor> = HashMap::new();
    loop {
        let Some(runtime) = rt.upgrade() else { return };
        if let Some(ino) = &inotify {
            let files = runtime.memory_events_files();
            watched.retain(|id, wd| {
                let keep = files.iter().any(|(f, _)| f == id);
                if !keep {
                    let _ = ino.rm_watch(*wd);
                }
                keep
            });
            for (id, path) in files {
                if let std::collections::hash_map::Entry::Vacant(slot) = watched.entry(id) {
                    if let Ok(wd) = ino.add_watch(&path, AddWatchFlags::IN_MODIFY) {
                        slot.insert(wd);
                    }
                }
            }
        }
        runtime.poll_oom();
        drop(runtime);
        match &inotify {
            Some(ino) => {
                let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(1000u16));
                // Drain: what changed is read from the files themselves.
                while let Ok(ev) = ino.read_events() {
                    if ev.is_empty() {
                        break;
                    }
                }
            }
            // No inotify: fall back to reading the counters five times a second.
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
