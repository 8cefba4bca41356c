//! Reading files that came from an image or that a jailed process or a guest can
//! replace: never through a symlink out of their tree, never a FIFO or a device (which
//! would block or never end), and never more than a bound.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why an untrusted file was not read.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: not a regular file ({kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: larger than {max} bytes")]
    TooLarge { path: String, max: u64 },
}

fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "not a file"
    }
}

/// Read `rel` inside the tree `root` (an image's root file system) as the container
/// would see it: symlinks resolved within `root` and never out of it (`openat2` with
/// `RESOLVE_IN_ROOT`), no magic links, no other file system; a regular file of at most
/// `max` bytes.
pub fn read_in_root(root: &Path, rel: &Path, max: u64) -> Result<Vec<u8>, UntrustedError> {
    let shown = || root.join(rel).display().to_string();
    let io = |source| UntrustedError::Io {
        path: shown(),
        source,
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(root)
        .map_err(io)?;
    let name = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io(io::Error::other("path has a NUL byte")))?;
    // SAFETY: an all-zero `open_how` is a valid value of the plain C struct.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    // SAFETY: a directory descriptor we own, a NUL-terminated path and the `open_how`
    // struct live across the call, whose size is passed; on success the result is a new
    // descriptor nobody else owns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io(io::Error::last_os_error()));
    }
    // SAFETY: see above.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    read_bounded(file, max, &shown())
}

/// The last `n` bytes at most of `path`, a file a jailed process writes (a serial log):
/// not followed if it is a symlink, refused if it is not a regular file.
pub fn tail(path: &Path, n: u64) -> Result<Vec<u8>, UntrustedError> {
    let shown = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| UntrustedError::Io {
            path: shown.clone(),
            source,
        })?;
    let len = regular(&f, &shown)?;
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut out = Vec::new();
    f.take(n)
        .read_to_end(&mut out)
        .map_err(|source| UntrustedError::Io {
            path: shown,
            source,
        })?;
    Ok(out)
}

/// The file's length, if it is a regular file.
fn regular(f: &File, shown: &str) -> Result<u64, UntrustedError> {
    let m = f.metadata().map_err(|source| UntrustedError::Io {
        path: shown.into(),
        source,
    })?;
    if !m.file_type().is_file() {
        return Err(UntrustedError::NotRegular {
            path: shown.into(),
            kind: kind(m.file_type()),
        });
    }
    Ok(m.len())
}

fn read_bounded(f: File, max: u64, shown: &str) -> Result<Vec<u8>, UntrustedError> {
    regular(&f, shown)?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|source| UntrustedError::Io {
            path: shown.into(),
            source,
        })?;
    if out.len() as u64 > max {
        return Err(UntrustedError::TooLarge {
            path: shown.into(),
            max,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn an_image_file_is_read_within_its_root_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("secret"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("usr/etc")).unwrap();
        std::fs::write(&outside, "host secret\n").unwrap();
        std::fs::write(root.join("usr/etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        // A link inside the image is followed inside it.
        symlink("../usr/etc/passwd", root.join("etc/passwd")).unwrap();
        let got = read_in_root(&root, Path::new("etc/passwd"), 4096).unwrap();
        assert_eq!(got, b"root:x:0:0::/:/bin/sh\n");
        // An absolute link, or one climbing out, resolves inside the root: the host's
        // file is never read.
        symlink(&outside, root.join("etc/group")).unwrap();
        assert!(read_in_root(&root, Path::new("etc/group"), 4096).is_err());
        symlink("../../../../../../secret", root.join("etc/shadow")).unwrap();
        assert!(read_in_root(&root, Path::new("etc/shadow"), 4096).is_err());
        // A device (the image's /dev/zero: endless) and a FIFO (never answers) are not
        // files, and a large file is refused, not read whole.
        symlink("/dev/zero", root.join("etc/hosts")).unwrap();
        assert!(read_in_root(&root, Path::new("etc/hosts"), 4096).is_err());
        nix_mkfifo(&root.join("etc/fifo"));
        assert!(matches!(
            read_in_root(&root, Path::new("etc/fifo"), 4096),
            Err(UntrustedError::NotRegular { .. })
        ));
        std::fs::write(root.join("etc/big"), vec![b'x'; 5000]).unwrap();
        assert!(matches!(
            read_in_root(&root, Path::new("etc/big"), 4096),
            Err(UntrustedError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_log_tail_follows_no_link_and_reads_no_fifo() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        std::fs::write(&log, "a\nb\nlast line\n").unwrap();
        assert_eq!(tail(&log, 10).unwrap(), b"last line\n");
        assert_eq!(tail(&log, 1000).unwrap(), b"a\nb\nlast line\n");
        let secret = t.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let link = t.path().join("link.log");
        symlink(&secret, &link).unwrap();
        assert!(tail(&link, 100).is_err(), "a symlink must not be followed");
        let fifo = t.path().join("fifo.log");
        nix_mkfifo(&fifo);
        assert!(matches!(
            tail(&fifo, 100),
            Err(UntrustedError::NotRegular { .. })
        ));
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo makes one node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }
}
