//! The Kubernetes path: containerd 1.6's CRI plugin with a runtime handler `bulkhead`
//! (our shim), driven by a CRI client of our own over containerd's socket, as the
//! kubelet drives it. containerd runs in a network namespace this test makes, so the
//! CNI plugins (Debian's containernetworking-plugins) build the pod network there.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cases::{find, ls_json};
use bulkhead_runtime_tests::ctrd::{start_with, CriSetup};
use bulkhead_runtime_tests::env::{run_cmd, Env};

const PAUSE: &str = "localhost/bulkhead/pause:latest";
const BUSYBOX: &str = "docker.io/test/busybox:latest";
const SUBNET: &str = "10.88.77";

/// The CRI section of containerd's config: our handler, the pause image the test
/// builds, CNI from Debian's plugins with its state kept under the test directory.
/// docs/containerd.md shows the same for a node.
fn cri_toml(cni_conf: &Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.bulkhead]
    runtime_type = "io.containerd.bulkhead.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{}"
"#,
        cni_conf.display()
    )
}

fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "bulkhead-test",
        "plugins": [
            {"type": "bridge", "bridge": "bhcni0", "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": ipam_dir,
                      "ranges": [[{"subnet": format!("{SUBNET}.0/24")}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"}
        ]
    })
    .to_string()
}

/// The pause image: the test's busybox whose command waits for a signal.
fn pause_archive(e: &Env) -> Result<std::path::PathBuf> {
    let layout = e.dir.join("pause-layout");
    let archive = e.dir.join("pause-oci.tar");
    let _ = std::fs::remove_dir_all(&layout);
    let sh = |c: &mut Command| -> Result<()> {
        run_cmd(c, None, Duration::from_secs(120))?.ok()?;
        Ok(())
    };
    sh(Command::new("cp").arg("-a").arg(&e.layout).arg(&layout))?;
    let img = format!("{}:latest", layout.display());
    sh(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.cmd",
        "sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "trap 'exit 0' TERM INT; sleep 2147483647 & wait",
    ]))?;
    sh(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    Ok(archive)
}

async fn connect(sock: &Path) -> Result<RuntimeServiceClient<Channel>> {
    let sock = sock.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .context("connecting to containerd's CRI socket")?;
    Ok(RuntimeServiceClient::new(channel))
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

pub fn cri(e: &mut Env) -> Result<()> {
    let ns = Netns(format!("bh-cri-{}", std::process::id()));
    run_cmd(
        Command::new("ip").args(["netns", "add", &ns.0]),
        None,
        Duration::from_secs(10),
    )?
    .ok()?;
    run_cmd(
        Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]),
        None,
        Duration::from_secs(10),
    )?
    .ok()?;
    let cni_conf = e.dir.join("cni-conf");
    let _ = std::fs::remove_dir_all(&cni_conf);
    std::fs::create_dir_all(&cni_conf)?;
    std::fs::write(
        cni_conf.join("10-bulkhead-test.conflist"),
        cni_conflist(&e.dir.join("cni-ipam")),
    )?;
    let setup = CriSetup {
        toml: cri_toml(&cni_conf),
        netns: ns.0.clone(),
    };
    let c = start_with(e, Some(&setup))?;
    c.import(&e.archive, "docker.io/test/busybox", "k8s.io")?;
    c.import(&pause_archive(e)?, "localhost/bulkhead/pause", "k8s.io")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(pod_lifecycle(e, &c.socket(), &ns.0));
    if r.is_err() {
        println!("--- containerd errors (last lines)\n{}", c.log_tail());
    }
    r
}

