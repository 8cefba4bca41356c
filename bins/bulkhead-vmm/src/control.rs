//! `org.bulkhead.Vmm1`, the VMM's control interface (state, pause, resume, shutdown,
//! memory, start phases, balloon), served peer to peer on the `--api-socket` socket.
//!
//! The event loop watches the listening socket. The first peer to connect starts the
//! `api` thread, which takes the socket over and serves every peer from then on under its
//! own seccomp class; a VM nobody asks about never runs (or maps in) the D-Bus code.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_dbus::vmm::{PhaseRow, VMM_PATH};
use bulkhead_dbus::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use zbus::zvariant::{OwnedValue, Value};

use crate::cpu::{self, RunState, VcpuControl};
use crate::exit::{ExitHandle, ExitReason};
use crate::memory::MemoryReport;
use crate::startup::Timeline;
use crate::virtio::balloon::BalloonControl;
use crate::virtio::mem::MemControl;

/// What the interface acts on, shared by every peer's object.
pub struct VmHandle {
    pub control: Arc<VcpuControl>,
    pub vcpus: Vec<libc::pthread_t>,
    /// Threads that stop for a pause (see [`VcpuControl`]).
    pub stop_for_pause: usize,
    pub exit: ExitHandle,
    pub cpus: u32,
    pub memory_mib: u64,
    pub memory: MemoryReport,
    pub timeline: Arc<Timeline>,
    pub balloon: Option<Arc<BalloonControl>>,
    /// The virtio-mem device, when the VM has a hot-plug region.
    pub hotplug: Option<Arc<MemControl>>,
}

/// The listening socket, until the first peer hands it to the `api` thread.
pub struct ControlApi {
    listener: Option<UnixListener>,
    handle: Arc<VmHandle>,
}

impl ControlApi {
    /// Bind `path` (replacing a stale socket) and register it in `epoll` as `token`.
    pub fn listen(
        path: &Path,
        epoll: &Epoll,
        token: u32,
        handle: Arc<VmHandle>,
    ) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(token)),
        )?;
        Ok(Self {
            listener: Some(listener),
            handle,
        })
    }

    /// A peer is waiting: start the `api` thread and give it the socket (the peer is
    /// accepted there).
    pub fn readable(&mut self, epoll: &Epoll) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let _ = epoll.ctl(
            ControlOperation::Delete,
            listener.as_raw_fd(),
            EpollEvent::default(),
        );
        let handle = self.handle.clone();
        let setup = || crate::seccomp::install_for(crate::seccomp::Class::Api);
        if let Err(e) = bulkhead_dbus::p2p::serve(
            listener,
            "api",
            VMM_PATH,
            move || Vmm1(handle.clone()),
            setup,
        ) {
            tracing::error!("control interface: cannot start its thread: {e}");
        }
    }
}

/// One peer's `org.bulkhead.Vmm1` object.
pub struct Vmm1(Arc<VmHandle>);

fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Running => "running",
        RunState::Paused => "paused",
    }
}

impl Vmm1 {
    fn balloon_control(&self) -> Result<&BalloonControl, Error> {
        self.0.balloon.as_deref().ok_or_else(|| {
            Error::FailedPrecondition("this VM has no balloon (start it with --balloon)".into())
        })
    }

    fn hotplug_control(&self) -> Result<&MemControl, Error> {
        self.0.hotplug.as_deref().ok_or_else(|| {
            Error::FailedPrecondition(
                "this VM has no hot-plug memory (start it with --hotplug)".into(),
            )
        })
    }
}

