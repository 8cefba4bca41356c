//! bulkhead-vmm on the host's own /dev/kvm with toy guests: a few bytes of hand-assembled
//! machine code each. They need no guest kernel, so they run even where /dev/kvm cannot
//! boot a stock one (PVM). Each test runs the real binary and checks what the guest did:
//! serial output, exit status, register values it read, interrupts it took.
//!
//! These tests need /dev/kvm. Without it they fail, unless BULKHEAD_SKIP_KVM_TESTS=1
//! says to skip them on purpose.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulkhead_dbus::vmm::Vmm1Proxy;

const VMM: &str = env!("CARGO_BIN_EXE_bulkhead-vmm");

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("BULKHEAD_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: no /dev/kvm and BULKHEAD_SKIP_KVM_TESTS=1");
        return false;
    }
    panic!("/dev/kvm is missing; set BULKHEAD_SKIP_KVM_TESTS=1 to skip these tests deliberately");
}

/// A scratch directory, removed when the returned guard is dropped.
fn tmpdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("bh-toy-{name}-"))
        .tempdir()
        .unwrap()
}

// --- a tiny assembler: just the instructions these guests use ---------------------------

/// `mov dx, port; mov al, val; out dx, al` (16-bit code; `op32` prefixes for 32-bit code).
fn out(port: u16, val: u8, op32: bool) -> Vec<u8> {
    let mut v = if op32 { vec![0x66] } else { vec![] };
    v.extend([0xba, port as u8, (port >> 8) as u8, 0xb0, val, 0xee]);
    v
}

fn print(s: &str, op32: bool) -> Vec<u8> {
    s.bytes().flat_map(|b| out(0x3f8, b, op32)).collect()
}

/// ACPI S5 through the FADT sleep control register, then `hlt`.
fn power_off(op32: bool) -> Vec<u8> {
    let mut v = out(0x3c0, 0x20 | (5 << 2), op32);
    v.push(0xf4);
    v
}

/// Run to completion, killing the VMM if it outlives `limit` (a guest that never gets
/// its interrupt halts forever; the test must fail, not hang).
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

struct Run {
    out: Output,
    serial: String,
}

