//! Builds a VM from a [`VmConfig`] and runs it until it ends.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm};
use vm_superio::Serial;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, MmioDesc};
use crate::boot;
use crate::bus::Bus;
use crate::config::{BootMode, SerialOut, VmConfig};
use crate::cpu::{self, RunState, VcpuControl, VcpuRunner};
use crate::exit::{ExitHandle, ExitReason};
use crate::layout::*;
use crate::legacy::{AcpiPm, IrqTrigger, SerialDevice, SharedOut, I8042};
use crate::memory;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{self, EventSink, Interrupt, VirtioDevice, DEVICE_TOKEN_BASE};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("this host's /dev/kvm is PVM (kvm_pvm module): it cannot run a stock guest kernel; use a host with VT-x/AMD-V, the QEMU backend, or the nested test node")]
    PvmKvm,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("{0}")]
    Device(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn kerr(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

const SLOT_CORE: u32 = 0;
const TOK_EXIT: u32 = 0;
const TOK_API: u32 = 1;
const TOK_API_CONN: u32 = 2;
const API_LINE_MAX: usize = 4096;

struct DeviceSlot {
    transport: Arc<Mutex<MmioTransport>>,
    kicks: Vec<EventFd>,
}

pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmmError> {
    cfg.validate()?;
    let t0 = std::time::Instant::now();
    // Toy guests (raw boot) run on PVM; stock kernels do not.
    if cfg.boot == BootMode::Linux
        && !cfg.allow_pvm
        && bulkhead_host::kvm_kind() == bulkhead_host::KvmKind::Pvm
    {
        return Err(VmmError::PvmKvm);
    }
    let kvm_h = Kvm::new().map_err(VmmError::KvmOpen)?;
    let max_vcpus = kvm_h.get_max_vcpus();
    if usize::from(cfg.cpus) > max_vcpus {
        return Err(VmmError::Device(format!(
            "cpus = {}: this host's KVM allows at most {max_vcpus}",
            cfg.cpus
        )));
    }
    let vm = kvm_h.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kerr("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kerr("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(kerr("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kerr("KVM_CREATE_PIT2"))?;

    let mem_size = cfg.memory_bytes();
    let ram = memory::create(mem_size)?;
    for (slot, r) in ram.regions.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.host_addr,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which outlives the VM.
        unsafe { vm.set_user_memory_region(region) }.map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
    }

    tracing::info!(ms = t0.elapsed().as_secs_f64() * 1e3, "guest memory mapped");
    let exit = ExitHandle::new().map_err(io("exit eventfd"))?;
    let epoll = Arc::new(Epoll::new().map_err(io("epoll"))?);
    let mut pio = Bus::default();
    let mut mmio = Bus::default();

    // Serial console on COM1.
    let out: Box<dyn Write + Send> = match &cfg.serial {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(
            std::fs::File::create(p).map_err(io(format!("serial output {}", p.display())))?,
        ),
        SerialOut::None => Box::new(std::io::sink()),
    };
    let serial_out = SharedOut(Arc::new(Mutex::new(out)));
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
    vm.register_irqfd(&serial_evt, COM1_IRQ)
        .map_err(kerr("KVM_IRQFD (serial)"))?;
    let serial = SerialDevice(Serial::new(IrqTrigger(serial_evt), serial_out.clone()));
    let bus_err = |e: crate::bus::Overlap| VmmError::Device(e.to_string());
    pio.insert(u64::from(COM1_PORT), 8, Arc::new(Mutex::new(serial)))
        .map_err(bus_err)?;
    pio.insert(
        u64::from(I8042_PORT),
        5,
        Arc::new(Mutex::new(I8042 { exit: exit.clone() })),
    )
    .map_err(bus_err)?;
    pio.insert(
        u64::from(ACPI_SLEEP_CTL_PORT),
        3,
        Arc::new(Mutex::new(AcpiPm { exit: exit.clone() })),
    )
    .map_err(bus_err)?;

    // Virtio devices, in a fixed order so a config always yields the same guest layout.
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(v) = &cfg.vsock {
        devices.push(Box::new(
            virtio::vsock::Vsock::new(v.cid, &v.socket)
                .map_err(|e| VmmError::Device(e.to_string()))?,
        ));
    }
    for d in &cfg.disks {
        devices.push(Box::new(
            virtio::blk::Blk::open(&d.path, d.readonly)
                .map_err(|e| VmmError::Device(e.to_string()))?,
        ));
    }
    if cfg.rng {
        devices.push(Box::new(virtio::rng::Rng::default()));
    }
    if let Some(p) = &cfg.console {
        let f = std::fs::File::create(p).map_err(io(format!("console output {}", p.display())))?;
        devices.push(Box::new(virtio::console::Console::new(f)));
    }
    for f in &cfg.fs {
        let dev = virtio::vhost_user_fs::VhostUserFs::connect(
            &f.socket,
            &f.tag,
            f.queue_size,
            ram.regions.clone(),
            ram.file.as_raw_fd(),
        )
        .map_err(|e| VmmError::Device(e.to_string()))?;
        devices.push(Box::new(dev));
    }

    let mut slots: Vec<DeviceSlot> = Vec::new();
    let mut descs = Vec::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_IRQ_BASE + i as u32;
        let slot = i as u32 + 1;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        vm.register_irqfd(&irq_evt, gsi)
            .map_err(kerr("KVM_IRQFD"))?;
        let external = dev.external_interrupts();
        let mut kicks = Vec::new();
        for q in 0..dev.queue_max_sizes().len() {
            let k = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
            vm.register_ioevent(&k, &IoEventAddress::Mmio(base + 0x50), q as u32)
                .map_err(kerr("KVM_IOEVENTFD"))?;
            if !external {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        k.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, (u64::from(slot) << 32) | q as u64),
                    )
                    .map_err(io("epoll add"))?;
            }
            kicks.push(k);
        }
        let kick_copies = kicks
            .iter()
            .map(|k| k.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(io("eventfd dup"))?;
        let t = MmioTransport::new(
            dev,
            ram.mem.clone(),
            Interrupt::new(irq_evt),
            kick_copies,
            EventSink::new(epoll.clone(), slot),
        );
        let t = Arc::new(Mutex::new(t));
        mmio.insert(base, VIRTIO_MMIO_SIZE, t.clone())
            .map_err(bus_err)?;
        slots.push(DeviceSlot {
            transport: t,
            kicks,
        });
        descs.push(MmioDesc { base, gsi });
    }

    let rsdp = acpi::write_tables(&ram.mem, cfg.cpus, &descs)?;
    let mut cmdline = cfg.cmdline.clone();
    if cfg.legacy_mmio_cmdline {
        for d in &descs {
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", d.base, d.gsi));
        }
    }
    let entry = match cfg.boot {
        BootMode::Linux => boot::load(
            &ram.mem,
            mem_size,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            cmdline.trim(),
            rsdp,
        )?,
        BootMode::Raw16 => boot::load_raw(&ram.mem, mem_size, &cfg.kernel, true)?,
        BootMode::Raw32 => boot::load_raw(&ram.mem, mem_size, &cfg.kernel, false)?,
    };

    tracing::info!(ms = t0.elapsed().as_secs_f64() * 1e3, "kernel loaded");
    cpu::install_kick_handler().map_err(io("vCPU kick signal handler"))?;
    let base_cpuid = cpu::supported_cpuid(&kvm_h)?;
    let control = Arc::new(VcpuControl::default());
    let mut runners = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kerr("KVM_CREATE_VCPU"))?;
        cpu::configure(
            &vcpu,
            id,
            cfg.cpus,
            &base_cpuid,
            &ram.mem,
            (id == 0).then_some(&entry),
        )?;
        runners.push(VcpuRunner {
            id,
            vcpu,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            control: control.clone(),
        });
    }
    let mut threads = Vec::new();
    for r in runners {
        let name = format!("vcpu{}", r.id);
        threads.push(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || r.run())
                .map_err(io("spawn vCPU thread"))?,
        );
    }
    tracing::info!(
        ms = t0.elapsed().as_secs_f64() * 1e3,
        cpus = cfg.cpus,
        memory_mib = cfg.memory_mib,
        devices = slots.len(),
        "VM started"
    );

    let api = match &cfg.api_socket {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(io(format!("control socket {}", p.display())))?;
            l.set_nonblocking(true).map_err(io("control socket"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, u64::from(TOK_API)),
                )
                .map_err(io("epoll add"))?;
            Some(l)
        }
        None => None,
    };
    epoll
        .ctl(
            ControlOperation::Add,
            exit.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(TOK_EXIT)),
        )
        .map_err(io("epoll add"))?;

    let pthreads: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
    let mut api_conns: HashMap<u32, (UnixStream, Vec<u8>)> = HashMap::new();
    let mut next_conn_tok = TOK_API_CONN;
    let mut events = vec![EpollEvent::default(); 64];
    'outer: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(VmmError::Io {
                    what: "epoll wait".into(),
                    source: e,
                })
            }
        };
        for ev in &events[..n] {
            let (slot, token) = ((ev.data() >> 32) as u32, ev.data() as u32);
            let set = ev.event_set();
            if slot == SLOT_CORE {
                match token {
                    TOK_EXIT => break 'outer,
                    TOK_API => {
                        while let Some(Ok((s, _))) = api.as_ref().map(|l| l.accept()) {
                            let tok = next_conn_tok;
                            next_conn_tok = next_conn_tok.wrapping_add(1).max(TOK_API_CONN);
                            if s.set_nonblocking(true).is_ok()
                                && epoll
                                    .ctl(
                                        ControlOperation::Add,
                                        s.as_raw_fd(),
                                        EpollEvent::new(EventSet::IN, u64::from(tok)),
                                    )
                                    .is_ok()
                            {
                                api_conns.insert(tok, (s, Vec::new()));
                            }
                        }
                    }
                    tok => {
                        let done = match api_conns.get_mut(&tok) {
                            Some((s, buf)) => serve_api(s, buf, &control, &pthreads, &exit, cfg),
                            None => true,
                        };
                        if done {
                            if let Some((s, _)) = api_conns.remove(&tok) {
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    s.as_raw_fd(),
                                    EpollEvent::default(),
                                );
                            }
                        }
                    }
                }
                continue;
            }
            let Some(d) = slots.get((slot - 1) as usize) else {
                continue;
            };
            let mut t = d.transport.lock().unwrap_or_else(|p| p.into_inner());
            if token < DEVICE_TOKEN_BASE {
                if let Some(k) = d.kicks.get(token as usize) {
                    let _ = k.read();
                }
                if t.is_activated() {
                    t.device_mut().queue_notify(token as usize);
                }
            } else {
                t.device_mut().handle_event(token, set);
            }
        }
    }
    let reason = exit.reason().unwrap_or(ExitReason::Crash(
        "event loop ended without a reason".into(),
    ));
    let _ = SharedOut::flush(&mut serial_out.clone());
    // Let vCPUs that are mid-exit see the reason; they are not joined (a vCPU can sit in
    // KVM_RUN indefinitely) and end with the process.
    control.set(RunState::Running);
    Ok(reason)
}

