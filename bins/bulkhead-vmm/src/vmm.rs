//! Builds a VM from a [`VmConfig`] and runs it until it ends.
//!
//! [`run`] reads as the start sequence: check the host, create the VM, map guest memory,
//! add the legacy and virtio devices, load the kernel, start the vCPUs, then serve the
//! event loop. Each step is a function below.

use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_superio::Serial;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::acpi::{self, MmioDesc};
use crate::boot::{self, BootEntry};
use crate::bus::Bus;
use crate::config::{BootMode, SerialOut, VmConfig};
use crate::control::{ControlApi, VmHandle};
use crate::cpu::{self, HaltWatch, RunState, VcpuControl, VcpuRunner};
use crate::exit::{ExitHandle, ExitReason};
use crate::layout::*;
use crate::legacy::{
    AcpiPm, Background, Capped, IrqTrigger, SerialDevice, SharedOut, I8042, OUTPUT_CAP,
};
use crate::memory::{self, GuestRam};
use crate::startup::{BootTimer, Timeline};
use crate::virtio::balloon::{Balloon, BalloonControl};
use crate::virtio::mem::{MemControl, VirtioMem};
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

fn dev_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Device(e.to_string())
}

/// Tokens of the event loop's own epoll. The devices' epoll inside it has tokens whose
/// upper 32 bits are a device slot (from 1) and lower 32 a queue index or device token.
const TOK_EXIT: u32 = 0;
const TOK_API: u32 = 1;
/// The devices' own epoll (see [`DeviceEvents`]) has something ready.
const TOK_DEVICES: u32 = 2;
/// The run state changed (pause, resume).
const TOK_RUNSTATE: u32 = 3;
/// Time for the vCPUs to look whether they can still wake ([`HaltWatch`]).
const TOK_HALT_WATCH: u32 = 4;
/// How often the halt watch looks.
const HALT_WATCH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The port I/O and MMIO buses the vCPUs dispatch exits to.
#[derive(Default)]
struct Buses {
    pio: Bus,
    mmio: Bus,
}

/// A virtio device on the MMIO bus, with the ioeventfds its queue notifications arrive on.
struct DeviceSlot {
    transport: Arc<Mutex<MmioTransport>>,
    kicks: Vec<EventFd>,
}

/// What every step shares: the switch that ends the VM, the event loop's epoll, the
/// devices' epoll inside it, and the start timeline.
struct Core {
    exit: ExitHandle,
    epoll: Arc<Epoll>,
    devices: Arc<Epoll>,
    timeline: Arc<Timeline>,
}

/// The running vCPUs, the switch that pauses them, and the watch that finds them all
/// halted for good.
struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    halt_watch: Arc<HaltWatch>,
}

impl Vcpus {
    fn pthreads(&self) -> Vec<libc::pthread_t> {
        self.threads.iter().map(|t| t.as_pthread_t()).collect()
    }
}

pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmmError> {
    cfg.validate()?;
    check_host(cfg)?;
    crate::seccomp::set_mode(cfg.seccomp);
    let core = Core {
        exit: ExitHandle::new().map_err(io("exit eventfd"))?,
        epoll: Arc::new(Epoll::new().map_err(io("epoll"))?),
        devices: Arc::new(Epoll::new().map_err(io("epoll"))?),
        timeline: Timeline::new(),
    };
    let (kvm, vm) = create_vm(cfg)?;
    let ram = map_memory(&vm, cfg)?;
    core.timeline.mark("memory ready");
    let mut buses = Buses::default();
    let serial_out = add_legacy_devices(&vm, &mut buses.pio, &core, cfg)?;
    let (devices, controls) = open_virtio_devices(cfg, &ram)?;
    let (slots, descs) = attach_virtio_devices(devices, &vm, &mut buses.mmio, &core.devices, &ram)?;
    core.timeline.mark("devices ready");
    let entry = load_kernel(cfg, &ram, &descs)?;
    core.timeline.mark("kernel loaded");
    let vcpus = start_vcpus(&kvm, &vm, cfg, &ram, entry, &buses, &core)?;
    // Read /proc while the guest already runs, not on the way to its first instruction.
    let huge = memory::huge_kib_in_use();
    core.timeline.set_huge_kib("kernel loaded", huge);
    tracing::info!(
        cpus = cfg.cpus,
        memory_mib = cfg.memory_mib,
        hotplug_mib = cfg.hotplug_mib,
        memory = ram.report.backing,
        pages = ram.report.pages,
        why = %ram.report.why,
        devices = slots.len(),
        entry = ?entry.mode,
        phases = %core.timeline.line(),
        "VM started"
    );
    let api = match &cfg.api_socket {
        Some(p) => {
            let handle = Arc::new(VmHandle {
                control: vcpus.control.clone(),
                vcpus: vcpus.pthreads(),
                // Every vCPU and the event loop (its devices) stop for a pause.
                stop_for_pause: vcpus.threads.len() + 1,
                exit: core.exit.clone(),
                cpus: u32::from(cfg.cpus),
                memory_mib: cfg.memory_mib,
                memory: ram.report.clone(),
                timeline: core.timeline.clone(),
                balloon: controls.balloon,
                hotplug: controls.hotplug,
            });
            Some(
                ControlApi::listen(p, &core.epoll, TOK_API, handle)
                    .map_err(io(format!("control socket {}", p.display())))?,
            )
        }
        None => None,
    };
    // Set-up is done; from here the main thread serves what the guest controls.
    crate::seccomp::install_for(crate::seccomp::Class::Main).map_err(VmmError::Device)?;
    let reason = event_loop(api, &core, &slots, &vcpus)?;
    let _ = SharedOut::flush(&mut serial_out.shared.clone());
    if let Some(b) = &serial_out.background {
        b.settle(std::time::Duration::from_millis(200));
    }
    // Let vCPUs that are mid-exit see the reason; they are not joined (a vCPU can sit in
    // KVM_RUN indefinitely) and end with the process.
    vcpus.control.set(RunState::Running);
    Ok(reason)
}

/// Toy guests (raw boot) run on PVM; stock kernels do not.
fn check_host(cfg: &VmConfig) -> Result<(), VmmError> {
    if matches!(cfg.boot, BootMode::Linux | BootMode::Pvh)
        && !cfg.allow_pvm
        && bulkhead_host::kvm_kind() == bulkhead_host::KvmKind::Pvm
    {
        return Err(VmmError::PvmKvm);
    }
    Ok(())
}

/// The VM with its in-kernel interrupt controller and timer.
fn create_vm(cfg: &VmConfig) -> Result<(Kvm, VmFd), VmmError> {
    let kvm = Kvm::new().map_err(VmmError::KvmOpen)?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(cfg.cpus) > max_vcpus {
        return Err(VmmError::Device(format!(
            "cpus = {}: this host's KVM allows at most {max_vcpus}",
            cfg.cpus
        )));
    }
    let vm = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
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
    Ok((kvm, vm))
}

/// Guest RAM, backed as the configuration and its devices need (see [`memory`]),
/// registered with KVM, one slot per region.
fn map_memory(vm: &VmFd, cfg: &VmConfig) -> Result<GuestRam, VmmError> {
    let ram = memory::create_with_hotplug(
        cfg.memory_bytes(),
        cfg.hotplug_bytes(),
        cfg.memory_backing,
        cfg.hugepages,
        cfg.shared_memory_needed(),
    )?;
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
    Ok(ram)
}

/// The serial port's output, kept to be flushed when the VM ends.
struct SerialOutput {
    shared: SharedOut,
    /// The writer thread of stdout, given a moment to catch up at the end.
    background: Option<Background>,
}

