//! Step 6: the component's `/`. A small tmpfs on the jail directory holds the paths the
//! component needs (bound from the host at the same place, so its arguments need no
//! rewriting), fresh device nodes, and a /proc of its own PID namespace. Host mounts
//! under a bound directory keep propagating in; nothing propagates out.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, pivot_root, Gid, Uid};

use crate::{Device, Jail, JailError};

const NONE: Option<&str> = None;

fn inside(root: &Path, p: &Path) -> PathBuf {
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(rel)
}

pub fn build(j: &Jail) -> Result<(), JailError> {
    mount(NONE, "/", NONE, MsFlags::MS_SLAVE | MsFlags::MS_REC, NONE)
        .map_err(|e| JailError::sys("make mounts slaves", e))?;
    mount(
        Some("tmpfs"),
        &j.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=755,size=1m"),
    )
    .map_err(|e| JailError::sys(format!("tmpfs on {}", j.root.display()), e))?;

    let mut binds: Vec<(&PathBuf, bool)> = j
        .read_only
        .iter()
        .map(|p| (p, false))
        .chain(j.read_write.iter().map(|p| (p, true)))
        .collect();
    // Parents before children, so a nested bind lands inside its parent's bind.
    binds.sort_by(|a, b| (a.0.components().count(), a.0).cmp(&(b.0.components().count(), b.0)));
    binds.dedup_by(|a, b| a.0 == b.0);
    for (host, writable) in binds {
        bind(&j.root, host, writable)?;
    }

    let dev = j.root.join("dev");
    std::fs::create_dir_all(&dev).map_err(|e| JailError::sys("mkdir /dev", e))?;
    for d in &j.devices {
        make_device(&dev, *d, j.uid, j.gid)?;
    }
    let proc = j.root.join("proc");
    std::fs::create_dir_all(&proc).map_err(|e| JailError::sys("mkdir /proc", e))?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        NONE,
    )
    .map_err(|e| JailError::sys("mount /proc", e))?;
    Ok(())
}

/// Bind `host` at the same path under `root`; a symlink is copied as a symlink (its
/// target must be bound on its own).
fn bind(root: &Path, host: &Path, writable: bool) -> Result<(), JailError> {
    let sys = |e: std::io::Error| JailError::sys(format!("bind {}", host.display()), e);
    let at = inside(root, host);
    let meta = std::fs::symlink_metadata(host).map_err(sys)?;
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent).map_err(sys)?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(host).map_err(sys)?;
        return match symlink(&target, &at) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(sys(e)),
            _ => Ok(()),
        };
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&at).map_err(sys)?;
    } else if !at.exists() {
        std::fs::File::create(&at).map_err(sys)?;
    }
    mount(
        Some(host),
        &at,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        NONE,
    )
    .map_err(|e| sys(e.into()))?;
    // Every mount of the bound tree, not only its top, and without clearing what the
    // host set: a path the host mounted read-only (a sandbox's shared directory) stays
    // read-only in a read-write bind.
    crate::idmap::restrict_tree(&at, !writable).map_err(sys)
}

fn make_device(dev: &Path, d: Device, uid: u32, gid: u32) -> Result<(), JailError> {
    let path = dev.join(d.name());
    let (major, minor) = d.number();
    let sys = |e: std::io::Error| JailError::sys(format!("/dev/{}", d.name()), e);
    mknod(
        &path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    )
    .map_err(|e| sys(e.into()))?;
    if d == Device::Kvm {
        // Only this jail's uid may open the hypervisor.
        chown(&path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| sys(e.into()))?;
    } else {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(sys)?;
    }
    Ok(())
}

/// Make `root` the process's `/`, drop the host's root from view, and seal `/`
/// read-only (bound read-write paths stay writable). Returns how: "pivot_root", or
/// "move" where the host runs from its initramfs (rootfs cannot be pivoted away; the
/// jail's root is moved over it and chrooted into, and the jailed process can neither
/// chroot nor mount to climb back out).
pub fn pivot(root: &Path) -> Result<&'static str, JailError> {
    std::env::set_current_dir(root).map_err(|e| JailError::sys("chdir to the jail root", e))?;
    // pivot_root(".", "."): the old root is stacked on the new one; unmount it.
    let how = match pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|e| JailError::sys("detach the host's root", e))?;
            "pivot_root"
        }
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some("."), "/", NONE, MsFlags::MS_MOVE, NONE)
                .map_err(|e| JailError::sys("move the jail root over /", e))?;
            nix::unistd::chroot(".").map_err(|e| JailError::sys("chroot", e))?;
            "move"
        }
        Err(e) => return Err(JailError::sys("pivot_root", e)),
    };
    std::env::set_current_dir("/").map_err(|e| JailError::sys("chdir /", e))?;
    mount(
        NONE,
        "/",
        NONE,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        NONE,
    )
    .map_err(|e| JailError::sys("seal / read-only", e))?;
    Ok(how)
}
