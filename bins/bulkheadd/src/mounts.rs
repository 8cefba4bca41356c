//! Bind and overlay mounts of container root file systems into a sandbox's shared
//! directory (idmapped when its virtiofsd has a user namespace), and finding every mount
//! under a directory before it is removed, so that removing a sandbox can never delete
//! through a mount into a user's files.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path has a NUL byte"))
}

/// `mount --rbind src dst`, then make it private so nothing propagates back to `src`.
pub fn bind(src: &Path, dst: &Path) -> io::Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: both strings are NUL-terminated and live across the calls.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Nothing a container or its image holds runs set-uid or opens a device node on the
    // host, through this bind or any mount below it.
    if let Err(e) = bulkhead_jail::idmap::restrict_tree(dst, false) {
        let _ = unmount(dst);
        return Err(e);
    }
    // SAFETY: as above; a propagation change takes no source or data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let _ = unmount(dst);
        return Err(e);
    }
    Ok(())
}

/// One `mount(2)` call on NUL-terminated strings (or none).
fn mount_at(
    src: Option<&CStr>,
    dst: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: NUL-terminated strings (or null) living across the call.
    let rc = unsafe { libc::mount(p(src), dst.as_ptr(), p(fstype), flags, p(data).cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Files a bounded tmpfs holds per MiB of its size. Each costs host kernel memory that
/// `size=` does not count (about 1 KiB of inode and dentry, measured: see
/// docs/security.md), and a tmpfs's own default is half the host's RAM pages: without
/// this a guest making empty files in a 64 MiB layer could take gigabytes. 64 per MiB
/// keeps that under 1/16 of the size (131,072 files in the default 2 GiB of layers).
pub const INODES_PER_MIB: u64 = 64;

/// A tmpfs of `size_mib` at `dir`, `nosuid,nodev`, its top owned by `owner` with `mode`,
/// holding at most `size_mib` x [`INODES_PER_MIB`] files: a bound on what a sandbox's
/// guest can make its components or bulkheadd write to host memory. A write or a create
/// past it fails with ENOSPC in that sandbox alone.
pub fn bounded_tmpfs(dir: &Path, size_mib: u64, mode: u32, owner: u32) -> io::Result<()> {
    let inodes = size_mib.saturating_mul(INODES_PER_MIB);
    let data = CString::new(format!(
        "size={size_mib}m,nr_inodes={inodes},mode={mode:o},uid={owner},gid={owner}"
    ))
    .map_err(|_| io::Error::other("tmpfs options"))?;
    mount_at(
        Some(c"tmpfs"),
        &cstr(dir)?,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&data),
    )
}

/// Lay out a sandbox's shared directory: `staging` (host-only: bulkheadd makes the
/// containers' directories and mount points there and mounts into it) becomes a mount
/// of its own with shared propagation, and `shared` (what virtiofsd serves) a bind of it
/// in the same peer group whose own mount is read-only, `nosuid,nodev`. What is mounted
/// under `staging` later (container root file systems, volumes) appears under `shared`
/// with its own flags, and in a jailed virtiofsd's mount namespace, whose copy of
/// `shared` is a slave. The guest can write inside those mounts, and nowhere in the
/// tree of directories around them: no path bulkheadd follows can have been planted.
pub fn make_staging(staging: &Path, shared: &Path) -> io::Result<()> {
    let (st, sh) = (cstr(staging)?, cstr(shared)?);
    // A change of flags or propagation: no source, type or data.
    let set = |at: &CStr, f: libc::c_ulong| mount_at(None, at, None, f, None);
    mount_at(Some(&st), &st, None, libc::MS_BIND, None)?;
    set(
        &st,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    set(&st, libc::MS_SHARED)?;
    mount_at(Some(&st), &sh, None, libc::MS_BIND, None)?;
    set(
        &sh,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
    )
}

/// `src` at `dst` for the guest: a private recursive bind ([`bind`]), seen through
/// virtiofsd's user namespace when it has one (`bulkhead_jail::idmap`).
pub fn share(src: &Path, dst: &Path, userns: Option<BorrowedFd>) -> io::Result<()> {
    match userns {
        Some(ns) => bulkhead_jail::idmap::bind_idmapped(src, dst, ns),
        None => bind(src, dst),
    }
}

/// A container's own writable layer in `layer` over the image `lower`, merged at
/// `target`, so it writes to its own layer and never into a shared image; over an
/// idmapped image when virtiofsd has a user namespace (whose root is host id `owner`). Undo with
/// [`unmount_and_remove`] of `target`'s directory and of `layer`.
pub fn overlay(
    lower: &Path,
    layer: &Path,
    target: &Path,
    userns: Option<(BorrowedFd, u32)>,
) -> io::Result<()> {
    match userns {
        Some((ns, owner)) => {
            bulkhead_jail::idmap::overlay_idmapped(lower, layer, target, ns, owner)
        }
        None => {
            let (upper, work) = (layer.join("upper"), layer.join("work"));
            std::fs::create_dir_all(&upper)?;
            std::fs::create_dir_all(&work)?;
            bulkhead_jail::idmap::overlay(&[lower], &upper, &work, target)
        }
    }
}

pub use bulkhead_host::overlay::SnapshotOverlay;

/// `o` merged at `target` for the guest: over idmapped layers, under `at`, when
/// virtiofsd has a user namespace (given with the writable layer's, from
/// `jail::layer_userns`), else as it is. Undo
/// with [`unmount_and_remove`] of `target`'s directory and of `at`.
pub fn snapshot_overlay(
    o: &SnapshotOverlay,
    at: &Path,
    target: &Path,
    userns: Option<(BorrowedFd, BorrowedFd)>,
) -> io::Result<()> {
    let lowers: Vec<&Path> = o.lowers.iter().map(PathBuf::as_path).collect();
    match userns {
        Some((ns, layer_ns)) => bulkhead_jail::idmap::overlay_layers_idmapped(
            &lowers, &o.upper, &o.work, at, target, ns, layer_ns,
        ),
        None => bulkhead_jail::idmap::overlay(&lowers, &o.upper, &o.work, target),
    }
}

/// Lazy unmount (`umount -l`); not mounted is not an error.
pub fn unmount(p: &Path) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

pub use bulkhead_jail::mounts_under;

/// Unmount everything under `dir`, then remove it. Refuses to remove anything while a
/// mount is left, so a user's directory is never deleted through a bind mount.
pub fn unmount_and_remove(dir: &Path) -> io::Result<()> {
    for _ in 0..3 {
        let left = mounts_under(dir);
        if left.is_empty() {
            break;
        }
        for m in left {
            unmount(&m)?;
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(io::Error::other(format!(
            "mounts left under {}: {left:?}; not removing it",
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_overlay_options_parse_and_bad_ones_are_refused() {
        let o = SnapshotOverlay::parse(
            "index=off,workdir=/s/3/work,upperdir=/s/3/fs,lowerdir=/s/2/fs:/s/1/fs",
        )
        .unwrap();
        assert_eq!(
            o.lowers,
            vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        assert_eq!(
            (o.upper.as_path(), o.work.as_path()),
            (Path::new("/s/3/fs"), Path::new("/s/3/work"))
        );
        for bad in [
            "lowerdir=/a",
            "lowerdir=/a,upperdir=/u,workdir=/w,metacopy=on",
            "lowerdir=a,upperdir=/u,workdir=/w",
            "lowerdir=/a/../b,upperdir=/u,workdir=/w",
            "lowerdir=/a,upperdir=/u,workdir=/w,userxattr",
            "",
        ] {
            assert!(SnapshotOverlay::parse(bad).is_err(), "{bad}");
        }
        let many = vec!["/l"; SnapshotOverlay::MAX_LAYERS + 1].join(":");
        assert!(
            SnapshotOverlay::parse(&format!("lowerdir={many},upperdir=/u,workdir=/w")).is_err()
        );
        assert!(o.check_dirs().is_err());
    }

    #[test]
    fn bind_then_remove_keeps_the_source() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for mount(2)");
            return;
        }
        let base = std::env::temp_dir().join(format!("bh-mnt-{}", std::process::id()));
        let src = base.join("src");
        let run = base.join("run");
        let dst = run.join("shared/c1/rootfs");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("keep"), b"x").unwrap();
        bind(&src, &dst).unwrap();
        assert!(dst.join("keep").exists());
        assert_eq!(mounts_under(&run), vec![dst.clone()]);
        unmount_and_remove(&run).unwrap();
        assert!(!run.exists());
        assert!(src.join("keep").exists(), "the bind source must survive");
        std::fs::remove_dir_all(base).unwrap();
    }
}