fn run_guest(name: &str, code: &[u8], mode: &str, extra: &[&str]) -> Run {
    let dir = tmpdir(name);
    let d = dir.path();
    let img = d.join("guest.bin");
    std::fs::write(&img, code).unwrap();
    let serial = d.join("serial.log");
    let mut args = vec![
        "--boot".to_string(),
        mode.to_string(),
        "--kernel".into(),
        img.display().to_string(),
        "--memory".into(),
        "32".into(),
        "--serial".into(),
        format!("file:{}", serial.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = output_within(Command::new(VMM).args(&args), Duration::from_secs(30));
    let serial = std::fs::read_to_string(&serial).unwrap_or_default();
    Run { out, serial }
}

#[test]
fn serial_output_and_acpi_power_off() {
    if !kvm_available() {
        return;
    }
    let mut code = print("OK\n", false);
    code.extend(power_off(false));
    let r = run_guest("serial", &code, "raw16", &[]);
    assert_eq!(
        r.serial,
        "OK\n",
        "stderr: {}",
        String::from_utf8_lossy(&r.out.stderr)
    );
    assert_eq!(r.out.status.code(), Some(0));
}

#[test]
fn keyboard_controller_reset_is_a_reboot() {
    if !kvm_available() {
        return;
    }
    let mut code = print("R", false);
    code.extend([0xb0, 0xfe, 0xe6, 0x64, 0xf4]); // mov al,0xfe; out 0x64,al; hlt
    let r = run_guest("reboot", &code, "raw16", &[]);
    assert_eq!(r.serial, "R");
    assert_eq!(r.out.status.code(), Some(3));
}

#[test]
fn virtio_mmio_registers_read_from_the_guest() {
    if !kvm_available() {
        return;
    }
    // 32-bit flat mode: compare three registers of the first device (virtio-rng) at
    // 0xd0000000 and print 'M' for each match, 'X' for a mismatch.
    let mut code = vec![];
    for (off, want) in [(0u32, 0x7472_6976u32), (4, 2), (8, 4)] {
        code.push(0xa1); // mov eax, [moffs32]
        code.extend((0xd000_0000u32 + off).to_le_bytes());
        code.push(0x3d); // cmp eax, imm32
        code.extend(want.to_le_bytes());
        let ok = print("M", true);
        let bad = print("X", true);
        code.extend([0x75, (ok.len() + 2) as u8]); // jne bad
        code.extend(&ok);
        code.extend([0xeb, bad.len() as u8]); // jmp over bad
        code.extend(&bad);
    }
    code.extend(power_off(true));
    let r = run_guest("mmio", &code, "raw32", &["--rng"]);
    assert_eq!(
        r.serial,
        "MMM",
        "stderr: {}",
        String::from_utf8_lossy(&r.out.stderr)
    );
    assert_eq!(r.out.status.code(), Some(0));
}

#[test]
fn serial_interrupt_reaches_the_guest_through_irqfd_and_the_pic() {
    if !kvm_available() {
        return;
    }
    // Real mode: point IVT vector 0x0c (IRQ 4 with the PIC based at 8) at a handler,
    // program the 8259, enable the UART's THR-empty interrupt, write one byte, sti, hlt.
    // The handler prints 'I' and powers off; without the interrupt the guest halts forever.
    let build = |handler: u16| {
        let mut c = vec![0xfa]; // cli
        c.extend([0xc7, 0x06, 0x30, 0x00, handler as u8, (handler >> 8) as u8]); // mov word [0x30], handler
        c.extend([0xc7, 0x06, 0x32, 0x00, 0x00, 0x00]); // mov word [0x32], 0
        for (port, val) in [
            (0x20u8, 0x11u8),
            (0x21, 0x08),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xef),
        ] {
            c.extend([0xb0, val, 0xe6, port]);
        }
        c.extend(out(0x3f9, 0x02, false)); // IER: THR empty
        c.extend(print("S", false));
        c.extend([0xfb, 0xf4, 0xeb, 0xfd]); // sti; hlt; jmp back to hlt
        c
    };
    let prefix_len = build(0).len() as u16;
    let mut code = build(0x1000 + prefix_len);
    code.extend(print("I", false));
    code.extend(power_off(false));
    let r = run_guest("irq", &code, "raw16", &[]);
    assert!(
        r.serial.starts_with("SI"),
        "serial {:?}, stderr {}",
        r.serial,
        String::from_utf8_lossy(&r.out.stderr)
    );
    assert_eq!(r.out.status.code(), Some(0));
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// `org.bulkhead.Vmm1` on the VMM's control socket once it is up (within 20 s).
async fn connect_api(sock: &Path) -> Vmm1Proxy<'static> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bulkhead_dbus::vmm::connect(sock, Duration::from_secs(10))
        .await
        .expect("control interface")
}

/// The named error a failed call carries.
fn error_name(e: zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => panic!("not a method error: {other}"),
    }
}

/// A VMM that a failed test does not leave spinning: killed when dropped, and then the
/// scratch directory it was given (if it owns one) removed.
struct KillOnDrop {
    child: std::process::Child,
    _dir: Option<tempfile::TempDir>,
}