/// COM1, the i8042 reset line, the ACPI sleep port and the boot timer.
fn add_legacy_devices(
    vm: &VmFd,
    pio: &mut Bus,
    core: &Core,
    cfg: &VmConfig,
) -> Result<SerialOutput, VmmError> {
    let exit = &core.exit;
    let mut background = None;
    let out: Box<dyn Write + Send> = match &cfg.serial {
        // stdout may be a pipe nobody drains: written from a thread of its own.
        SerialOut::Stdout => {
            let b = Background::start(std::io::stdout(), "serial-out", || {
                crate::seccomp::install_for(crate::seccomp::Class::Worker)
            })
            .map_err(io("serial output thread"))?;
            background = Some(b.clone());
            Box::new(Capped::new(b, OUTPUT_CAP))
        }
        SerialOut::File(p) => Box::new(Capped::new(
            std::fs::File::create(p).map_err(io(format!("serial output {}", p.display())))?,
            OUTPUT_CAP,
        )),
        SerialOut::None => Box::new(std::io::sink()),
    };
    let serial_out = SharedOut(Arc::new(Mutex::new(out)));
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
    vm.register_irqfd(&serial_evt, COM1_IRQ)
        .map_err(kerr("KVM_IRQFD (serial)"))?;
    let serial = SerialDevice(Serial::new(IrqTrigger(serial_evt), serial_out.clone()));
    pio.insert(u64::from(COM1_PORT), 8, Arc::new(Mutex::new(serial)))
        .map_err(dev_err)?;
    let i8042 = I8042 { exit: exit.clone() };
    pio.insert(u64::from(I8042_PORT), 5, Arc::new(Mutex::new(i8042)))
        .map_err(dev_err)?;
    let pm = AcpiPm { exit: exit.clone() };
    pio.insert(u64::from(ACPI_SLEEP_CTL_PORT), 3, Arc::new(Mutex::new(pm)))
        .map_err(dev_err)?;
    let timer = BootTimer {
        timeline: core.timeline.clone(),
    };
    pio.insert(u64::from(BOOT_TIMER_PORT), 1, Arc::new(Mutex::new(timer)))
        .map_err(dev_err)?;
    Ok(SerialOutput {
        shared: serial_out,
        background,
    })
}

/// The configured virtio devices, in a fixed order so a config always yields the same
/// guest layout.
type Devices = Vec<Box<dyn VirtioDevice>>;

/// The control sides of the devices the control interface drives.
#[derive(Default)]
struct DeviceControls {
    balloon: Option<Arc<BalloonControl>>,
    hotplug: Option<Arc<MemControl>>,
}

fn open_virtio_devices(
    cfg: &VmConfig,
    ram: &GuestRam,
) -> Result<(Devices, DeviceControls), VmmError> {
    let mut controls = DeviceControls::default();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    // Set whenever a vhost-user device is configured (memory::create makes it so).
    let ram_fd = || {
        ram.file
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| VmmError::Device("vhost-user device on private guest RAM".into()))
    };
    if let Some(v) = &cfg.vsock {
        devices.push(Box::new(
            virtio::vsock::Vsock::new(v.cid, &v.socket).map_err(dev_err)?,
        ));
    }
    for d in &cfg.disks {
        devices.push(Box::new(
            virtio::blk::Blk::open(&d.path, d.readonly).map_err(dev_err)?,
        ));
    }
    if cfg.rng {
        devices.push(Box::new(virtio::rng::Rng::default()));
    }
    // Made before the balloon, which bounds its target by what is plugged; put on the
    // bus after it.
    let mem = ram
        .hotplug
        .map(|region| VirtioMem::new(region, ram.file.clone(), ram.report.hugetlb()));
    controls.hotplug = mem.as_ref().map(|(_, control)| control.clone());
    if cfg.balloon {
        let (dev, control) = Balloon::new(
            ram.regions.clone(),
            ram.file.clone(),
            ram.report.hugetlb(),
            controls.hotplug.clone(),
        )
        .map_err(io("balloon eventfd"))?;
        devices.push(Box::new(dev));
        controls.balloon = Some(control);
    }
    if let Some((dev, _)) = mem {
        devices.push(Box::new(dev));
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
            ram_fd()?,
        )
        .map_err(dev_err)?;
        devices.push(Box::new(dev));
    }
    for n in &cfg.net {
        // The back end (bulkhead-net) starts beside the VMM and connects within moments.
        let dev = virtio::vhost_user_net::VhostUserNet::listen(
            &n.socket,
            n.mac,
            n.mtu,
            ram.regions.clone(),
            ram_fd()?,
            std::time::Duration::from_secs(30),
        )
        .map_err(dev_err)?;
        devices.push(Box::new(dev));
    }
    Ok((devices, controls))
}

/// Put each device on the MMIO bus behind a virtio-mmio transport, with an irqfd for its
/// interrupt and one ioeventfd per queue. Queue kicks of devices served in this process go
/// to the event loop; those of external (vhost-user) devices go to their back end.
fn attach_virtio_devices(
    devices: Devices,
    vm: &VmFd,
    mmio: &mut Bus,
    epoll: &Arc<Epoll>,
    ram: &GuestRam,
) -> Result<(Vec<DeviceSlot>, Vec<MmioDesc>), VmmError> {
    let mut slots = Vec::new();
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
                let token = (u64::from(slot) << 32) | q as u64;
                epoll
                    .ctl(
                        ControlOperation::Add,
                        k.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
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
        let transport = Arc::new(Mutex::new(t));
        mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(dev_err)?;
        slots.push(DeviceSlot { transport, kicks });
        descs.push(MmioDesc { base, gsi });
    }
    Ok((slots, descs))
}

