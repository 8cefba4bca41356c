//! A sandbox's host processes once started: each watched, a network back end started
//! again when it dies, and their jails as `Security()` reports them.

use super::*;

/// At most this many restarts of one sandbox's network back ends within
/// [`NET_RESTART_WINDOW`]; one more tears the sandbox down.
pub(super) const NET_RESTART_LIMIT: usize = 5;
pub(super) const NET_RESTART_WINDOW: Duration = Duration::from_secs(30);

/// A network back end that dies this soon after its restart is crash-looping: its next
/// restart waits (longer each time). One that ran longer (killed, upgraded) comes back
/// at once, however many times that happens within the window.
pub(super) const NET_CRASH_LOOP: Duration = Duration::from_secs(1);

impl Daemon {
    /// When a component exits on its own: a network back end of a running sandbox is
    /// started again (the VMM takes it back, the pod goes on); for any other, the sandbox
    /// cannot go on and is torn down.
    pub(super) fn watch_component(self: &Arc<Self>, sb: &Arc<Sandbox>, comp: Component) {
        let d = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            let status = supervisor::watch(comp.clone()).await;
            if sb.removing.load(Ordering::SeqCst) {
                return;
            }
            let mut why = format!(
                "{} (pid {}) exited{}",
                comp.name,
                comp.pid,
                status
                    .map(|s| format!(" with status {s}"))
                    .unwrap_or_default()
            );
            if status == Some(128 + libc::SIGSYS) {
                why.push_str(", killed by its seccomp filter");
                tracing::error!(
                    sandbox = %sb.id,
                    component = %comp.name,
                    security_event = "seccomp",
                    "security event: {} made a system call its filter forbids and was killed \
                     (the kernel's audit log names the call)",
                    comp.name
                );
            }
            let rec = sb.snapshot();
            tracing::debug!(sandbox = %sb.id, "{} log: {}", comp.name, log_tail(&rec.run_dir.join(format!("{}.log", comp.name))));
            let restartable = Role::of(&comp.name).is_some_and(Role::restartable)
                && rec.state == SandboxState::Running;
            if restartable {
                match d.restart_component(&sb, &comp).await {
                    Ok(new) => {
                        tracing::warn!(sandbox = %sb.id, "{why}: started again as pid {}", new.pid);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(sandbox = %sb.id, "{why}; cannot start it again: {e}")
                    }
                }
            }
            tracing::warn!(sandbox = %sb.id, "{why}: tearing the sandbox down");
            d.teardown(&sb, &why, false).await;
        });
    }

    /// Start a network back end again in place of `old`, within the restart budget.
    pub(super) async fn restart_component(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        old: &Component,
    ) -> Result<Component, String> {
        let (tries, crash_loop) = {
            let mut r = sb.net_restarts.lock().expect("restarts lock");
            r.retain(|t| t.elapsed() < NET_RESTART_WINDOW);
            if r.len() >= NET_RESTART_LIMIT {
                return Err(format!(
                    "{NET_RESTART_LIMIT} restarts in {NET_RESTART_WINDOW:?} already"
                ));
            }
            let crash_loop = r.last().is_some_and(|t| t.elapsed() < NET_CRASH_LOOP);
            r.push(Instant::now());
            (r.len(), crash_loop)
        };
        // A restart is immediate (traffic is stopped meanwhile); a back end that dies
        // again within moments of its start is given more time each round.
        if crash_loop {
            tokio::time::sleep(Duration::from_millis(100 << tries.min(5))).await;
        }
        let Some(Role::Net(i)) = Role::of(&old.name) else {
            return Err(format!("{} is not a network back end", old.name));
        };
        let i = i as usize;
        let rec = sb.snapshot();
        let cfg = self.cfg.clone();
        let comp = tokio::task::spawn_blocking(move || {
            let spec = backend::bulkhead_net(&cfg, &rec, i).map_err(|e| e.0)?;
            let log = rec.run_dir.join(format!("{}.log", spec.name));
            let mut cmd = jail::command(&cfg, &rec, &spec).map_err(|e| e.0)?;
            supervisor::spawn(&spec.name, &mut cmd, &spec.fds, &log).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let name = old.name.clone();
        let new = comp.clone();
        self.update(
            sb,
            Changed {
                components: true,
                ..Default::default()
            },
            |r| match r.components.iter_mut().find(|c| c.name == name) {
                Some(c) => *c = new,
                None => r.components.push(new),
            },
        )
        .await;
        self.watch_component(sb, comp.clone());
        Ok(comp)
    }

    /// The security posture of every component of a sandbox, as JSON: what its jailer
    /// reported enforcing, and what `/proc` shows for the live process and its children
    /// (uids, capability sets, no_new_privs, seccomp mode of every thread, namespaces).
    pub fn security(&self, sid: &str) -> Result<String, Error> {
        let sb = self.get(sid)?;
        let rec = sb.snapshot();
        let mut out = vec![];
        for c in &rec.components {
            let (pid, supervisor) = c.pids();
            let jailed = supervisor.is_some();
            let report: Option<serde_json::Value> = std::fs::read(jail::report_path(&rec, &c.name))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .filter(|_| jailed);
            let process = pid.and_then(|p| bulkhead_jail::posture::live(p).ok());
            let children: Vec<_> = pid
                .map(bulkhead_jail::posture::descendants)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| bulkhead_jail::posture::live(p).ok())
                .collect();
            out.push(serde_json::json!({
                "name": c.name,
                "jailer_pid": supervisor,
                "pid": pid,
                "jailed": jailed,
                "report": report,
                "process": process,
                "children": children,
            }));
        }
        serde_json::to_string(&out).map_err(|e| Error::Failed(e.to_string()))
    }
}
