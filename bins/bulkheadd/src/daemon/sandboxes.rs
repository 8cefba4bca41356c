//! A sandbox's life: create (directories, network, components, boot, agent set-up),
//! remove and tear down, and adoption of what a previous bulkheadd left running.

use super::*;

/// Wait until each back end has created its socket; one that exits first, or takes over
/// 10 s, fails the sandbox with the tail of its log. In a jailed sandbox the sockets are
/// then handed to the jail uid: a back end that runs as root (virtiofsd) makes its socket root's, and
/// the VMM must be able to connect to it.
pub(super) async fn wait_sockets(
    pending: &[(Component, PathBuf, PathBuf)],
    jail_uid: Option<u32>,
) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (comp, sock, log) in pending {
        while !sock.exists() {
            if !supervisor::alive(comp) || Instant::now() > deadline {
                return Err(Error::Backend(format!(
                    "{} did not create {}: {}",
                    comp.name,
                    sock.display(),
                    log_tail(log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some(uid) = jail_uid {
            std::os::unix::fs::lchown(sock, Some(uid), Some(uid)).map_err(io_err(&format!(
                "cannot hand {} to the jail",
                sock.display()
            )))?;
        }
    }
    Ok(())
}

/// A VM's size: what its creator asked, else the configured `default`; with `floor`,
/// never below the default.
fn sized(asked: Option<u32>, default: u32, floor: bool) -> u32 {
    match asked {
        Some(n) if floor => n.max(default),
        Some(n) => n,
        None => default,
    }
}

impl Daemon {
    pub async fn create_sandbox(
        self: &Arc<Self>,
        id: String,
        opts: SandboxOptions,
    ) -> Result<OwnedObjectPath, Error> {
        let SandboxOptions {
            backend,
            cpus,
            memory_mib,
            hotplug_mib,
            hostname,
            netns,
            net_backend,
            virtiofsd_userns,
            layers_mib,
            at_least_defaults,
        } = opts;
        let layers_mib = layers_mib.map_or(self.cfg.layers_mib, u64::from);
        if !(16..=1 << 20).contains(&layers_mib) {
            return Err(Error::InvalidArgument(format!(
                "layers_mib {layers_mib}: want 16 to 1048576"
            )));
        }
        if let Some(ns) = &netns {
            if !ns.starts_with('/') || ns.len() > 4096 || !Path::new(ns).exists() {
                return Err(Error::InvalidArgument(format!(
                    "netns {ns:?}: want the absolute path of an existing network namespace"
                )));
            }
        }
        if let Some(h) = &hostname {
            if h.is_empty()
                || h.len() > 63
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(Error::InvalidArgument(format!(
                    "hostname {h:?}: want 1 to 63 letters, digits, '-' or '.'"
                )));
            }
        }
        let t0 = Instant::now();
        let id = if id.is_empty() { random_id() } else { id };
        valid_id(&id).map_err(Error::InvalidArgument)?;
        let backend = match backend {
            None => *self.backends.first().ok_or_else(|| {
                Error::FailedPrecondition(
                    "no hypervisor backend can run on this host (see `bulkhead check`)".into(),
                )
            })?,
            Some(name) => {
                let b = Backend::parse(&name).ok_or_else(|| {
                    Error::InvalidArgument(format!("backend {name:?}: want bulkhead-vmm or qemu"))
                })?;
                if !self.backends.contains(&b) {
                    return Err(Error::FailedPrecondition(format!(
                        "backend {name} cannot run on this host (see `bulkhead check`)"
                    )));
                }
                b
            }
        };
        let net_backend = match net_backend.as_deref() {
            None => NetBackend::default(),
            Some(name) => NetBackend::parse(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "net_backend {name:?}: want bulkhead-net or vhost-net"
                ))
            })?,
        };
        if net_backend == NetBackend::VhostNet {
            if backend != Backend::Qemu {
                return Err(Error::InvalidArgument(format!(
                    "net_backend vhost-net: only the qemu backend can use the kernel's vhost-net, not {}",
                    backend.as_str()
                )));
            }
            if !Path::new(crate::net::VHOST_NET).exists() {
                return Err(Error::FailedPrecondition(format!(
                    "net_backend vhost-net: {} is missing (modprobe vhost_net)",
                    crate::net::VHOST_NET
                )));
            }
        }
        let floor = at_least_defaults.unwrap_or(false);
        let cpus = sized(cpus, self.cfg.cpus, floor);
        let memory_mib = sized(memory_mib, self.cfg.memory_mib, floor);
        if !(1..=64).contains(&cpus) {
            return Err(Error::InvalidArgument(format!("cpus {cpus}: want 1 to 64")));
        }
        if !(64..=65536).contains(&memory_mib) {
            return Err(Error::InvalidArgument(format!(
                "memory_mib {memory_mib}: want 64 to 65536"
            )));
        }
        // The configured region is a default for the backend that has virtio-mem.
        let hotplug_mib = hotplug_mib.unwrap_or(match backend {
            Backend::BulkheadVmm => self.cfg.hotplug_mib,
            _ => 0,
        });
        if !hotplug_mib.is_multiple_of(128) || hotplug_mib > 65536 {
            return Err(Error::InvalidArgument(format!(
                "hotplug_mib {hotplug_mib}: want a multiple of 128 up to 65536"
            )));
        }
        if hotplug_mib > 0 && backend != Backend::BulkheadVmm {
            return Err(Error::InvalidArgument(format!(
                "hotplug_mib: only bulkhead-vmm has virtio-mem, not {}",
                backend.as_str()
            )));
        }
        let run_dir = self.state_dir.join("run").join(random_id());
        let rec = SandboxRec {
            id: id.clone(),
            backend: backend.as_str().into(),
            cpus,
            memory_mib,
            hotplug_mib,
            hotplug_floor_mib: 0,
            created_at_us: now_us(),
            state: SandboxState::Creating,
            run_dir: run_dir.clone(),
            components: vec![],
            containers: vec![],
            timings: Default::default(),
            hostname,
            network: None,
            jail_uid: None,
            fs_userns: false,
            net_backend,
        };
        let sb = Sandbox::new(rec, Some(0), &self.cfg);
        {
            let mut map = self.sandboxes.lock().expect("sandboxes lock");
            if map.contains_key(&id) {
                return Err(Error::AlreadyExists(format!("sandbox {id:?} exists")));
            }
            if self.cfg.jail.enabled() {
                let used: Vec<u32> = map.values().filter_map(|s| s.snapshot().jail_uid).collect();
                let uid = jail::allocate_uid(&self.cfg, &used).ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "every jail uid of the configured range ({}) is in use",
                        self.cfg.jail.uid_count
                    ))
                })?;
                let fs_userns = jail::fs_userns(&self.cfg, virtiofsd_userns.unwrap_or(false))
                    .map_err(Error::FailedPrecondition)?;
                let mut r = sb.rec.lock().expect("rec lock");
                r.jail_uid = Some(uid);
                r.fs_userns = fs_userns;
            }
            map.insert(id.clone(), sb.clone());
        }
        let created = async {
            let rec = sb.snapshot();
            jail::make_run_dir(&rec)
                .and_then(|()| std::fs::create_dir(rec.staging_dir()))
                .and_then(|()| std::fs::create_dir(rec.shared_dir()))
                .and_then(|()| jail::make_vm_dir(&rec))
                .and_then(|()| jail::make_layers_dir(&rec, layers_mib))
                .and_then(|()| mounts::make_staging(&rec.staging_dir(), &rec.shared_dir()))
                .and_then(|()| jail::own_shared_dir(&rec, &rec.staging_dir()))
                .map_err(io_err("cannot create the sandbox's directories"))?;
            self.save(&sb);
            self.events.emit(Event::SandboxAdded(sb.clone())).await;
            self.watch_health(&sb);
            if let Some(ns) = netns {
                self.plumb(&sb, PathBuf::from(ns)).await?;
            }
            self.boot(&sb, t0).await
        }
        .await;
        match created {
            Ok(()) => {
                self.move_sandbox(&sb, SandboxState::Running).await;
                self.watch_oom(&sb);
                tracing::info!(sandbox = %id, backend = backend.as_str(), "sandbox running in {:?}", t0.elapsed());
                Ok(sb.path.clone())
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, "create failed: {e}");
                self.teardown(&sb, &format!("create failed: {e}"), false)
                    .await;
                Err(e)
            }
        }
    }

    /// Start the components in order, wait for the agent, set the guest up.
    pub(super) async fn boot(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        t0: Instant,
    ) -> Result<(), Error> {
        let rec = sb.snapshot();
        let specs = backend::plan(&self.cfg, &rec, self.tcg).map_err(|e| Error::Backend(e.0))?;
        // Every component starts at once. A jailed VMM sets its jail up beside the back
        // ends and waits at its jailer's start gate until every socket it connects to is
        // there and handed to the jail's uid; an unjailed one starts after them.
        let ready = crate::agent::ready_listener(&rec.vsock_socket(), rec.jail_uid)
            .map_err(
                |e| tracing::warn!(sandbox = %sb.id, "no listener for the agent's ready word: {e}"),
            )
            .ok();
        let mut pending: Vec<(Component, PathBuf, PathBuf)> = vec![];
        let mut gate: Option<std::fs::File> = None;
        for mut spec in specs {
            let log = rec.run_dir.join(format!("{}.log", spec.name));
            if Role::of(&spec.name) == Some(Role::Vmm) {
                if rec.jail_uid.is_some() {
                    let (rd, wr) =
                        cloexec_pipe().map_err(|e| Error::Backend(format!("start gate: {e}")))?;
                    let n = spec
                        .fds
                        .iter()
                        .map(|(_, n)| n + 1)
                        .max()
                        .unwrap_or(3)
                        .max(3);
                    spec.fds.push((rd, n));
                    spec.start_gate = Some(n);
                    gate = Some(wr);
                } else {
                    wait_sockets(&std::mem::take(&mut pending), rec.jail_uid).await?;
                }
                sb.rec
                    .lock()
                    .expect("rec lock")
                    .timings
                    .insert("vmm_exec".into(), t0.elapsed().as_micros() as u64);
            }
            let mut cmd = jail::command(&self.cfg, &rec, &spec).map_err(|e| Error::Backend(e.0))?;
            // Off the manager's one runtime thread: a start waits for the spawner's
            // answer, and a wedged spawner must not stall every other call. The passed
            // descriptors close here once the component holds its copies.
            let (name, fds, out) = (
                spec.name.clone(),
                std::mem::take(&mut spec.fds),
                log.clone(),
            );
            let comp =
                tokio::task::spawn_blocking(move || supervisor::spawn(&name, &mut cmd, &fds, &out))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|e| Error::Backend(format!("cannot start {}: {e}", spec.name)))?;
            tracing::debug!(sandbox = %sb.id, "started {} pid {}", comp.name, comp.pid);
            // Saved at once, so a manager restarted mid-start knows what to stop; the
            // bus hears of them all together below.
            sb.rec
                .lock()
                .expect("rec lock")
                .components
                .push(comp.clone());
            self.save(sb);
            self.watch_component(sb, comp.clone());
            if let Some(sock) = spec.ready_socket {
                pending.push((comp, sock, log));
            }
        }
        self.notify(
            sb,
            Changed {
                components: true,
                ..Default::default()
            },
        )
        .await;
        // On an error the gate's write end closes with `gate`: the jailer gives up.
        wait_sockets(&pending, rec.jail_uid).await?;
        if let Some(mut g) = gate {
            use std::io::Write;
            g.write_all(&[1]).map_err(|e| {
                Error::Backend(format!(
                    "the VMM's jail did not wait for its start ({e}): {}",
                    log_tail(&rec.run_dir.join("vmm.log"))
                ))
            })?;
        }
        sb.rec
            .lock()
            .expect("rec lock")
            .timings
            .insert("components_started".into(), t0.elapsed().as_micros() as u64);
        let vmm = sb
            .vmm()
            .ok_or_else(|| Error::Backend("no VMM component".into()))?;
        let serial = rec.vm_dir().join("serial.log");
        sb.agent
            .wait_ready(Duration::from_secs(self.cfg.boot_timeout_s), ready, || {
                (!supervisor::alive(&vmm)).then(|| {
                    format!(
                        "the VMM exited while the guest booted: {} / serial: {}",
                        log_tail(&rec.run_dir.join("vmm.log")),
                        log_tail(&serial)
                    )
                })
            })
            .await
            .map_err(|e| match e {
                Error::Backend(m) => {
                    Error::Backend(format!("{m} / guest serial: {}", log_tail(&serial)))
                }
                other => other,
            })?;
        sb.rec
            .lock()
            .expect("rec lock")
            .timings
            .insert("agent_ready".into(), t0.elapsed().as_micros() as u64);
        let hostname = sb
            .snapshot()
            .hostname
            .unwrap_or_else(|| sb.id.chars().take(63).collect());
        let (interfaces, routes) = match &sb.snapshot().network {
            Some(n) => (
                n.links.iter().map(|l| l.guest.clone()).collect(),
                n.routes.clone(),
            ),
            None => (vec![], vec![]),
        };
        let unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        sb.agent
            .call(Call::Change, move |c| {
                c.create_sandbox(SandboxConfig {
                    hostname: Some(hostname),
                    share_pid: false,
                })?;
                c.expect_ok(&Request::MountVirtiofs {
                    tag: backend::SHARE_TAG.into(),
                    target: GUEST_SHARED.into(),
                })?;
                c.expect_ok(&Request::SetTime { unix_nanos })?;
                if !interfaces.is_empty() {
                    c.update_network(interfaces, routes)?;
                }
                Ok(())
            })
            .await?;
        self.save(sb);
        Ok(())
    }

    /// Mirror the pod's network namespace for the guest and record what was made, so a
    /// teardown (also after a crash) undoes it.
    pub(super) async fn plumb(&self, sb: &Arc<Sandbox>, netns: PathBuf) -> Result<(), Error> {
        let t = Instant::now();
        let rec = tokio::task::spawn_blocking(move || crate::net::plumb(&netns))
            .await
            .map_err(|e| Error::Backend(format!("network plumbing: {e}")))?
            .map_err(|e| match e {
                crate::net::NetError::Netns { .. } | crate::net::NetError::Invalid(_) => {
                    Error::InvalidArgument(e.to_string())
                }
                other => Error::Backend(format!("network plumbing: {other}")),
            })?;
        tracing::info!(sandbox = %sb.id, interfaces = rec.links.len(), ms = t.elapsed().as_secs_f64() * 1e3, "pod network plumbed");
        sb.rec.lock().expect("rec lock").network = Some(rec);
        self.save(sb);
        Ok(())
    }

    pub async fn remove_sandbox(self: &Arc<Self>, id: &str, force: bool) -> Result<(), Error> {
        let sb = self.get(id)?;
        if !force {
            let running: Vec<String> = sb
                .snapshot()
                .containers
                .iter()
                .filter(|c| c.state.is_live())
                .map(|c| c.id.clone())
                .collect();
            if !running.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} has running containers {running:?}: stop them or use force"
                )));
            }
        }
        self.teardown(&sb, "removed", true).await;
        Ok(())
    }

    /// Stop everything of a sandbox and forget it. `graceful`: ask the guest to power off
    /// first. Runs once per sandbox; later callers return at once.
    pub async fn teardown(self: &Arc<Self>, sb: &Arc<Sandbox>, reason: &str, graceful: bool) {
        if sb.removing.swap(true, Ordering::SeqCst) {
            return;
        }
        self.move_sandbox(sb, SandboxState::Stopping).await;
        let vmm = sb.vmm();
        if graceful && vmm.as_ref().is_some_and(supervisor::alive) {
            let agent = sb.agent.clone();
            let bye = async {
                let _ = agent.request(Call::Change, Request::DestroySandbox).await;
                let _ = agent.request(Call::Change, Request::Shutdown).await;
                while vmm.as_ref().is_some_and(supervisor::alive) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(10), bye)
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %sb.id, "guest did not power off in 10 s; killing");
            }
        }
        let rec = sb.snapshot();
        supervisor::stop_all(&rec.components, Duration::from_secs(2)).await;
        jail::remove_cgroup(&rec);
        if let Some(net) = rec.network.clone() {
            match tokio::task::spawn_blocking(move || crate::net::unplumb(&net)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(sandbox = %sb.id, "network cleanup: {e}"),
                Err(e) => tracing::error!(sandbox = %sb.id, "network cleanup: {e}"),
            }
        }
        // A guest-filled tree can take long to remove: off the runtime's thread.
        let run_dir = rec.run_dir.clone();
        match tokio::task::spawn_blocking(move || mounts::unmount_and_remove(&run_dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sandbox = %sb.id, "cleanup: {e}"),
            Err(e) => tracing::error!(sandbox = %sb.id, "cleanup: {e}"),
        }
        if let Err(e) = self.store.remove(&sb.id) {
            tracing::error!(sandbox = %sb.id, "cannot remove state file: {e}");
        }
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .remove(&sb.id);
        self.events
            .emit(Event::SandboxRemoved {
                sb: sb.clone(),
                reason: reason.into(),
            })
            .await;
        tracing::info!(sandbox = %sb.id, "sandbox removed: {reason}");
    }

    /// Take over the sandboxes a previous bulkheadd left: watch the live ones again,
    /// clean up after the dead ones.
    pub async fn adopt(self: &Arc<Self>) {
        for r in self.store.load_all() {
            let rec = match r {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::error!("unreadable sandbox record: {e}");
                    continue;
                }
            };
            let id = rec.id.clone();
            let all_alive =
                !rec.components.is_empty() && rec.components.iter().all(supervisor::alive);
            let sb = Sandbox::new(rec.clone(), None, &self.cfg);
            self.sandboxes
                .lock()
                .expect("sandboxes lock")
                .insert(id.clone(), sb.clone());
            self.events.emit(Event::SandboxAdded(sb.clone())).await;
            self.watch_health(&sb);
            if !all_alive || rec.state != SandboxState::Running {
                let why = if rec.state != SandboxState::Running {
                    format!("the manager restarted while it was {}", rec.state)
                } else {
                    "a component died while the manager was down".into()
                };
                tracing::warn!(sandbox = %id, "not adopting: {why}");
                self.teardown(&sb, &why, false).await;
                continue;
            }
            for c in &rec.components {
                self.watch_component(&sb, c.clone());
            }
            for c in rec.containers.iter().filter(|c| c.state.is_live()) {
                self.watch_exit(&sb, c.id.clone());
            }
            self.watch_oom(&sb);
            tracing::info!(sandbox = %id, "adopted ({} components)", rec.components.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sized;

    #[test]
    fn a_vm_sized_at_least_to_the_defaults_is_never_smaller() {
        // Asked for, unasked, and raised to the default only where the floor is asked.
        assert_eq!(sized(Some(1), 2, false), 1);
        assert_eq!(sized(Some(1), 2, true), 2);
        assert_eq!(sized(Some(4), 2, true), 4);
        assert_eq!(sized(None, 2, true), 2);
        assert_eq!(sized(None, 256, false), 256);
        // A pod's 16 MiB limit plus the guest's 64 against a 256 MiB default.
        assert_eq!(sized(Some(80), 256, true), 256);
    }
}
