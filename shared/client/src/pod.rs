//! The one create path of every client (`bulkhead run`, the OCI CLI, the shim): a
//! container made in a sandbox of its own, made for it, or in a running one; and,
//! should the container not be made, the sandbox made for it removed again, so no
//! half-made pod is left. What a client does once it has the container (a monitor,
//! records, hooks, timing logs) stays the client's, with [`Client::undo`] to take it
//! back should that fail.

use bulkhead_dbus::{ContainerOptions, Sandbox1Proxy, SandboxOptions};

use crate::Client;

/// A container to make.
pub struct NewPod<'a> {
    /// The sandbox: made with these options when `own` is set, else one that runs.
    pub sandbox: &'a str,
    pub own: Option<SandboxOptions>,
    pub container: &'a str,
    /// The OCI spec, as JSON.
    pub spec_json: &'a str,
    /// A host directory (empty with `ContainerOptions::rootfs_overlay`).
    pub rootfs: &'a str,
    pub options: ContainerOptions,
}

/// A container [`Client::create_pod`] made.
pub struct Pod {
    pub sandbox_id: String,
    pub sandbox: Sandbox1Proxy<'static>,
    pub container: String,
    /// Its init's pid in the guest.
    pub pid: u32,
    /// The sandbox was made for it: undoing removes the sandbox.
    pub own: bool,
}

impl Client {
    /// Make `p`'s sandbox (when it is its own) and its container; if the container
    /// cannot be made, a sandbox made here is removed again before the error returns.
    pub async fn create_pod(&self, p: NewPod<'_>) -> zbus::Result<Pod> {
        let own = p.own.is_some();
        let path = match &p.own {
            Some(o) => self.manager.create_sandbox(p.sandbox, o.to_dict()).await?,
            None => self.manager.get_sandbox(p.sandbox).await?,
        };
        let made = async {
            let sb = Sandbox1Proxy::builder(&self.conn)
                .path(path)?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            let pid = sb
                .create_container(p.container, p.spec_json, p.rootfs, p.options.to_dict())
                .await?;
            Ok::<_, zbus::Error>((sb, pid))
        }
        .await;
        match made {
            Ok((sandbox, pid)) => Ok(Pod {
                sandbox_id: p.sandbox.to_string(),
                sandbox,
                container: p.container.to_string(),
                pid,
                own,
            }),
            Err(e) => {
                if own {
                    let _ = self.manager.remove_sandbox(p.sandbox, true).await;
                }
                Err(e)
            }
        }
    }

    /// Take back what [`Client::create_pod`] made: its own sandbox, or only its
    /// container in a sandbox it joined.
    pub async fn undo(&self, pod: &Pod) {
        if pod.own {
            let _ = self.manager.remove_sandbox(&pod.sandbox_id, true).await;
        } else {
            let _ = pod.sandbox.delete_container(&pod.container, true).await;
        }
    }
}
