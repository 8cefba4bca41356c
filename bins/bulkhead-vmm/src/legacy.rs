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

/// How much guest console output (serial or virtio console) one VM may write to its
/// file: the guest decides how much it prints, the host's disk is not its to fill.
pub const OUTPUT_CAP: u64 = 16 << 20;

/// A writer that passes on the first `cap` bytes, then says once that it stopped and
/// swallows the rest (reporting it written, so the guest's device never stalls).
pub struct Capped<W: Write> {
    inner: W,
    left: u64,
    cap: u64,
    dropped: u64,
}

impl<W: Write> Capped<W> {
    pub fn new(inner: W, cap: u64) -> Self {
        Capped {
            inner,
            left: cap,
            cap,
            dropped: 0,
        }
    }

    /// Bytes swallowed past the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        let n = buf.len().min(self.left as usize);
        let wrote = self.inner.write(&buf[..n])?;
        self.left -= wrote as u64;
        if self.left == 0 {
            let _ = writeln!(
                self.inner,
                "\n[bulkhead-vmm: guest output stops here: {} bytes is the cap]",
                self.cap
            );
            let _ = self.inner.flush();
            self.dropped += (buf.len() - wrote) as u64;
            return Ok(buf.len());
        }
        Ok(wrote)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

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
    fn output_past_the_cap_is_swallowed_and_said_once() {
        let mut c = Capped::new(Vec::new(), 10);
        for _ in 0..5 {
            assert_eq!(c.write(b"abcde").unwrap(), 5);
        }
        assert_eq!(c.dropped(), 15);
        let text = String::from_utf8(c.inner).unwrap();
        assert!(text.starts_with("abcdeabcde\n[bulkhead-vmm: guest output stops here"));
        assert_eq!(text.matches("stops here").count(), 1);
        let mut small = Capped::new(Vec::new(), 100);
        small.write_all(b"fits").unwrap();
        assert_eq!(small.inner, b"fits");
    }

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
