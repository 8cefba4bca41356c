//! Why the VM ended, and the process exit status each reason maps to.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, triple fault).
    Reboot,
    /// Stopped through the control socket.
    Stopped,
    /// Every vCPU halted with interrupts off (or never started): the guest can never
    /// run again (`cli; hlt`, Linux's `halt`).
    Halted,
    /// The guest or KVM failed in a way the VM cannot continue from.
    Crash(String),
}

impl ExitReason {
    /// Exit status of `bulkhead-vmm`: 0 power-off, 1 VMM error before or during boot,
    /// 2 bad configuration, 3 guest reboot, 4 guest crash, 5 stopped by request, 6 every
    /// vCPU halted for good.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::Reboot => 3,
            ExitReason::Crash(_) => 4,
            ExitReason::Stopped => 5,
            ExitReason::Halted => 6,
        }
    }
}

/// Shared by every thread that can end the VM; the first reason wins.
#[derive(Clone)]
pub struct ExitHandle(Arc<(Mutex<Option<ExitReason>>, EventFd)>);

impl ExitHandle {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitHandle(Arc::new((
            Mutex::new(None),
            EventFd::new(EFD_NONBLOCK)?,
        ))))
    }

    pub fn request(&self, reason: ExitReason) {
        let mut r = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            let _ = self.0 .1.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0 .1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_statuses_differ() {
        let h = ExitHandle::new().unwrap();
        h.request(ExitReason::Reboot);
        h.request(ExitReason::PowerOff);
        assert_eq!(h.reason(), Some(ExitReason::Reboot));
        assert_eq!(h.eventfd().read().unwrap(), 1);
        let s: Vec<i32> = [
            ExitReason::PowerOff,
            ExitReason::Reboot,
            ExitReason::Crash(String::new()),
            ExitReason::Stopped,
            ExitReason::Halted,
        ]
        .iter()
        .map(ExitReason::status)
        .collect();
        assert_eq!(s, vec![0, 3, 4, 5, 6]);
    }
}

/// Make a panic on any thread end the whole process at once (SIGABRT, status 134 to
/// bulkheadd), after its message. Without it a panicking vCPU or device thread ends
/// alone and leaves a VMM that runs no guest and never exits.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("bulkhead-vmm: a thread panicked; stopping the VMM");
        std::process::abort();
    }));
}

#[cfg(test)]
mod panic_tests {
    /// Run as a child by `a_thread_panic_ends_the_process`: install the hook, panic on
    /// a thread, and keep the main thread waiting as the event loop would.
    #[test]
    fn panicking_child() {
        if std::env::var_os("BULKHEAD_PANIC_CHILD").is_none() {
            return;
        }
        super::abort_on_panic();
        let _ = std::thread::spawn(|| panic!("a vCPU thread fails"));
        std::thread::sleep(std::time::Duration::from_secs(30));
    }

    #[test]
    fn a_thread_panic_ends_the_process() {
        use std::os::unix::process::ExitStatusExt;
        let mut c = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "exit::panic_tests::panicking_child",
                "--nocapture",
            ])
            .env("BULKHEAD_PANIC_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break Some(st);
            }
            if t.elapsed() > std::time::Duration::from_secs(10) {
                let _ = c.kill();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let st = st.expect("the process outlived its panicked thread");
        assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}");
    }
}
