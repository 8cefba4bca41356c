//! What every client of bulkheadd needs: the state directory, a connection to the
//! manager (the embedded bus and bulkheadd started on first use), errors in plain words,
//! and following one process through the file descriptors `Sandbox1.Attach` hands out.

pub mod follow;
pub mod pod;

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use bulkhead_dbus::{Manager1Proxy, Sandbox1Proxy};

pub use follow::{pump, Attached, SandboxLost};
pub use pod::{NewPod, Pod};

/// The manager's state directory: `$BULKHEAD_ROOT`, else /run/bulkhead.
pub fn state_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| bulkhead_host::config::DEFAULT_STATE_DIR.into())
}

pub fn bulkheadd_path() -> PathBuf {
    bulkhead_host::config::Config::load()
        .ok()
        .and_then(|c| c.binary(bulkhead_host::config::Binary::Bulkheadd))
        .unwrap_or_else(|| "bulkheadd".into())
}

pub struct Client {
    pub conn: zbus::Connection,
    pub manager: Manager1Proxy<'static>,
}

impl Client {
    pub async fn connect() -> Result<Client> {
        let dir = state_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let (conn, _) = bulkhead_dbus::bus::connect_manager(&dir, &bulkheadd_path()).await?;
        Client::over(conn).await
    }

    /// Connect to a manager that is running (or that the bus activates), starting
    /// neither a bus nor bulkheadd from this process: for a caller whose seccomp filter
    /// forbids exec (the shim).
    pub async fn connect_started() -> Result<Client> {
        let (conn, _) = bulkhead_dbus::bus::connect_manager_started(&state_dir()).await?;
        Client::over(conn).await
    }

    async fn over(conn: zbus::Connection) -> Result<Client> {
        let manager = Manager1Proxy::new(&conn).await?;
        Ok(Client { conn, manager })
    }

    pub async fn sandbox(&self, id: &str) -> Result<Sandbox1Proxy<'static>> {
        let path = self.manager.get_sandbox(id).await.map_err(explain)?;
        Ok(Sandbox1Proxy::builder(&self.conn)
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?)
    }
}

/// A D-Bus error as a user reads it: the manager's message, then the error's name.
pub fn explain(e: zbus::Error) -> anyhow::Error {
    match &e {
        zbus::Error::MethodError(name, Some(msg), _) => anyhow!("{msg} ({})", name.as_str()),
        _ => anyhow!(e),
    }
}
