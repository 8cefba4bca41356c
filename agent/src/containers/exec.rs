//! Processes exec'd into a running container, and the stdio calls that apply to any
//! process (attach, resize, close stdin).

use std::time::Instant;

use bulkhead_protocol::{AgentError, ExecProcess, StdioStream};
use libcontainer::container::ContainerStatus;
use oci_spec::runtime::Process;

use super::{io_err, not_found, runtime_err, validate_id, Proc, Runtime};

/// Most live execs one container keeps.
const MAX_EXECS: usize = 1024;

impl Runtime {
    pub fn exec(&self, req: ExecProcess) -> Result<u32, AgentError> {
        validate_id(&req.id)?;
        validate_id(&req.exec_id)?;
        let process: Process = serde_json::from_str(&req.process_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI process: {e}")))?;
        {
            let t = self.tables();
            let c = t
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            // An exec id whose process has exited may be used again (containerd reuses
            // them once the exec is deleted); a live one may not.
            if c.execs
                .get(&req.exec_id)
                .is_some_and(|p| p.exit.get().is_none())
            {
                return Err(AgentError::AlreadyExists(format!("exec {}", req.exec_id)));
            }
            // The cap is on live execs: a probe that execs every 10 s must run forever.
            let live = c.execs.values().filter(|p| p.exit.get().is_none()).count();
            if live >= MAX_EXECS {
                return Err(AgentError::InvalidArgument(format!(
                    "more than {MAX_EXECS} live execs"
                )));
            }
            if c.init.exit.get().is_some() {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {} has stopped",
                    req.id
                )));
            }
        }
        let _lc = self.lc_lock();
        let st = self.load(&req.id)?.status();
        if st != ContainerStatus::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {} is {st:?}",
                req.id
            )));
        }
        let path = self
            .bundle(&req.id)
            .join(format!("exec-{}.json", req.exec_id));
        std::fs::write(
            &path,
            serde_json::to_vec(&process).map_err(|e| AgentError::Io(e.to_string()))?,
        )
        .map_err(io_err("exec process.json"))?;
        let since = Instant::now();
        let terminal = process.terminal().unwrap_or(false);
        let res = self.spawn_with_stdio(&req.id, terminal, req.stdin, |b| {
            b.as_tenant()
                .with_detach(true)
                .with_process(Some(&path))
                .build()
                .map(|p| p.as_raw())
                .map_err(runtime_err)
        });
        let _ = std::fs::remove_file(&path);
        let (io, pid) = res?;
        let exit = self.reaper.watch(pid, since);
        let mut t = self.tables();
        let c = t
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        c.execs.insert(
            req.exec_id,
            Proc {
                pid: pid as u32,
                exit,
                io,
            },
        );
        Ok(pid as u32)
    }

    pub fn attach<C>(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
        conn: C,
        ready: impl FnOnce(&mut C) -> std::io::Result<()>,
    ) -> Result<(), AgentError>
    where
        C: std::io::Read + std::io::Write + Send + 'static,
    {
        let io = match self.with_proc(id, exec_id, |p| p.io.clone()) {
            Ok(io) => io,
            // A quick exec whose exit was collected before its output was asked for.
            Err(e) => exec_id.and_then(|x| self.collected_io(id, x)).ok_or(e)?,
        };
        io.attach(stream, conn, ready)
    }

    /// The stdio of `exec_id` if its exit was collected lately (the newest such).
    fn collected_io(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Option<std::sync::Arc<crate::stdio::ProcIo>> {
        let t = self.tables();
        t.containers
            .get(id)?
            .collected_io
            .iter()
            .rev()
            .find(|(x, _)| x == exec_id)
            .map(|(_, io)| io.clone())
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        self.with_proc(id, exec_id, |p| p.io.clone())?
            .resize(rows, cols)
    }

    pub fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<(), AgentError> {
        self.with_proc(id, exec_id, |p| p.io.close_stdin())
    }
}
