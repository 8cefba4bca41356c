//! Bad input, one row each: through the CLI, the OCI CLI and straight on the bus. Every
//! row must fail with a non-zero status (or a named D-Bus error) whose message names the
//! cause; at the end nothing may have leaked and the manager must still serve.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use bulkhead_runtime_tests::env::{run_cmd, Env, Out};

type Check = Box<dyn Fn(&Env) -> Result<Out>>;

struct Row {
    name: &'static str,
    run: Check,
    /// Substring the error output must contain.
    want: String,
}

fn cli(args: &[&str]) -> Check {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Box::new(move |e: &Env| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        e.bh(&a)
    })
}

/// busctl on our bus, as another uid when given.
fn bus_as(uid: Option<u32>, args: &[&str]) -> Check {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Box::new(move |e: &Env| {
        let mut c = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    &format!("--regid={u}"),
                    "--clear-groups",
                    "busctl",
                ]);
                c
            }
            None => Command::new("busctl"),
        };
        c.arg(format!("--address={}", e.bus_address())).args(&args);
        run_cmd(&mut c, None, Duration::from_secs(60))
    })
}

const M: [&str; 3] = [
    "org.bulkhead.Manager1",
    "/org/bulkhead/Manager1",
    "org.bulkhead.Manager1",
];
const S: [&str; 3] = [
    "org.bulkhead.Manager1",
    "/org/bulkhead/Manager1/sandbox/bad",
    "org.bulkhead.Sandbox1",
];

fn call(target: [&str; 3], rest: &[&str]) -> Vec<String> {
    let mut v = vec!["call".to_string()];
    v.extend(target.iter().map(|s| s.to_string()));
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

/// dbus-send, which prints a method error's name (busctl prints only its message).
fn send_as(uid: Option<u32>, path: &str, method: &str, args: &[&str]) -> Check {
    let (path, method) = (path.to_string(), method.to_string());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Box::new(move |e: &Env| {
        let mut c = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    &format!("--regid={u}"),
                    "--clear-groups",
                    "dbus-send",
                ]);
                c
            }
            None => Command::new("dbus-send"),
        };
        // --bus registers on the bus (--address would talk to it as a peer).
        c.arg(format!("--bus={}", e.bus_address()))
            .args([
                "--print-reply",
                "--dest=org.bulkhead.Manager1",
                &path,
                &method,
            ])
            .args(&args);
        run_cmd(&mut c, None, Duration::from_secs(60))
    })
}

fn busv(uid: Option<u32>, v: Vec<String>) -> Check {
    let a: Vec<&str> = v.iter().map(String::as_str).collect();
    bus_as(uid, &a)
}