#[zbus::interface(name = "org.bulkhead.Vmm1")]
impl Vmm1 {
    /// Stop every vCPU and the in-process devices (the event loop stops serving them);
    /// the VM keeps running if they do not all stop within 2 s.
    fn pause(&self) -> Result<(), Error> {
        let h = &self.0;
        if h.control.state() == RunState::Paused {
            return Ok(());
        }
        h.control.set(RunState::Paused);
        cpu::kick(&h.vcpus);
        // Blocks this thread only, until the vCPUs and the event loop say they stopped.
        if h.control
            .wait_parked(h.stop_for_pause, Duration::from_secs(2))
        {
            Ok(())
        } else {
            h.control.set(RunState::Running);
            Err(Error::Failed(
                "vCPUs did not stop within 2 s; still running".into(),
            ))
        }
    }

    fn resume(&self) {
        self.0.control.set(RunState::Running);
    }

    /// End the VM (the VMM exits with status 5), once this reply is on its way.
    fn shutdown(&self) {
        let exit = self.0.exit.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            exit.request(ExitReason::Stopped);
        });
    }

    fn memory(&self) -> HashMap<String, String> {
        let m = &self.0.memory;
        [
            ("asked_backing", m.asked_backing.as_str().to_string()),
            ("asked_hugepages", m.asked_hugepages.as_str().to_string()),
            ("backing", m.backing.to_string()),
            ("pages", m.pages.to_string()),
            ("why", m.why.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn start_phases(&self) -> Vec<PhaseRow> {
        self.0
            .timeline
            .phases()
            .into_iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    p.ms,
                    p.minor_faults,
                    p.major_faults,
                    p.cpu_ms,
                    p.huge_kib.unwrap_or(0),
                )
            })
            .collect()
    }

    fn balloon(&self) -> Result<HashMap<String, OwnedValue>, Error> {
        let s = self.balloon_control()?.status();
        let mut out: HashMap<String, OwnedValue> = HashMap::new();
        let mut put = |k: &str, v: Value<'_>| {
            if let Ok(v) = v.try_to_owned() {
                out.insert(k.to_string(), v);
            }
        };
        put("active", Value::from(s.active));
        put("target_mib", Value::from(s.target_mib));
        put("actual_mib", Value::from(s.actual_mib));
        put("features", Value::from(s.features.clone()));
        put("inflated_bytes", Value::from(s.inflated_bytes));
        put("reported_bytes", Value::from(s.reported_bytes));
        put("refused", Value::from(s.refused));
        put("discard_errors", Value::from(s.discard_errors));
        let stats: HashMap<String, u64> =
            s.stats.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        put("stats", Value::from(stats));
        if let Some(age) = s.stats_age_ms {
            put("stats_age_ms", Value::from(age));
        }
        Ok(out)
    }

    fn set_balloon_target(&self, mib: u64) -> Result<(), Error> {
        self.balloon_control()?
            .set_target(mib)
            .map_err(Error::InvalidArgument)
    }

    fn hotplug_memory(&self) -> Result<HashMap<String, OwnedValue>, Error> {
        let s = self.hotplug_control()?.status();
        let mut out: HashMap<String, OwnedValue> = HashMap::new();
        out.insert("active".into(), OwnedValue::from(s.active));
        for (k, v) in [
            ("addr", s.addr),
            ("region_mib", s.region_mib),
            ("requested_mib", s.requested_mib),
            ("plugged_mib", s.plugged_mib),
            ("plugs", s.plugs),
            ("unplugs", s.unplugs),
            ("refused", s.refused),
            ("discard_errors", s.discard_errors),
        ] {
            out.insert(k.into(), OwnedValue::from(v));
        }
        Ok(out)
    }

    fn set_hotplug_memory(&self, mib: u64) -> Result<(), Error> {
        self.hotplug_control()?
            .set_requested(mib)
            .map_err(Error::InvalidArgument)
    }

    #[zbus(property)]
    fn state(&self) -> String {
        state_name(self.0.control.state()).into()
    }

    #[zbus(property)]
    fn cpus(&self) -> u32 {
        self.0.cpus
    }

    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> u64 {
        self.0.memory_mib
    }

    #[zbus(property)]
    fn has_balloon(&self) -> bool {
        self.0.balloon.is_some()
    }
}