/// ACPI tables describing the devices, then the kernel, initrd and command line.
fn load_kernel(cfg: &VmConfig, ram: &GuestRam, descs: &[MmioDesc]) -> Result<BootEntry, VmmError> {
    let mem_size = cfg.memory_bytes();
    let rsdp = acpi::write_tables(&ram.mem, cfg.cpus, descs)?;
    let mut cmdline = cfg.cmdline.clone();
    if cfg.legacy_mmio_cmdline {
        for d in descs {
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", d.base, d.gsi));
        }
    }
    Ok(match cfg.boot {
        BootMode::Linux | BootMode::Pvh => boot::load(
            &ram.mem,
            mem_size,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            cmdline.trim(),
            rsdp,
            cfg.boot == BootMode::Pvh,
        )?,
        BootMode::Raw16 => boot::load_raw(&ram.mem, mem_size, &cfg.kernel, true)?,
        BootMode::Raw32 => boot::load_raw(&ram.mem, mem_size, &cfg.kernel, false)?,
    })
}

/// One thread per vCPU; vCPU 0 starts at the kernel's entry point, the others wait for
/// the guest to bring them up.
fn start_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cfg: &VmConfig,
    ram: &GuestRam,
    entry: BootEntry,
    buses: &Buses,
    core: &Core,
) -> Result<Vcpus, VmmError> {
    cpu::install_kick_handler().map_err(io("vCPU kick signal handler"))?;
    let base_cpuid = cpu::supported_cpuid(kvm)?;
    let control = Arc::new(VcpuControl::default());
    let halt_watch = Arc::new(HaltWatch::new(usize::from(cfg.cpus)));
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
            pio: buses.pio.clone(),
            mmio: buses.mmio.clone(),
            exit: core.exit.clone(),
            control: control.clone(),
            timeline: (id == 0).then(|| core.timeline.clone()),
            halt_watch: halt_watch.clone(),
        });
    }
    let mut threads = Vec::new();
    for r in runners {
        threads.push(
            crate::threads::builder(format!("vcpu{}", r.id))
                .spawn(move || r.run())
                .map_err(io("spawn vCPU thread"))?,
        );
    }
    Ok(Vcpus {
        control,
        threads,
        halt_watch,
    })
}

/// The devices' epoll, watched from the event loop's while the VM runs and left out of
/// it while the VM is paused: then no in-process device touches guest memory, and what
/// became ready meanwhile is served on resume (epoll is level-triggered).
struct DeviceEvents {
    epoll: Arc<Epoll>,
    watched: bool,
}

impl DeviceEvents {
    fn watch(core: &Epoll, devices: Arc<Epoll>) -> std::io::Result<Self> {
        core.ctl(
            ControlOperation::Add,
            devices.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(TOK_DEVICES)),
        )?;
        Ok(DeviceEvents {
            epoll: devices,
            watched: true,
        })
    }

    /// Follow the run state: on pause stop watching, stop the devices that have
    /// threads of their own, and count the loop as parked; on resume the reverse.
    fn follow(&mut self, core: &Epoll, control: &VcpuControl, slots: &[DeviceSlot]) {
        let want = control.state() == RunState::Running;
        if want == self.watched {
            return;
        }
        for d in slots {
            let mut t = d.transport.lock().unwrap_or_else(|p| p.into_inner());
            if want {
                t.device_mut().resume();
            } else {
                t.device_mut().pause();
            }
        }
        let (op, ev) = if want {
            (
                ControlOperation::Add,
                EpollEvent::new(EventSet::IN, u64::from(TOK_DEVICES)),
            )
        } else {
            (ControlOperation::Delete, EpollEvent::default())
        };
        match core.ctl(op, self.epoll.as_raw_fd(), ev) {
            Ok(()) => {
                self.watched = want;
                control.count_parked(!want);
            }
            Err(e) => tracing::error!("device events: cannot follow the run state: {e}"),
        }
    }
}

