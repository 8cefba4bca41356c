//! Idmapped mounts: how a component that runs as root of its own user namespace
//! ([`crate::Jail::userns`], virtiofsd) serves files whose owners on disk are the host's
//! ids (container images owned by root, 0..65535).
//!
//! A mount is idmapped with a user namespace whose map is `0 base count`: an owner `k`
//! on disk reads as host id `base + k` through that mount, and a file created there by
//! host id `base + k` is owned by `k` on disk. The component's namespace has the same
//! map, so inside it the owner is `k` again: the guest sees the image's real owners,
//! the disk keeps them, and the process serving them holds host ids of its sandbox's
//! range, never root's.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path has a NUL byte"))
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Write the uid and gid maps of `pid`'s (new) user namespace: ids `0..n` are the
/// host's `uid..uid+n` and `gid..gid+n`. The writer needs CAP_SETUID and CAP_SETGID in
/// the namespace's parent.
pub fn write_maps(pid: i32, uid: u32, gid: u32, n: u32) -> io::Result<()> {
    std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {uid} {n}\n"))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {gid} {n}\n"))
}

/// Both maps of `pid`'s (new) user namespace, as extents of (inside, host, count).
fn write_extents(pid: i32, extents: &[(u32, u32, u32)]) -> io::Result<()> {
    let text: String = extents
        .iter()
        .map(|(inside, host, n)| format!("{inside} {host} {n}\n"))
        .collect();
    std::fs::write(format!("/proc/{pid}/uid_map"), &text)?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &text)
}

/// Lazy unmount of what this module mounted at `p`; not mounted is not an error.
fn detach(p: &Path) {
    if let Ok(c) = cstr(p) {
        // SAFETY: a NUL-terminated path living across the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// `/proc/<pid>/ns/user`, opened, when that namespace's uid and gid maps are exactly
/// `0 base count` as this process sees them. The namespace is checked after it is
/// opened, so a process that moved on meanwhile is refused, not trusted.
pub fn userns_of(pid: u32, base: u32, count: u32) -> io::Result<OwnedFd> {
    userns_of_extents(pid, &[(0, base, count)])
}

/// A new user namespace whose uid and gid maps are `0 base count`, as a descriptor. A
/// short-lived child makes it (a process cannot move itself into a new user namespace
/// once it has threads); the child does only async-signal-safe calls, so this may be
/// called from any process.
pub fn new_userns(base: u32, count: u32) -> io::Result<OwnedFd> {
    let pid = hold_userns(&[(0, base, count)])?;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from);
    release_holder(pid);
    ns
}

/// Kill and reap a child [`hold_userns`] made; its namespace lives on in whatever has
/// it open.
pub fn release_holder(pid: u32) {
    // SAFETY: killing and reaping our own child, by the pid fork gave us.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
        libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
    }
}

/// The maps of a user namespace for a writable layer's idmapped mount, as extents of
/// (inside, host, count): `0 base count`, as for an image, and besides the layer's one inside id `count` for host root. overlayfs makes
/// its work files in the writable layer as its mounter (host root), which must have an
/// id through the mount; it then gives each file its owner (`base + k`, on disk `k`),
/// so only the work directory's own entries are ever `count` on disk. Only an idle
/// holder ([`hold_userns`]) ever runs in this namespace; virtiofsd's has no id `count`, so nothing the guest asks for
/// can be host root's.
pub fn layer_extents(base: u32, count: u32) -> [(u32, u32, u32); 2] {
    [(0, base, count), (count, 0, 1)]
}

/// A child that holds a new user namespace with these maps until it is killed (or its
/// parent dies); its pid. For a process that may not fork or unshare itself (bulkheadd
/// under its allow list asks its spawner), which opens `/proc/<pid>/ns/user`, checks
/// the maps with [`userns_of_extents`], then kills the holder.
pub fn hold_userns(extents: &[(u32, u32, u32)]) -> io::Result<u32> {
    let mut sync = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    check(unsafe { libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC) }.into())?;
    // SAFETY: the two descriptors are ours and open; each is owned once.
    let (r_end, w_end) = unsafe { (OwnedFd::from_raw_fd(sync[0]), OwnedFd::from_raw_fd(sync[1])) };
    // SAFETY: the child runs only prctl, unshare, write, pause and _exit, which are
    // async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            let ok: u8 = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
            libc::write(w_end.as_raw_fd(), (&ok as *const u8).cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    drop(w_end);
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let made = (|| {
        let mut ok = 0u8;
        // SAFETY: reading one byte into a local from a descriptor we own.
        let n = unsafe { libc::read(r_end.as_raw_fd(), (&mut ok as *mut u8).cast(), 1) };
        if n != 1 || ok != 1 {
            return Err(io::Error::other("cannot make a user namespace here"));
        }
        write_extents(pid, extents)
    })();
    if made.is_err() {
        release_holder(pid as u32);
    }
    made.map(|()| pid as u32)
}

