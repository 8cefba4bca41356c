//! Which bus the manager lives on, and getting there.
//!
//! In order: `BULKHEAD_BUS_ADDRESS` (explicit), the system bus named by
//! `DBUS_SYSTEM_BUS_ADDRESS`, a running system bus at its standard socket, and otherwise
//! the *embedded* bus: a private dbus-daemon with a config of ours under
//! `<state>/bus/`, started by the first command that needs it. On the embedded bus the
//! manager is D-Bus activated (a service file in `<state>/bus/services`), so a bulkheadd
//! that died is started again by the next call that names it. Where activation is not
//! set up (a system bus without our files installed), the client starts bulkheadd itself.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::MANAGER_NAME;

/// The system bus's standard socket.
pub const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// `BULKHEAD_BUS_ADDRESS`.
    Explicit,
    /// The system bus.
    System,
    /// Our private dbus-daemon under the state directory.
    Embedded,
}

impl BusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BusKind::Explicit => "explicit",
            BusKind::System => "system",
            BusKind::Embedded => "embedded",
        }
    }
}

/// Where the bus is, decided without starting anything.
#[derive(Debug, Clone)]
pub struct BusChoice {
    pub kind: BusKind,
    pub address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot prepare the embedded bus under {dir}: {source}")]
    Setup { dir: String, source: std::io::Error },
    #[error("cannot start dbus-daemon (is the dbus package installed?): {0}")]
    Daemon(String),
    #[error("cannot connect to the bus at {address}: {source}")]
    Connect {
        address: String,
        source: Box<zbus::Error>,
    },
    #[error("bulkheadd did not come up on the bus: {0}")]
    Manager(String),
}

/// The embedded bus's directory.
pub fn embedded_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("bus")
}

/// The embedded bus's address.
pub fn embedded_address(state_dir: &Path) -> String {
    format!(
        "unix:path={}",
        embedded_dir(state_dir).join("socket").display()
    )
}

/// Decide which bus to use (no side effects).
pub fn choose(state_dir: &Path) -> BusChoice {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(a) = env("BULKHEAD_BUS_ADDRESS") {
        return BusChoice {
            kind: BusKind::Explicit,
            address: a,
        };
    }
    if let Some(a) = env("DBUS_SYSTEM_BUS_ADDRESS") {
        return BusChoice {
            kind: BusKind::System,
            address: a,
        };
    }
    if std::os::unix::net::UnixStream::connect(SYSTEM_BUS_SOCKET).is_ok() {
        return BusChoice {
            kind: BusKind::System,
            address: format!("unix:path={SYSTEM_BUS_SOCKET}"),
        };
    }
    BusChoice {
        kind: BusKind::Embedded,
        address: embedded_address(state_dir),
    }
}

/// The embedded bus's config. Anyone may connect and call (bulkheadd checks the caller's
/// uid on every call that changes something); only root may own bulkhead's names. No
/// rule allows eavesdropping: a caller sees its own calls' replies and the broadcast
/// signals, never another's method calls (a spec's environment), replies or the
/// descriptors `Attach` hands out; `BecomeMonitor` is the bus owner's (root's) alone.
pub fn embedded_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- bulkhead's embedded bus: written by bulkhead, do not edit. -->
<busconfig>
  <type>bulkhead</type>
  <listen>unix:path={d}/socket</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{d}/services</servicedir>
  <pidfile>{d}/pid</pidfile>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
    <deny own_prefix="org.bulkhead"/>
  </policy>
  <policy user="root">
    <allow own_prefix="org.bulkhead"/>
  </policy>
  <!-- Creating a sandbox waits for its guest to boot: allow minutes, not seconds. -->
  <limit name="reply_timeout">600000</limit>
  <limit name="max_incoming_unix_fds">64</limit>
  <limit name="max_outgoing_unix_fds">64</limit>
</busconfig>
"#
    )
}

/// Variables an activated bulkheadd gets from the command that wrote its activation
/// file (dbus-daemon passes its own environment, which is that of whichever command
/// started the bus, maybe long ago).
const FORWARDED_ENV: &[&str] = &["BULKHEAD_CONFIG", "BULKHEAD_GUEST_DIR", "BULKHEAD_LOG"];

/// A relative path in a forwarded variable means the writer's directory; bulkheadd
/// runs elsewhere, so it gets the absolute form.
fn absolute_if_path(key: &str, v: String) -> String {
    if key == "BULKHEAD_LOG" || v.is_empty() {
        return v;
    }
    std::path::absolute(&v)
        .map(|p| p.display().to_string())
        .unwrap_or(v)
}

/// The activation file that lets the embedded bus start bulkheadd on demand.
pub fn activation_file(bulkheadd: &Path, state_dir: &Path) -> String {
    // dbus-daemon splits Exec like a shell; values that would need quoting are left out.
    let plain = |v: &str| {
        !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c))
    };
    let env: Vec<String> = FORWARDED_ENV
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .map(|v| absolute_if_path(k, v))
                .filter(|v| plain(v))
                .map(|v| format!("{k}={v}"))
        })
        .collect();
    // Exec wants an absolute path; env is not always in /usr/bin (busybox systems).
    let env_bin = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("env"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| "/usr/bin/env".into());
    let prefix = if env.is_empty() {
        String::new()
    } else {
        format!("{} {} ", env_bin.display(), env.join(" "))
    };
    format!(
        "[D-BUS Service]\nName={MANAGER_NAME}\nExec={prefix}{} --state-dir {} --log-file {}\n",
        bulkheadd.display(),
        state_dir.display(),
        state_dir.join("bulkheadd.log").display()
    )
}

