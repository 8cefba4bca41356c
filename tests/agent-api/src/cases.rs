//! The test cases. Each returns `Ok(Outcome)` or an error saying what differed.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_protocol::client::ClientError;
use bulkhead_protocol::{
    encode, read_frame, write_frame, AgentError, ContainerState, ExecProcess, Hello, Request,
    Response, Rootfs, SandboxConfig, StdioStream,
};
use serde_json::json;

use crate::{collect, create_req, expect_success, run_container, spec, with_tmpfs, Env, TIMEOUT};

pub enum Outcome {
    Passed,
    /// Not applicable here, and why (said in the report, never counted as passed).
    Skipped(String),
}
use Outcome::{Passed, Skipped};

pub type Case = fn(&Env) -> Result<Outcome>;

pub fn all() -> Vec<(&'static str, Case)> {
    vec![
        ("health_and_details", health_and_details),
        ("true_exits_zero", true_exits_zero),
        ("exit_code_exact", exit_code_exact),
        ("signal_exit_reaches_host", signal_exit_reaches_host),
        ("stdout_stderr_separate", stdout_stderr_separate),
        ("process_defaults_sigpipe_nofile", process_defaults),
        ("stdin_round_trip_and_close", stdin_round_trip_and_close),
        ("output_before_attach_is_kept", output_before_attach_is_kept),
        ("flood_backpressure_control_unblocked", flood_backpressure),
        ("exec_and_exec_into_stopped", exec_and_exec_into_stopped),
        ("spec_process_fields", spec_process_fields),
        ("spec_security_fields", spec_security_fields),
        ("spec_seccomp_profile", spec_seccomp_profile),
        ("terminal_and_resize", terminal_and_resize),
        ("pause_resume_ps_stats", pause_resume_ps_stats),
        ("sandbox_shares_namespaces", sandbox_shares_namespaces),
        ("delete_rules", delete_rules),
        ("update_memory_limit_and_oom", update_and_oom),
        ("block_rootfs", block_rootfs),
        ("writes_reach_host_directory", writes_reach_host),
        ("set_time", set_time),
        ("network_update_checked", network_update_checked),
        ("bad_input_typed_errors", bad_input_typed_errors),
        ("oversized_and_garbage_frames", oversized_and_garbage_frames),
    ]
}

fn agent_err(r: std::result::Result<impl std::fmt::Debug, ClientError>) -> Result<AgentError> {
    match r {
        Err(ClientError::Agent(e)) => Ok(e),
        other => bail!("expected a typed agent error, got {other:?}"),
    }
}

fn health_and_details(env: &Env) -> Result<Outcome> {
    let mut c = env.client()?;
    let h = c.health()?;
    ensure!(h.protocol_version >= 2, "protocol {}", h.protocol_version);
    let d = c.guest_details()?;
    ensure!(d.cpus_online >= 1 && d.mem_total_kib > 0, "{d:?}");
    Ok(Passed)
}

fn true_exits_zero(env: &Env) -> Result<Outcome> {
    let o = run_container(env, "t-true", &spec(&["/bin/true"]), None)?;
    expect_success(&o)?;
    ensure!(o.stdout.is_empty() && o.stderr.is_empty());
    Ok(Passed)
}

fn exit_code_exact(env: &Env) -> Result<Outcome> {
    for code in [1, 42, 255] {
        let o = run_container(
            env,
            "t-exit",
            &spec(&["sh", "-c", &format!("exit {code}")]),
            None,
        )?;
        ensure!(
            o.status.code == code && o.status.signal.is_none(),
            "{:?}",
            o.status
        );
    }
    Ok(Passed)
}

fn signal_exit_reaches_host(env: &Env) -> Result<Outcome> {
    // A container's init is PID 1 of its namespace: only SIGKILL is forced on it. Other
    // signals are checked on an exec'd process, which is not.
    for all in [false, true] {
        let id = "t-sig";
        let mut c = env.client()?;
        c.create_container(create_req(
            env,
            id,
            &spec(&["sh", "-c", "sleep 300 & wait"]),
            false,
        ))?;
        c.start(id)?;
        c.signal(id, None, libc::SIGKILL, all)?;
        let st = env.client()?.wait(id, None)?;
        ensure!(
            st.signal == Some(libc::SIGKILL) && st.code == 137,
            "all={all}: {st:?}"
        );
        c.delete(id, false)?;
    }
    let id = "t-sig2";
    let mut c = env.client()?;
    c.create_container(create_req(env, id, &spec(&["sleep", "300"]), false))?;
    c.start(id)?;
    for (n, sig) in [libc::SIGTERM, libc::SIGUSR1, libc::SIGSEGV]
        .into_iter()
        .enumerate()
    {
        let exec_id = format!("s{n}");
        c.exec(ExecProcess {
            id: id.into(),
            exec_id: exec_id.clone(),
            process_json: json!({"args": ["sleep", "300"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}})
                .to_string(),
            stdin: false,
        })?;
        c.signal(id, Some(&exec_id), sig, false)?;
        let st = env.client()?.wait(id, Some(&exec_id))?;
        ensure!(
            st.signal == Some(sig) && st.code == 128 + sig,
            "signal {sig}: {st:?}"
        );
        // Its exit was collected, so the exec is gone.
        let e = agent_err(c.signal(id, Some(&exec_id), sig, false))?;
        ensure!(
            matches!(e, AgentError::NotFound(_)),
            "signal after the exit was collected: {e:?}"
        );
    }
    c.delete(id, true)?;
    Ok(Passed)
}

