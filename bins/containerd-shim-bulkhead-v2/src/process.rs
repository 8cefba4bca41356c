//! One process the shim follows: a container's init (exec id empty) or an exec. Its
//! streams and exit come from `Sandbox1.Attach`; the exit is published once, to every
//! waiter, through a watch channel.

use std::path::Path;

use anyhow::Result;
use bulkhead_client::follow::stream;
use bulkhead_client::{pump, Attached, SandboxLost};
use bulkhead_dbus::Sandbox1Proxy;
use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::io::{open_writer, pump_stdin, Stdio};

/// How a process ended: containerd's exit status (the code, or 128 + signal) and when.
#[derive(Debug, Clone)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

/// What containerd reports when the sandbox went away under a process: killed.
pub const LOST_STATUS: u32 = 137;

pub struct Process {
    pub pid: u32,
    pub io: Stdio,
    pub status: Status,
    /// An exec's OCI process, kept from Exec until Start.
    pub spec: Option<String>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(pid: u32, io: Stdio) -> Process {
        Process {
            pid,
            io,
            status: Status::CREATED,
            spec: None,
            exit_tx: watch::channel(None).0,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit_tx.borrow().clone()
    }

    pub fn waiter(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    /// Record the exit (the first one wins) and mark the process stopped.
    pub fn exited(&mut self, e: Exit) {
        self.status = Status::STOPPED;
        self.exit_tx.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(e);
                true
            } else {
                false
            }
        });
    }
}

pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// Connect a process's streams to containerd's fifos. Call before the process starts,
/// so no byte of its output is missed.
pub async fn attach(
    sb: &Sandbox1Proxy<'_>,
    id: &str,
    exec_id: &str,
    io: &Stdio,
) -> Result<Attached> {
    let wait = stream(sb, id, exec_id, "wait").await?;
    let mut outputs = Vec::new();
    let mut streams = vec![("stdout", &io.stdout)];
    if !io.terminal {
        streams.push(("stderr", &io.stderr));
    }
    for (which, path) in streams {
        if path.is_empty() {
            continue;
        }
        let from = stream(sb, id, exec_id, which).await?;
        let to = open_writer(Path::new(path))?;
        outputs.push(pump(from, to));
    }
    if !io.stdin.is_empty() {
        pump_stdin(io.stdin.clone(), stream(sb, id, exec_id, "stdin").await?);
    }
    Ok(Attached::new(outputs, wait))
}

/// Wait (on a blocking thread) for the process to exit and its output to drain.
pub async fn finish(attached: Attached) -> Exit {
    let r = tokio::task::spawn_blocking(move || attached.finish()).await;
    let status = match r {
        Ok(Ok(s)) => s.code as u32,
        Ok(Err(e)) if e.downcast_ref::<SandboxLost>().is_some() => {
            log::warn!("{e:#}");
            LOST_STATUS
        }
        Ok(Err(e)) => {
            log::error!("waiting for a process: {e:#}");
            255
        }
        Err(e) => {
            log::error!("waiting for a process: {e}");
            255
        }
    };
    Exit { status, at: now() }
}
