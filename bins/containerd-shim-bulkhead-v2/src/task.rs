//! containerd's task API, carried to bulkheadd. A task is a container in the pod's VM;
//! its id is the container id, and `exec_id` names an extra process in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bulkhead_client::{explain, Client, NewPod};
use bulkhead_dbus::{ContainerOptions, Sandbox1Proxy, SandboxOptions};
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal};
use serde_json::Value;
use tokio::sync::OnceCell;
use zbus::zvariant::Value as V;

use crate::io::Stdio;
use crate::metrics;
use crate::pod::{self, Role};
use crate::process::{self, Exit, Process};

type TResult<T> = ttrpc::Result<T>;

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// A bulkheadd error as containerd understands it: named errors become the gRPC codes
/// containerd maps to its own (not found, already exists, ...).
fn from_dbus(e: zbus::Error) -> ttrpc::Error {
    let code = match &e {
        zbus::Error::MethodError(name, _, _) => match name.as_str().rsplit('.').next() {
            Some("NotFound") => Code::NOT_FOUND,
            Some("AlreadyExists") => Code::ALREADY_EXISTS,
            Some("InvalidArgument") => Code::INVALID_ARGUMENT,
            Some("FailedPrecondition") => Code::FAILED_PRECONDITION,
            Some("AccessDenied") => Code::PERMISSION_DENIED,
            _ => Code::UNKNOWN,
        },
        _ => Code::UNAVAILABLE,
    };
    status(code, format!("{:#}", explain(e)))
}

fn other(e: anyhow::Error) -> ttrpc::Error {
    status(Code::UNKNOWN, format!("{e:#}"))
}

/// One container of the pod, as this shim follows it.
struct Task {
    role: Role,
    sandbox: String,
    /// The pod's sandbox object, looked up once at create.
    sb: Sandbox1Proxy<'static>,
    bundle: PathBuf,
    /// Where the shim mounted containerd's rootfs mounts (unmounted on delete).
    mounted_rootfs: Option<PathBuf>,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Task {
    fn process(&self, exec_id: &str) -> TResult<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id:?} does not exist")))
    }

    fn process_mut(&mut self, exec_id: &str) -> TResult<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id:?} does not exist")))
    }
}

type Tasks = Arc<Mutex<HashMap<String, Task>>>;

pub struct Service {
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    client: OnceCell<Client>,
    tasks: Tasks,
}

