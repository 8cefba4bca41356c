//! Cases that boot VMs: each asserts what a user would see.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::Case;
use bulkhead_runtime_tests::env::{procs, run_cmd, Env, Out};

pub fn list() -> Vec<Case> {
    let own: Vec<Case> = vec![
        ("check: --json names the backend and the bus", check_json),
        (
            "systemd files: dbus-daemon takes the policy, systemd-analyze the units",
            systemd_files,
        ),
        (
            "run: prints the guest's kernel, not the host's",
            run_guest_kernel,
        ),
        (
            "run: exact exit codes, stdout and stderr apart",
            run_exit_codes,
        ),
        ("run: stdin reaches the container", run_stdin),
        ("run: a terminal", run_tty),
        (
            "images: OCI layout, OCI archive, local registry, zstd layers; writes stay private",
            images,
        ),
        (
            "images: a registry that wants a login, with the auth file skopeo login wrote",
            registry_login,
        ),
        (
            "sandbox: detached, ls, exec, pause/resume, kill, shared volume, busctl",
            sandbox,
        ),
        (
            "fault: kill -9 bulkheadd mid-run loses nothing",
            kill_manager,
        ),
        (
            "fault: kill -9 the VMM: exit within 2 s, nothing left",
            kill_vmm,
        ),
        ("podman: run, exit code, stdin, exec, tty, stop", podman),
        (
            "podman: a pod's containers share one VM (infra and members)",
            podman_pod,
        ),
        (
            "dockerd: run, exit code, stdin, exec, stop (containerd's runc shim)",
            docker,
        ),
    ];
    own.into_iter()
        .chain(crate::net::list())
        .chain(crate::netfilter::list())
        .chain(crate::jail::list())
        .chain(crate::hostile::list())
        .chain(crate::metrics::list())
        .chain(crate::containerd::list())
        .collect()
}

fn rootfs(e: &Env) -> String {
    e.rootfs.display().to_string()
}

fn check_json(e: &mut Env) -> Result<()> {
    let o = e.bh(&["check", "--json"])?;
    let v: Value = serde_json::from_str(&o.stdout).context("check --json output")?;
    ensure!(
        v["bus_address"] == e.bus_address(),
        "bus_address: {}",
        v["bus_address"]
    );
    ensure!(v["bus_kind"] == "embedded", "bus_kind: {}", v["bus_kind"]);
    let backend = v["backend"].as_str().context("no backend")?;
    ensure!(
        backend == "qemu" || backend == "bulkhead-vmm",
        "backend {backend}"
    );
    let kvm = v["kvm"].as_str().unwrap_or("");
    if kvm == "Pvm" {
        ensure!(backend == "qemu", "a PVM KVM must not pick bulkhead-vmm");
        let vmm = &v["backends"][0];
        ensure!(
            vmm["usable"] == false && vmm["reasons"][0].as_str().unwrap_or("").contains("PVM"),
            "the reason names PVM: {vmm}"
        );
    }
    // The suite runs as root: components are jailed, and the jailer is found.
    ensure!(v["jail"]["enabled"] == true, "jail: {}", v["jail"]);
    ensure!(
        v["jail"]["jailer"]
            .as_str()
            .is_some_and(|p| p.ends_with("bulkhead-jailer")),
        "jail: {}",
        v["jail"]
    );
    ensure!(o.code == 0, "check exits 0 when a backend is usable");
    Ok(())
}

fn systemd_files(e: &mut Env) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../systemd")
        .canonicalize()?;
    // The units, with ExecStart pointing at the binaries we built: no warning at all.
    for (unit, bin) in [
        ("bulkheadd.service", "bulkheadd"),
        ("bulkhead-metrics.service", "bulkhead-metrics"),
    ] {
        let text = std::fs::read_to_string(dir.join(unit))?.replace(
            &format!("/usr/libexec/bulkhead/{bin}"),
            &e.bin.join(bin).display().to_string(),
        );
        let u = e.dir.join(unit);
        std::fs::write(&u, text)?;
        let o = run_cmd(
            Command::new("systemd-analyze").arg("verify").arg(&u),
            None,
            Duration::from_secs(60),
        )?;
        ensure!(
            o.code == 0 && o.stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {o:?}"
        );
    }
    // The policy, included in a bus config: dbus-daemon refuses to start on a bad one.
    let conf = e.dir.join("policy-check.conf");
    let sock = e.dir.join("policy-check.sock");
    std::fs::write(
        &conf,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\
             <listen>unix:path={}</listen><auth>EXTERNAL</auth>\
             <policy context=\"default\"><allow user=\"*\"/></policy>\
             <include>{}</include></busconfig>\n",
            sock.display(),
            dir.join("org.bulkhead.Manager1.conf").display()
        ),
    )?;
    let o = run_cmd(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--fork", "--print-pid=1"]),
        None,
        Duration::from_secs(30),
    )?;
    ensure!(o.code == 0, "dbus-daemon refused the policy: {o:?}");
    if let Ok(pid) = o.stdout.trim().parse::<i32>() {
        // SAFETY: kill(2) on the dbus-daemon this case started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let act = std::fs::read_to_string(dir.join("org.bulkhead.Manager1.service"))?;
    ensure!(
        act.contains("SystemdService=bulkheadd.service"),
        "activation file: {act}"
    );
    Ok(())
}

