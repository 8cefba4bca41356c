//! What bulkheadd waits on for each sandbox: its agent's health, its containers' exits
//! and the guest's OOM kills.

use super::*;

impl Daemon {
    /// Follow a running container until its init exits, then record the exit.
    /// Log and announce (`Healthy`) each change of the agent's health. Holds the
    /// sandbox weakly: the task ends with it.
    pub(super) fn watch_health(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let d = Arc::downgrade(self);
        let weak = Arc::downgrade(sb);
        let mut rx = sb.agent.health();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let healthy = *rx.borrow_and_update();
                let (Some(d), Some(sb)) = (d.upgrade(), weak.upgrade()) else {
                    return;
                };
                if healthy {
                    tracing::info!(sandbox = %sb.id, "the guest agent answers again");
                } else {
                    tracing::warn!(sandbox = %sb.id, security_event = "agent-silent", "the guest agent stopped answering: sandbox unhealthy");
                }
                d.notify(
                    &sb,
                    Changed {
                        health: true,
                        ..Default::default()
                    },
                )
                .await;
            }
        });
    }

    /// Pass the guest's OOM kills on as `ContainerOom` signals, one per kill, for the
    /// sandbox's lifetime. The id comes from the guest: only a container this sandbox
    /// has is announced.
    pub(super) fn watch_oom(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let d = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            while !sb.removing.load(Ordering::SeqCst) {
                match sb.agent.wait_oom().await {
                    Ok(cid) if sb.snapshot().container(&cid).is_none() => {
                        // The guest named a container it does not have: counted as a
                        // failure, so a guest answering this in a loop is backed off
                        // and then no longer asked.
                        failures += 1;
                        let shown: String = cid.chars().take(64).collect();
                        tracing::warn!(sandbox = %sb.id, "OOM event for an unknown container {shown:?}");
                        if failures >= 5 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    }
                    Ok(cid) => {
                        failures = 0;
                        tracing::info!(sandbox = %sb.id, container = %cid, "OOM kill in the guest");
                        d.events
                            .emit(Event::ContainerOom {
                                sb: sb.clone(),
                                id: cid,
                            })
                            .await;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures >= 5 || sb.removing.load(Ordering::SeqCst) {
                            if !sb.removing.load(Ordering::SeqCst) {
                                tracing::warn!(sandbox = %sb.id, "stopped watching OOM kills: {e}");
                            }
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    }
                }
            }
        });
    }

    pub(super) fn watch_exit(self: &Arc<Self>, sb: &Arc<Sandbox>, cid: String) {
        let d = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            match sb.agent.wait_exit(cid.clone(), None).await {
                Ok(st) => {
                    d.set_container_state(&sb, &cid, ContainerState::Stopped, Some(st.code))
                        .await;
                    d.events
                        .emit(Event::ContainerExited {
                            sb: sb.clone(),
                            id: cid,
                            status: st.code,
                        })
                        .await;
                }
                Err(e) if !sb.removing.load(Ordering::SeqCst) => {
                    tracing::warn!(sandbox = %sb.id, container = %cid, "lost the exit: {e}")
                }
                Err(_) => {}
            }
        });
    }
}
