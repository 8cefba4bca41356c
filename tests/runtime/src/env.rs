//! The test environment: a private state directory (so a private embedded bus and
//! bulkheadd), the guest image, a busybox rootfs, the same rootfs as an OCI layout, an
//! OCI archive and an image in a local registry on loopback, and a runtime wrapper for
//! podman (which passes the runtime no environment of ours).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Env {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub guest: PathBuf,
    pub rootfs: PathBuf,
    pub layout: PathBuf,
    pub archive: PathBuf,
    /// `127.0.0.1:PORT`, while the registry runs.
    pub registry: Option<String>,
    registry_proc: Option<Child>,
    login_registry_proc: Option<Child>,
    pub runtime_wrapper: PathBuf,
}

/// What a command did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Out {
    pub fn ok(&self) -> Result<&Self> {
        if self.code != 0 {
            bail!(
                "exit {}: stdout {:?} stderr {:?}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// Run a command with a deadline; a command past it is killed and reported.
pub fn run_cmd(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Out> {
    let start = Instant::now();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    if let Some(data) = stdin {
        let mut w = child.stdin.take().context("stdin")?;
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let out_h = read_all(child.stdout.take());
    let err_h = read_all(child.stderr.take());
    let code = loop {
        if let Some(st) = child.try_wait()? {
            break st.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
            });
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = start.elapsed();
    Ok(Out {
        code,
        stdout: out_h.join().unwrap_or_default(),
        stderr: err_h.join().unwrap_or_default(),
        took,
    })
}

fn read_all<R: std::io::Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

impl Env {
    pub fn new(bin: PathBuf, guest: PathBuf) -> Result<Env> {
        let dir = std::env::temp_dir().join(format!("bh-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let rootfs = bulkhead_agent_tests::rootfs::busybox_rootfs()?;
        std::fs::create_dir_all(rootfs.join("etc"))?;
        let layout = dir.join("layout");
        let archive = dir.join("busybox-oci.tar");
        build_image(&rootfs, &layout, &archive, &dir)?;
        let wrapper = dir.join("bulkhead-runtime");
        let mut e = Env {
            dir,
            bin,
            guest,
            rootfs,
            layout,
            archive,
            registry: None,
            registry_proc: None,
            login_registry_proc: None,
            runtime_wrapper: wrapper,
        };
        e.write_wrapper()?;
        Ok(e)
    }

    /// Remove the scratch directory, once bulkheadd and its bus are gone (after
    /// `cases::shutdown`). Refused while anything is still mounted beneath it, so a
    /// container's bind mount can never lead the removal into files that are not ours.
    pub fn remove_scratch(mut self) -> Result<()> {
        self.stop_registries();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bulkheadd_pid().is_some() || self.bus_alive() {
            if Instant::now() > deadline {
                bail!("bulkheadd or its bus is still running");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mounted = bulkhead_jail::mounts_under(&self.dir);
        if let Some(m) = mounted.first() {
            bail!(
                "{} mount(s) left beneath it, one is {}",
                mounted.len(),
                m.display()
            );
        }
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("rm -r {}", self.dir.display()))
    }

    fn stop_registries(&mut self) {
        for mut r in [self.registry_proc.take(), self.login_registry_proc.take()]
            .into_iter()
            .flatten()
        {
            let _ = r.kill();
            let _ = r.wait();
        }
    }

    /// The embedded bus's dbus-daemon, from the pid file it leaves in the state directory.
    fn bus_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state().join("bus/pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    fn bus_alive(&self) -> bool {
        self.bus_pid().is_some_and(|p| comm(p) == "dbus-daemon")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn write_wrapper(&mut self) -> Result<()> {
        let text = format!(
            "#!/bin/sh\n# podman and dockerd run the OCI runtime with an environment of their own.\n\
             export BULKHEAD_ROOT={} BULKHEAD_GUEST_DIR={} BULKHEAD_DATA={}\nexec {} \"$@\"\n",
            self.state().display(),
            self.guest.display(),
            self.dir.join("data").display(),
            self.bin.join("bulkhead").display()
        );
        std::fs::write(&self.runtime_wrapper, text)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            &self.runtime_wrapper,
            std::fs::Permissions::from_mode(0o755),
        )?;
        Ok(())
    }

    /// `bulkhead ARGS` in this environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("bulkhead"));
        self.env_on(&mut c);
        c.args(args);
        c
    }

    pub fn env_on(&self, c: &mut Command) {
        c.env("BULKHEAD_ROOT", self.state())
            .env("BULKHEAD_GUEST_DIR", &self.guest)
            .env("BULKHEAD_DATA", self.dir.join("data"))
            .env_remove("BULKHEAD_BUS_ADDRESS")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env_remove("BULKHEAD_CONFIG");
    }

    pub fn bh(&self, args: &[&str]) -> Result<Out> {
        run_cmd(&mut self.cmd(args), None, Duration::from_secs(180))
    }

    pub fn bh_in(&self, args: &[&str], stdin: &[u8]) -> Result<Out> {
        run_cmd(&mut self.cmd(args), Some(stdin), Duration::from_secs(180))
    }

    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.state().join("bus/socket").display())
    }

    /// `busctl --address=<our bus> ARGS`.
    pub fn busctl(&self, args: &[&str]) -> Result<Out> {
        let mut c = Command::new("busctl");
        c.arg(format!("--address={}", self.bus_address()))
            .args(args);
        run_cmd(&mut c, None, Duration::from_secs(60))
    }

    /// The pid of this environment's bulkheadd, if one runs.
    pub fn bulkheadd_pid(&self) -> Option<u32> {
        let want = self.state().display().to_string();
        procs()
            .into_iter()
            .find(|(p, cmd)| {
                cmd.contains("bulkheadd") && cmd.contains(&want) && comm(*p) != SPAWNER_COMM
            })
            .map(|(p, _)| p)
    }

    /// The spawner bulkheadd forked: same command line, its own name.
    pub fn spawner_pid(&self) -> Option<u32> {
        let want = self.state().display().to_string();
        procs()
            .into_iter()
            .find(|(p, cmd)| cmd.contains(&want) && comm(*p) == SPAWNER_COMM)
            .map(|(p, _)| p)
    }

    /// Stop this environment's bulkheadd and embedded bus (sandboxes are not touched).
    pub fn stop_daemons(&self) {
        if let Some(p) = self.bulkheadd_pid() {
            // SAFETY: kill(2) on this environment's bulkheadd.
            unsafe { libc::kill(p as i32, libc::SIGTERM) };
        }
        if let Some(pid) = self.bus_pid() {
            // SAFETY: kill(2) on this environment's dbus-daemon.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }

    /// Start a local registry on a free loopback port and push the test image to it.
    pub fn start_registry(&mut self) -> Result<String> {
        let (addr, child) = self.spawn_registry("registry", "")?;
        self.registry_proc = Some(child);
        run_cmd(
            Command::new("skopeo").args([
                "copy",
                "--dest-tls-verify=false",
                &format!("oci:{}:latest", self.layout.display()),
                &format!("docker://{addr}/test/busybox:latest"),
            ]),
            None,
            Duration::from_secs(60),
        )?
        .ok()?;
        self.registry = Some(addr.clone());
        Ok(addr)
    }

    /// A second registry that wants a login (htpasswd, basic auth), holding the test
    /// image as `private/busybox:latest`, pushed with `user`'s credentials.
    pub fn start_login_registry(&mut self, user: &str, password: &str) -> Result<String> {
        let htpasswd = self.dir.join("htpasswd");
        let hash = bcrypt::hash(password, 4).context("bcrypt")?;
        std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: bulkhead-test\n    path: {}\n",
            htpasswd.display()
        );
        let (addr, child) = self.spawn_registry("registry-login", &auth)?;
        self.login_registry_proc = Some(child);
        run_cmd(
            Command::new("skopeo").args([
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                &format!("{user}:{password}"),
                &format!("oci:{}:latest", self.layout.display()),
                &format!("docker://{addr}/private/busybox:latest"),
            ]),
            None,
            Duration::from_secs(60),
        )?
        .ok()?;
        Ok(addr)
    }

    /// `docker-registry` on a free loopback port, storing under `<dir>/<name>`, with
    /// `extra` appended to its config; returns once it listens.
    fn spawn_registry(&self, name: &str, extra: &str) -> Result<(String, Child)> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let addr = format!("127.0.0.1:{port}");
        let cfg = self.dir.join(format!("{name}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{extra}",
                self.dir.join(name).display()
            ),
        )?;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{name}.log")))?)
            .spawn()
            .context("docker-registry (apt-get install docker-registry)")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the registry did not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((addr, child))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_registries();
    }
}

/// The busybox rootfs as an OCI layout (umoci) and an OCI archive (a tar of it).
fn build_image(rootfs: &Path, layout: &Path, archive: &Path, dir: &Path) -> Result<()> {
    let umoci = |args: &[&str]| -> Result<()> {
        run_cmd(
            Command::new("umoci").args(args),
            None,
            Duration::from_secs(120),
        )?
        .ok()
        .with_context(|| format!("umoci {args:?} (apt-get install umoci)"))?;
        Ok(())
    };
    let l = layout.display().to_string();
    let img = format!("{l}:latest");
    let bundle = dir.join("umoci-bundle");
    let _ = std::fs::remove_dir_all(layout);
    let _ = std::fs::remove_dir_all(&bundle);
    umoci(&["init", "--layout", &l])?;
    umoci(&["new", "--image", &img])?;
    umoci(&["unpack", "--image", &img, &bundle.display().to_string()])?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(bundle.join("rootfs"))
        .status()?;
    if !status.success() {
        bail!("cannot copy the rootfs into the image bundle");
    }
    std::fs::write(
        bundle.join("rootfs/etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )?;
    std::fs::write(bundle.join("rootfs/etc/group"), "root:x:0:\n")?;
    umoci(&["repack", "--image", &img, &bundle.display().to_string()])?;
    umoci(&[
        "config",
        "--image",
        &img,
        "--config.cmd",
        "sh",
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ])?;
    let _ = std::fs::remove_dir_all(&bundle);
    run_cmd(
        Command::new("tar")
            .arg("-C")
            .arg(layout)
            .arg("-cf")
            .arg(archive)
            .arg("."),
        None,
        Duration::from_secs(60),
    )?
    .ok()?;
    Ok(())
}

/// (pid, command line) of every process.
/// Every live thread of `pid` runs under a seccomp filter (`Seccomp: 2`); `what`
/// names the process in the error.
pub fn every_thread_filtered(pid: u32, what: &str) -> anyhow::Result<()> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        // An empty read: the thread ended meanwhile.
        anyhow::ensure!(
            st.is_empty() || st.lines().any(|l| l == "Seccomp:\t2"),
            "{what} thread {:?} has no seccomp filter",
            t.file_name()
        );
    }
    Ok(())
}

/// bulkheadd's spawner's process name (bulkheadd's `spawner::SPAWNER_NAME`).
pub const SPAWNER_COMM: &str = "bulkhead-spawn";

/// A process's name (`comm`), empty if it is gone.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

pub fn procs() -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|d| {
                    let pid: u32 = d.file_name().to_str()?.parse().ok()?;
                    let cmd = std::fs::read(d.path().join("cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    (!cmd.is_empty()).then_some((pid, cmd))
                })
                .collect()
        })
        .unwrap_or_default()
}
