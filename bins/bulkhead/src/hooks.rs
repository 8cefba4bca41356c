//! OCI hooks, run on the host by the OCI CLI. The container runs in a VM, so a hook's
//! binary (dockerd's libnetwork-setkey, say) exists only here: the guest never sees the
//! spec's hooks. Each hook gets the container's state on stdin, its own args and env,
//! and is killed at its timeout.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Run every hook of one stage (`prestart`, `createRuntime`, `poststart`, `poststop`).
pub fn run_stage(hooks: &Value, stage: &str, state: &Value) -> Result<()> {
    let Some(list) = hooks.get(stage).and_then(|l| l.as_array()) else {
        return Ok(());
    };
    for h in list {
        run_one(h, state).with_context(|| format!("{stage} hook {}", h["path"]))?;
    }
    Ok(())
}

fn run_one(h: &Value, state: &Value) -> Result<()> {
    let path = h["path"]
        .as_str()
        .ok_or_else(|| anyhow!("hook without a path"))?;
    let args: Vec<&str> = h["args"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let mut cmd = Command::new(path);
    {
        use std::os::unix::process::CommandExt;
        if let Some(argv0) = args.first() {
            cmd.arg0(argv0);
        }
    }
    cmd.args(args.iter().skip(1))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(env) = h["env"].as_array() {
        cmd.env_clear();
        for kv in env.iter().filter_map(|x| x.as_str()) {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot run {path}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state.to_string().as_bytes());
    }
    let timeout = h["timeout"].as_u64().map(Duration::from_secs);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {:?}", timeout.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{status}: {}", err.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runs_hooks_with_state_on_stdin_and_reports_failure() {
        let dir = std::env::temp_dir().join(format!("bh-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("state");
        let hooks = json!({
            "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]}],
            "poststart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no >&2; exit 3"]}],
            "poststop": [{"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}],
        });
        let state = json!({"id": "c1", "status": "created"});
        run_stage(&hooks, "prestart", &state).unwrap();
        let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got, state);
        let e = run_stage(&hooks, "poststart", &state).unwrap_err();
        assert!(format!("{e:#}").contains("no"), "{e:#}");
        let e = run_stage(&hooks, "poststop", &state).unwrap_err();
        assert!(format!("{e:#}").contains("timed out"), "{e:#}");
        run_stage(&hooks, "createRuntime", &state).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
