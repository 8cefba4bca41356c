//! vCPU setup (CPUID, MSRs, FPU, LAPIC, entry registers) and the per-vCPU run loop.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{BootEntry, EntryMode};
use crate::bus::Bus;
use crate::exit::{ExitHandle, ExitReason};
use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write boot page tables or GDT: {0}")]
    Memory(String),
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { id, what, source }
}

/// A GDT entry from flags (access byte + granularity nibble), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let flags = |shift: u32, bits: u32| ((entry >> shift) & ((1 << bits) - 1)) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = flags(55, 1);
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: index * 8,
        type_: flags(40, 4),
        present: flags(47, 1),
        dpl: flags(45, 2),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g,
        avl: flags(52, 1),
        unusable: 0,
        padding: 0,
    }
}

/// CPUID as KVM supports it, with this vCPU's APIC id and the hypervisor bit.
pub fn cpuid_for(base: &CpuId, id: u8, cpus: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                e.ecx |= 1 << 31;
                if cpus > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// CPUID leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// What the VM's vCPUs are offered: what KVM supports, plus the TSC-deadline timer when
/// KVM emulates it. KVM reports that one through KVM_CAP_TSC_DEADLINE_TIMER rather than
/// in its CPUID, and a guest that does not see it measures its LAPIC timer against the
/// PIT at every boot (ten ticks of its clock, 100 ms at HZ=100) instead of using the
/// TSC's known rate.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    let mut c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(0, "KVM_GET_SUPPORTED_CPUID"))?;
    offer_tsc_deadline(
        &mut c,
        kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    Ok(c)
}

fn offer_tsc_deadline(c: &mut CpuId, emulated: bool) {
    if !emulated {
        return;
    }
    for e in c.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
    }
}

/// Everything a vCPU needs before its first KVM_RUN. `entry` only for the boot vCPU; the
/// others wait in the in-kernel LAPIC for INIT/SIPI from the guest.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    cpus: u8,
    base_cpuid: &CpuId,
    mem: &GuestMemoryMmap,
    entry: Option<&BootEntry>,
) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&cpuid_for(base_cpuid, id, cpus))
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    // IA32_MISC_ENABLE: fast string operations on.
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x1a0,
        data: 1,
        ..Default::default()
    }])
    .map_err(|_| CpuError::Memory("MSR list".into()))?;
    vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
    .map_err(kvm_err(id, "KVM_SET_FPU"))?;
    // LINT0 as ExtINT (the 8259 path), LINT1 as NMI.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let raw: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as i8;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    if let Some(e) = entry {
        set_entry_registers(vcpu, id, mem, e)?;
    }
    Ok(())
}

fn set_entry_registers(
    vcpu: &VcpuFd,
    id: u8,
    mem: &GuestMemoryMmap,
    e: &BootEntry,
) -> Result<(), CpuError> {
    let wmem = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|err| CpuError::Memory(err.to_string()))
    };
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: e.rip,
        ..Default::default()
    };
    if e.mode == EntryMode::Real16 {
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        regs.rsp = 0xff0;
        vcpu.set_sregs(&sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
        return Ok(());
    }
    let (code, data) = match e.mode {
        EntryMode::Pvh | EntryMode::Real16 => {
            (gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff))
        }
        EntryMode::Linux64 => (gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff)),
    };
    let tss = gdt_entry(0x808b, 0, 0xfffff);
    let gdt = [0u64, code, data, tss];
    for (i, ent) in gdt.iter().enumerate() {
        wmem(*ent, GDT_START + 8 * i as u64)?;
    }
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let (cs, ds, tr) = (segment(code, 1), segment(data, 2), segment(tss, 3));
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = tr;
    match e.mode {
        EntryMode::Pvh | EntryMode::Real16 => {
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            regs.rbx = e.params_addr;
        }
        EntryMode::Linux64 => {
            // Identity-map the first 4 GiB with 2 MiB pages.
            wmem(PDPT_START | 0x3, PML4_START)?;
            for i in 0..4u64 {
                wmem((PD_START + i * 0x1000) | 0x3, PDPT_START + i * 8)?;
            }
            for j in 0..2048u64 {
                wmem((j << 21) | 0x83, PD_START + j * 8)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 = 1 << 5; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = (1 << 8) | (1 << 10); // LME | LMA
            regs.rsi = e.params_addr;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
    Ok(())
}

/// Run state shared by the control socket and the vCPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// The VM's run state, and how many of the threads that touch guest memory have stopped
/// for a pause: every vCPU, and the event loop that serves the in-process devices.
pub struct VcpuControl {
    state: Mutex<(RunState, usize)>,
    cv: Condvar,
    /// Written on every change of state, for threads that wait in epoll, not here.
    watchers: Mutex<Vec<EventFd>>,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: Mutex::new((RunState::Running, 0)),
            cv: Condvar::new(),
            watchers: Mutex::new(Vec::new()),
        }
    }
}

