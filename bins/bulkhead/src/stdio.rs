//! Moving a container's stdio between this terminal and the streams the manager hands
//! over (file descriptors connected to the guest), and the local terminal's raw mode.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::thread::JoinHandle;

pub use bulkhead_client::pump;

/// Copy stdin to a stream, then half-close it so the process reads end of file.
pub fn pump_stdin(to: std::os::unix::net::UnixStream) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut w = &to;
        let n = std::io::copy(&mut stdin, &mut w).unwrap_or(0);
        let _ = to.shutdown(std::net::Shutdown::Write);
        n
    })
}

/// The local terminal in raw mode until dropped.
pub struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// `None` when stdin is not a terminal.
    pub fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// (rows, cols) of the terminal on `fd`.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: a zeroed winsize is valid; TIOCGWINSZ writes into it and nothing else.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a valid open descriptor for the call; &mut ws is a valid pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}