/// `/proc/<pid>/ns/user`, opened, when its uid and gid maps are exactly `extents`, as
/// [`userns_of`] checks a single extent.
pub fn userns_of_extents(pid: u32, extents: &[(u32, u32, u32)]) -> io::Result<OwnedFd> {
    let dir = format!("/proc/{pid}");
    let ns = std::fs::File::open(format!("{dir}/ns/user"))?;
    let want: Vec<Vec<String>> = extents
        .iter()
        .map(|(a, b, c)| vec![a.to_string(), b.to_string(), c.to_string()])
        .collect();
    for map in ["uid_map", "gid_map"] {
        let text = std::fs::read_to_string(format!("{dir}/{map}"))?;
        let got: Vec<Vec<String>> = text
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        if got != want {
            return Err(io::Error::other(format!(
                "process {pid}'s {map} is {:?}, not {extents:?}",
                text.trim()
            )));
        }
    }
    let still = std::fs::metadata(format!("{dir}/ns/user"))?;
    let opened = ns.metadata()?;
    if (still.dev(), still.ino()) != (opened.dev(), opened.ino()) {
        return Err(io::Error::other(format!(
            "process {pid} changed user namespace"
        )));
    }
    Ok(ns.into())
}

/// Bind `src` (with what is mounted below it) at `dst`, every id seen through `userns`
/// (see the module's text), with private propagation. The bind is made detached, mapped,
/// then attached, as the kernel only maps a mount nobody can see yet.
pub fn bind_idmapped(src: &Path, dst: &Path, userns: BorrowedFd) -> io::Result<()> {
    let tree = detached_copy(src)?;
    set_idmap(&tree, userns)?;
    let to = cstr(dst)?;
    // SAFETY: a detached mount descriptor and a NUL-terminated target that live across
    // the call; the empty path with MOVE_MOUNT_F_EMPTY_PATH names the descriptor itself.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Set `nosuid,nodev` (and `ro` when `read_only`) on the mount at `path` and on every
/// mount below it (`mount_setattr` with `AT_RECURSIVE`). Nothing is cleared: a mount
/// that was read-only stays so, whatever `read_only` says, so a bind can narrow what
/// its source allows and never widen it.
pub fn restrict_tree(path: &Path, read_only: bool) -> io::Result<()> {
    let at = cstr(path)?;
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a NUL-terminated path and the attribute struct live across the call, and
    // the struct's size is passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            at.as_ptr(),
            libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
    .map(drop)
}

/// A detached copy of the mounts at and below `src` (`open_tree` with a clone).
fn detached_copy(src: &Path) -> io::Result<OwnedFd> {
    let from = cstr(src)?;
    // SAFETY: a NUL-terminated path living across the call; on success the result is a
    // new descriptor we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
        )
    })?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Map every mount of the detached tree `tree` through `userns`, and make it private.
fn set_idmap(tree: &OwnedFd, userns: BorrowedFd) -> io::Result<()> {
    let attr = libc::mount_attr {
        // Nothing from a container's files runs set-uid or opens a device on the host.
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: the attribute struct lives across the call and its size is passed; the
    // empty path with AT_EMPTY_PATH names the descriptor itself.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
    .map(drop)
}

/// An overlay at `target`: `lowers` (topmost first) read-only below a private `upper`
/// (with `work`), so a container writes to its own layer and never into a shared image.
pub fn overlay(lowers: &[&Path], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    if lowers.is_empty() {
        return Err(io::Error::other(
            "an overlay needs at least one lower layer",
        ));
    }
    for p in lowers.iter().chain([&upper, &work]) {
        let s = p.as_os_str().as_bytes();
        if s.iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
            return Err(io::Error::other(format!(
                "{}: overlay paths may not contain ',', ':' or '\\'",
                p.display()
            )));
        }
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let data = CString::new(format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    ))
    .map_err(|_| io::Error::other("path has a NUL byte"))?;
    let d = cstr(target)?;
    // SAFETY: every pointer is a NUL-terminated string living across the call.
    let rc = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            d.as_ptr(),
            c"overlay".as_ptr(),
            // A container's files never run set-uid or open devices on the host.
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    check(rc.into()).map(drop)
}