/// A container (whose spec sets no rlimits) starts with SIGPIPE at its default
/// disposition, not inherited as ignored from the agent, and with more than PID 1's
/// 1024 open files.
fn process_defaults(env: &Env) -> Result<Outcome> {
    let mut s = spec(&[
        "sh",
        "-c",
        "grep SigIgn /proc/self/status; ulimit -n; yes | head -c 3",
    ]);
    // No rlimits in the spec: the process keeps the agent's.
    if let Some(p) = s["process"].as_object_mut() {
        p.remove("rlimits");
    }
    let o = run_container(env, "t-defaults", &s, None)?;
    expect_success(&o)?;
    let mask = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .with_context(|| format!("no SigIgn in {:?}", o.stdout))?;
    ensure!(
        mask & (1 << (libc::SIGPIPE - 1)) == 0,
        "SIGPIPE is ignored in the container (SigIgn {mask:#x})"
    );
    let nofile: u64 = o
        .stdout
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no ulimit -n in {:?}", o.stdout))?;
    ensure!(nofile > 1024, "open files {nofile}");
    ensure!(o.stdout.ends_with("y\ny"), "yes | head: {:?}", o.stdout);
    Ok(Passed)
}

fn stdout_stderr_separate(env: &Env) -> Result<Outcome> {
    let o = run_container(
        env,
        "t-streams",
        &spec(&["sh", "-c", "echo to-out; echo to-err >&2; echo more-out"]),
        None,
    )?;
    expect_success(&o)?;
    ensure!(o.stdout == "to-out\nmore-out\n", "stdout {:?}", o.stdout);
    ensure!(o.stderr == "to-err\n", "stderr {:?}", o.stderr);
    Ok(Passed)
}

fn stdin_round_trip_and_close(env: &Env) -> Result<Outcome> {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    // Through the stream connection, closed by closing it.
    let o = run_container(
        env,
        "t-stdin",
        &spec(&["sh", "-c", "cat | wc -c"]),
        Some(&data),
    )?;
    expect_success(&o)?;
    ensure!(o.stdout.trim() == "200000", "wc said {:?}", o.stdout);
    // Closed by CloseStdin while the stream stays attached.
    let id = "t-stdin2";
    let mut c = env.client()?;
    c.create_container(create_req(
        env,
        id,
        &spec(&["sh", "-c", "cat; echo eof"]),
        true,
    ))?;
    let out = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stdout, TIMEOUT)?,
    );
    let mut inp = env.endpoint.attach(id, None, StdioStream::Stdin, TIMEOUT)?;
    c.start(id)?;
    inp.write_all(b"abc\n")?;
    std::thread::sleep(Duration::from_millis(100));
    c.expect_ok(&Request::CloseStdin {
        id: id.into(),
        exec_id: None,
    })?;
    let st = env.client()?.wait(id, None)?;
    let text = String::from_utf8(out.join().unwrap_or_default())?;
    ensure!(st.code == 0 && text == "abc\neof\n", "{st:?} {text:?}");
    drop(inp);
    c.delete(id, false)?;
    Ok(Passed)
}

fn output_before_attach_is_kept(env: &Env) -> Result<Outcome> {
    let id = "t-late";
    let mut c = env.client()?;
    c.create_container(create_req(
        env,
        id,
        &spec(&["sh", "-c", "seq 1 2000"]),
        false,
    ))?;
    c.start(id)?;
    // The process has exited (its output sits in the pipe) before anyone attaches.
    let st = env.client()?.wait(id, None)?;
    ensure!(st.code == 0, "{st:?}");
    let out = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stdout, TIMEOUT)?,
    );
    let text = String::from_utf8(out.join().unwrap_or_default())?;
    let want: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    ensure!(
        text == want,
        "got {} bytes, want {}",
        text.len(),
        want.len()
    );
    // A second attach of the same stream is refused.
    let e = agent_err(env.endpoint.attach(id, None, StdioStream::Stdout, TIMEOUT))?;
    ensure!(matches!(e, AgentError::FailedPrecondition(_)), "{e:?}");
    c.delete(id, false)?;
    Ok(Passed)
}