impl Service {
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        Service {
            namespace,
            publisher: Arc::new(publisher),
            exit,
            client: OnceCell::new(),
            tasks: Arc::default(),
        }
    }

    async fn client(&self) -> TResult<&Client> {
        self.client
            .get_or_try_init(Client::connect_started)
            .await
            .map_err(|e| status(Code::UNAVAILABLE, format!("cannot reach bulkheadd: {e:#}")))
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Task) -> TResult<T>) -> TResult<T> {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        let t = tasks
            .get_mut(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("task {id:?} does not exist")))?;
        f(t)
    }

    /// The sandbox object of the pod task `id` lives in.
    fn proxy(&self, id: &str) -> TResult<Sandbox1Proxy<'static>> {
        self.with(id, |t| Ok(t.sb.clone()))
    }

    async fn publish(&self, event: impl Event + 'static) {
        publish(&self.publisher, &self.namespace, event).await;
    }

    /// Follow a started process to its exit: record it, then tell containerd.
    fn watch_exit(&self, attached: bulkhead_client::Attached, id: String, exec_id: String) {
        let (tasks, publisher, ns) = (
            self.tasks.clone(),
            self.publisher.clone(),
            self.namespace.clone(),
        );
        tokio::spawn(async move {
            let exit = process::finish(attached).await;
            if exec_id.is_empty() {
                log::info!("timings exited id={id} unix_us={}", unix_us());
            }
            let pid = {
                let mut tasks = tasks.lock().expect("tasks lock");
                let Some(p) = tasks
                    .get_mut(&id)
                    .and_then(|t| t.process_mut(&exec_id).ok())
                else {
                    return;
                };
                p.exited(exit.clone());
                p.pid
            };
            let ev = TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() { id } else { exec_id },
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.at),
                ..Default::default()
            };
            publish(&publisher, &ns, ev).await;
        });
    }

    /// Publish TaskOOM for every OOM kill the manager reports in a pod this shim made.
    async fn forward_oom(&self, sb: Sandbox1Proxy<'static>) {
        use futures::StreamExt;
        let Ok(mut kills) = sb.receive_container_oom().await else {
            log::warn!("cannot follow OOM kills: the shim will not report TaskOOM");
            return;
        };
        let (tasks, publisher, ns) = (
            self.tasks.clone(),
            self.publisher.clone(),
            self.namespace.clone(),
        );
        tokio::spawn(async move {
            while let Some(sig) = kills.next().await {
                let Ok(args) = sig.args() else { continue };
                let id = args.id().to_string();
                if !tasks.lock().expect("tasks lock").contains_key(&id) {
                    continue;
                }
                let ev = TaskOOM {
                    container_id: id,
                    ..Default::default()
                };
                publish(&publisher, &ns, ev).await;
            }
        });
    }

    async fn create_task(&self, req: &CreateTaskRequest) -> TResult<(Task, u32)> {
        let received = unix_us();
        let bundle = PathBuf::from(&req.bundle);
        let text = std::fs::read_to_string(bundle.join("config.json")).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("{}/config.json: {e}", bundle.display()),
            )
        })?;
        let mut spec: Value = serde_json::from_str(&text).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("{}/config.json is not valid JSON: {e}", bundle.display()),
            )
        })?;
        if !spec["process"].is_object() {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "the OCI spec has no process to run",
            ));
        }
        let role = Role::of(&spec, &req.id).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let sandbox = role.sandbox(&req.id).to_owned();
        let hostname = spec["hostname"].as_str().map(str::to_owned);
        let netns = bulkhead_host::pod::network_namespace(&spec);
        bulkhead_host::pod::host_paths_to_guest(&mut spec);

        // A snapshotter's overlay goes to bulkheadd as layers, so it can serve them to a
        // virtiofsd in its own user namespace; anything else the shim mounts.
        let layers = overlay_layers(req);
        let (rootfs, mounted) = match layers {
            Some(_) => (PathBuf::new(), None),
            None => mount_rootfs(req, &bundle, &spec).await?,
        };
        let undo_mount = |m: &Option<PathBuf>| {
            if let Some(p) = m {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        };
        let client = self.client().await?;
        let own = (role == Role::Sandbox).then(|| {
            // Sized by the pod's limits; bulkheadd raises that to its defaults.
            let (cpus, mem) = pod::size(&spec);
            SandboxOptions {
                cpus,
                memory_mib: mem,
                at_least_defaults: Some(true),
                hostname: hostname.clone(),
                netns: netns.clone(),
                virtiofsd_userns: Some(layers.is_some()),
                ..Default::default()
            }
        });
        let called = unix_us();
        let made = client
            .create_pod(NewPod {
                sandbox: &sandbox,
                own,
                container: &req.id,
                spec_json: &spec.to_string(),
                rootfs: &rootfs.display().to_string(),
                options: ContainerOptions {
                    stdin: !req.stdin.is_empty(),
                    terminal: Some(req.terminal),
                    rootfs_overlay: layers.clone(),
                    ..Default::default()
                },
            })
            .await;
        let made = match made {
            Ok(p) => p,
            Err(e) => {
                undo_mount(&mounted);
                return Err(from_dbus(e));
            }
        };
        let (sb, pid) = (made.sandbox.clone(), made.pid);
        if made.own {
            self.log_sandbox_timings(&sb, &sandbox, received, called)
                .await;
            self.forward_oom(sb.clone()).await;
        }
        let io = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        Ok((
            Task {
                role,
                sandbox,
                sb,
                bundle,
                mounted_rootfs: mounted,
                init: Process::new(pid, io),
                execs: HashMap::new(),
            },
            pid,
        ))
    }

    /// Where the time to a ready sandbox went, for operators and the ctr bench: the
    /// manager's phases are microseconds after it received the call.
    async fn log_sandbox_timings(
        &self,
        sb: &Sandbox1Proxy<'_>,
        sandbox: &str,
        received: u64,
        called: u64,
    ) {
        {
            if let Ok(t) = sb.timings().await {
                let get = |k: &str| t.get(k).copied().unwrap_or(0);
                log::info!(
                    "timings sandbox={sandbox} create_received_unix_us={received} create_sandbox_unix_us={called} vmm_exec_us={} agent_ready_us={}",
                    get("vmm_exec"),
                    get("agent_ready")
                );
            }
        }
    }
}

async fn publish(publisher: &RemotePublisher, ns: &str, event: impl Event + 'static) {
    let topic = event.topic();
    if let Err(e) = publisher
        .publish(Context::default(), &topic, ns, Box::new(event))
        .await
    {
        log::error!("publishing {topic}: {e}");
    }
}

/// containerd's rootfs as one overlay mount's options (what its overlayfs snapshotter
/// gives a writable container) when bulkheadd takes them: layers, a writable layer and
/// its work directory, and nothing else but `index=off`.
fn overlay_layers(req: &CreateTaskRequest) -> Option<String> {
    let [m] = req.rootfs.as_slice() else {
        return None;
    };
    let options = m.options.join(",");
    let takes =
        m.type_ == "overlay" && bulkhead_host::overlay::SnapshotOverlay::parse(&options).is_ok();
    takes.then_some(options)
}

