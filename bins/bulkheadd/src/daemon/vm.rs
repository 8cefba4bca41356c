//! The VM's control passed through to its components (bulkhead-vmm's `Vmm1`,
//! bulkhead-net's `Net1`): status, memory hot-plug and balloon, network counters.

use super::*;

/// What `Sandbox1.VmStatus` passes on from the VMM (a separate, jailed process): known
/// keys only, strings clipped.
pub(super) const VM_MEMORY_KEYS: [&str; 5] = [
    "asked_backing",
    "asked_hugepages",
    "backing",
    "pages",
    "why",
];
/// Each balloon figure the VMM may send, with its D-Bus signature.
pub(super) const VM_BALLOON_FIELDS: [(&str, &str); 10] = [
    ("active", "b"),
    ("target_mib", "t"),
    ("actual_mib", "t"),
    ("features", "as"),
    ("inflated_bytes", "t"),
    ("reported_bytes", "t"),
    ("refused", "t"),
    ("discard_errors", "t"),
    ("stats", "a{st}"),
    ("stats_age_ms", "t"),
];
/// Each virtio-mem figure the VMM may send, with its D-Bus signature.
pub(super) const VM_HOTPLUG_FIELDS: [(&str, &str); 9] = [
    ("active", "b"),
    ("addr", "t"),
    ("region_mib", "t"),
    ("requested_mib", "t"),
    ("plugged_mib", "t"),
    ("plugs", "t"),
    ("unplugs", "t"),
    ("refused", "t"),
    ("discard_errors", "t"),
];
/// The most entries passed on in `features` or `stats` (the VMM keeps at most 64 stats).
pub(super) const VM_BALLOON_LIST_MAX: usize = 64;

/// A known figure of `fields`, of the expected type, its lists within bounds.
pub(super) fn field_ok(fields: &[(&str, &str)], key: &str, v: &OwnedValue) -> bool {
    let sig = v.value_signature().to_string();
    if !fields.contains(&(key, sig.as_str())) {
        return false;
    }
    match &**v {
        Value::Array(a) => {
            a.len() <= VM_BALLOON_LIST_MAX
                && a.iter()
                    .all(|s| matches!(s, Value::Str(s) if s.len() <= 64))
        }
        Value::Dict(d) => {
            d.iter().count() <= VM_BALLOON_LIST_MAX
                && d.iter()
                    .all(|(k, _)| matches!(k, Value::Str(s) if s.len() <= 64))
        }
        _ => true,
    }
}

/// Every call to a VMM is bounded: a stuck or hostile VMM costs a caller 5 s at most.
async fn within_vmm_bound<T>(
    sid: &str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .map_err(|_| Error::Backend(format!("sandbox {sid}: the VMM did not answer in 5 s")))
}

