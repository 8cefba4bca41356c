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

/// Guest output to a descriptor whose writes can block: stdout into a pipe nobody
/// drains. The vCPU that writes the serial port puts bytes in a bounded buffer, and a
/// thread of its own writes them out. A full buffer drops output (counted, and said
/// once it moves again); a vCPU never waits in write(2) while it holds the serial
/// device's lock, which the way out of the VMM needs too.
#[derive(Clone)]
pub struct Background {
    shared: Arc<(Mutex<Pending>, std::sync::Condvar)>,
}

#[derive(Default)]
struct Pending {
    data: std::collections::VecDeque<u8>,
    /// Bytes dropped since the writer last caught up.
    dropped: u64,
    /// The writer is writing a chunk it took out.
    busy: bool,
    /// The output failed for good (a closed pipe): everything is dropped from now on.
    broken: bool,
}

/// How much guest output [`Background`] holds for a slow reader.
pub const BACKGROUND_BUFFER: usize = 64 << 10;

impl Background {
    /// Start the writer thread (`name`) on `out`; `setup` runs first on that thread (its
    /// seccomp filter).
    pub fn start<W, S>(mut out: W, name: &str, setup: S) -> std::io::Result<Self>
    where
        W: Write + Send + 'static,
        S: FnOnce() -> Result<(), String> + Send + 'static,
    {
        let shared: Arc<(Mutex<Pending>, std::sync::Condvar)> = Arc::default();
        let s = shared.clone();
        crate::threads::builder(name)
            .spawn(move || {
                if let Err(e) = setup() {
                    tracing::error!("guest output writer: {e}");
                    s.0.lock().unwrap_or_else(|p| p.into_inner()).broken = true;
                    return;
                }
                let (lock, cv) = &*s;
                loop {
                    let (chunk, dropped) = {
                        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                        g.busy = false;
                        cv.notify_all();
                        while g.data.is_empty() {
                            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                        g.busy = true;
                        let n = g.data.len().min(4096);
                        let chunk: Vec<u8> = g.data.drain(..n).collect();
                        (chunk, std::mem::take(&mut g.dropped))
                    };
                    let said = if dropped > 0 {
                        writeln!(
                            out,
                            "\n[bulkhead-vmm: {dropped} bytes of guest output dropped: nobody read them]"
                        )
                    } else {
                        Ok(())
                    };
                    let wrote = said
                        .and_then(|()| out.write_all(&chunk))
                        .and_then(|()| out.flush());
                    if wrote.is_err() {
                        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                        g.broken = true;
                        g.busy = false;
                        g.data.clear();
                        cv.notify_all();
                        return;
                    }
                }
            })?;
        Ok(Background { shared })
    }
}

impl Write for Background {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (lock, cv) = &*self.shared;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        if g.broken {
            return Ok(buf.len());
        }
        let room = BACKGROUND_BUFFER.saturating_sub(g.data.len());
        let n = buf.len().min(room);
        g.data.extend(&buf[..n]);
        g.dropped += (buf.len() - n) as u64;
        cv.notify_all();
        Ok(buf.len())
    }

    /// The writer thread flushes what it writes; nothing to wait for here (the serial
    /// device flushes after every byte).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Background {
    /// Give the writer up to `limit` to write out what it holds (when the VM ends).
    pub fn settle(&self, limit: std::time::Duration) {
        let (lock, cv) = &*self.shared;
        let deadline = std::time::Instant::now() + limit;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !g.broken && (g.busy || !g.data.is_empty()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            g = cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
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
    fn output_nobody_reads_is_dropped_never_waited_for() {
        // A pipe whose reader never reads: its buffer fills, then write(2) would block.
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are ours, each owned once.
        let (reader, writer) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let mut out = Background::start(writer, "test-out", || Ok(())).unwrap();
        let t = std::time::Instant::now();
        // 4 MiB, far past the pipe's and the buffer's room together.
        let block = [b'x'; 4096];
        for _ in 0..1024 {
            assert_eq!(out.write(&block).unwrap(), block.len());
        }
        out.settle(std::time::Duration::from_millis(200));
        assert!(
            // Without the buffer this write never returns; the bound only says "soon".
            t.elapsed() < std::time::Duration::from_secs(10),
            "the writer waited for the reader: {:?}",
            t.elapsed()
        );
        // What was kept arrives once someone reads, with the drop said. "end" is written
        // only after the writer has caught up: while the buffer is full it would be
        // dropped too, which is the point of the buffer.
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut r = reader;
            // SAFETY: F_SETFL on a descriptor this thread owns.
            unsafe {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&r),
                    libc::F_SETFL,
                    libc::O_NONBLOCK,
                )
            };
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut buf = [0u8; 65536];
            while !String::from_utf8_lossy(&got).contains("\nend\n")
                && std::time::Instant::now() < deadline
            {
                match r.read(&mut buf) {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
            got
        });
        out.settle(std::time::Duration::from_secs(5));
        out.write_all(b"\nend\n").unwrap();
        let got = reader.join().unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("\nend\n"), "{} bytes, no end", got.len());
        assert!(
            text.contains("bytes of guest output dropped"),
            "{}",
            &text[text.len() - 200..]
        );
        assert!(got.len() < 1 << 20, "{} bytes kept", got.len());
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
