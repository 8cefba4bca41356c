//! The shim's own lifecycle, as containerd drives it: `start` (one shim per pod: every
//! container of a CRI pod is served by the shim its sandbox started), serving the task
//! API until `shutdown`, and `delete`, which containerd runs when a shim died, to clean
//! up what it left.
//!
//! The serving process runs under its own seccomp allow list (`seccomp/x86_64.json`,
//! class `shim`) from the moment its task service exists, on every thread: it may talk
//! to containerd, the bus and its fifos, and mount a container's rootfs, but never exec,
//! trace, load a module or make a namespace. So it starts nothing itself: `start`, which
//! runs before it, makes sure the bus and bulkheadd are up.

use std::sync::Arc;

use async_trait::async_trait;
use bulkhead_client::Client;
use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{spawn, Config, Error, ExitSignal, Flags, StartOpts};
use serde_json::Value;

use crate::pod::Role;
use crate::process::{now, LOST_STATUS};
use crate::task::Service;

/// The shim's seccomp policy, compiled by build.rs: one list, `shim`.
pub static SECCOMP: bulkhead_seccomp::Programs =
    bulkhead_seccomp::Programs(include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs")));

/// `kill` (the default), `log` (let calls outside the list through and have the kernel
/// log them) or `off`, from the environment containerd gives the shim.
pub const SECCOMP_ENV: &str = "BULKHEAD_SHIM_SECCOMP";

pub struct BulkheadShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

/// The bundle's spec (containerd runs `start` and `delete` in the bundle directory).
fn bundle_spec() -> Option<Value> {
    let text = std::fs::read_to_string("config.json").ok()?;
    serde_json::from_str(&text).ok()
}

#[async_trait]
impl containerd_shim::Shim for BulkheadShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        BulkheadShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::default(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // A pod's containers share the shim its sandbox started: the socket address is
        // derived from the grouping id, and a second `spawn` finds it already served.
        let grouping = match bundle_spec().map(|s| Role::of(&s, &opts.id)) {
            Some(Ok(Role::Container { sandbox })) => sandbox,
            _ => opts.id.clone(),
        };
        if grouping == opts.id {
            // A new shim: the serving process may start nothing (its seccomp filter
            // forbids exec), so bring up the bus and bulkheadd from here if they are not.
            if let Err(e) = Client::connect().await {
                log::warn!("bulkheadd is not reachable yet: {e:#}");
            }
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        std::fs::write("address", &address)
            .map_err(|e| Error::Other(format!("writing the address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim serving this task died. Take its container (or, for a pod's sandbox,
        // the whole VM) down so nothing is left half alive, and undo the rootfs mount.
        let role = bundle_spec()
            .and_then(|s| Role::of(&s, &self.id).ok())
            .unwrap_or(Role::Sandbox);
        match Client::connect().await {
            Ok(c) => match &role {
                Role::Sandbox => {
                    let _ = c.manager.remove_sandbox(&self.id, true).await;
                }
                Role::Container { sandbox } => {
                    if let Ok(sb) = c.sandbox(sandbox).await {
                        let _ = sb.delete_container(&self.id, true).await;
                    }
                }
            },
            Err(e) => log::warn!("cleanup of {}: cannot reach bulkheadd: {e:#}", self.id),
        }
        let rootfs = std::path::Path::new("rootfs");
        let _ = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH);
        Ok(DeleteResponse {
            exit_status: LOST_STATUS,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let service = Service::new(self.namespace.clone(), publisher, self.exit.clone());
        // Every thread, before the first task call is read. A shim that cannot have its
        // filter does not serve.
        if let Err(e) = bulkhead_seccomp::Mode::from_env(SECCOMP_ENV)
            .and_then(|m| SECCOMP.install("shim", m, true))
        {
            log::error!("{e}");
            std::process::exit(1);
        }
        service
    }
}

#[cfg(test)]
mod seccomp_policy {
    #[test]
    fn the_policy_kills_exec_and_ptrace() {
        bulkhead_seccomp::testing::assert_files_and_sockets_but_no_exec(&super::SECCOMP, "shim");
        use bulkhead_seccomp::testing::{assert_ioctls, FIONBIO};
        assert_ioctls(&super::SECCOMP, "shim", &[FIONBIO]);
    }
}