fn flood_backpressure(env: &Env) -> Result<Outcome> {
    // 32 MiB of output, read slowly at first: the writer blocks on the full pipe, the
    // agent does not buffer it, and control calls stay quick meanwhile.
    let id = "t-flood";
    // Smaller in a guest under nested virtualization, still far above what the pipe and
    // the socket buffers hold.
    let total: usize = if env.in_guest { 4 << 20 } else { 32 << 20 };
    let mut c = env.client()?;
    c.create_container(create_req(
        env,
        id,
        &spec(&["sh", "-c", &format!("head -c {total} /dev/zero")]),
        false,
    ))?;
    let mut out = env
        .endpoint
        .attach(id, None, StdioStream::Stdout, TIMEOUT)?;
    c.start(id)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        c.health()?;
        worst = worst.max(t.elapsed());
    }
    // The writer cannot have finished: nobody has read yet.
    let listed = c.containers()?;
    let state = listed.iter().find(|i| i.id == id).map(|i| i.state);
    ensure!(
        state == Some(ContainerState::Running),
        "state {state:?} while unread"
    );
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    ensure!(got == total, "read {got} of {total} bytes");
    let st = env.client()?.wait(id, None)?;
    ensure!(st.code == 0, "{st:?}");
    ensure!(
        worst < Duration::from_secs(2),
        "a health call took {worst:?} during the flood"
    );
    c.delete(id, false)?;
    Ok(Passed)
}

/// The agent's cap on execs per container (agent/src/containers.rs, MAX_EXECS).
const MAX_EXECS_SEEN: usize = 1024;

