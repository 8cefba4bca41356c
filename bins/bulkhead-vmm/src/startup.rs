//! The VMM's start, phase by phase: monotonic time since `main`, and the process's page
//! faults and CPU time at each phase (memory ready, kernel loaded, devices ready, first
//! vCPU entry, guest init). One log line when the first vCPU enters the guest, another
//! when the guest reports init through the boot-timer port; the control socket's
//! `start` op returns the same as JSON.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::bus::BusDevice;

/// When `main` began; set first thing by the binary. Falls back to the first use.
static EXEC: OnceLock<Instant> = OnceLock::new();

/// Record the process start (call at the top of `main`).
pub fn mark_exec() {
    let _ = EXEC.set(Instant::now());
}

fn exec() -> Instant {
    *EXEC.get_or_init(Instant::now)
}

/// What was true at one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// Milliseconds since `main` began.
    pub ms: f64,
    pub minor_faults: u64,
    pub major_faults: u64,
    /// User plus system CPU time of the whole process.
    pub cpu_ms: f64,
    /// Huge pages backing the process (KiB), where it was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub huge_kib: Option<u64>,
}

/// The phases so far, shared with the vCPU threads and the boot timer.
#[derive(Debug, Default)]
pub struct Timeline {
    phases: Mutex<Vec<Phase>>,
}

fn usage() -> (u64, u64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given; the result is checked.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF covers every thread of the process.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0, 0.0);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e3 + tv.tv_usec as f64 / 1e3;
    (
        ru.ru_minflt as u64,
        ru.ru_majflt as u64,
        t(ru.ru_utime) + t(ru.ru_stime),
    )
}

impl Timeline {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Record `name` now. A phase is recorded once; later marks of it are ignored.
    /// Returns whether this call recorded it.
    pub fn mark(&self, name: &'static str) -> bool {
        let ms = exec().elapsed().as_secs_f64() * 1e3;
        let (minor_faults, major_faults, cpu_ms) = usage();
        let mut p = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        if p.iter().any(|x| x.name == name) {
            return false;
        }
        p.push(Phase {
            name,
            ms,
            minor_faults,
            major_faults,
            cpu_ms,
            huge_kib: None,
        });
        true
    }

    /// Add the huge-page figure to a recorded phase (measured after it, so that reading
    /// /proc does not count in its time).
    pub fn set_huge_kib(&self, name: &str, kib: Option<u64>) {
        let mut p = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = p.iter_mut().find(|x| x.name == name) {
            x.huge_kib = kib;
        }
    }

    pub fn phases(&self) -> Vec<Phase> {
        self.phases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `memory_ready=3.1ms/41flt/2.0cpu kernel_loaded=...`: the phases in one line.
    pub fn line(&self) -> String {
        self.phases()
            .iter()
            .map(|p| {
                let mut s = format!(
                    "{}={:.1}ms/{}flt/{:.1}cpu",
                    p.name.replace(' ', "_"),
                    p.ms,
                    p.minor_faults + p.major_faults,
                    p.cpu_ms
                );
                if let Some(h) = p.huge_kib {
                    s.push_str(&format!("/{h}KiB-huge"));
                }
                s
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub use bulkhead_protocol::BOOT_TIMER_MAGIC;

/// An I/O port the guest's init writes [`BOOT_TIMER_MAGIC`] to, giving exec-to-init
/// without vsock. Other values, and writes after the first, are ignored; reads see 0.
pub struct BootTimer {
    pub timeline: Arc<Timeline>,
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&BOOT_TIMER_MAGIC) && self.timeline.mark("guest init") {
            tracing::info!(phases = %self.timeline.line(), "guest init reached");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_recorded_once_in_order_with_counts() {
        let t = Timeline::new();
        assert!(t.mark("memory ready"));
        let v = vec![1u8; 8 << 20]; // touch fresh pages: faults rise
        std::hint::black_box(&v);
        assert!(t.mark("kernel loaded"));
        t.set_huge_kib("kernel loaded", Some(2048));
        assert!(!t.mark("memory ready"));
        let p = t.phases();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "memory ready");
        assert!(p[1].ms >= p[0].ms);
        assert!(p[1].minor_faults > p[0].minor_faults);
        assert!(t.line().contains("kernel_loaded="), "{}", t.line());
        assert!(t.line().contains("/2048KiB-huge"), "{}", t.line());
    }

    #[test]
    fn boot_timer_takes_only_the_magic_once() {
        let t = Timeline::new();
        let mut d = BootTimer {
            timeline: t.clone(),
        };
        d.write(0, &[0x01]);
        assert!(t.phases().is_empty());
        d.write(0, &[BOOT_TIMER_MAGIC]);
        d.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.phases().len(), 1);
        assert_eq!(t.phases()[0].name, "guest init");
        let mut b = [0xffu8; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0]);
    }
}
