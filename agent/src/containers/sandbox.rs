//! The pod sandbox in the guest: the process holding the pod's shared IPC, UTS and
//! (optionally) PID namespaces, and guest-wide settings.

use std::path::PathBuf;
use std::time::Instant;

use bulkhead_protocol::{AgentError, SandboxConfig};

use super::{io_err, Runtime, Sandbox};

impl Runtime {
    pub fn create_sandbox(&self, cfg: SandboxConfig) -> Result<(), AgentError> {
        if let Some(h) = &cfg.hostname {
            if h.is_empty() || h.len() > 64 || h.contains('\0') {
                return Err(AgentError::InvalidArgument(format!("hostname {h:?}")));
            }
        }
        let mut t = self.tables();
        if t.sandbox.is_some() {
            return Err(AgentError::AlreadyExists("sandbox".into()));
        }
        // The magic link, not current_exe()'s readlink of it: PID 1's executable lies
        // under the root it left (sys::remount_root_for_pivot), and the link opens the
        // running binary wherever it lies.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("--ns-holder");
        if cfg.share_pid {
            cmd.arg("--pid");
        }
        if let Some(h) = &cfg.hostname {
            cmd.arg("--hostname").arg(h);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if cfg.share_pid {
            flags |= libc::CLONE_NEWPID;
        }
        use std::os::unix::process::CommandExt;
        // SAFETY: unshare is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let since = Instant::now();
        let mut child = cmd.spawn().map_err(io_err("sandbox namespace holder"))?;
        // The holder prints one line once its namespaces are ready: its pid-namespace
        // init's pid (0 without a shared PID namespace).
        let mut line = String::new();
        {
            use std::io::BufRead;
            let out = child
                .stdout
                .take()
                .ok_or_else(|| AgentError::Io("holder stdout".into()))?;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        // The holder's exit, if it ever comes, is the reaper's to collect.
        let _ = self.reaper.watch(child.id() as i32, since);
        let pid_init: u32 = line.trim().parse().map_err(|_| {
            let _ = child.kill();
            AgentError::Io(format!(
                "sandbox holder failed to start ({:?})",
                line.trim()
            ))
        })?;
        let ns = |n: &str| PathBuf::from(format!("/proc/{}/ns/{n}", child.id()));
        t.sandbox = Some(Sandbox {
            ipc: ns("ipc"),
            uts: ns("uts"),
            pid: cfg
                .share_pid
                .then(|| PathBuf::from(format!("/proc/{pid_init}/ns/pid"))),
            holder: child,
        });
        Ok(())
    }

    pub fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let ids: Vec<String> = self.tables().containers.keys().cloned().collect();
        let mut failed = Vec::new();
        for id in ids {
            if let Err(e) = self.delete(&id, true) {
                crate::log(&format!("destroy sandbox: delete {id}: {e}"));
                failed.push(format!("{id}: {e}"));
            }
        }
        let sb = self.tables().sandbox.take();
        match sb {
            Some(mut sb) => {
                let _ = sb.holder.kill();
                if failed.is_empty() {
                    Ok(())
                } else {
                    // The sandbox is gone either way; the caller learns what is left.
                    Err(AgentError::Runtime(format!(
                        "sandbox destroyed, containers not deleted: {}",
                        failed.join("; ")
                    )))
                }
            }
            None => Err(AgentError::NotFound("sandbox".into())),
        }
    }

    pub fn set_time(&self, unix_nanos: u64) -> Result<(), AgentError> {
        if !self.in_guest {
            return Err(AgentError::Unsupported(
                "SetTime outside a guest would set the host's clock".into(),
            ));
        }
        let ts = libc::timespec {
            tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(AgentError::Io(format!(
                "clock_settime: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}