fn rows(e: &Env) -> Result<Vec<Row>> {
    let d = &e.dir;
    let r = e.rootfs.display().to_string();
    let file = d.join("not-a-dir");
    std::fs::write(&file, "text, not a tar")?;
    let f = file.display().to_string();
    let layout = e.layout.display().to_string();
    // Bundles for the OCI CLI.
    let bundle = |name: &str, config: &str, rootfs: bool| -> Result<String> {
        let b = d.join(name);
        std::fs::create_dir_all(&b)?;
        std::fs::write(b.join("config.json"), config)?;
        if rootfs {
            let _ = std::os::unix::fs::symlink(&e.rootfs, b.join("rootfs"));
        }
        Ok(b.display().to_string())
    };
    let good_spec = {
        let mut v = bulkhead_agent_tests::spec(&["true"]);
        v["root"] = serde_json::json!({"path": "rootfs"});
        v
    };
    let mut tty_spec = good_spec.clone();
    tty_spec["process"]["terminal"] = serde_json::json!(true);
    let malformed = bundle(
        "b-malformed",
        "{\"ociVersion\": \"1.0.2\", \"process\": ",
        true,
    )?;
    let no_rootfs = bundle("b-norootfs", &good_spec.to_string(), false)?;
    let good = bundle("b-good", &good_spec.to_string(), true)?;
    let tty = bundle("b-tty", &tty_spec.to_string(), true)?;
    let reg = e.registry.clone().unwrap_or_else(|| "127.0.0.1:9".into());
    let long = "a".repeat(129);
    let long_bus = "b".repeat(200);
    let spec_no_process = serde_json::json!({"ociVersion": "1.0.2"}).to_string();
    let mut spec_bad_bind = good_spec.clone();
    spec_bad_bind["mounts"]
        .as_array_mut()
        .context("mounts")?
        .push(serde_json::json!({"destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}));
    let spec_bad_bind = spec_bad_bind.to_string();
    let good_s = good_spec.to_string();
    // One argv string may not exceed 128 KiB: three variables of 100 KiB make the spec big.
    let big: Vec<String> = (0..3)
        .map(|i| format!("BIG{i}={}", "x".repeat(100 * 1024)))
        .collect();
    // On a host whose KVM cannot boot a stock kernel, asking for bulkhead-vmm is refused.
    let vmm_refused = Path::new("/sys/module/kvm_pvm").exists() || !Path::new("/dev/kvm").exists();

    let row = |name, run, want: &str| Row {
        name,
        run,
        want: want.to_string(),
    };
    let mut v = vec![
        row(
            "run: neither image nor --rootfs",
            cli(&["run"]),
            "give an IMAGE",
        ),
        row(
            "run: --rootfs missing",
            cli(&["run", "--rootfs", "/no/such/dir", "true"]),
            "/no/such/dir",
        ),
        row(
            "run: --rootfs is a file",
            cli(&["run", "--rootfs", &f, "true"]),
            "not a directory",
        ),
        row(
            "run: image path missing",
            cli(&["run", "/no/such/image"]),
            "no such file or directory",
        ),
        row(
            "run: directory that is no OCI layout",
            cli(&["run", &r, "true"]),
            "not an OCI image layout",
        ),
        row(
            "run: layout without that tag",
            cli(&["run", &format!("{layout}:nosuchtag"), "true"]),
            "no image tagged \"nosuchtag\"",
        ),
        row(
            "run: file that is no OCI archive",
            cli(&["run", &f, "true"]),
            "not a readable OCI archive",
        ),
        row(
            "run: registry refuses the connection",
            cli(&["run", "127.0.0.1:9/nothing:latest", "true"]),
            "cannot pull",
        ),
        row(
            "run: image not in the registry",
            cli(&["run", &format!("{reg}/test/missing:latest"), "true"]),
            "cannot pull",
        ),
        row(
            "run: an auth file that is not JSON",
            cli(&[
                "run",
                "--authfile",
                &f,
                &format!("{reg}/test/busybox:latest"),
                "true",
            ]),
            "not a valid auth file",
        ),
        row(
            "run: malformed reference",
            cli(&["run", "Not A Reference!!", "true"]),
            "not a valid reference",
        ),
        row(
            "run: id with a slash",
            cli(&["run", "--name", "bad/id", "--rootfs", &r, "true"]),
            "not allowed",
        ),
        row(
            "run: id too long",
            cli(&["run", "--name", &long, "--rootfs", &r, "true"]),
            "1 to 128",
        ),
        row(
            "run: --env without =",
            cli(&["run", "-e", "NOEQUALS", "--rootfs", &r, "true"]),
            "want KEY=VALUE",
        ),
        row(
            "run: volume source missing",
            cli(&["run", "-v", "/no/such/dir:/x", "--rootfs", &r, "true"]),
            "not a directory",
        ),
        row(
            "run: volume path relative",
            cli(&["run", "-v", "rel:/x", "--rootfs", &r, "true"]),
            "absolute",
        ),
        row(
            "run: unknown backend",
            cli(&["run", "--backend", "xen", "--rootfs", &r, "true"]),
            "want bulkhead-vmm or qemu",
        ),
        row(
            "run: cpus 0",
            cli(&["run", "--cpus", "0", "--rootfs", &r, "true"]),
            "cpus 0",
        ),
        row(
            "run: memory 1 MiB",
            cli(&["run", "--memory", "1", "--rootfs", &r, "true"]),
            "memory_mib 1",
        ),
        row(
            "run: hot-plug memory in a size Linux cannot add",
            cli(&["run", "--hotplug", "100", "--rootfs", &r, "true"]),
            "hotplug_mib 100",
        ),
        row(
            "run: hot-plug memory on QEMU",
            cli(&[
                "run",
                "--backend",
                "qemu",
                "--hotplug",
                "128",
                "--rootfs",
                &r,
                "true",
            ]),
            "only bulkhead-vmm has virtio-mem",
        ),
        row(
            "run: a container memory limit of 0",
            cli(&["run", "--container-memory", "0", "--rootfs", &r, "true"]),
            "--container-memory 0",
        ),
        row(
            "run: a container memory limit past 64 bits of bytes",
            cli(&[
                "run",
                "--container-memory",
                "18446744073709551615",
                "--rootfs",
                &r,
                "true",
            ]),
            "--container-memory 18446744073709551615: want 1 MiB or more",
        ),
        row(
            "run: duplicate id",
            cli(&["run", "--name", "bad", "--rootfs", &r, "true"]),
            "org.bulkhead.Error.AlreadyExists",
        ),
        row(
            "run: into a sandbox that does not exist",
            cli(&["run", "--sandbox", "nosuch", "--rootfs", &r, "true"]),
            "NotFound",
        ),
        row(
            "update: unknown container",
            cli(&["update", "--memory", "1048576", "nosuch"]),
            "NotFound",
        ),
        row(
            "update: a container the sandbox does not hold",
            cli(&[
                "update",
                "--sandbox",
                "bad",
                "--memory",
                "1048576",
                "nosuch",
            ]),
            "NotFound",
        ),
        row(
            "rm: unknown id",
            cli(&["rm", "nosuch"]),
            "org.bulkhead.Error.NotFound",
        ),
        row(
            "vm: unknown sandbox",
            cli(&["vm", "nosuch"]),
            "org.bulkhead.Error.NotFound",
        ),
        row(
            // QEMU (this host): FailedPrecondition, it serves no org.bulkhead.Vmm1;
            // bulkhead-vmm: InvalidArgument, past guest RAM. Named either way.
            "vm: a balloon target the VM cannot take",
            cli(&["vm", "--balloon", "999999", "bad"]),
            "org.bulkhead.Error.",
        ),
        row(
            "vm: hot-plug memory for a sandbox created without it",
            cli(&["vm", "--hotplug", "128", "bad"]),
            "org.bulkhead.Error.FailedPrecondition",
        ),
        row(
            "exec: unknown container",
            cli(&["exec", "nosuch", "true"]),
            "does not exist",
        ),
        row(
            "kill: unknown signal",
            cli(&["kill", "bad", "NOSIG"]),
            "unknown signal",
        ),
        row(
            "oci create: malformed config.json",
            cli(&["create", "--bundle", &malformed, "m1"]),
            "not a valid OCI runtime spec",
        ),
        row(
            "oci create: bundle without rootfs",
            cli(&["create", "--bundle", &no_rootfs, "m2"]),
            "does not exist or is not a directory",
        ),
        row(
            "oci create: bundle missing",
            cli(&["create", "--bundle", "/no/such/bundle", "m3"]),
            "no such directory",
        ),
        row(
            "oci create: terminal without console socket",
            cli(&["create", "--bundle", &tty, "m4"]),
            "--console-socket is required",
        ),
        row(
            "oci create: id a sandbox already has",
            cli(&["create", "--bundle", &good, "bad"]),
            "AlreadyExists",
        ),
        row(
            "oci state: unknown id",
            cli(&["state", "nosuch"]),
            "does not exist",
        ),
        row(
            "oci delete: unknown id",
            cli(&["delete", "nosuch"]),
            "does not exist",
        ),
        row(
            "oci start: unknown id",
            cli(&["start", "nosuch"]),
            "does not exist",
        ),
        row(
            "bus: CreateSandbox with the wrong signature",
            busv(None, call(M, &["CreateSandbox", "s", "x"])),
            "Signature mismatch",
        ),
        row(
            "bus: CreateSandbox with an unknown option",
            busv(
                None,
                call(M, &["CreateSandbox", "sa{sv}", "x", "1", "cpu", "u", "2"]),
            ),
            "unknown option \"cpu\"",
        ),
        row(
            "bus: CreateSandbox with an option of the wrong type",
            busv(
                None,
                call(
                    M,
                    &["CreateSandbox", "sa{sv}", "x", "1", "cpus", "s", "two"],
                ),
            ),
            "wrong type",
        ),
        row(
            "bus: CreateSandbox with a 200-character id",
            busv(None, call(M, &["CreateSandbox", "sa{sv}", &long_bus, "0"])),
            "must be 1 to 128 characters",
        ),
        row(
            "bus: GetSandbox of an unknown id",
            send_as(
                None,
                M[1],
                "org.bulkhead.Manager1.GetSandbox",
                &["string:nosuch"],
            ),
            "org.bulkhead.Error.NotFound",
        ),
        row(
            "bus: CreateSandbox from an unprivileged uid",
            busv(Some(65534), call(M, &["CreateSandbox", "sa{sv}", "x", "0"])),
            "may not change sandboxes",
        ),
        row(
            "bus: RemoveSandbox from an unprivileged uid",
            send_as(
                Some(65534),
                M[1],
                "org.bulkhead.Manager1.RemoveSandbox",
                &["string:bad", "boolean:true"],
            ),
            "org.bulkhead.Error.AccessDenied",
        ),
        row(
            "bus: Attach from an unprivileged uid",
            send_as(
                Some(65534),
                S[1],
                "org.bulkhead.Sandbox1.Attach",
                &["string:bad", "string:", "string:stdout"],
            ),
            "org.bulkhead.Error.AccessDenied",
        ),
        row(
            "bus: CreateContainer with malformed JSON",
            busv(
                None,
                call(S, &["CreateContainer", "sssa{sv}", "c1", "{nope", &r, "0"]),
            ),
            "not valid JSON",
        ),
        row(
            "bus: CreateContainer with no process",
            busv(
                None,
                call(
                    S,
                    &[
                        "CreateContainer",
                        "sssa{sv}",
                        "c1",
                        &spec_no_process,
                        &r,
                        "0",
                    ],
                ),
            ),
            "with a process",
        ),
        row(
            "bus: CreateContainer with a relative rootfs",
            busv(
                None,
                call(
                    S,
                    &[
                        "CreateContainer",
                        "sssa{sv}",
                        "c1",
                        &good_s,
                        "rel/rootfs",
                        "0",
                    ],
                ),
            ),
            "not an existing directory",
        ),
        row(
            "bus: CreateContainer binding a missing host path",
            busv(
                None,
                call(
                    S,
                    &["CreateContainer", "sssa{sv}", "c1", &spec_bad_bind, &r, "0"],
                ),
            ),
            "bind mount source /no/such/dir",
        ),
        row(
            "run: a spec over 256 KiB (the manager's bound)",
            cli(&[
                "run",
                "--sandbox",
                "bad",
                "--rootfs",
                &r,
                "-e",
                &big[0],
                "-e",
                &big[1],
                "-e",
                &big[2],
                "true",
            ]),
            "at most 262144",
        ),
        row(
            "bus: Attach to an unknown stream",
            busv(None, call(S, &["Attach", "sss", "bad", "", "video"])),
            "want stdin, stdout, stderr or wait",
        ),
        row(
            "bus: Signal 0",
            busv(None, call(S, &["Signal", "ssib", "bad", "", "0", "false"])),
            "signal 0",
        ),
        row(
            "bus: StartContainer of an unknown container",
            send_as(
                None,
                S[1],
                "org.bulkhead.Sandbox1.StartContainer",
                &["string:nosuch"],
            ),
            "org.bulkhead.Error.NotFound",
        ),
        row(
            "bus: Exec with a malformed process",
            busv(
                None,
                call(S, &["Exec", "sssa{sv}", "bad", "e1", "[1,2]", "0"]),
            ),
            "OCI process JSON object",
        ),
        row(
            "bus: Update with a malformed resources",
            busv(None, call(S, &["Update", "ss", "bad", "\"x\""])),
            "linux.resources",
        ),
    ];
    if vmm_refused {
        v.push(row(
            "run: bulkhead-vmm on a KVM that cannot boot a stock kernel",
            cli(&["run", "--backend", "bulkhead-vmm", "--rootfs", &r, "true"]),
            "cannot run on this host",
        ));
    }
    Ok(v)
}

/// Run every row; returns (name, result) for each, plus the final leak check.
pub fn run(e: &Env) -> Vec<(String, Result<()>)> {
    let mut out = vec![];
    let r = e.rootfs.display().to_string();
    let setup = e
        .bh(&["run", "-d", "--name", "bad", "--rootfs", &r, "sleep", "600"])
        .and_then(|o| o.ok().map(|_| ()));
    if let Err(err) = setup {
        out.push(("bad input: set-up sandbox".to_string(), Err(err)));
        return out;
    }
    let rows = match rows(e) {
        Ok(r) => r,
        Err(err) => {
            out.push(("bad input: set-up".to_string(), Err(err)));
            return out;
        }
    };
    let before = state_files(e);
    for row in rows {
        let res = (row.run)(e).and_then(|o| {
            let text = format!("{}{}", o.stdout, o.stderr);
            let short: String = text.chars().take(600).collect();
            ensure!(o.code != 0, "succeeded, exit 0: {short:?}");
            ensure!(
                text.contains(&row.want),
                "error does not say {:?}: {short:?}",
                row.want
            );
            Ok(())
        });
        out.push((format!("bad input: {}", row.name), res));
    }
    let leak = (|| -> Result<()> {
        let after = state_files(e);
        ensure!(
            after == before,
            "state changed by refused calls: {before:?} -> {after:?}"
        );
        let o = e.bh(&["exec", "bad", "echo", "alive"])?;
        ensure!(o.stdout == "alive\n", "the manager or sandbox broke: {o:?}");
        e.bh(&["rm", "-f", "bad"])?.ok()?;
        let left = state_files(e);
        ensure!(
            left.is_empty(),
            "left after the last sandbox was removed: {left:?}"
        );
        Ok(())
    })();
    out.push((
        "bad input: nothing leaked, the manager still serves".into(),
        leak,
    ));
    out
}

/// Sandbox records, run directories and OCI records.
fn state_files(e: &Env) -> Vec<String> {
    let mut v = vec![];
    for sub in ["sandboxes", "run", "oci"] {
        if let Ok(rd) = std::fs::read_dir(e.state().join(sub)) {
            for d in rd.flatten() {
                v.push(format!("{sub}/{}", d.file_name().to_string_lossy()));
            }
        }
    }
    v.sort();
    v
}
