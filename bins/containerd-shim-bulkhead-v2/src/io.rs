//! containerd's fifos. containerd (or `ctr`) makes a fifo per stream and names it in
//! Create/Exec; the shim copies between them and the streams bulkheadd hands out.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

/// The stdio a task or exec was created with: fifo paths, empty when unused.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Open a fifo the shim writes (stdout, stderr). Its reader is normally there already;
/// when it is not, the fifo is opened read-write so the open never blocks, and output
/// waits in the pipe until a reader comes.
pub fn open_writer(path: &Path) -> io::Result<File> {
    let f = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            OpenOptions::new().read(true).write(true).open(path)?
        }
        Err(e) => return Err(e),
    };
    set_blocking(&f)?;
    Ok(f)
}

fn set_blocking(f: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Copy a stdin fifo into a process's stdin stream, then half-close the stream so the
/// process reads end of file. The open blocks until containerd's side opens the fifo
/// for writing; the thread is not joined (a client that never writes holds nothing).
pub fn pump_stdin(path: String, to: UnixStream) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let Ok(mut f) = File::open(&path) else {
            let _ = to.shutdown(std::net::Shutdown::Write);
            return 0;
        };
        let mut w = &to;
        let n = io::copy(&mut f, &mut w).unwrap_or(0);
        let _ = to.shutdown(std::net::Shutdown::Write);
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fifo(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("bh-shim-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[test]
    fn writer_opens_with_or_without_a_reader() {
        let p = fifo("out");
        // No reader yet: the open must not block, and what is written waits.
        let mut w = open_writer(&p).unwrap();
        w.write_all(b"early").unwrap();
        let mut r = OpenOptions::new().read(true).open(&p).unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"early");
        drop((w, r));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn stdin_is_copied_then_closed() {
        let p = fifo("in");
        let (a, mut b) = UnixStream::pair().unwrap();
        let h = pump_stdin(p.display().to_string(), a);
        let mut w = OpenOptions::new().write(true).open(&p).unwrap();
        w.write_all(b"hello").unwrap();
        drop(w);
        let mut got = String::new();
        b.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        assert_eq!(h.join().unwrap(), 5);
        std::fs::remove_file(&p).unwrap();
    }
}