fn run_guest_kernel(e: &mut Env) -> Result<()> {
    let o = e.bh(&["run", "--rm", "--rootfs", &rootfs(e), "uname", "-r"])?;
    o.ok()?;
    let guest = std::fs::read_to_string(e.guest.join("kernel-release"))?;
    let host = String::from_utf8(Command::new("uname").arg("-r").output()?.stdout)?;
    ensure!(
        o.stdout.trim() == guest.trim(),
        "guest kernel {:?} != image's {guest:?}",
        o.stdout
    );
    ensure!(
        o.stdout.trim() != host.trim(),
        "the container saw the host's kernel"
    );
    Ok(())
}

fn run_exit_codes(e: &mut Env) -> Result<()> {
    let r = rootfs(e);
    let o = e.bh(&[
        "run",
        "--rm",
        "--rootfs",
        &r,
        "sh",
        "-c",
        "echo out; echo err >&2; exit 42",
    ])?;
    ensure!(o.code == 42, "exit {} (want 42): {o:?}", o.code);
    ensure!(o.stdout == "out\n" && o.stderr == "err\n", "{o:?}");
    // (A container killed by a signal exits 128 + signal: see the kill -9 cases below;
    // PID 1 cannot SIGKILL itself inside its PID namespace.)
    let o = e.bh(&["run", "--rm", "--rootfs", &r, "sh", "-c", "exit 255"])?;
    ensure!(o.code == 255, "exit {} (want 255)", o.code);
    let o = e.bh(&["run", "--rm", "--rootfs", &r, "/no/such/binary"])?;
    ensure!(o.code != 0, "a missing binary must fail: {o:?}");
    Ok(())
}

fn run_stdin(e: &mut Env) -> Result<()> {
    let data: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let o = e.bh_in(
        &[
            "run",
            "--rm",
            "-i",
            "--rootfs",
            &rootfs(e),
            "sh",
            "-c",
            "cat; exit 7",
        ],
        data.as_bytes(),
    )?;
    ensure!(o.code == 7, "exit {}", o.code);
    ensure!(
        o.stdout == data,
        "stdin came back with {} of {} bytes",
        o.stdout.len(),
        data.len()
    );
    Ok(())
}

fn run_tty(e: &mut Env) -> Result<()> {
    // util-linux `script` gives the CLI a terminal.
    let inner = format!(
        "stty cols 91 rows 27; {} run --rm -t --rootfs {} sh -c 'tty; stty size; exit 3'",
        e.bin.join("bulkhead").display(),
        rootfs(e)
    );
    let mut c = Command::new("script");
    c.args(["-qec", &inner, "/dev/null"]);
    e.env_on(&mut c);
    let o = run_cmd(&mut c, None, Duration::from_secs(180))?;
    ensure!(o.code == 3, "exit {}: {o:?}", o.code);
    ensure!(
        o.stdout.contains("/dev/pts/"),
        "no pty in the guest: {:?}",
        o.stdout
    );
    ensure!(
        o.stdout.contains("27 91"),
        "window size not carried: {:?}",
        o.stdout
    );
    Ok(())
}

