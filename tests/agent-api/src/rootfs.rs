//! A busybox rootfs for the tests, built from Debian's busybox-static and cached under
//! `.cache/rootfs/busybox-<hash of the busybox binary>`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const BUSYBOX: &str = "/bin/busybox";

fn cache_root() -> PathBuf {
    std::env::var_os("BULKHEAD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache"))
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Build (or reuse) the rootfs; returns its directory.
pub fn busybox_rootfs() -> Result<PathBuf> {
    let bin = std::fs::read(BUSYBOX)
        .with_context(|| format!("{BUSYBOX} (install busybox-static: scripts/install-deps.sh)"))?;
    let dir = cache_root()
        .join("rootfs")
        .join(format!("busybox-{:016x}", fnv(&bin)));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    for d in [
        "bin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var",
    ] {
        std::fs::create_dir_all(tmp.join(d))?;
    }
    std::fs::write(tmp.join("bin/busybox"), &bin)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tmp.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output()?;
    if !list.status.success() {
        bail!("busybox --list failed");
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))?;
        }
    }
    std::os::unix::fs::symlink("bin", tmp.join("sbin"))?;
    std::fs::write(
        tmp.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(tmp.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::write(tmp.join(".complete"), "")?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// An ext4 image of `dir` beside it (`<dir>.ext4`), made once with `mkfs.ext4 -d`.
pub fn ext4_image(dir: &Path) -> Result<PathBuf> {
    let img = dir.with_extension("ext4");
    if img.exists() {
        return Ok(img);
    }
    let tmp = dir.with_extension("ext4.tmp");
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .arg(&tmp)
        .arg("16M")
        .status()
        .context("mkfs.ext4 (e2fsprogs)")?;
    if !st.success() {
        bail!("mkfs.ext4 -d {} failed", dir.display());
    }
    std::fs::rename(&tmp, &img)?;
    Ok(img)
}

/// A read-only loop device over an image, detached on drop.
pub struct LoopDev(pub String);

impl LoopDev {
    pub fn attach(img: &Path) -> Result<LoopDev> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(img)
            .output()
            .context("losetup")?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(LoopDev(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}
