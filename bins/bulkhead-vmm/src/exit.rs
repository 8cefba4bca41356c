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
    /// The guest or KVM failed in a way the VM cannot continue from.
    Crash(String),
}

impl ExitReason {
    /// Exit status of `bulkhead-vmm`: 0 power-off, 1 VMM error before or during boot,
    /// 2 bad configuration, 3 guest reboot, 4 guest crash, 5 stopped by request.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::Reboot => 3,
            ExitReason::Crash(_) => 4,
            ExitReason::Stopped => 5,
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
        ]
        .iter()
        .map(ExitReason::status)
        .collect();
        assert_eq!(s, vec![0, 3, 4, 5]);
    }
}