fn exec_and_exec_into_stopped(env: &Env) -> Result<Outcome> {
    let id = "t-exec";
    let mut c = env.client()?;
    c.create_container(create_req(env, id, &spec(&["sleep", "300"]), false))?;
    c.start(id)?;
    let process = json!({
        "args": ["sh", "-c", "read x; echo got:$x; echo $HOSTNAME_CHECK; exit 7"],
        "env": ["PATH=/bin", "HOSTNAME_CHECK=exec-env"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "terminal": false,
    });
    let e = ExecProcess {
        id: id.into(),
        exec_id: "e1".into(),
        process_json: process.to_string(),
        stdin: true,
    };
    let pid = c.exec(e.clone())?;
    ensure!(pid > 0);
    let out = collect(
        env.endpoint
            .attach(id, Some("e1"), StdioStream::Stdout, TIMEOUT)?,
    );
    let mut inp = env
        .endpoint
        .attach(id, Some("e1"), StdioStream::Stdin, TIMEOUT)?;
    inp.write_all(b"hello\n")?;
    drop(inp);
    let st = env.client()?.wait(id, Some("e1"))?;
    let text = String::from_utf8(out.join().unwrap_or_default())?;
    ensure!(st.code == 7, "exec exit {st:?}");
    ensure!(text == "got:hello\nexec-env\n", "exec output {text:?}");
    // A live exec's id is refused to a second exec; once its exit is collected the
    // exec is forgotten and its id free again (containerd reuses ids).
    let sleeper = ExecProcess {
        id: id.into(),
        exec_id: "e-live".into(),
        process_json: json!({"args": ["sleep", "300"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).to_string(),
        stdin: false,
    };
    let live_pid = c.exec(sleeper.clone())?;
    // The exec's pid is really in the container's process list while it runs.
    let ps = c.processes(id)?;
    ensure!(ps.contains(&live_pid), "exec pid {live_pid} not in {ps:?}");
    let err = agent_err(c.exec(sleeper))?;
    ensure!(matches!(err, AgentError::AlreadyExists(_)), "{err:?}");
    let quick = |exec_id: &str| {
        ExecProcess {
        id: id.into(),
        exec_id: exec_id.into(),
        process_json: json!({"args": ["true"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).to_string(),
        stdin: false,
    }
    };
    c.exec(quick("e1"))?;
    ensure!(env.client()?.wait(id, Some("e1"))?.code == 0, "e1 reused");
    // A client that collects a quick exec's exit before it asks for the output (the
    // CLI opens its wait stream first) still gets every byte.
    c.exec(ExecProcess {
        id: id.into(),
        exec_id: "e-late".into(),
        process_json: json!({"args": ["echo", "late"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).to_string(),
        stdin: false,
    })?;
    ensure!(env.client()?.wait(id, Some("e-late"))?.code == 0, "e-late");
    let late = collect(
        env.endpoint
            .attach(id, Some("e-late"), StdioStream::Stdout, TIMEOUT)?,
    );
    let text = String::from_utf8(late.join().unwrap_or_default())?;
    ensure!(
        text == "late\n",
        "output attached after the exit was collected: {text:?}"
    );
    // The cap counts live execs only: more execs than the cap, one after another,
    // all run (a kubelet exec probe every 10 s must work forever). Host mode only:
    // 1000 execs take 3 s there and several minutes in a nested guest.
    let rounds = if env.in_guest { 0 } else { MAX_EXECS_SEEN + 8 };
    for n in 0..rounds {
        let x = format!("p{n}");
        c.exec(quick(&x))?;
        env.client()?.wait(id, Some(&x))?;
    }
    c.signal(id, None, libc::SIGKILL, false)?;
    env.client()?.wait(id, None)?;
    let err = agent_err(c.exec(ExecProcess {
        id: id.into(),
        exec_id: "e2".into(),
        process_json: process.to_string(),
        stdin: false,
    }))?;
    ensure!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
    c.delete(id, false)?;
    Ok(Passed)
}

fn spec_process_fields(env: &Env) -> Result<Outcome> {
    let mut s = spec(&[
        "sh",
        "-c",
        "echo uid=$(id -u) gid=$(id -g) groups=$(id -G); echo cwd=$(pwd); echo env=$FOO; \
         echo host=$(hostname); echo nofile=$(ulimit -n); echo msgmax=$(cat /proc/sys/kernel/msgmax)",
    ]);
    s["process"]["user"] = json!({"uid": 65534, "gid": 65534, "additionalGids": [5, 7]});
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 333, "soft": 222}]);
    s["hostname"] = json!("specbox");
    s["linux"]["sysctl"] = json!({"kernel.msgmax": "4321"});
    let o = run_container(env, "t-fields", &s, None)?;
    expect_success(&o)?;
    let want = "uid=65534 gid=65534 groups=65534 5 7\ncwd=/tmp\nenv=bar baz\nhost=specbox\nnofile=222\nmsgmax=4321\n";
    ensure!(
        o.stdout == want,
        "got {:?}\nwant {:?}\nstderr {}",
        o.stdout,
        want,
        o.stderr
    );
    Ok(Passed)
}

fn status_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

fn spec_security_fields(env: &Env) -> Result<Outcome> {
    // Capabilities: only CAP_NET_BIND_SERVICE (bit 10) and CAP_KILL (bit 5).
    let mut s = spec(&[
        "sh",
        "-c",
        "cat /proc/self/status; echo ---; touch /rootfs-write 2>&1; echo touch=$?; \
         echo masked=$(wc -c < /etc/group); echo 1 > /proc/sys/kernel/msgmax; echo procsys=$?; \
         touch /scratch/ok && echo scratch=ok",
    ]);
    let caps = json!(["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    s["process"]["capabilities"] = json!({"bounding": caps, "effective": caps, "permitted": caps});
    s["process"]["noNewPrivileges"] = json!(true);
    s["linux"]["maskedPaths"]
        .as_array_mut()
        .context("maskedPaths")?
        .push(json!("/etc/group"));
    s = with_tmpfs(s, "/scratch");
    let o = run_container(env, "t-sec", &s, None)?;
    expect_success(&o)?;
    let (status, rest) = o.stdout.split_once("---\n").context("no separator")?;
    let cap = |k| status_field(status, k).unwrap_or_default();
    ensure!(
        cap("CapEff:") == "0000000000000420",
        "CapEff {}",
        cap("CapEff:")
    );
    ensure!(
        cap("CapBnd:") == "0000000000000420",
        "CapBnd {}",
        cap("CapBnd:")
    );
    ensure!(
        cap("NoNewPrivs:") == "1",
        "NoNewPrivs {}",
        cap("NoNewPrivs:")
    );
    ensure!(
        rest.contains("Read-only file system") && rest.contains("touch=1"),
        "rootfs not read-only: {rest}"
    );
    ensure!(rest.contains("masked=0"), "/etc/group not masked: {rest}");
    ensure!(rest.contains("procsys=1"), "/proc/sys writable: {rest}");
    ensure!(rest.contains("scratch=ok"), "tmpfs mount missing: {rest}");
    Ok(Passed)
}

fn spec_seccomp_profile(env: &Env) -> Result<Outcome> {
    let mut s = with_tmpfs(
        spec(&[
            "sh",
            "-c",
            "mkdir /scratch/d; echo mkdir=$?; touch /scratch/f; echo touch=$?",
        ]),
        "/scratch",
    );
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let o = run_container(env, "t-seccomp", &s, None)?;
    expect_success(&o)?;
    ensure!(
        o.stdout == "mkdir=1\ntouch=0\n",
        "stdout {:?} stderr {:?}",
        o.stdout,
        o.stderr
    );
    ensure!(
        o.stderr.contains("Operation not permitted"),
        "stderr {:?}",
        o.stderr
    );
    Ok(Passed)
}

fn terminal_and_resize(env: &Env) -> Result<Outcome> {
    let id = "t-tty";
    let mut s = spec(&["sh", "-c", "read line; stty size; tty; echo line=$line"]);
    s["process"]["terminal"] = json!(true);
    let mut c = env.client()?;
    c.create_container(create_req(env, id, &s, true))?;
    c.expect_ok(&Request::ResizePty {
        id: id.into(),
        exec_id: None,
        rows: 41,
        cols: 113,
    })?;
    let out = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stdout, TIMEOUT)?,
    );
    let mut inp = env.endpoint.attach(id, None, StdioStream::Stdin, TIMEOUT)?;
    c.start(id)?;
    inp.write_all(b"typed\n")?;
    let st = env.client()?.wait(id, None)?;
    drop(inp);
    let text = String::from_utf8_lossy(&out.join().unwrap_or_default()).replace('\r', "");
    ensure!(st.code == 0, "{st:?} {text:?}");
    ensure!(text.contains("41 113\n"), "no resize in {text:?}");
    ensure!(text.contains("/dev/pts/"), "no tty in {text:?}");
    ensure!(text.contains("line=typed"), "no input in {text:?}");
    // Not a terminal: resize is refused.
    c.delete(id, false)?;
    c.create_container(create_req(env, id, &spec(&["true"]), false))?;
    let e = agent_err(c.expect_ok(&Request::ResizePty {
        id: id.into(),
        exec_id: None,
        rows: 1,
        cols: 1,
    }))?;
    ensure!(matches!(e, AgentError::FailedPrecondition(_)), "{e:?}");
    c.delete(id, false)?;
    Ok(Passed)
}

fn pause_resume_ps_stats(env: &Env) -> Result<Outcome> {
    let id = "t-pause";
    let mut c = env.client()?;
    let pid = c.create_container(create_req(
        env,
        id,
        &spec(&["sh", "-c", "sleep 300 & while :; do sleep 0.05; done"]),
        false,
    ))?;
    c.start(id)?;
    // The shell forks its children soon after start; a slow guest takes a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ps = loop {
        let ps = c.processes(id)?;
        if ps.len() >= 2 || Instant::now() > deadline {
            break ps;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(ps.contains(&pid) && ps.len() >= 2, "ps {ps:?} (init {pid})");
    let state = |c: &mut bulkhead_protocol::client::AgentClient<_>| -> Result<ContainerState> {
        let l = c.containers()?;
        l.iter()
            .find(|i| i.id == id)
            .map(|i| i.state)
            .context("not listed")
    };
    c.expect_ok(&Request::Pause { id: id.into() })?;
    ensure!(state(&mut c)? == ContainerState::Paused);
    let s1 = c.stats(id)?;
    std::thread::sleep(Duration::from_millis(300));
    let s2 = c.stats(id)?;
    ensure!(s1.cpu_usage_usec.is_some(), "no cpu figure: {s1:?}");
    ensure!(
        s1.cpu_usage_usec == s2.cpu_usage_usec,
        "cpu moved while frozen: {s1:?} {s2:?}"
    );
    c.expect_ok(&Request::Resume { id: id.into() })?;
    ensure!(state(&mut c)? == ContainerState::Running);
    std::thread::sleep(Duration::from_millis(300));
    let s3 = c.stats(id)?;
    ensure!(
        s3.cpu_usage_usec > s2.cpu_usage_usec,
        "cpu still after resume: {s3:?}"
    );
    if env.has_memory_controller() {
        ensure!(
            s3.memory_current.unwrap_or(0) > 0 && s3.pids_current >= Some(2),
            "{s3:?}"
        );
    }
    c.delete(id, true)?;
    Ok(Passed)
}

fn sandbox_shares_namespaces(env: &Env) -> Result<Outcome> {
    // The sandbox must outlive the connection that created it (bulkheadd opens one
    // connection per call): create it on a connection of its own and close that first.
    env.client()?.create_sandbox(SandboxConfig {
        hostname: Some("podhost".into()),
        share_pid: true,
    })?;
    // Let the agent notice the closed connection and end its thread.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut c = env.client()?;
    let res = (|| -> Result<Outcome> {
        // Namespaces given by path (as a pod's containers join the pause container's)
        // are the sandbox's; the network namespace is always the guest's.
        let pod_spec = |args: &[&str]| {
            let mut s = spec(args);
            s["hostname"] = serde_json::Value::Null;
            s["linux"]["namespaces"] = json!([
                {"type": "pid", "path": "/proc/1/ns/pid"},
                {"type": "network", "path": "/var/run/netns/whatever"},
                {"type": "ipc", "path": "/proc/1/ns/ipc"},
                {"type": "uts", "path": "/proc/1/ns/uts"},
                {"type": "mount"},
            ]);
            s
        };
        c.create_container(create_req(
            env,
            "pod-a",
            &pod_spec(&["sleep", "300"]),
            false,
        ))?;
        c.start("pod-a")?;
        let probe = "for n in ipc uts pid net; do readlink /proc/self/ns/$n; done; hostname; ps -o comm | grep -c '^sleep$'";
        let o = run_container(env, "pod-b", &pod_spec(&["sh", "-c", probe]), None)?;
        expect_success(&o)?;
        let lines: Vec<&str> = o.stdout.lines().collect();
        ensure!(
            lines.len() == 6,
            "probe output {:?} / {}",
            o.stdout,
            o.stderr
        );
        ensure!(lines[4] == "podhost", "hostname {}", lines[4]);
        ensure!(
            lines[5] == "1",
            "pod-b does not see pod-a's sleep: {}",
            lines[5]
        );
        // A container outside the pod has its own ipc/uts/pid namespaces.
        let o2 = run_container(env, "solo", &spec(&["sh", "-c", probe]), None)?;
        let solo: Vec<&str> = o2.stdout.lines().collect();
        ensure!(solo.len() == 6, "solo output {:?}", o2.stdout);
        for i in 0..3 {
            ensure!(
                lines[i] != solo[i],
                "{} shared with a non-pod container",
                lines[i]
            );
        }
        ensure!(
            lines[3] == solo[3],
            "net namespace differs: {} vs {}",
            lines[3],
            solo[3]
        );
        Ok(Passed)
    })();
    let destroyed = c.expect_ok(&Request::DestroySandbox);
    let out = res?;
    destroyed?;
    ensure!(
        c.containers()?.is_empty(),
        "containers left after DestroySandbox"
    );
    Ok(out)
}

fn delete_rules(env: &Env) -> Result<Outcome> {
    let id = "t-del";
    let mut c = env.client()?;
    c.create_container(create_req(env, id, &spec(&["sleep", "300"]), false))?;
    c.start(id)?;
    let e = agent_err(c.delete(id, false))?;
    ensure!(matches!(e, AgentError::FailedPrecondition(_)), "{e:?}");
    // A waiter on another connection sees the forced delete's kill.
    let ep = env.endpoint.clone();
    let waiter = std::thread::spawn(move || ep.client(TIMEOUT).and_then(|mut c| c.wait(id, None)));
    std::thread::sleep(Duration::from_millis(100));
    c.delete(id, true)?;
    let st = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("waiter panicked"))??;
    ensure!(st.signal == Some(libc::SIGKILL), "{st:?}");
    ensure!(c.containers()?.iter().all(|i| i.id != id));
    let e = agent_err(c.start(id))?;
    ensure!(matches!(e, AgentError::NotFound(_)), "{e:?}");
    Ok(Passed)
}

fn update_and_oom(env: &Env) -> Result<Outcome> {
    if !env.has_memory_controller() {
        return Ok(Skipped(
            "no memory controller in this cgroup v2 tree (host mode on a v1 host)".into(),
        ));
    }
    let id = "t-oom";
    let mut c = env.client()?;
    let ep = env.endpoint.clone();
    let oom_waiter = std::thread::spawn(move || -> Result<String> {
        let mut c = ep.client(TIMEOUT)?;
        c.get_ref()
            .set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(c.wait_oom()?)
    });
    // The shell holds 64 MiB in a variable: anonymous memory, four times the limit.
    const LIMIT: u64 = 16 << 20;
    let s = spec(&[
        "sh",
        "-c",
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
    ]);
    c.create_container(create_req(env, id, &s, false))?;
    c.expect_ok(&Request::Update {
        id: id.into(),
        resources_json: json!({"memory": {"limit": LIMIT, "swap": LIMIT}}).to_string(),
    })?;
    let st = c.stats(id)?;
    ensure!(
        st.memory_limit == Some(LIMIT),
        "limit {:?}",
        st.memory_limit
    );
    let out = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stdout, TIMEOUT)?,
    );
    c.start(id)?;
    let mut w = env.client()?;
    w.get_ref()
        .set_read_timeout(Some(Duration::from_secs(120)))?;
    let exit = w
        .wait(id, None)
        .context("wait for the OOM-killed container")?;
    let oom_id = oom_waiter
        .join()
        .map_err(|_| anyhow::anyhow!("oom waiter panicked"))?
        .context("OOM event")?;
    let text = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    ensure!(oom_id == id, "oom event for {oom_id}");
    ensure!(
        !text.contains("survived"),
        "the hog was not stopped: {text:?}"
    );
    ensure!(exit.code != 0, "{exit:?}");
    c.delete(id, true)?;
    Ok(Passed)
}

fn block_rootfs(env: &Env) -> Result<Outcome> {
    let Some(dev) = &env.block_rootfs else {
        return Ok(Skipped("no block device with a rootfs image here".into()));
    };
    let id = "t-blk";
    let mut c = env.client()?;
    let mut req = create_req(
        env,
        id,
        &spec(&["sh", "-c", "cat /etc/passwd | head -1"]),
        false,
    );
    req.rootfs = Rootfs::Block {
        device: dev.clone(),
        fstype: "ext4".into(),
        readonly: true,
    };
    c.create_container(req)?;
    let out = collect(
        env.endpoint
            .attach(id, None, StdioStream::Stdout, TIMEOUT)?,
    );
    c.start(id)?;
    let st = env.client()?.wait(id, None)?;
    let text = String::from_utf8(out.join().unwrap_or_default())?;
    ensure!(st.code == 0 && text.starts_with("root:"), "{st:?} {text:?}");
    c.delete(id, false)?;
    Ok(Passed)
}

fn writes_reach_host(env: &Env) -> Result<Outcome> {
    let Some((host, agent_path)) = &env.share else {
        return Ok(Skipped(
            "no writable host directory shared with the agent".into(),
        ));
    };
    // A rootfs and a volume (a bind mount in the spec), both host directories: what the
    // container writes must land there.
    let tag = format!("w{}", std::process::id());
    let host_root = host.join(&tag).join("rootfs");
    let host_vol = host.join(&tag).join("vol");
    std::fs::create_dir_all(&host_vol)?;
    let src = std::path::Path::new(&env.rootfs);
    // The busybox rootfs is the agent's path; in host mode it is also ours. In a guest the
    // harness shares a copy, so build a tiny writable rootfs from ours when we can see it.
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(if src.exists() {
            src.to_path_buf()
        } else {
            host.join("rootfs")
        })
        .arg(&host_root)
        .status()?;
    ensure!(copy.success(), "cp -a rootfs");
    let agent_dir = format!("{agent_path}/{tag}");
    let mut s = spec(&[
        "sh",
        "-c",
        "echo from-rootfs > /written; echo from-volume > /data/written",
    ]);
    s["root"]["readonly"] = json!(false);
    s["mounts"].as_array_mut().context("mounts")?.push(json!({
        "destination": "/data", "type": "bind", "source": format!("{agent_dir}/vol"),
        "options": ["rbind", "rw"]
    }));
    let mut c = env.client()?;
    let mut req = create_req(env, "t-write", &s, false);
    req.rootfs = Rootfs::Path(format!("{agent_dir}/rootfs"));
    c.create_container(req)?;
    c.start("t-write")?;
    let st = env.client()?.wait("t-write", None)?;
    c.delete("t-write", false)?;
    let root_file = std::fs::read_to_string(host_root.join("written")).unwrap_or_default();
    let vol_file = std::fs::read_to_string(host_vol.join("written")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(host.join(&tag));
    ensure!(st.code == 0, "{st:?}");
    ensure!(
        root_file == "from-rootfs\n",
        "rootfs write on host: {root_file:?}"
    );
    ensure!(
        vol_file == "from-volume\n",
        "volume write on host: {vol_file:?}"
    );
    Ok(Passed)
}

/// The network calls check before they change: a route leaving the pod's subnets or a
/// MAC no NIC has is refused with nothing changed; outside a guest an update is refused
/// outright. (A real NIC configured end to end is the runtime tests' work.)
fn network_update_checked(env: &Env) -> Result<Outcome> {
    use bulkhead_protocol::net::{IpNet, NetInterface, NetRoute};
    let mut c = env.client()?;
    let before = c.interfaces()?;
    ensure!(before.iter().all(|i| i.name != "lo"), "{before:?}");
    let routes_before = c.routes()?;
    let ifc = NetInterface {
        name: "eth7".into(),
        mac: [0x02, 0xbb, 0, 0, 0, 0x77],
        mtu: 1500,
        addresses: vec![IpNet {
            addr: "10.250.0.2".parse()?,
            prefix_len: 24,
        }],
    };
    let route = |gw: &str| -> Result<NetRoute> {
        Ok(NetRoute {
            dest: None,
            gateway: Some(gw.parse()?),
            device: "eth7".into(),
        })
    };
    let e = agent_err(c.update_network(vec![ifc.clone()], vec![route("192.0.2.1")?]))?;
    ensure!(
        matches!(&e, AgentError::InvalidArgument(m) if m.contains("outside every subnet")),
        "{e:?}"
    );
    let e = agent_err(c.update_network(vec![ifc.clone()], vec![route("10.250.0.1")?]))?;
    if env.in_guest {
        ensure!(
            matches!(&e, AgentError::NotFound(m) if m.contains("02:bb:00:00:00:77")),
            "{e:?}"
        );
    } else {
        ensure!(matches!(e, AgentError::Unsupported(_)), "{e:?}");
    }
    ensure!(
        c.interfaces()? == before,
        "interfaces changed by refused updates"
    );
    ensure!(
        c.routes()? == routes_before,
        "routes changed by refused updates"
    );
    Ok(Passed)
}

fn set_time(env: &Env) -> Result<Outcome> {
    let mut c = env.client()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let target = now + Duration::from_secs(3 * 86_400);
    let r = c.expect_ok(&Request::SetTime {
        unix_nanos: target.as_nanos() as u64,
    });
    if !env.in_guest {
        // Host mode must refuse: it would set this machine's clock.
        let e = agent_err(r)?;
        ensure!(matches!(e, AgentError::Unsupported(_)), "{e:?}");
        return Ok(Passed);
    }
    r?;
    let o = run_container(env, "t-time", &spec(&["date", "+%s"]), None)?;
    expect_success(&o)?;
    let seen: u64 = o.stdout.trim().parse().context("date output")?;
    let want = target.as_secs();
    ensure!(
        seen.abs_diff(want) < 120,
        "guest clock {seen}, set to {want}"
    );
    // Put it back for what follows.
    c.expect_ok(&Request::SetTime {
        unix_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    })?;
    Ok(Passed)
}

fn bad_input_typed_errors(env: &Env) -> Result<Outcome> {
    let mut c = env.client()?;
    let e = agent_err(c.start("no-such"))?;
    ensure!(matches!(e, AgentError::NotFound(_)), "unknown id: {e:?}");
    let e = agent_err(c.wait("no-such", None))?;
    ensure!(matches!(e, AgentError::NotFound(_)), "wait unknown: {e:?}");
    // An exec into a container that does not exist, and an unknown exec of no container.
    let e = agent_err(c.exec(ExecProcess {
        id: "no-such".into(),
        exec_id: "x1".into(),
        process_json: json!({"args": ["true"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).to_string(),
        stdin: false,
    }))?;
    ensure!(
        matches!(e, AgentError::NotFound(_)),
        "exec into unknown: {e:?}"
    );
    let e = agent_err(c.wait("no-such", Some("x1")))?;
    ensure!(
        matches!(e, AgentError::NotFound(_)),
        "wait unknown exec: {e:?}"
    );
    let e = agent_err(c.create_container(create_req(env, "../evil", &spec(&["true"]), false)))?;
    ensure!(matches!(e, AgentError::InvalidArgument(_)), "bad id: {e:?}");
    let mut req = create_req(env, "t-bad", &spec(&["true"]), false);
    req.spec_json = "{not json".into();
    let e = agent_err(c.create_container(req))?;
    ensure!(
        matches!(e, AgentError::InvalidArgument(_)),
        "bad spec: {e:?}"
    );
    let mut req = create_req(env, "t-bad", &spec(&["true"]), false);
    req.rootfs = Rootfs::Path("/nonexistent/rootfs".into());
    let e = agent_err(c.create_container(req))?;
    ensure!(
        matches!(e, AgentError::InvalidArgument(_)),
        "missing rootfs: {e:?}"
    );
    let e = agent_err(c.create_container(create_req(
        env,
        "t-bad",
        &spec(&["/bin/no-such-binary"]),
        false,
    )))?;
    ensure!(matches!(e, AgentError::Runtime(_)), "missing binary: {e:?}");
    c.create_container(create_req(env, "t-dup", &spec(&["true"]), false))?;
    let e = agent_err(c.create_container(create_req(env, "t-dup", &spec(&["true"]), false)))?;
    ensure!(matches!(e, AgentError::AlreadyExists(_)), "dup: {e:?}");
    let e = agent_err(c.signal("t-dup", None, 12345, false))?;
    ensure!(
        matches!(e, AgentError::InvalidArgument(_)),
        "bad signal: {e:?}"
    );
    c.delete("t-dup", false)?;
    let mut req = create_req(env, "t-bad", &spec(&["true"]), false);
    req.rootfs = Rootfs::Block {
        device: "/etc/passwd".into(),
        fstype: "ext4".into(),
        readonly: true,
    };
    let e = agent_err(c.create_container(req))?;
    ensure!(
        matches!(e, AgentError::InvalidArgument(_)),
        "bad block device: {e:?}"
    );
    // Nothing half-made was left behind, and the agent still serves.
    ensure!(c.containers()?.is_empty(), "left: {:?}", c.containers()?);
    c.health()?;
    Ok(Passed)
}

fn oversized_and_garbage_frames(env: &Env) -> Result<Outcome> {
    // Garbage payload: typed error, connection lives.
    let mut s = env.endpoint.connect(TIMEOUT)?;
    write_frame(&mut s, &encode(&Hello::current())?)?;
    read_frame(&mut s)?;
    write_frame(&mut s, &[0xff; 64])?;
    let r: Response = bulkhead_protocol::decode(&read_frame(&mut s)?)?;
    ensure!(
        matches!(r, Response::Error(AgentError::Malformed(_))),
        "{r:?}"
    );
    write_frame(&mut s, &encode(&Request::Health)?)?;
    let r: Response = bulkhead_protocol::decode(&read_frame(&mut s)?)?;
    ensure!(matches!(r, Response::Health(_)), "{r:?}");
    // Oversized declared length: refused, connection closed.
    let mut s = env.endpoint.connect(TIMEOUT)?;
    write_frame(&mut s, &encode(&Hello::current())?)?;
    read_frame(&mut s)?;
    s.write_all(&(64u32 << 20).to_le_bytes())?;
    let r: Response = bulkhead_protocol::decode(&read_frame(&mut s)?)?;
    ensure!(
        matches!(r, Response::Error(AgentError::Malformed(_))),
        "{r:?}"
    );
    // A spec at the frame limit is refused by the frame layer on our side already.
    let huge = "x".repeat(2 << 20);
    let mut c = env.client()?;
    let r = c.call(&Request::Update {
        id: "x".into(),
        resources_json: huge,
    });
    ensure!(matches!(r, Err(ClientError::Frame(_))), "{r:?}");
    env.client()?.health()?;
    Ok(Passed)
}