/// A snapshotter's overlay (containerd's: image layers `lowers`, topmost first, and the
/// container's writable layer `upper` with its `work`) merged at `target` for a
/// component in the user namespace `userns`, whose root is host id `base` over 65536
/// ids. Each layer is bound idmapped at `at/<n>`; the directory that holds `upper` and
/// `work` (siblings, as snapshotters make them) is bound at `at/rw` through
/// `layer_ns` (maps as [`layer_extents`] gives them), so the writable layer keeps the guest's owners on disk as they
/// are (`k`, not `base + k`) and the snapshot stays the snapshotter's to commit or
/// reuse. Undo with an unmount of `target`, then of everything under `at`.
pub fn overlay_layers_idmapped(
    lowers: &[&Path],
    upper: &Path,
    work: &Path,
    at: &Path,
    target: &Path,
    userns: BorrowedFd,
    layer_ns: BorrowedFd,
) -> io::Result<()> {
    let (Some(parent), Some(up), Some(wk)) = (upper.parent(), upper.file_name(), work.file_name())
    else {
        return Err(io::Error::other("upperdir and workdir must be directories"));
    };
    if work.parent() != Some(parent) {
        return Err(io::Error::other(format!(
            "upperdir {} and workdir {} are not in one directory",
            upper.display(),
            work.display()
        )));
    }
    let mut bound = Vec::new();
    let made = (|| {
        for (n, lower) in lowers.iter().enumerate() {
            let to = at.join(n.to_string());
            std::fs::create_dir_all(&to)?;
            bind_idmapped(lower, &to, userns)?;
            bound.push(to);
        }
        let rw = at.join("rw");
        std::fs::create_dir_all(&rw)?;
        bind_idmapped(parent, &rw, layer_ns)?;
        bound.push(rw.clone());
        let lowers: Vec<&Path> = bound[..lowers.len()].iter().map(|p| p.as_path()).collect();
        overlay(&lowers, &rw.join(up), &rw.join(wk), target).and_then(|()| writable(target))
    })();
    if made.is_err() {
        for b in &bound {
            detach(b);
        }
    }
    made
}

/// [`overlay`] for a component in the user namespace `userns`, whose root is host id
/// `owner`. overlayfs cannot be idmapped itself, and its writable layer cannot be (it
/// writes there as its mounter, host root, whom the map leaves out), so only the image
/// is: `lower` is bound idmapped at `layer/lower`. The writable layer (`layer/upper`,
/// `layer/work`) holds the sandbox's host ids as they are, its top owned by `owner`: the
/// container's own files are owned on the host by its sandbox's range. An overlay the
/// kernel would only mount read-only is an error. Undo with an unmount of `target`,
/// then of everything under `layer`.
pub fn overlay_idmapped(
    lower: &Path,
    layer: &Path,
    target: &Path,
    userns: BorrowedFd,
    owner: u32,
) -> io::Result<()> {
    let (lower_at, upper, work) = (layer.join("lower"), layer.join("upper"), layer.join("work"));
    for d in [&lower_at, &upper, &work] {
        std::fs::create_dir_all(d)?;
    }
    std::os::unix::fs::chown(&upper, Some(owner), Some(owner))?;
    bind_idmapped(lower, &lower_at, userns)?;
    let made = overlay(&[&lower_at], &upper, &work, target).and_then(|()| writable(target));
    if made.is_err() {
        detach(&lower_at);
    }
    made
}

/// An error, and the mount at `target` undone, when it is read-only.
fn writable(target: &Path) -> io::Result<()> {
    let c = cstr(target)?;
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct behind the pointer, which lives across the call.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }.into())?;
    if st.f_flag & libc::ST_RDONLY != 0 {
        detach(target);
        return Err(io::Error::other(format!(
            "{}: the kernel mounted the overlay read-only (see dmesg)",
            target.display()
        )));
    }
    Ok(())
}