pub(super) fn clip(mut s: String) -> String {
    if s.len() > 512 {
        let mut end = 512;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

pub(super) fn owned(v: Value<'_>) -> OwnedValue {
    v.try_to_owned().unwrap_or_else(|_| OwnedValue::from(0u8))
}

/// A Vmm1 failure as the manager reports it: the VMM's own named errors keep their
/// kind (a refused balloon target stays `InvalidArgument`), anything else is `Backend`.
pub(super) fn vmm_error(sid: &str, e: zbus::Error) -> Error {
    if let zbus::Error::MethodError(name, msg, _) = &e {
        let msg = clip(msg.clone().unwrap_or_default());
        match name.as_str() {
            "org.bulkhead.Error.InvalidArgument" => return Error::InvalidArgument(msg),
            "org.bulkhead.Error.FailedPrecondition" => return Error::FailedPrecondition(msg),
            _ => {}
        }
    }
    Error::Backend(format!("sandbox {sid}: VMM control interface: {e}"))
}

impl Daemon {
    /// See `Sandbox1.NetworkStats`.
    pub async fn network_stats(
        &self,
        sid: &str,
    ) -> Result<HashMap<String, HashMap<String, u64>>, Error> {
        let sb = self.running(sid)?;
        let rec = sb.snapshot();
        let mut out = HashMap::new();
        if rec.net_backend == NetBackend::VhostNet {
            // No back end of ours to ask: the kernel counts each tap.
            let Some(net) = rec.network.clone() else {
                return Ok(out);
            };
            let taps = tokio::task::spawn_blocking(move || crate::net::tap_counters(&net))
                .await
                .map_err(|e| Error::Backend(format!("tap counters: {e}")))?
                .map_err(|e| Error::Backend(format!("sandbox {sid}: tap counters: {e}")))?;
            return Ok(taps);
        }
        for (i, l) in rec.network.iter().flat_map(|n| n.links.iter()).enumerate() {
            let sock = backend::net_dbus_socket(&rec, i);
            let read = async {
                let conn = bulkhead_dbus::p2p::connect(&sock, Duration::from_secs(2)).await?;
                // A peer connection has no bus names; any destination is the peer.
                let p = bulkhead_dbus::net::Net1Proxy::new(&conn, "org.bulkhead.Net1").await?;
                p.counters().await
            };
            match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok(mut c)) => {
                    // The back end is a separate (jailed) process: only the counters it
                    // should have are passed on.
                    c.retain(|k, _| bulkhead_dbus::net::COUNTER_NAMES.contains(&k.as_str()));
                    out.insert(l.guest.name.clone(), c);
                }
                Ok(Err(e)) => tracing::debug!(sandbox = %sid, "net{i} counters: {e}"),
                Err(_) => tracing::debug!(sandbox = %sid, "net{i} counters: no answer in 2 s"),
            }
        }
        Ok(out)
    }

    /// The VMM's `org.bulkhead.Vmm1`, for a running bulkhead-vmm sandbox.
    pub(super) async fn vmm1(
        &self,
        sid: &str,
    ) -> Result<bulkhead_dbus::vmm::Vmm1Proxy<'static>, Error> {
        let rec = self.running(sid)?.snapshot();
        if rec.backend != Backend::BulkheadVmm.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {sid} runs on {}: only bulkhead-vmm serves the VM control interface (org.bulkhead.Vmm1)",
                rec.backend
            )));
        }
        bulkhead_dbus::vmm::connect(&backend::vmm_api_socket(&rec), Duration::from_secs(2))
            .await
            .map_err(|e| Error::Backend(format!("sandbox {sid}: VMM control interface: {e}")))
    }

    /// See `Sandbox1.VmStatus`.
    pub async fn vm_status(&self, sid: &str) -> Result<HashMap<String, OwnedValue>, Error> {
        let p = self.vmm1(sid).await?;
        let rec = self.get(sid)?.snapshot();
        let hotplug = rec.hotplug_mib > 0;
        let from_vmm = |e: zbus::Error| vmm_error(sid, e);
        let read = async {
            let mut out: HashMap<String, OwnedValue> = HashMap::new();
            let state = p.state().await.map_err(from_vmm)?;
            out.insert("state".into(), owned(Value::from(clip(state))));
            let memory: HashMap<String, String> = p
                .memory()
                .await
                .map_err(from_vmm)?
                .into_iter()
                .filter(|(k, _)| VM_MEMORY_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k, clip(v)))
                .collect();
            out.insert("memory".into(), owned(Value::from(memory)));
            let mut phases = p.start_phases().await.map_err(from_vmm)?;
            phases.truncate(16);
            for ph in &mut phases {
                ph.0 = clip(std::mem::take(&mut ph.0));
            }
            out.insert("start_phases".into(), owned(Value::from(phases)));
            if p.has_balloon().await.map_err(from_vmm)? {
                let b: HashMap<String, OwnedValue> = p
                    .balloon()
                    .await
                    .map_err(from_vmm)?
                    .into_iter()
                    .filter(|(k, v)| field_ok(&VM_BALLOON_FIELDS, k, v))
                    .collect();
                out.insert("balloon".into(), owned(Value::from(b)));
            }
            if hotplug {
                let mut h: HashMap<String, OwnedValue> = p
                    .hotplug_memory()
                    .await
                    .map_err(from_vmm)?
                    .into_iter()
                    .filter(|(k, v)| field_ok(&VM_HOTPLUG_FIELDS, k, v))
                    .collect();
                // The manager's side: what sizes the request, and what the region
                // cannot hold of it.
                let t = Self::memory_target(&rec, rec.hotplug_floor_mib);
                for (k, v) in [
                    ("floor_mib", rec.hotplug_floor_mib),
                    ("limits_mib", t.limits_mib),
                    ("short_mib", t.short_mib),
                ] {
                    h.insert(k.into(), OwnedValue::from(v));
                }
                out.insert("hotplug".into(), owned(Value::from(h)));
            }
            Ok::<_, Error>(out)
        };
        within_vmm_bound(sid, read).await?
    }

    /// See `Sandbox1.SetHotplugMemory`: `mib` becomes the floor under what the
    /// containers' limits ask for.
    pub async fn set_hotplug_memory(&self, sid: &str, mib: u64) -> Result<(), Error> {
        let sb = self.get(sid)?;
        let mut sent = sb.memory_fit.lock().await;
        let rec = sb.snapshot();
        if rec.hotplug_mib == 0 {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {sid} has no hot-plug memory (create it with hotplug_mib)"
            )));
        }
        if mib > u64::from(rec.hotplug_mib) {
            return Err(Error::InvalidArgument(format!(
                "{mib} MiB is more than sandbox {sid}'s hot-plug region ({} MiB)",
                rec.hotplug_mib
            )));
        }
        let t = Self::memory_target(&rec, mib);
        self.request_hotplug(sid, t.mib).await?;
        *sent = Some(t.mib);
        self.update(&sb, Changed::default(), |r| r.hotplug_floor_mib = mib)
            .await;
        Ok(())
    }

    pub(super) fn memory_target(rec: &SandboxRec, floor_mib: u64) -> memory::Target {
        memory::target(
            rec.memory_mib.into(),
            rec.hotplug_mib.into(),
            floor_mib,
            rec.containers.iter().filter_map(|c| c.memory_limit_mib),
        )
    }

    pub(super) async fn request_hotplug(&self, sid: &str, mib: u64) -> Result<(), Error> {
        let p = self.vmm1(sid).await?;
        within_vmm_bound(sid, p.set_hotplug_memory(mib))
            .await?
            .map_err(|e| vmm_error(sid, e))
    }

    /// Ask the VMM for as much of the hot-plug region as the containers' limits need
    /// (see `memory.rs`); with `wait`, until the guest has plugged it, for at most
    /// [`memory::PLUG_WAIT`]. Nothing here fails the container change that called it:
    /// a VMM that cannot be asked is logged, and the container's own limit still holds.
    pub(super) async fn fit_memory(&self, sb: &Arc<Sandbox>, wait: bool) {
        let mut sent = sb.memory_fit.lock().await;
        let rec = sb.snapshot();
        if rec.hotplug_mib == 0 {
            return;
        }
        let t = Self::memory_target(&rec, rec.hotplug_floor_mib);
        // Already asked for (and, if it grew, waited for) by an earlier change.
        if *sent == Some(t.mib) {
            return;
        }
        if t.short_mib > 0 {
            tracing::warn!(
                sandbox = %sb.id,
                "the containers' memory limits need {} MiB more than the VM's hot-plug region ({} MiB) holds",
                t.short_mib,
                rec.hotplug_mib
            );
        }
        if let Err(e) = self.request_hotplug(&sb.id, t.mib).await {
            tracing::warn!(sandbox = %sb.id, "cannot ask for {} MiB of hot-plug memory: {e}", t.mib);
            *sent = None;
            return;
        }
        *sent = Some(t.mib);
        tracing::info!(sandbox = %sb.id, "hot-plug memory asked: {} MiB", t.mib);
        if wait && !self.wait_plugged(&sb.id, t.mib).await {
            tracing::warn!(
                sandbox = %sb.id,
                "the guest did not plug {} MiB within {:?}; going on without it",
                t.mib,
                memory::PLUG_WAIT
            );
        }
    }

    /// Whether the guest had `mib` MiB of the region plugged within [`memory::PLUG_WAIT`].
    pub(super) async fn wait_plugged(&self, sid: &str, mib: u64) -> bool {
        let deadline = Instant::now() + memory::PLUG_WAIT;
        let Ok(p) = self.vmm1(sid).await else {
            return false;
        };
        loop {
            let plugged = within_vmm_bound(sid, p.hotplug_memory())
                .await
                .ok()
                .and_then(|r| r.ok())
                .and_then(|h| h.get("plugged_mib").and_then(|v| u64::try_from(v).ok()));
            if plugged.is_some_and(|p| p >= mib) {
                return true;
            }
            if plugged.is_none() || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// See `Sandbox1.SetBalloonTarget`.
    pub async fn set_balloon_target(&self, sid: &str, mib: u64) -> Result<(), Error> {
        let p = self.vmm1(sid).await?;
        within_vmm_bound(sid, p.set_balloon_target(mib))
            .await?
            .map_err(|e| vmm_error(sid, e))
    }
}