impl VcpuControl {
    pub fn state(&self) -> RunState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    pub fn set(&self, s: RunState) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = s;
        self.cv.notify_all();
        for w in self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = w.write(1);
        }
    }

    /// An eventfd that becomes readable whenever the state is set.
    pub fn watch(&self) -> std::io::Result<EventFd> {
        let w = EventFd::new(EFD_NONBLOCK)?;
        let copy = w.try_clone()?;
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(copy);
        Ok(w)
    }

    /// For a thread that stops touching guest memory without blocking here (the event
    /// loop): count it as parked (`true`) or running again (`false`).
    pub fn count_parked(&self, parked: bool) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if parked {
            g.1 += 1;
        } else {
            g.1 = g.1.saturating_sub(1);
        }
        self.cv.notify_all();
    }

    /// Wait until `n` vCPUs have parked, or `timeout` passes.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while g.1 < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    fn park_while_paused(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != RunState::Paused {
            return;
        }
        g.1 += 1;
        self.cv.notify_all();
        while g.0 == RunState::Paused {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.1 -= 1;
    }
}

/// Finds a guest that can never run again. A vCPU halted with interrupts off (`cli;
/// hlt`, Linux's `halt`), or waiting for a start-up IPI, sleeps inside KVM_RUN with the
/// in-kernel LAPIC and never exits to us: without this the VMM would live on, silent,
/// running nothing. The event loop calls [`HaltWatch::tick`] once a second and kicks the
/// vCPUs; each, back from KVM_RUN, looks at its own state ([`VcpuRunner`]).
pub struct HaltWatch {
    tick: AtomicU64,
    /// Per vCPU: ticks in a row it was seen unable to wake, with no exit to us between.
    dead_ticks: Mutex<Vec<u32>>,
}

/// Ticks in a row every vCPU must be seen unable to wake before the VM is given up.
pub const DEAD_TICKS: u32 = 3;

impl HaltWatch {
    pub fn new(cpus: usize) -> Self {
        HaltWatch {
            tick: AtomicU64::new(0),
            dead_ticks: Mutex::new(vec![0; cpus]),
        }
    }

    /// A new look is due.
    pub fn tick(&self) {
        self.tick.fetch_add(1, Ordering::AcqRel);
    }

    fn current(&self) -> u64 {
        self.tick.load(Ordering::Acquire)
    }