fn images(e: &mut Env) -> Result<()> {
    let layout = e.layout.display().to_string();
    let o = e.bh(&[
        "run",
        "--rm",
        &layout,
        "sh",
        "-c",
        "cat /etc/passwd; echo x > /marker",
    ])?;
    o.ok()?;
    ensure!(o.stdout.starts_with("root:x:0:0"), "layout: {o:?}");
    let archive = format!("{}:latest", e.archive.display());
    let o = e.bh(&[
        "run",
        "--rm",
        &archive,
        "sh",
        "-c",
        "test ! -e /marker && echo clean",
    ])?;
    ensure!(
        o.stdout.trim() == "clean",
        "a container's writes leaked into the image: {o:?}"
    );
    let reg = e.start_registry()?;
    let o = e.bh(&[
        "run",
        "--rm",
        &format!("{reg}/test/busybox:latest"),
        "uname",
        "-r",
    ])?;
    o.ok()?;
    let guest = std::fs::read_to_string(e.guest.join("kernel-release"))?;
    ensure!(o.stdout.trim() == guest.trim(), "registry image: {o:?}");
    // zstd-compressed layers (what podman and buildah push with zstd on), recompressed
    // by skopeo into a layout, then pushed as they are (a push that recompresses would
    // reuse the gzip blob the registry already has).
    let zlayout = e.dir.join("layout-zstd");
    let zref = format!("{reg}/test/busybox:zstd");
    for (src, dest, flags) in [
        (
            format!("oci:{layout}:latest"),
            format!("oci:{}:latest", zlayout.display()),
            &["--dest-compress-format", "zstd"][..],
        ),
        (
            format!("oci:{}:latest", zlayout.display()),
            format!("docker://{zref}"),
            &["--dest-tls-verify=false"][..],
        ),
    ] {
        let mut c = Command::new("skopeo");
        c.arg("copy").args(flags).args([&src, &dest]);
        run_cmd(&mut c, None, Duration::from_secs(120))?.ok()?;
    }
    let mut c = Command::new("skopeo");
    c.args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{zref}"),
    ]);
    let manifest = run_cmd(&mut c, None, Duration::from_secs(60))?;
    ensure!(
        manifest.stdout.contains("tar+zstd") && !manifest.stdout.contains("tar+gzip"),
        "skopeo did not push zstd layers: {}",
        manifest.stdout
    );
    let script = "head -1 /etc/passwd; test -x /bin/busybox && echo whole";
    for image in [format!("{}:latest", zlayout.display()), zref] {
        let o = e.bh(&["run", "--rm", &image, "sh", "-c", script])?;
        ensure!(
            o.code == 0 && o.stdout == "root:x:0:0:root:/root:/bin/sh\nwhole\n",
            "zstd image {image}: {o:?}"
        );
    }
    Ok(())
}