fn setup_err(dir: &Path) -> impl Fn(std::io::Error) -> BusError + '_ {
    move |source| BusError::Setup {
        dir: dir.display().to_string(),
        source,
    }
}

fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    // Per process: two commands may rewrite the same file at once.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::File::create(&tmp)?.write_all(text.as_bytes())?;
    std::fs::rename(tmp, path)
}

/// Start the embedded dbus-daemon unless it already runs. Serialized by a lock file, so
/// two commands started at once share one bus.
pub fn ensure_embedded(state_dir: &Path, bulkheadd: &Path) -> Result<String, BusError> {
    let dir = embedded_dir(state_dir);
    let err = setup_err(&dir);
    std::fs::create_dir_all(dir.join("services")).map_err(&err)?;
    write_if_changed(
        &dir.join("services").join(format!("{MANAGER_NAME}.service")),
        &activation_file(bulkheadd, state_dir),
    )
    .map_err(&err)?;
    let address = embedded_address(state_dir);
    let socket = dir.join("socket");
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(address);
    }
    let lock = std::fs::File::create(dir.join("lock")).map_err(&err)?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(address);
    }
    // Nobody answers on the socket and we hold the lock: a bus that died (or a machine
    // that rebooted with /run kept) left its socket and pid file; dbus-daemon refuses to
    // start over a pid file.
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(dir.join("pid"));
    let conf = dir.join("bus.conf");
    write_if_changed(&conf, &embedded_config(&dir)).map_err(&err)?;
    let out = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .arg("--fork")
        .arg("--print-address=1")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| BusError::Daemon(e.to_string()))?;
    if !out.status.success() {
        return Err(BusError::Daemon(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    tracing::debug!(address, "embedded bus started");
    Ok(address)
}

/// Connect to the manager's bus, starting the embedded bus if that is the one, and make
/// sure bulkheadd owns its name (activating or starting it).
pub async fn connect_manager(
    state_dir: &Path,
    bulkheadd: &Path,
) -> Result<(zbus::Connection, BusChoice), BusError> {
    let choice = choose(state_dir);
    if choice.kind == BusKind::Embedded {
        ensure_embedded(state_dir, bulkheadd)?;
    }
    let conn = connect(&choice.address).await?;
    ensure_manager(&conn, &choice, state_dir, Some(bulkheadd)).await?;
    Ok((conn, choice))
}

/// Like [`connect_manager`], for a process that may start nothing itself (the shim
/// under its seccomp filter): the bus must be up, and bulkheadd running or started by
/// the bus's activation.
pub async fn connect_manager_started(
    state_dir: &Path,
) -> Result<(zbus::Connection, BusChoice), BusError> {
    let choice = choose(state_dir);
    let conn = connect(&choice.address).await?;
    ensure_manager(&conn, &choice, state_dir, None).await?;
    Ok((conn, choice))
}

/// Open a connection to a bus by address.
pub async fn connect(address: &str) -> Result<zbus::Connection, BusError> {
    let e = |source| BusError::Connect {
        address: address.to_string(),
        source: Box::new(source),
    };
    zbus::connection::Builder::address(address)
        .map_err(e)?
        .build()
        .await
        .map_err(e)
}

async fn ensure_manager(
    conn: &zbus::Connection,
    choice: &BusChoice,
    state_dir: &Path,
    bulkheadd: Option<&Path>,
) -> Result<(), BusError> {
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| BusError::Manager(e.to_string()))?;
    let name = zbus::names::BusName::try_from(MANAGER_NAME).expect("valid name");
    if dbus.name_has_owner(name.clone()).await.unwrap_or(false) {
        return Ok(());
    }
    let wk = zbus::names::WellKnownName::try_from(MANAGER_NAME).expect("valid name");
    let bulkheadd = match (dbus.start_service_by_name(wk, 0).await, bulkheadd) {
        (Ok(_), _) => return Ok(()),
        (Err(e), Some(b)) => {
            tracing::debug!("activation of {MANAGER_NAME} failed: {e}; starting it");
            b
        }
        (Err(e), None) => {
            return Err(BusError::Manager(format!(
                "{MANAGER_NAME} is not running and the bus did not start it: {e}"
            )))
        }
    };
    // No activation on this bus: start bulkheadd ourselves, detached.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("bulkheadd.log"))
        .map_err(|e| BusError::Manager(format!("log file: {e}")))?;
    let mut cmd = Command::new(bulkheadd);
    cmd.arg("--state-dir")
        .arg(state_dir)
        .arg("--bus-address")
        .arg(&choice.address)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| BusError::Manager(e.to_string()))?,
        )
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; the manager must not die with our session.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
    }
    cmd.spawn()
        .map_err(|e| BusError::Manager(format!("cannot run {}: {e}", bulkheadd.display())))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if dbus.name_has_owner(name.clone()).await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BusError::Manager(format!(
        "{MANAGER_NAME} has no owner 20 s after starting {} (see {})",
        bulkheadd.display(),
        state_dir.join("bulkheadd.log").display()
    )))
}