/// Serve device queues, device back-end events and the control socket until something
/// asks the VM to end.
fn event_loop(
    mut api: Option<ControlApi>,
    core: &Core,
    slots: &[DeviceSlot],
    vcpus: &Vcpus,
) -> Result<ExitReason, VmmError> {
    let (epoll, exit, control) = (&core.epoll, &core.exit, &*vcpus.control);
    let runstate = control.watch().map_err(io("eventfd"))?;
    let timer_err = |e: vmm_sys_util::errno::Error| io("timerfd")(e.into());
    let mut halt_timer = TimerFd::new().map_err(timer_err)?;
    halt_timer
        .reset(HALT_WATCH_PERIOD, Some(HALT_WATCH_PERIOD))
        .map_err(timer_err)?;
    let pthreads = vcpus.pthreads();
    for (fd, token) in [
        (exit.eventfd().as_raw_fd(), TOK_EXIT),
        (runstate.as_raw_fd(), TOK_RUNSTATE),
        (halt_timer.as_raw_fd(), TOK_HALT_WATCH),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, u64::from(token)),
            )
            .map_err(io("epoll add"))?;
    }
    let mut devices = DeviceEvents::watch(epoll, core.devices.clone()).map_err(io("epoll add"))?;
    let mut events = vec![EpollEvent::default(); 8];
    let mut device_events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("epoll wait")(e)),
        };
        for ev in &events[..n] {
            match ev.data() as u32 {
                TOK_EXIT => {
                    return Ok(exit.reason().unwrap_or(ExitReason::Crash(
                        "event loop ended without a reason".into(),
                    )))
                }
                TOK_API => {
                    if let Some(api) = api.as_mut() {
                        api.readable(epoll);
                    }
                }
                TOK_RUNSTATE => {
                    let _ = runstate.read();
                    devices.follow(epoll, control, slots);
                }
                TOK_HALT_WATCH => {
                    let _ = halt_timer.wait();
                    // A paused vCPU is stopped by us, not halted by its guest.
                    if control.state() == RunState::Running {
                        vcpus.halt_watch.tick();
                        cpu::kick(&pthreads);
                    }
                }
                TOK_DEVICES if devices.watched => {
                    let m = match devices.epoll.wait(0, &mut device_events) {
                        Ok(m) => m,
                        Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                        Err(e) => return Err(io("epoll wait (devices)")(e)),
                    };
                    for d in &device_events[..m] {
                        let (slot, token) = ((d.data() >> 32) as u32, d.data() as u32);
                        device_event(slots, slot, token, d.event_set());
                    }
                }
                _ => {}
            }
        }
    }
}

/// A queue kick (token below [`DEVICE_TOKEN_BASE`]) or a device's own event.
fn device_event(slots: &[DeviceSlot], slot: u32, token: u32, set: EventSet) {
    let Some(d) = slot.checked_sub(1).and_then(|i| slots.get(i as usize)) else {
        return;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_paused_vm_serves_no_device_event_until_it_resumes() {
        let core = Epoll::new().unwrap();
        let devices = Arc::new(Epoll::new().unwrap());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        devices
            .ctl(
                ControlOperation::Add,
                kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 1 << 32), // slot 1, queue 0
            )
            .unwrap();
        let control = VcpuControl::default();
        let mut dev = DeviceEvents::watch(&core, devices).unwrap();
        let mut evs = vec![EpollEvent::default(); 4];
        kick.write(1).unwrap();
        assert_eq!(core.wait(0, &mut evs).unwrap(), 1, "a kick while running");

        control.set(RunState::Paused);
        dev.follow(&core, &control, &[]);
        assert_eq!(core.wait(0, &mut evs).unwrap(), 0, "served while paused");
        assert!(
            control.wait_parked(1, Duration::ZERO),
            "the loop did not count itself stopped"
        );
        // Following twice changes nothing.
        dev.follow(&core, &control, &[]);
        assert!(!control.wait_parked(2, Duration::ZERO));

        control.set(RunState::Running);
        dev.follow(&core, &control, &[]);
        assert_eq!(
            core.wait(0, &mut evs).unwrap(),
            1,
            "the kick waited for resume"
        );
        assert_eq!(evs[0].data() as u32, TOK_DEVICES);
        assert!(!control.wait_parked(1, Duration::ZERO));
    }
}
