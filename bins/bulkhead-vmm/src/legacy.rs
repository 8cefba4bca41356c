//! Legacy platform devices: COM1, the i8042 reset line and the ACPI sleep/reset ports.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, ExitReason};
use crate::layout::ACPI_RESET_VALUE;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial output that is shared so the VMM can flush it on exit.
#[derive(Clone)]
pub struct SharedOut(pub Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

pub struct SerialDevice(pub Serial<IrqTrigger, NoEvents, SharedOut>);

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([b], Ok(off)) = (&mut *data, u8::try_from(offset)) {
            *b = self.0.read(off);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            // An output error (full disk, closed pipe) must not stop the guest.
            let _ = self.0.write(off, *b);
        }
    }
}

/// Just enough of the i8042 for the guest's reset-by-keyboard-controller path.
pub struct I8042 {
    pub exit: ExitHandle,
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so writers never wait.
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // Port 0x64, command 0xfe: pulse the CPU reset line.
        if offset == 4 && data.first() == Some(&0xfe) {
            self.exit.request(ExitReason::Reboot);
        }
    }
}

/// The FADT's hardware-reduced sleep control/status and reset registers, one byte each:
/// offset 0 sleep control, 1 sleep status, 2 reset.
pub struct AcpiPm {
    pub exit: ExitHandle,
}

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_S5: u8 = 5;

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 7 == SLP_TYP_S5 => {
                self.exit.request(ExitReason::PowerOff)
            }
            2 if v == ACPI_RESET_VALUE => self.exit.request(ExitReason::Reboot),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_pm_power_off_and_reset() {
        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPm { exit: exit.clone() };
        pm.write(0, &[SLP_EN | (3 << 2)]); // S3: ignored
        assert_eq!(exit.reason(), None);
        pm.write(2, &[0x01]); // wrong reset value: ignored
        assert_eq!(exit.reason(), None);
        pm.write(0, &[SLP_EN | (SLP_TYP_S5 << 2)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPm { exit: exit.clone() };
        pm.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn i8042_reset() {
        let exit = ExitHandle::new().unwrap();
        let mut k = I8042 { exit: exit.clone() };
        k.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        k.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn serial_writes_reach_the_output() {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        struct V(Arc<Mutex<Vec<u8>>>);
        impl Write for V {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = SharedOut(Arc::new(Mutex::new(Box::new(V(buf.clone())))));
        let evt = EventFd::new(0).unwrap();
        let mut s = SerialDevice(Serial::new(IrqTrigger(evt), out));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        s.write(0, &[1, 2]); // wrong width: ignored
        assert_eq!(&*buf.lock().unwrap(), b"hi");
    }
}
