//! Step 1: close every descriptor except stdio and the ones handed on on purpose.

use crate::JailError;

/// Close every descriptor above 2 that is not in `keep`, and make sure the kept ones
/// survive exec.
pub fn close_all_but(keep: &[i32]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep.iter().map(|&f| f as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for &k in &keep {
        if k > from {
            close_range(from, k - 1)?;
        }
        from = k + 1;
        // SAFETY: F_SETFD on a descriptor number; an fd that is not open gives EBADF.
        if unsafe { libc::fcntl(k as i32, libc::F_SETFD, 0) } != 0 {
            return Err(JailError::sys(
                format!("descriptor {k} to hand on"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    close_range(from, u32::MAX)
}

/// Block until the gate descriptor gives one byte, then close it; EOF or an error means
/// the manager gave up on this start.
pub fn wait_gate(fd: i32) -> Result<(), JailError> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was kept open for this purpose by `close_all_but` and nothing else in
    // this process owns it; the File closes it when dropped.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut b = [0u8; 1];
    loop {
        match f.read(&mut b) {
            Ok(1) => return Ok(()),
            Ok(_) => {
                return Err(JailError::Invalid(
                    "the start gate closed before it opened: the manager gave up on this start"
                        .into(),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(JailError::sys("start gate", e)),
        }
    }
}

fn close_range(first: u32, last: u32) -> Result<(), JailError> {
    // SAFETY: close_range only closes descriptors in the range; nothing in this
    // single-threaded process holds one of them across this call.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r != 0 {
        return Err(JailError::sys(
            "close inherited descriptors",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