async fn pod_lifecycle(e: &Env, sock: &Path, netns: &str) -> Result<()> {
    let mut cri = connect(sock).await?;
    let logs = e.dir.join("cri-logs");
    std::fs::create_dir_all(&logs)?;
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "uid-web-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web-pod".into(),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: "bulkhead".into(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    // One VM for the pod, named after the sandbox.
    ensure!(find(&ls_json(e)?, &pod).is_some(), "no VM for pod {pod}");
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner()
        .status
        .context("no status")?;
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    ensure!(
        ip.starts_with(&format!("{SUBNET}.")),
        "the pod's IP from CNI: {ip:?}"
    );
    ensure!(
        status.state == PodSandboxState::SandboxReady as i32,
        "pod state {}",
        status.state
    );

    let ctr_config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo app-started; hostname; exec sleep 600".into(),
        ],
        log_path: "app.log".into(),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 128 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ctr_config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("StartContainer")?;
    // The container joined the pod's VM: no VM of its own.
    let all = ls_json(e)?;
    ensure!(
        find(&all, &id).is_none(),
        "the container got a VM of its own"
    );
    let pod_vm = find(&all, &pod).context("pod VM")?;
    ensure!(
        pod_vm["containers"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["id"] == id.as_str())),
        "container not in the pod VM: {pod_vm}"
    );

    let r = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "echo $((6*7)); exit 3".into()],
            timeout: 60,
        })
        .await
        .context("ExecSync")?
        .into_inner();
    ensure!(
        r.exit_code == 3 && r.stdout == b"42\n",
        "ExecSync: exit {} stdout {:?} stderr {:?}",
        r.exit_code,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    // The pod's hostname reaches its containers (they share the pod's UTS namespace).
    let r = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["hostname".into()],
            timeout: 60,
        })
        .await?
        .into_inner();
    ensure!(
        r.stdout == b"web-pod\n",
        "hostname: {:?}",
        String::from_utf8_lossy(&r.stdout)
    );

    // The pod's CNI address is inside the VM, on the guest's eth0, with the bridge
    // plugin's gateway as the default route; a server on the CNI bridge's gateway address
    // (in the test's namespace) answers the container.
    let www = e.dir.join("cri-www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "from the CNI bridge\n")?;
    let mut httpd = Command::new("ip")
        .args(["netns", "exec", netns, "busybox", "httpd", "-f"])
        .args(["-p", &format!("{SUBNET}.1:8099"), "-h"])
        .arg(&www)
        .spawn()?;
    let r = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                format!("ip -o addr show eth0; ip route; wget -q -O- http://{SUBNET}.1:8099/"),
            ],
            timeout: 60,
        })
        .await;
    let _ = httpd.kill();
    let _ = httpd.wait();
    let r = r?.into_inner();
    let out = String::from_utf8_lossy(&r.stdout);
    ensure!(
        out.contains(&format!("{ip}/"))
            && out.contains(&format!("default via {SUBNET}.1"))
            && out.ends_with("from the CNI bridge\n"),
        "the pod IP {ip} inside the VM, the bridge reached: {out:?} {:?}",
        String::from_utf8_lossy(&r.stderr)
    );

    let stats = cri
        .container_stats(ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .context("ContainerStats")?
        .into_inner()
        .stats
        .context("no stats")?;
    let ws = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    let cpu = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value)
        .unwrap_or(0);
    ensure!(ws > 0 && cpu > 0, "stats: working set {ws}, cpu {cpu}");

    let list = cri
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    ensure!(
        list.iter()
            .any(|c| c.id == id && c.state == ContainerState::ContainerRunning as i32),
        "ListContainers: {list:?}"
    );
    // What the container wrote reached CRI's log through the shim's fifos.
    let log = std::fs::read_to_string(logs.join("app.log")).unwrap_or_default();
    ensure!(
        log.contains("app-started") && log.contains("web-pod"),
        "container log: {log:?}"
    );

    cri.stop_container(StopContainerRequest {
        container_id: id.clone(),
        timeout: 2,
    })
    .await
    .context("StopContainer")?;
    cri.remove_container(RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("RemoveContainer")?;
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .context("RemovePodSandbox")?;
    ensure!(
        ls_json(e)?.is_empty(),
        "VMs left after RemovePodSandbox: {:?}",
        ls_json(e)?
    );
    Ok(())
}