/// Whether this host can give a component its own user namespace over the sandbox's
/// files: a user namespace made, and a writable overlay on an idmapped image under
/// `scratch` (the run directory, where the layers live) in which a root-owned file
/// reads as `base`. `Err` says what failed. Leaves nothing mounted.
pub fn probe(scratch: &Path, base: u32) -> Result<(), String> {
    let userns = new_userns(base, 65536).map_err(|e| format!("user namespace: {e}"))?;
    let dir = scratch.join(format!(".idmap-probe-{}", std::process::id()));
    let (lower, merged) = (dir.join("image"), dir.join("merged"));
    let result = (|| {
        for d in [&lower, &merged] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        std::fs::write(lower.join("f"), "").map_err(|e| e.to_string())?;
        overlay_idmapped(&lower, &dir.join("layer"), &merged, userns.as_fd(), base).map_err(
            |e| {
                format!(
                    "an overlay on an idmapped image in {}: {e}",
                    scratch.display()
                )
            },
        )?;
        let seen = std::fs::metadata(merged.join("f")).map(|m| m.uid());
        detach(&merged);
        detach(&dir.join("layer/lower"));
        match seen {
            Ok(uid) if uid == base => Ok(()),
            other => Err(format!("a root-owned file reads as {other:?}, not {base}")),
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Through an idmapped bind, a root-owned file reads as the range's first id, and a
    /// file made there by a host id of the range is owned by its offset on disk.
    #[test]
    fn an_idmapped_bind_shifts_owners_both_ways() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let base = 1_999_100_000;
        let dir = std::env::temp_dir().join(format!("bh-idmap-{}", std::process::id()));
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        std::fs::write(src.join("g"), "y").unwrap();
        if let Err(e) = probe(&dir, base) {
            eprintln!("skipped: this host cannot idmap here: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let ns = new_userns(base, 65536).unwrap();
        bind_idmapped(&src, &dst, ns.as_fd()).unwrap();
        let seen = std::fs::metadata(dst.join("f")).unwrap();
        // Host root has no id through the mount: it cannot make a file there.
        let as_root = std::fs::write(dst.join("h"), "z");
        std::os::unix::fs::chown(dst.join("g"), Some(base + 1000), Some(base + 7)).unwrap();
        let g = std::fs::metadata(src.join("g")).unwrap();
        // An id outside the range has no owner through the mount.
        let outside = std::os::unix::fs::chown(dst.join("g"), Some(base - 1), None);
        detach(&dst);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((seen.uid(), seen.gid()), (base, base));
        assert_eq!((g.uid(), g.gid()), (1000, 7));
        assert!(outside.is_err());
        assert!(as_root.is_err());
        // The maps a process has are what userns_of checks.
        assert!(userns_of(std::process::id(), 0, 4294967295).is_ok());
        assert!(userns_of(std::process::id(), base, 65536).is_err());
    }

    /// A snapshotter's layers and writable layer, merged for a user namespace: the
    /// image's owners read shifted into the range, and what is written through the
    /// overlay lands in the writable layer with the real owners, not the range's.
    #[test]
    fn a_snapshot_overlay_keeps_real_owners_in_its_writable_layer() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let base = 1_999_200_000;
        let dir = std::env::temp_dir().join(format!("bh-snap-{}", std::process::id()));
        if let Err(e) = probe(&dir, base) {
            eprintln!("skipped: this host cannot idmap here: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let (l1, l2) = (dir.join("snap/1/fs"), dir.join("snap/2/fs"));
        let (upper, work) = (dir.join("snap/3/fs"), dir.join("snap/3/work"));
        let (at, merged) = (dir.join("at"), dir.join("merged"));
        for d in [&l1, &l2, &upper, &work, &merged, &l1.join("tmp")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::set_permissions(l1.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(l1.join("f"), "lower").unwrap();
        std::fs::write(l2.join("f"), "upper image").unwrap();
        std::os::unix::fs::chown(l2.join("f"), Some(1000), Some(1000)).unwrap();
        let ns = new_userns(base, 65536).unwrap();
        // As bulkheadd gets it: from a holder process.
        let extents = layer_extents(base, 65536);
        let holder = hold_userns(&extents).unwrap();
        let layer_ns = userns_of_extents(holder, &extents);
        release_holder(holder);
        let layer_ns = layer_ns.unwrap();
        overlay_layers_idmapped(
            &[&l2, &l1],
            &upper,
            &work,
            &at,
            &merged,
            ns.as_fd(),
            layer_ns.as_fd(),
        )
        .unwrap();
        let f = std::fs::metadata(merged.join("f"));
        let text = std::fs::read_to_string(merged.join("f"));
        let tmp = std::fs::metadata(merged.join("tmp"));
        // As the range's id 1000 would write for the guest (virtiofsd's fsuid).
        let made = std::process::Command::new("/bin/sh")
            .args(["-c", "echo x > \"$1\"/tmp/new && chmod 600 \"$1\"/f", "sh"])
            .arg(&merged)
            .uid(base + 1000)
            .gid(base + 1000)
            .status();
        let new_on_disk = std::fs::metadata(upper.join("tmp/new"));
        let f_on_disk = std::fs::metadata(upper.join("f"));
        let tmp_on_disk = std::fs::metadata(upper.join("tmp"));
        detach(&merged);
        for n in ["0", "1", "rw"] {
            detach(&at.join(n));
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(text.unwrap(), "upper image");
        assert_eq!(f.unwrap().uid(), base + 1000);
        assert_eq!(tmp.unwrap().uid(), base);
        assert!(made.unwrap().success());
        let new_on_disk = new_on_disk.unwrap();
        assert_eq!((new_on_disk.uid(), new_on_disk.gid()), (1000, 1000));
        let f_on_disk = f_on_disk.unwrap();
        assert_eq!((f_on_disk.uid(), f_on_disk.mode() & 0o777), (1000, 0o600));
        assert_eq!(tmp_on_disk.unwrap().uid(), 0);
    }
}