    /// vCPU `id` was seen unable to wake (`dead`) or not at this tick; true when every
    /// vCPU has now been seen so for [`DEAD_TICKS`] ticks in a row.
    fn report(&self, id: usize, dead: bool) -> bool {
        let mut d = self.dead_ticks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = d.get_mut(id) {
            *n = if dead { n.saturating_add(1) } else { 0 };
        }
        d.iter().all(|&n| n >= DEAD_TICKS)
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN.with(Cell::get);
    if !p.is_null() {
        // SAFETY: p points at this thread's mmapped kvm_run, set before the first
        // KVM_RUN and valid for the vCPU's lifetime; a single aligned byte store.
        unsafe { (*p).immediate_exit = 1 };
    }
}

/// Kick each of `threads` (vCPU threads) out of KVM_RUN.
pub fn kick(threads: &[libc::pthread_t]) {
    for t in threads {
        // SAFETY: t is a live vCPU thread (they run until process exit).
        unsafe { libc::pthread_kill(*t, kick_signal()) };
    }
}

pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

pub struct VcpuRunner {
    pub id: u8,
    pub vcpu: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: ExitHandle,
    pub control: Arc<VcpuControl>,
    /// vCPU 0 records its first entry into the guest here.
    pub timeline: Option<Arc<crate::startup::Timeline>>,
    pub halt_watch: Arc<HaltWatch>,
}

/// Whether a vCPU in this state can never run again by itself: halted with interrupts
/// off, or never started (waiting for INIT/SIPI from another vCPU).
pub fn unable_to_wake(mp_state: u32, rflags: u64) -> bool {
    const IF: u64 = 1 << 9;
    match mp_state {
        kvm_bindings::KVM_MP_STATE_HALTED => rflags & IF == 0,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => true,
        _ => false,
    }
}

impl VcpuRunner {
    /// Run until the VM ends; the reason goes to the shared exit handle.
    pub fn run(mut self) {
        KVM_RUN.with(|c| c.set(self.vcpu.get_kvm_run() as *mut _));
        // Exits to us since the last halt-watch tick, and the tick last looked at.
        let (mut exits, mut seen_tick) = (0u64, 0u64);
        // Before the guest runs a single instruction on this vCPU.
        if let Err(e) = crate::seccomp::install_for(crate::seccomp::Class::Vcpu) {
            self.exit.request(ExitReason::Crash(e));
            return;
        }
        if let Some(t) = self.timeline.take() {
            if t.mark("first vCPU entry") {
                tracing::info!(phases = %t.line(), "entering the guest");
            }
        }
        loop {
            if self.exit.reason().is_some() {
                return;
            }
            match self.vcpu.run() {
                Ok(exit) => {
                    exits += 1;
                    match exit {
                        VcpuExit::IoIn(port, data) => {
                            self.pio.read(u64::from(port), data);
                        }
                        VcpuExit::IoOut(port, data) => {
                            self.pio.write(u64::from(port), data);
                        }
                        VcpuExit::MmioRead(addr, data) => {
                            self.mmio.read(addr, data);
                        }
                        VcpuExit::MmioWrite(addr, data) => {
                            self.mmio.write(addr, data);
                        }
                        VcpuExit::Hlt => {
                            // With the in-kernel LAPIC a halt only exits when the vCPU can
                            // never wake again: interrupts off and halted.
                            self.exit.request(ExitReason::PowerOff);
                            return;
                        }
                        VcpuExit::Shutdown => {
                            // Triple fault: Linux's last-resort reboot path.
                            self.exit.request(ExitReason::Reboot);
                            return;
                        }
                        VcpuExit::SystemEvent(kind, _) => {
                            let r = match kind {
                                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                                k => {
                                    ExitReason::Crash(format!("vCPU {}: system event {k}", self.id))
                                }
                            };
                            self.exit.request(r);
                            return;
                        }
                        VcpuExit::FailEntry(reason, cpu) => {
                            self.exit.request(ExitReason::Crash(format!(
                            "vCPU {}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                            self.id
                        )));
                            return;
                        }
                        VcpuExit::InternalError => {
                            self.exit.request(ExitReason::Crash(format!(
                            "vCPU {}: KVM internal error (instruction emulation failed: this /dev/kvm cannot run this guest)",
                            self.id
                        )));
                            return;
                        }
                        other => {
                            self.exit.request(ExitReason::Crash(format!(
                                "vCPU {}: unexpected KVM exit {other:?}",
                                self.id
                            )));
                            return;
                        }
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    self.control.park_while_paused();
                    let tick = self.halt_watch.current();
                    if tick != seen_tick {
                        seen_tick = tick;
                        let dead = exits == 0 && self.unable_to_wake();
                        exits = 0;
                        if self.halt_watch.report(usize::from(self.id), dead) {
                            self.exit.request(ExitReason::Halted);
                            return;
                        }
                    }
                }
                Err(e) => {
                    self.exit
                        .request(ExitReason::Crash(format!("vCPU {}: KVM_RUN: {e}", self.id)));
                    return;
                }
            }
        }
    }
}

impl VcpuRunner {
    fn unable_to_wake(&self) -> bool {
        match (self.vcpu.get_mp_state(), self.vcpu.get_regs()) {
            (Ok(mp), Ok(regs)) => unable_to_wake(mp.mp_state, regs.rflags),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_every_vcpu_unable_to_wake_for_long_enough_ends_the_vm() {
        use kvm_bindings::{
            KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
        };
        assert!(unable_to_wake(KVM_MP_STATE_HALTED, 0x2));
        assert!(
            !unable_to_wake(KVM_MP_STATE_HALTED, 0x202),
            "idle with interrupts on"
        );
        assert!(!unable_to_wake(KVM_MP_STATE_RUNNABLE, 0x2));
        assert!(unable_to_wake(KVM_MP_STATE_INIT_RECEIVED, 0x2));
        let w = HaltWatch::new(2);
        for _ in 0..DEAD_TICKS + 2 {
            assert!(!w.report(0, true), "vCPU 1 still runs");
            assert!(!w.report(1, false));
        }
        for i in 1..=DEAD_TICKS {
            let over = w.report(1, true);
            assert_eq!(over, i == DEAD_TICKS, "after {i} ticks");
        }
        // One look that finds a vCPU alive starts its count again.
        assert!(!w.report(0, false));
        assert!(!w.report(0, true));
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_only_where_kvm_emulates_it() {
        let leaf = |function, ecx| kvm_bindings::kvm_cpuid_entry2 {
            function,
            ecx,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[leaf(0, 0), leaf(1, 0x8000_0001)]).unwrap();
        let ecx1 = |c: &CpuId| c.as_slice().iter().find(|e| e.function == 1).unwrap().ecx;
        let mut off = base.clone();
        offer_tsc_deadline(&mut off, false);
        assert_eq!(ecx1(&off), 0x8000_0001);
        let mut on = base.clone();
        offer_tsc_deadline(&mut on, true);
        assert_eq!(ecx1(&on), 0x8000_0001 | CPUID_1_ECX_TSC_DEADLINE);
        // Leaf 0 is left alone, and the per-vCPU edits keep the bit.
        assert_eq!(on.as_slice()[0].ecx, 0);
        assert_ne!(ecx1(&cpuid_for(&on, 1, 2)) & CPUID_1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.l, code64.db, code64.g, code64.type_),
            (1, 0, 1, 0xb)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        assert_eq!(code64.selector, 8);
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.present, data.s), (3, 1, 1));
        let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        let c = Arc::new(VcpuControl::default());
        c.set(RunState::Paused);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.park_while_paused());
        assert!(c.wait_parked(1, Duration::from_secs(5)));
        c.set(RunState::Running);
        t.join().unwrap();
        assert!(!c.wait_parked(1, Duration::from_millis(10)));
    }
}
