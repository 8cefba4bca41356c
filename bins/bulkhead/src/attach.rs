//! Following one process in a sandbox from this terminal: its stdio and its exit status
//! arrive as file descriptors from the manager (`Sandbox1.Attach`), connected straight
//! to the guest, so the manager can restart meanwhile without losing a byte.

use anyhow::Result;
use bulkhead_client::follow::stream;
use bulkhead_dbus::Sandbox1Proxy;

use crate::stdio;

pub use bulkhead_client::{Attached, SandboxLost};

/// Attach to a created container's init (`exec_id` empty) or an exec'd process.
/// `stdin`: copy this process's stdin to it. `tty`: the process has a terminal, whose
/// output comes on the stdout stream alone.
pub async fn attach(
    sb: &Sandbox1Proxy<'_>,
    id: &str,
    exec_id: &str,
    stdin: bool,
    tty: bool,
) -> Result<Attached> {
    let wait = stream(sb, id, exec_id, "wait").await?;
    let mut outputs = vec![stdio::pump(
        stream(sb, id, exec_id, "stdout").await?,
        std::io::stdout(),
    )];
    if !tty {
        outputs.push(stdio::pump(
            stream(sb, id, exec_id, "stderr").await?,
            std::io::stderr(),
        ));
    }
    if stdin {
        // Not joined: a blocked read of our stdin must not keep us alive.
        stdio::pump_stdin(stream(sb, id, exec_id, "stdin").await?);
    }
    Ok(Attached::new(outputs, wait))
}