/// Handle readable data on a control connection. Returns true when it should be closed.
fn serve_api(
    s: &mut UnixStream,
    buf: &mut Vec<u8>,
    control: &VcpuControl,
    vcpus: &[libc::pthread_t],
    exit: &ExitHandle,
    cfg: &VmConfig,
) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
        if buf.len() > API_LINE_MAX {
            let _ = s.write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n");
            return true;
        }
    }
    while let Some(end) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        let reply = api_request(&line, control, vcpus, exit, cfg);
        if s.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return true;
        }
    }
    false
}

fn api_request(
    line: &[u8],
    control: &VcpuControl,
    vcpus: &[libc::pthread_t],
    exit: &ExitHandle,
    cfg: &VmConfig,
) -> serde_json::Value {
    use serde_json::json;
    let req: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let state = |c: &VcpuControl| match c.state() {
        RunState::Running => "running",
        RunState::Paused => "paused",
    };
    match req.get("op").and_then(|o| o.as_str()) {
        Some("state") => json!({"ok": true, "state": state(control)}),
        Some("info") => {
            json!({"ok": true, "state": state(control), "cpus": cfg.cpus, "memory_mib": cfg.memory_mib})
        }
        Some("pause") => {
            if control.state() == RunState::Paused {
                return json!({"ok": true, "state": "paused"});
            }
            control.set(RunState::Paused);
            for t in vcpus {
                // SAFETY: t is a live vCPU thread (they run until process exit).
                unsafe { libc::pthread_kill(*t, cpu::kick_signal()) };
            }
            if control.wait_parked(vcpus.len(), Duration::from_secs(2)) {
                json!({"ok": true, "state": "paused"})
            } else {
                control.set(RunState::Running);
                json!({"ok": false, "error": "vCPUs did not stop within 2 s; still running"})
            }
        }
        Some("resume") => {
            control.set(RunState::Running);
            json!({"ok": true, "state": "running"})
        }
        Some("shutdown") => {
            exit.request(ExitReason::Stopped);
            json!({"ok": true, "state": "stopping"})
        }
        Some(other) => json!({"ok": false, "error": format!("unknown op {other:?}")}),
        None => json!({"ok": false, "error": "missing \"op\""}),
    }
}