/// The directory the container's root is in: containerd's rootfs mounts (a snapshot,
/// usually overlay) mounted at `<bundle>/rootfs`, or the spec's own root when containerd
/// mounted nothing.
async fn mount_rootfs(
    req: &CreateTaskRequest,
    bundle: &Path,
    spec: &Value,
) -> TResult<(PathBuf, Option<PathBuf>)> {
    if req.rootfs.is_empty() {
        let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
        return Ok((bundle.join(root), None));
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| status(Code::UNKNOWN, e.to_string()))?;
    for m in &req.rootfs {
        if let Err(e) = containerd_shim::util::mount_rootfs(m, &target).await {
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
            return Err(status(
                Code::UNKNOWN,
                format!("mounting the rootfs ({} {}): {e}", m.type_, m.source),
            ));
        }
    }
    Ok((target.clone(), Some(target)))
}

#[async_trait]
impl containerd_shim::Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TResult<CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "checkpoint/restore is not supported by bulkhead",
            ));
        }
        if self.tasks.lock().expect("tasks lock").contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {:?} exists", req.id),
            ));
        }
        let (task, pid) = self.create_task(&req).await?;
        self.tasks
            .lock()
            .expect("tasks lock")
            .insert(req.id.clone(), task);
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        })
        .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TResult<StartResponse> {
        let (sb, io, spec, status_now) = self.with(&req.id, |t| {
            let sb = t.sb.clone();
            let p = t.process(&req.exec_id)?;
            Ok((sb, p.io.clone(), p.spec.clone(), p.status))
        })?;
        if status_now != Status::CREATED {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "{} is not in the created state",
                    describe(&req.id, &req.exec_id)
                ),
            ));
        }
        let pid = if req.exec_id.is_empty() {
            let attached = process::attach(&sb, &req.id, "", &io)
                .await
                .map_err(other)?;
            sb.start_container(&req.id).await.map_err(from_dbus)?;
            self.watch_exit(attached, req.id.clone(), String::new());
            self.with(&req.id, |t| Ok(t.init.pid))?
        } else {
            let spec = spec.unwrap_or_default();
            let mut opts: HashMap<&str, V<'_>> = HashMap::new();
            opts.insert("stdin", (!io.stdin.is_empty()).into());
            let pid = sb
                .exec(&req.id, &req.exec_id, &spec, opts)
                .await
                .map_err(from_dbus)?;
            let attached = process::attach(&sb, &req.id, &req.exec_id, &io)
                .await
                .map_err(other)?;
            self.watch_exit(attached, req.id.clone(), req.exec_id.clone());
            pid
        };
        self.with(&req.id, |t| {
            let p = t.process_mut(&req.exec_id)?;
            p.pid = pid;
            if p.status == Status::CREATED {
                p.status = Status::RUNNING;
            }
            Ok(())
        })?;
        if req.exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        } else {
            self.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TResult<StateResponse> {
        self.with(&req.id, |t| {
            let bundle = t.bundle.display().to_string();
            let p = t.process(&req.exec_id)?;
            let exit = p.exit();
            Ok(StateResponse {
                id: req.id.clone(),
                bundle,
                pid: p.pid,
                status: p.status.into(),
                stdin: p.io.stdin.clone(),
                stdout: p.io.stdout.clone(),
                stderr: p.io.stderr.clone(),
                terminal: p.io.terminal,
                exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
                exited_at: exit.map(|e| e.at).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TResult<Empty> {
        let (sb, st) = self.with(&req.id, |t| {
            Ok((t.sb.clone(), t.process(&req.exec_id)?.status))
        })?;
        if st == Status::STOPPED {
            return Err(status(
                Code::NOT_FOUND,
                format!(
                    "{}: process already finished",
                    describe(&req.id, &req.exec_id)
                ),
            ));
        }
        let sig = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
        sb.signal(&req.id, &req.exec_id, sig, req.all)
            .await
            .map_err(from_dbus)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TResult<Empty> {
        bulkhead_dbus::valid_id(&req.exec_id).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let mut process: Value = serde_json::from_slice(&req.spec.value).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec {}: the process spec is not valid JSON: {e}",
                    req.exec_id
                ),
            )
        })?;
        if !process.is_object() {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "the exec's process spec is not an object",
            ));
        }
        process["terminal"] = Value::Bool(req.terminal);
        self.with(&req.id, |t| {
            if t.init.status == Status::STOPPED {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if t.execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} exists", req.exec_id),
                ));
            }
            let mut p = Process::new(
                0,
                Stdio {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
            );
            p.spec = Some(process.to_string());
            t.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })?;
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TResult<Empty> {
        let sb = self.proxy(&req.id)?;
        let (rows, cols) = (
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        );
        sb.resize_pty(&req.id, &req.exec_id, rows, cols)
            .await
            .map_err(from_dbus)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TResult<Empty> {
        // The stdin fifo's end of file reaches the process through our copy (io.rs),
        // after every byte before it; here we only check the process exists.
        self.with(&req.id, |t| t.process(&req.exec_id).map(|_| ()))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TResult<WaitResponse> {
        let mut rx = self.with(&req.id, |t| Ok(t.process(&req.exec_id)?.waiter()))?;
        let exit: Exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| status(Code::NOT_FOUND, "the task was deleted while waiting"))?
            .clone()
            .expect("waited for Some");
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TResult<DeleteResponse> {
        if !req.exec_id.is_empty() {
            let (pid, exit) = self.with(&req.id, |t| {
                let p = t.process(&req.exec_id)?;
                if p.status == Status::RUNNING || p.status == Status::PAUSED {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("exec {} is still running", req.exec_id),
                    ));
                }
                let r = (p.pid, p.exit());
                t.execs.remove(&req.exec_id);
                Ok(r)
            })?;
            return Ok(delete_response(pid, exit));
        }
        let (role, sandbox, sb, st, pid, exit, mounted) = self.with(&req.id, |t| {
            Ok((
                t.role.clone(),
                t.sandbox.clone(),
                t.sb.clone(),
                t.init.status,
                t.init.pid,
                t.init.exit(),
                t.mounted_rootfs.clone(),
            ))
        })?;
        if st == Status::RUNNING || st == Status::PAUSED {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {} is still running: kill it first", req.id),
            ));
        }
        let client = self.client().await?;
        if let Err(e) = sb.delete_container(&req.id, true).await {
            log::warn!("deleting container {}: {:#}", req.id, explain(e));
        }
        if role == Role::Sandbox {
            match client.manager.remove_sandbox(&sandbox, true).await {
                Ok(()) => {}
                Err(zbus::Error::MethodError(n, _, _)) if n.as_str().ends_with("NotFound") => {}
                Err(e) => return Err(from_dbus(e)),
            }
        }
        if let Some(p) = &mounted {
            if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
                log::warn!("unmounting {}: {e}", p.display());
            }
        }
        let exit = exit.unwrap_or_else(|| Exit {
            status: 0,
            at: process::now(),
        });
        self.tasks.lock().expect("tasks lock").remove(&req.id);
        self.publish(TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(delete_response(pid, Some(exit)))
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TResult<PidsResponse> {
        let sb = self.proxy(&req.id)?;
        let pids = sb.processes(&req.id).await.map_err(from_dbus)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TResult<Empty> {
        let (sb, st) = self.with(&req.id, |t| Ok((t.sb.clone(), t.init.status)))?;
        if st != Status::RUNNING {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {} is not running ({st:?})", req.id),
            ));
        }
        sb.pause(&req.id).await.map_err(from_dbus)?;
        self.with(&req.id, |t| {
            t.init.status = Status::PAUSED;
            Ok(())
        })?;
        self.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TResult<Empty> {
        let sb = self.proxy(&req.id)?;
        sb.resume(&req.id).await.map_err(from_dbus)?;
        self.with(&req.id, |t| {
            if t.init.status == Status::PAUSED {
                t.init.status = Status::RUNNING;
            }
            Ok(())
        })?;
        self.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TResult<Empty> {
        let sb = self.proxy(&req.id)?;
        let json = std::str::from_utf8(&req.resources.value).map_err(|_| {
            status(
                Code::INVALID_ARGUMENT,
                "resources are not JSON (want OCI linux.resources)",
            )
        })?;
        sb.update(&req.id, json).await.map_err(from_dbus)?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TResult<StatsResponse> {
        let sb = self.proxy(&req.id)?;
        let figures = sb.stats(&req.id).await.map_err(from_dbus)?;
        let any =
            metrics::to_any(&metrics::metrics(&figures)).map_err(|e| status(Code::INTERNAL, e))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TResult<ConnectResponse> {
        let task_pid = self.with(&req.id, |t| Ok(t.init.pid)).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TResult<Empty> {
        if req.now || self.tasks.lock().expect("tasks lock").is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn describe(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("task {id}")
    } else {
        format!("exec {exec_id} of task {id}")
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> DeleteResponse {
    DeleteResponse {
        pid,
        exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
        exited_at: exit.map(|e| e.at).into(),
        ..Default::default()
    }
}