impl KillOnDrop {
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VMM whose guest spins (`jmp $`) with its control interface on `<dir>/api.sock`.
fn spin_vmm(name: &str, args: &[&str]) -> (KillOnDrop, PathBuf) {
    let dir = tmpdir(name);
    let d = dir.path();
    let img = d.join("spin.bin");
    std::fs::write(&img, [0xeb, 0xfe]).unwrap(); // jmp $
    let sock = d.join("api.sock");
    let child = Command::new(VMM)
        .args(["--boot", "raw16", "--kernel", img.to_str().unwrap()])
        .args(args)
        .args(["--api-socket", sock.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (
        KillOnDrop {
            child,
            _dir: Some(dir),
        },
        sock,
    )
}

#[test]
fn control_interface_state_pause_resume_shutdown() {
    if !kvm_available() {
        return;
    }
    let (mut child, sock) = spin_vmm("api", &["--memory", "32", "--cpus", "2"]);
    block_on(async {
        let p = connect_api(&sock).await;
        assert_eq!(p.state().await.unwrap(), "running");
        assert_eq!(p.cpus().await.unwrap(), 2);
        assert_eq!(p.memory_mib().await.unwrap(), 32);
        p.pause().await.unwrap();
        assert_eq!(p.state().await.unwrap(), "paused");
        // A second peer sees the same VM.
        let q = connect_api(&sock).await;
        assert_eq!(q.state().await.unwrap(), "paused");
        p.resume().await.unwrap();
        assert_eq!(q.state().await.unwrap(), "running");
        assert!(!p.has_balloon().await.unwrap());
        assert_eq!(
            error_name(p.balloon().await.unwrap_err()),
            "org.bulkhead.Error.FailedPrecondition"
        );
        assert_eq!(
            error_name(p.set_balloon_target(1).await.unwrap_err()),
            "org.bulkhead.Error.FailedPrecondition"
        );
        assert_eq!(
            error_name(p.set_hotplug_memory(128).await.unwrap_err()),
            "org.bulkhead.Error.FailedPrecondition"
        );
        p.shutdown().await.unwrap();
    });
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(5));
}

#[test]
fn hotplug_memory_is_asked_for_and_read_on_the_control_interface() {
    if !kvm_available() {
        return;
    }
    let (mut child, sock) = spin_vmm("hotplug", &["--memory", "32", "--hotplug", "256"]);
    block_on(async {
        let p = connect_api(&sock).await;
        let get = |m: &std::collections::HashMap<String, zbus::zvariant::OwnedValue>, k: &str| {
            u64::try_from(m[k].clone()).unwrap()
        };
        let m = p.hotplug_memory().await.unwrap();
        // The toy guest has no driver: the region is there, nothing is plugged.
        assert!(!bool::try_from(m["active"].clone()).unwrap());
        assert_eq!(get(&m, "addr"), 4 << 30);
        assert_eq!(get(&m, "region_mib"), 256);
        assert_eq!((get(&m, "requested_mib"), get(&m, "plugged_mib")), (0, 0));
        p.set_hotplug_memory(64).await.unwrap();
        // More than the region, or not whole 2 MiB blocks: a named error, nothing changed.
        for bad in [512, 3] {
            assert_eq!(
                error_name(p.set_hotplug_memory(bad).await.unwrap_err()),
                "org.bulkhead.Error.InvalidArgument"
            );
        }
        let m = p.hotplug_memory().await.unwrap();
        assert_eq!((get(&m, "requested_mib"), get(&m, "plugged_mib")), (64, 0));
        // Guest RAM is still the boot size; the region is not part of it.
        assert_eq!(p.memory_mib().await.unwrap(), 32);
        p.shutdown().await.unwrap();
    });
    assert_eq!(child.wait().unwrap().code(), Some(5));
}

#[test]
fn a_guest_that_halts_with_interrupts_off_ends_the_vmm_with_its_own_status() {
    if !kvm_available() {
        return;
    }
    // cli; hlt on the boot vCPU; the second vCPU is never started.
    let t = Instant::now();
    let r = run_guest("clihlt", &[0xfa, 0xf4], "raw16", &["--cpus", "2"]);
    let stderr = String::from_utf8_lossy(&r.out.stderr);
    assert_eq!(r.out.status.code(), Some(6), "stderr: {stderr}");
    assert!(stderr.contains("halted every vCPU"), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn serial_output_into_a_pipe_nobody_reads_does_not_stop_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = tmpdir("stdoutpipe");
    let d = dir.path();
    let img = d.join("chatty.bin");
    // mov dx,0x3f8; mov al,'x'; mov bx,4; outer: mov cx,0xffff; inner: out dx,al;
    // loop inner; dec bx; jnz outer: 256 KiB to COM1 (a pipe holds 64), then ACPI
    // power-off.
    let mut code = vec![0xba, 0xf8, 0x03, 0xb0, b'x', 0xbb, 4, 0];
    code.extend([0xb9, 0xff, 0xff, 0xee, 0xe2, 0xfd, 0x4b, 0x75, 0xf7]);
    code.extend(power_off(false));
    std::fs::write(&img, &code).unwrap();
    // stdout is a pipe this test holds open and never reads.
    let mut child = KillOnDrop {
        child: Command::new(VMM)
            .args(["--boot", "raw16", "--kernel", img.to_str().unwrap()])
            .args(["--memory", "32", "--serial", "stdout"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        _dir: None,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = status.expect("the VMM hung writing to a full pipe");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn an_idle_guest_with_interrupts_on_is_left_running() {
    if !kvm_available() {
        return;
    }
    let dir = tmpdir("stihlt");
    let d = dir.path();
    let img = d.join("idle.bin");
    std::fs::write(&img, [0xfb, 0xf4, 0xeb, 0xfd]).unwrap(); // sti; hlt; jmp back
    let sock = d.join("api.sock");
    let mut child = KillOnDrop {
        child: Command::new(VMM)
            .args(["--boot", "raw16", "--kernel", img.to_str().unwrap()])
            .args(["--memory", "32", "--api-socket", sock.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        _dir: None,
    };
    // Longer than the halt watch needs to give a dead guest up.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "an idle guest was ended"
    );
    block_on(async {
        let p = connect_api(&sock).await;
        // A long pause is not a halt either.
        p.pause().await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(p.state().await.unwrap(), "paused");
        p.shutdown().await.unwrap();
    });
    assert_eq!(child.wait().unwrap().code(), Some(5));
}

/// busctl, a client nobody wrote for us, reads the interface peer to peer.
#[test]
fn busctl_reads_the_control_interface() {
    if !kvm_available() || Command::new("busctl").arg("--version").output().is_err() {
        return;
    }
    let (mut child, sock) = spin_vmm("busctl", &["--memory", "32", "--balloon"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = format!("--address=unix:path={}", sock.display());
    let busctl = |args: &[&str]| {
        let o = Command::new("busctl")
            .arg(&addr)
            .arg("--timeout=10")
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "busctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // A peer has no bus names: busctl wants one, and any will do.
    let (path, iface) = ("/org/bulkhead/Vmm1", "org.bulkhead.Vmm1");
    let prop = |p: &str| busctl(&["get-property", iface, path, iface, p]);
    assert_eq!(prop("State"), "s \"running\"");
    assert_eq!(prop("HasBalloon"), "b true");
    let intro = busctl(&["introspect", iface, path, iface]);
    for m in [".Pause", ".SetBalloonTarget", ".StartPhases", ".MemoryMiB"] {
        assert!(intro.contains(m), "{m} missing from:\n{intro}");
    }
    // 32 MiB of RAM cannot give 64 to the balloon: a named error, and the VM runs on.
    let o = Command::new("busctl")
        .arg(&addr)
        .args([
            "--timeout=10",
            "call",
            iface,
            path,
            iface,
            "SetBalloonTarget",
            "t",
            "64",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("below guest RAM"));
    busctl(&["call", iface, path, iface, "Pause"]);
    assert_eq!(prop("State"), "s \"paused\"");
    busctl(&["call", iface, path, iface, "Shutdown"]);
    assert_eq!(child.wait().unwrap().code(), Some(5));
}

/// The start timeline on the control interface: every phase in order, the guest's
/// boot-timer write last; and the memory report (no vhost-user device: private RAM).
#[test]
fn start_phases_and_boot_timer_on_the_control_interface() {
    if !kvm_available() {
        return;
    }
    let dir = tmpdir("phases");
    let d = dir.path();
    let img = d.join("timer.bin");
    let mut code = out(0x3f8, b'.', false); // a stray value first: ignored
    code.extend(out(bulkhead_protocol::BOOT_TIMER_PORT, 0x01, false));
    code.extend(out(
        bulkhead_protocol::BOOT_TIMER_PORT,
        bulkhead_protocol::BOOT_TIMER_MAGIC,
        false,
    ));
    code.extend([0xeb, 0xfe]); // jmp $
    std::fs::write(&img, code).unwrap();
    let sock = d.join("api.sock");
    let mut child = KillOnDrop {
        child: Command::new(VMM)
            .args(["--boot", "raw16", "--kernel", img.to_str().unwrap()])
            .args(["--memory", "64", "--api-socket", sock.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        _dir: None,
    };
    block_on(async {
        let p = connect_api(&sock).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let phases = loop {
            let ph = p.start_phases().await.unwrap();
            if ph.len() == 5 || Instant::now() > deadline {
                break ph;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let names: Vec<&str> = phases.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "memory ready",
                "devices ready",
                "kernel loaded",
                "first vCPU entry",
                "guest init"
            ]
        );
        let ms: Vec<f64> = phases.iter().map(|p| p.1).collect();
        assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{ms:?}");
        assert!(phases.iter().all(|p| p.2 > 0), "{phases:?}");
        let m = p.memory().await.unwrap();
        assert_eq!(m["backing"], "private", "{m:?}");
        assert_eq!(m["asked_backing"], "auto", "{m:?}");
        assert!(m["why"].contains("no vhost-user"), "{m:?}");
        p.shutdown().await.unwrap();
    });
    assert_eq!(child.wait().unwrap().code(), Some(5));
}

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM).args(args).output().unwrap()
}

fn one_line_error(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "want a one-line error, got {e:?}");
    e
}

#[test]
fn bad_input_gives_one_line_errors_and_distinct_statuses() {
    let dir = tmpdir("bad");
    let d = dir.path();
    // Impossible sizes: configuration error, status 2.
    let o = vmm(&["--kernel", "/k", "--memory", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("memory = 0 MiB"));
    let o = vmm(&["--kernel", "/k", "--cpus", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("cpus = 0"));
    if !kvm_available() {
        return;
    }
    // Missing kernel (raw boot, so the PVM check does not come first).
    let o = vmm(&[
        "--boot",
        "raw16",
        "--kernel",
        "/nonexistent/kernel",
        "--memory",
        "32",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("/nonexistent/kernel"));
    // Garbage kernel, missing initrd and a corrupt disk image, each named.
    let garbage = d.join("garbage");
    std::fs::write(&garbage, vec![0x55u8; 8192]).unwrap();
    let odd = d.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let g = garbage.to_str().unwrap();
    let o = vmm(&["--kernel", g, "--memory", "64", "--allow-pvm"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("neither an ELF vmlinux nor a bzImage"));
    let o = vmm(&[
        "--boot",
        "raw16",
        "--kernel",
        g,
        "--memory",
        "32",
        "--disk",
        &format!("path={}", odd.display()),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("not a multiple of 512"));
    let o = vmm(&[
        "--kernel",
        g,
        "--initrd",
        "/nonexistent/initrd",
        "--memory",
        "64",
        "--allow-pvm",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        one_line_error(&o).contains("garbage")
            || one_line_error(&o).contains("/nonexistent/initrd")
    );
    // A /dev/kvm that cannot run a stock kernel is refused up front, not after a 27 s hang.
    if bulkhead_host::kvm_kind() == bulkhead_host::KvmKind::Pvm {
        let t = Instant::now();
        let o = vmm(&["--kernel", g, "--memory", "64"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(one_line_error(&o).contains("PVM"));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