fn registry_login(e: &mut Env) -> Result<()> {
    let reg = e.start_login_registry("alice", "s3cret")?;
    let image = format!("{reg}/private/busybox:latest");
    // A user's own environment: podman's runtime-dir auth file, nothing else.
    let xdg = e.dir.join("xdg");
    let home = e.dir.join("home");
    std::fs::create_dir_all(&home)?;
    let run = |extra: &[&str], env: &[(&str, &Path)]| -> Result<Out> {
        let mut args = vec!["run", "--rm"];
        args.extend(extra);
        args.extend([image.as_str(), "sh", "-c", "echo pulled"]);
        let mut c = e.cmd(&args);
        c.env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_CONFIG")
            .env_remove("XDG_CONFIG_HOME");
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(&mut c, None, Duration::from_secs(180))
    };
    let o = run(&[], &[])?;
    ensure!(
        o.code == 125 && o.stderr.contains("anonymously") && o.stderr.contains("--authfile"),
        "no login: {o:?}"
    );
    // `skopeo login` (as `podman login`) writes $XDG_RUNTIME_DIR/containers/auth.json.
    let authfile = xdg.join("containers/auth.json");
    let mut c = Command::new("skopeo");
    c.args(["login", "--tls-verify=false", "-u", "alice", "-p", "s3cret"])
        .arg("--authfile")
        .arg(&authfile)
        .arg(&reg);
    run_cmd(&mut c, None, Duration::from_secs(60))?.ok()?;
    let o = run(&[], &[])?;
    ensure!(
        o.code == 0 && o.stdout == "pulled\n",
        "after skopeo login: {o:?}"
    );
    // A wrong password, given with REGISTRY_AUTH_FILE: refused, and the file is named.
    let bad = e.dir.join("bad-auth.json");
    std::fs::write(
        &bad,
        format!(r#"{{"auths": {{"{reg}": {{"auth": "YWxpY2U6d3Jvbmc="}}}}}}"#),
    )?;
    let o = run(&[], &[("REGISTRY_AUTH_FILE", &bad)])?;
    ensure!(
        o.code == 125 && o.stderr.contains(&bad.display().to_string()),
        "a wrong password: {o:?}"
    );
    // --authfile wins over REGISTRY_AUTH_FILE.
    let good = authfile.display().to_string();
    let o = run(&["--authfile", &good], &[("REGISTRY_AUTH_FILE", &bad)])?;
    ensure!(o.code == 0, "--authfile: {o:?}");
    Ok(())
}

pub(crate) fn ls_json(e: &Env) -> Result<Vec<Value>> {
    let o = e.bh(&["ls", "--json"])?;
    o.ok()?;
    Ok(serde_json::from_str::<Value>(&o.stdout)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The host pid of one of a sandbox's components (`vmm`, `virtiofsd`, ...).
pub(crate) fn component_pid(e: &Env, sandbox: &str, name: &str) -> Result<u64> {
    component_field(e, sandbox, name, "pid")
}

/// The pid of the jailer that supervises one of a sandbox's components.
pub(crate) fn supervisor_pid(e: &Env, sandbox: &str, name: &str) -> Result<u64> {
    component_field(e, sandbox, name, "supervisor_pid")
}

/// A number of one component's entry in `ls --json`.
fn component_field(e: &Env, sandbox: &str, name: &str, field: &str) -> Result<u64> {
    find(&ls_json(e)?, sandbox)
        .and_then(|s| s["components"].as_array().cloned())
        .and_then(|c| c.into_iter().find(|c| c["name"] == name))
        .and_then(|c| c[field].as_u64())
        .with_context(|| format!("no {field} of {sandbox}'s {name}"))
}

pub(crate) fn find<'a>(v: &'a [Value], id: &str) -> Option<&'a Value> {
    v.iter().find(|s| s["id"] == id)
}

fn container_state(e: &Env, sandbox: &str, c: &str) -> Result<String> {
    let all = ls_json(e)?;
    let s = find(&all, sandbox).with_context(|| format!("sandbox {sandbox} not listed"))?;
    Ok(s["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|x| x["id"] == c))
        .and_then(|x| x["state"].as_str())
        .unwrap_or("")
        .to_string())
}

pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

fn sandbox(e: &mut Env) -> Result<()> {
    let r = rootfs(e);
    let o = e.bh(&[
        "run",
        "-d",
        "--name",
        "pod",
        "--rootfs",
        &r,
        "sh",
        "-c",
        "echo started; exec sleep 600",
    ])?;
    o.ok()?;
    ensure!(o.stdout.trim() == "pod", "-d prints the sandbox id: {o:?}");
    let log = e.state().join("logs/pod/pod.log");
    wait_for(
        "the detached container's log",
        Duration::from_secs(20),
        || Ok(std::fs::read_to_string(&log).unwrap_or_default() == "started\n"),
    )?;
    let all = ls_json(e)?;
    let s = find(&all, "pod").context("pod not in ls --json")?;
    ensure!(s["state"] == "running", "{s}");
    let comps: Vec<(String, u64)> = s["components"]
        .as_array()
        .context("components")?
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for want in ["virtiofsd", "vmm"] {
        let (_, pid) = comps
            .iter()
            .find(|(n, _)| n == want)
            .with_context(|| format!("no {want} component: {comps:?}"))?;
        ensure!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{want} pid {pid} not alive"
        );
    }
    // exec, with its own exit status
    let o = e.bh(&["exec", "pod", "sh", "-c", "echo in-pod; exit 6"])?;
    ensure!(o.code == 6 && o.stdout == "in-pod\n", "exec: {o:?}");
    // pause and resume
    e.bh(&["pause", "pod"])?.ok()?;
    ensure!(container_state(e, "pod", "pod")? == "paused", "not paused");
    e.bh(&["resume", "pod"])?.ok()?;
    ensure!(
        container_state(e, "pod", "pod")? == "running",
        "not running after resume"
    );
    // two more containers in the same VM share a volume
    let vol = e.dir.join("vol");
    std::fs::create_dir_all(&vol)?;
    let v = format!("{}:/vol", vol.display());
    let o = e.bh(&[
        "run",
        "--rm",
        "--sandbox",
        "pod",
        "--name",
        "w",
        "-v",
        &v,
        "--rootfs",
        &r,
        "sh",
        "-c",
        "echo shared > /vol/f; uname -n",
    ])?;
    o.ok()?;
    ensure!(
        o.stdout.trim() == "pod",
        "the joined container has the sandbox's hostname: {o:?}"
    );
    let o = e.bh(&[
        "run",
        "--rm",
        "--sandbox",
        "pod",
        "--name",
        "rd",
        "-v",
        &v,
        "--rootfs",
        &r,
        "cat",
        "/vol/f",
    ])?;
    ensure!(
        o.stdout == "shared\n",
        "the second container did not see the first's write: {o:?}"
    );
    ensure!(
        std::fs::read_to_string(vol.join("f"))? == "shared\n",
        "the write did not reach the host"
    );
    // busctl sees the sandbox object with its components
    let tree = e.busctl(&["tree", "org.bulkhead.Manager1"])?;
    ensure!(
        tree.stdout.contains("/org/bulkhead/Manager1/sandbox/pod"),
        "busctl tree: {tree:?}"
    );
    let intro = e.busctl(&[
        "introspect",
        "org.bulkhead.Manager1",
        "/org/bulkhead/Manager1/sandbox/pod",
    ])?;
    for want in [
        "org.bulkhead.Sandbox1",
        ".Components",
        ".Containers",
        ".CreateContainer",
        "org.freedesktop.DBus.Properties",
    ] {
        ensure!(
            intro.stdout.contains(want),
            "introspect lacks {want}: {}",
            intro.stdout
        );
    }
    let comp = e.busctl(&[
        "get-property",
        "org.bulkhead.Manager1",
        "/org/bulkhead/Manager1/sandbox/pod",
        "org.bulkhead.Sandbox1",
        "Components",
    ])?;
    ensure!(
        comp.stdout.contains("\"vmm\"") && comp.stdout.contains("\"virtiofsd\""),
        "{comp:?}"
    );
    let managed = e.busctl(&[
        "call",
        "org.bulkhead.Manager1",
        "/org/bulkhead/Manager1",
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
    ])?;
    ensure!(
        managed.stdout.contains("org.bulkhead.Sandbox1"),
        "ObjectManager: {managed:?}"
    );
    // rm without -f refuses while running; kill stops the container
    let o = e.bh(&["rm", "pod"])?;
    ensure!(
        o.code != 0 && o.stderr.contains("FailedPrecondition"),
        "rm of a running sandbox: {o:?}"
    );
    e.bh(&["kill", "pod", "KILL"])?.ok()?;
    wait_for("pod to stop", Duration::from_secs(10), || {
        Ok(container_state(e, "pod", "pod")? == "stopped")
    })?;
    e.bh(&["rm", "pod"])?.ok()?;
    ensure!(
        find(&ls_json(e)?, "pod").is_none(),
        "pod still listed after rm"
    );
    ensure!(!log.exists(), "rm left the log behind");
    Ok(())
}

/// The run directory of a sandbox, from its record.
pub(crate) fn run_dir(e: &Env, id: &str) -> Result<PathBuf> {
    let rec: Value = serde_json::from_slice(&std::fs::read(
        e.state().join("sandboxes").join(format!("{id}.json")),
    )?)?;
    Ok(rec["run_dir"].as_str().context("run_dir")?.into())
}

/// Everything a sandbox could leave behind: processes, mounts, files, its record.
pub(crate) fn leftovers(e: &Env, id: &str, run: &Path) -> Vec<String> {
    let mut left = vec![];
    let r = run.display().to_string();
    for (pid, cmd) in procs() {
        if cmd.contains(&r) && pid != std::process::id() {
            left.push(format!("process {pid}: {cmd}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for l in mounts.lines().filter(|l| l.contains(&r)) {
        left.push(format!("mount: {l}"));
    }
    if run.exists() {
        left.push(format!("directory {r} (sockets, logs, shared dir)"));
    }
    let rec = e.state().join("sandboxes").join(format!("{id}.json"));
    if rec.exists() {
        left.push(format!("state file {}", rec.display()));
    }
    left
}

fn kill_manager(e: &mut Env) -> Result<()> {
    let script = "i=0; while [ $i -lt 40 ]; do echo line$i; i=$((i+1)); sleep 0.2; done; sleep 600";
    let mut c = e.cmd(&[
        "run",
        "--rm",
        "--name",
        "km",
        "--rootfs",
        &rootfs(e),
        "sh",
        "-c",
        script,
    ]);
    let out = e.dir.join("km.out");
    c.stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(e.dir.join("km.err"))?);
    let mut child = c.spawn()?;
    wait_for("output to start", Duration::from_secs(120), || {
        Ok(std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("line3"))
    })?;
    let pid = e.bulkheadd_pid().context("no bulkheadd")?;
    // SAFETY: kill(2) on a pid we just found.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    ensure!(e.bulkheadd_pid().is_none(), "bulkheadd survived SIGKILL");
    // The next command brings the manager back; it adopts the sandbox.
    let o = e.bh(&["exec", "km", "sh", "-c", "echo still-here"])?;
    ensure!(
        o.stdout == "still-here\n",
        "exec after the manager restarted: {o:?}"
    );
    ensure!(
        e.bulkheadd_pid().is_some_and(|p| p != pid),
        "a new bulkheadd runs"
    );
    wait_for("all 40 lines", Duration::from_secs(60), || {
        Ok(std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("line39"))
    })?;
    e.bh(&["kill", "km", "KILL"])?.ok()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("run did not end after the container was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out)?;
    let want: String = (0..40).map(|i| format!("line{i}\n")).collect();
    ensure!(
        text == want,
        "output lost or damaged across the manager's restart: {text:?}"
    );
    ensure!(
        status.code() == Some(137),
        "run exit {:?} (want 137)",
        status.code()
    );
    Ok(())
}

fn kill_vmm(e: &mut Env) -> Result<()> {
    let mut c = e.cmd(&[
        "run",
        "--name",
        "kv",
        "--rootfs",
        &rootfs(e),
        "sleep",
        "600",
    ]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn()?;
    wait_for("kv to run", Duration::from_secs(120), || {
        Ok(container_state(e, "kv", "kv").unwrap_or_default() == "running")
    })?;
    let run = run_dir(e, "kv")?;
    let vmm = component_pid(e, "kv", "vmm")?;
    let t = Instant::now();
    // SAFETY: kill(2) on the VMM's pid.
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "run still waiting 10 s after the VMM died"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t.elapsed();
    ensure!(
        took < Duration::from_secs(2),
        "the client saw the exit after {took:?} (want < 2 s)"
    );
    ensure!(
        status.code() == Some(137),
        "exit {:?} (want 137)",
        status.code()
    );
    let mut left = vec![];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        left = leftovers(e, "kv", &run);
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(left.is_empty(), "left behind: {left:#?}");
    ensure!(find(&ls_json(e)?, "kv").is_none(), "kv still listed");
    println!(
        "       (client saw the exit {:.0} ms after kill -9 of the VMM)",
        took.as_secs_f64() * 1e3
    );
    Ok(())
}

/// podman's global flags for this environment: private roots, our runtime.
fn podman_base(e: &Env) -> Vec<String> {
    let pm = e.dir.join("podman");
    vec![
        format!("--root={}", pm.join("root").display()),
        format!("--runroot={}", pm.join("run").display()),
        "--cgroup-manager=cgroupfs".into(),
        "--events-backend=file".into(),
        format!("--runtime={}", e.runtime_wrapper.display()),
    ]
}

/// podman with [`podman_base`].
fn podman_in(e: &Env, args: &[&str], stdin: Option<&[u8]>) -> Result<Out> {
    let mut c = Command::new("podman");
    c.args(podman_base(e)).args(args);
    run_cmd(&mut c, stdin, Duration::from_secs(180))
}

/// The test image in podman's store, and the flags every container needs here (this
/// machine's root cannot raise its limits; no network).
const PODMAN_IMAGE: &str = "localhost/latest:latest";
const PODMAN_FLAGS: [&str; 3] = [
    "--network=none",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
];

fn podman(e: &mut Env) -> Result<()> {
    let base = podman_base(e);
    let podman = |args: &[&str], stdin: Option<&[u8]>| podman_in(e, args, stdin);
    podman(&["load", "-i", &e.archive.display().to_string()], None)?.ok()?;
    let img = PODMAN_IMAGE;
    let u = PODMAN_FLAGS;
    let run = |extra: &[&str], cmd: &[&str], stdin: Option<&[u8]>| {
        let mut a = vec!["run"];
        a.extend(extra);
        a.extend(u);
        a.push(img);
        a.extend(cmd);
        podman(&a, stdin)
    };
    let o = run(&["--rm"], &["sh", "-c", "uname -r; exit 3"], None)?;
    let guest = std::fs::read_to_string(e.guest.join("kernel-release"))?;
    ensure!(
        o.code == 3 && o.stdout.trim() == guest.trim(),
        "podman run: {o:?}"
    );
    let o = run(&["--rm", "-i"], &["cat"], Some(b"through podman\n"))?;
    ensure!(o.stdout == "through podman\n", "podman -i: {o:?}");
    run(&["-d", "--name", "pd"], &["sleep", "600"], None)?.ok()?;
    let o = podman(&["exec", "pd", "sh", "-c", "echo exec-ok; exit 4"], None)?;
    ensure!(o.code == 4 && o.stdout == "exec-ok\n", "podman exec: {o:?}");
    podman(&["pause", "pd"], None)?.ok()?;
    podman(&["unpause", "pd"], None)?.ok()?;
    let o = podman(&["stop", "-t", "1", "pd"], None)?;
    o.ok()?;
    let o = podman(&["inspect", "--format", "{{.State.ExitCode}}", "pd"], None)?;
    ensure!(
        o.stdout.trim() == "137",
        "stopped by SIGKILL after the timeout: {o:?}"
    );
    podman(&["rm", "pd"], None)?.ok()?;
    let mut c = Command::new("script");
    let inner = format!(
        "podman {} run --rm -t {} {img} tty",
        base.join(" "),
        u.join(" ")
    );
    c.args(["-qec", &inner, "/dev/null"]);
    let o = run_cmd(&mut c, None, Duration::from_secs(180))?;
    ensure!(
        o.code == 0 && o.stdout.contains("/dev/pts/"),
        "podman -t: {o:?}"
    );
    let o = podman(&["ps", "-aq"], None)?;
    ensure!(o.stdout.trim().is_empty(), "podman containers left: {o:?}");
    ensure!(
        !ls_json(e)?
            .iter()
            .any(|s| s["id"].as_str().is_some_and(|i| i.len() == 64)),
        "podman's sandboxes were not removed"
    );
    Ok(())
}

/// A podman pod: its infra container makes the VM, and every member joins it, sharing
/// the pod's UTS, IPC and network namespaces in the guest.
fn podman_pod(e: &mut Env) -> Result<()> {
    let podman = |args: &[&str]| podman_in(e, args, None);
    podman(&["load", "-i", &e.archive.display().to_string()])?.ok()?;
    // An infra image that stays up (podman's own pause image needs catatonit).
    let ctx = e.dir.join("infra-image");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("Containerfile"),
        format!("FROM {PODMAN_IMAGE}\nCMD [\"sleep\", \"600\"]\n"),
    )?;
    let ctx_s = ctx.display().to_string();
    podman(&["build", "-q", "-t", "localhost/bh-infra:latest", &ctx_s])?.ok()?;
    podman(&[
        "pod",
        "create",
        "--name",
        "bp",
        "--network",
        "none",
        "--infra-image",
        "localhost/bh-infra:latest",
    ])?
    .ok()?;
    let r = (|| -> Result<()> {
        podman(&["pod", "start", "bp"])?.ok()?;
        let member = |extra: &[&str], cmd: &str| {
            let mut a = vec!["run", "--pod", "bp"];
            a.extend(extra);
            a.extend(&PODMAN_FLAGS[1..]);
            a.extend([PODMAN_IMAGE, "sh", "-c", cmd]);
            podman(&a)
        };
        member(&["-d", "--name", "bp-a"], "sleep 600")?.ok()?;
        let ns = "hostname; uname -r; for n in ipc uts net; do readlink /proc/self/ns/$n; done";
        let b = member(&["--rm"], ns)?;
        b.ok()?;
        let a = podman(&["exec", "bp-a", "sh", "-c", ns])?;
        a.ok()?;
        let guest = std::fs::read_to_string(e.guest.join("kernel-release"))?;
        let lines: Vec<&str> = b.stdout.lines().collect();
        ensure!(
            lines.len() == 5 && lines[0] == "bp" && lines[1] == guest.trim(),
            "a pod member's hostname and kernel: {b:?}"
        );
        ensure!(
            a.stdout == b.stdout,
            "two members of the pod in different namespaces or VMs: {a:?} / {b:?}"
        );
        // One VM: the infra container's sandbox holds the members.
        let infra = podman(&["pod", "inspect", "bp", "--format", "{{.InfraContainerID}}"])?;
        let infra = infra.stdout.trim().to_string();
        let a_id = podman(&["inspect", "bp-a", "--format", "{{.Id}}"])?;
        let sbs = ls_json(e)?;
        let sb = find(&sbs, &infra).with_context(|| format!("no sandbox {infra}: {sbs:?}"))?;
        let ids: Vec<&str> = sb["containers"]
            .as_array()
            .context("containers")?
            .iter()
            .filter_map(|c| c["id"].as_str())
            .collect();
        ensure!(
            ids.contains(&infra.as_str()) && ids.contains(&a_id.stdout.trim()),
            "the pod's sandbox holds {ids:?}"
        );
        ensure!(
            !sbs.iter().any(|s| s["id"] == a_id.stdout.trim()),
            "a pod member got a VM of its own"
        );
        Ok(())
    })();
    let rm = podman(&["pod", "rm", "-f", "bp"]);
    r?;
    rm?.ok()?;
    ensure!(
        !ls_json(e)?
            .iter()
            .any(|s| s["id"].as_str().is_some_and(|i| i.len() == 64)),
        "the pod's sandbox was not removed"
    );
    Ok(())
}

/// dockerd 20.10 with private roots, no bridge and no iptables, and bulkhead declared as
/// a runtime: containerd's runc shim runs our OCI CLI as it would run runc.
fn docker(e: &mut Env) -> Result<()> {
    let reg = match e.registry.clone() {
        Some(r) => r,
        None => e.start_registry()?,
    };
    let dk = e.dir.join("docker");
    std::fs::create_dir_all(&dk)?;
    let sock = dk.join("docker.sock");
    let cfg = serde_json::json!({
        "data-root": dk.join("data"), "exec-root": dk.join("exec"), "pidfile": dk.join("docker.pid"),
        "hosts": [format!("unix://{}", sock.display())],
        "bridge": "none", "iptables": false, "ip-masq": false, "ip-forward": false,
        "runtimes": {"bulkhead": {"path": e.runtime_wrapper}},
    });
    std::fs::write(dk.join("daemon.json"), cfg.to_string())?;
    let mut daemon = Command::new("dockerd")
        .arg("--config-file")
        .arg(dk.join("daemon.json"))
        .stdout(std::fs::File::create(dk.join("dockerd.log"))?)
        .stderr(std::fs::File::create(dk.join("dockerd.err"))?)
        .spawn()
        .context("dockerd (apt-get install docker.io)")?;
    // Debian's client matches the daemon; another docker on PATH may not.
    let cli = if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    let host = format!("unix://{}", sock.display());
    let docker = |args: &[&str], stdin: Option<&[u8]>| -> Result<Out> {
        let mut c = Command::new(cli);
        c.args(["-H", &host]).args(args);
        run_cmd(&mut c, stdin, Duration::from_secs(180))
    };
    let res = (|| -> Result<()> {
        wait_for("dockerd", Duration::from_secs(60), || {
            Ok(docker(&["info"], None)?.code == 0)
        })?;
        let img = format!("{reg}/test/busybox:latest");
        docker(&["pull", &img], None)?.ok()?;
        let base = ["--runtime=bulkhead", "--network=none"];
        let run = |extra: &[&str], cmd: &[&str], stdin: Option<&[u8]>| {
            let mut a = vec!["run"];
            a.extend(extra);
            a.extend(base);
            a.push(&img);
            a.extend(cmd);
            docker(&a, stdin)
        };
        let o = run(&["--rm"], &["sh", "-c", "uname -r; exit 3"], None)?;
        let guest = std::fs::read_to_string(e.guest.join("kernel-release"))?;
        ensure!(
            o.code == 3 && o.stdout.trim() == guest.trim(),
            "docker run: {o:?}"
        );
        let o = run(&["--rm", "-i"], &["cat"], Some(b"through dockerd\n"))?;
        ensure!(o.stdout == "through dockerd\n", "docker run -i: {o:?}");
        // A retried case finds the first attempt's container in the same data root.
        let _ = docker(&["rm", "-f", "dk"], None);
        run(&["-d", "--name", "dk"], &["sleep", "600"], None)?.ok()?;
        let o = docker(&["exec", "dk", "sh", "-c", "echo exec-ok; exit 4"], None)?;
        ensure!(o.code == 4 && o.stdout == "exec-ok\n", "docker exec: {o:?}");
        docker(&["stop", "-t", "1", "dk"], None)?.ok()?;
        let o = docker(&["inspect", "--format", "{{.State.ExitCode}}", "dk"], None)?;
        ensure!(
            o.stdout.trim() == "137",
            "stopped by SIGKILL after the timeout: {o:?}"
        );
        docker(&["rm", "dk"], None)?.ok()?;
        ensure!(
            !ls_json(e)?
                .iter()
                .any(|s| s["id"].as_str().is_some_and(|i| i.len() == 64)),
            "dockerd's sandboxes were not removed"
        );
        Ok(())
    })();
    // SAFETY: kill(2) on the dockerd we started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    if res.is_err() {
        let err = std::fs::read_to_string(dk.join("dockerd.err")).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        println!(
            "--- dockerd.err (last lines, newest first)\n{}",
            tail.join("\n")
        );
    }
    res
}

/// On a failure: the manager's log and the serial consoles of live sandboxes.
pub fn dump_logs(e: &Env) {
    let tail = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    println!(
        "--- bulkheadd.log\n{}",
        tail(&e.state().join("bulkheadd.log"))
    );
    if let Ok(rd) = std::fs::read_dir(e.state().join("run")) {
        for d in rd.flatten() {
            for f in [
                "serial.log",
                "vmm.log",
                "virtiofsd.log",
                "vhost-device-vsock.log",
            ] {
                let p = d.path().join(f);
                if p.exists() {
                    println!("--- {}\n{}", p.display(), tail(&p));
                }
            }
        }
    }
}

/// Remove every sandbox left.
pub fn shutdown_sandboxes(e: &Env) {
    if let Ok(all) = ls_json(e) {
        for s in all {
            if let Some(id) = s["id"].as_str() {
                let _ = e.bh(&["rm", "-f", id]);
            }
        }
    }
}

/// Remove what is left, stop the manager and the bus.
pub fn shutdown(e: &Env) {
    shutdown_sandboxes(e);
    e.stop_daemons();
}
