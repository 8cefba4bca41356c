//! Images for `bulkhead run`: an OCI layout directory (`DIR` or `DIR:TAG`), an OCI
//! archive (a tar of a layout, `FILE[:TAG]`), or a registry reference
//! (`host[:port]/name[:tag|@digest]`, pulled with the `oci-client` crate).
//!
//! Blobs are kept by digest under `<data>/images/blobs`, and each image's layers are
//! unpacked once into `<data>/images/rootfs/<manifest digest>`, which containers use as
//! the read-only lower layer of an overlay the manager mounts. Layer unpacking is ours
//! (on the `tar`, `flate2` and `ruzstd` crates): OCI whiteouts and opaque directories, hard links,
//! device nodes, ownership; no path may leave the root, through `..` or a symlink.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde_json::Value;

/// What the image says about how to run it.
#[derive(Debug, Default, Clone)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    /// The process's argv: entrypoint + (the given command, else the image's cmd).
    pub fn command(&self, given: &[String]) -> Vec<String> {
        let mut v = self.entrypoint.clone();
        if given.is_empty() {
            v.extend(self.cmd.iter().cloned());
        } else {
            v.extend(given.iter().cloned());
        }
        v
    }

    pub fn from_oci(c: &ImageConfiguration) -> ImageConfig {
        let Some(cfg) = c.config() else {
            return ImageConfig::default();
        };
        ImageConfig {
            env: cfg.env().clone().unwrap_or_default(),
            entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
            cmd: cfg.cmd().clone().unwrap_or_default(),
            working_dir: cfg.working_dir().clone(),
            user: cfg.user().clone().filter(|u| !u.is_empty()),
        }
    }
}

pub struct Prepared {
    /// The unpacked image, to be used read-only.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

/// Where pulled and unpacked images are kept: `$BULKHEAD_DATA/images`, else
/// /var/lib/bulkhead/images.
pub fn data_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/bulkhead".into())
        .join("images")
}

/// Split `PATH:TAG` when PATH exists; otherwise the whole string is the path.
fn split_tag(s: &str) -> (PathBuf, Option<String>) {
    if Path::new(s).exists() {
        return (s.into(), None);
    }
    match s.rsplit_once(':') {
        Some((p, t)) if Path::new(p).exists() && !t.contains('/') => (p.into(), Some(t.into())),
        _ => (s.into(), None),
    }
}

/// `authfile`: registry credentials to use (`--authfile`), see [`crate::auth`].
pub async fn prepare(reference: &str, authfile: Option<&Path>) -> Result<Prepared> {
    let store = data_dir();
    // Unpacked images keep their owners and set-uid bits, for the guest: no other host
    // user may reach them (or run a set-uid file of theirs).
    bulkhead_host::private_dir(&store)
        .with_context(|| format!("cannot make {} private", store.display()))?;
    let r = reference
        .strip_prefix("oci:")
        .or_else(|| reference.strip_prefix("oci-archive:"))
        .unwrap_or(reference);
    let (path, tag) = split_tag(r);
    if path.is_dir() {
        if !path.join("oci-layout").exists() {
            bail!(
                "{}: a directory but not an OCI image layout (no oci-layout file); use --rootfs for a plain root directory",
                path.display()
            );
        }
        return from_layout(&path, tag.as_deref(), &store);
    }
    if path.is_file() {
        let dir = unpack_archive(&path, &store)?;
        return from_layout(&dir, tag.as_deref(), &store);
    }
    if reference.starts_with('/') || reference.starts_with('.') {
        bail!("image {reference:?}: no such file or directory");
    }
    crate::registry::pull(reference, &store, authfile).await
}

/// An OCI archive is a tar of a layout: unpack it once per archive content.
fn unpack_archive(file: &Path, store: &Path) -> Result<PathBuf> {
    let digest = crate::registry::sha256_file(file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let dir = store.join("archives").join(&digest);
    if dir.join("oci-layout").exists() {
        return Ok(dir);
    }
    let tmp = store
        .join("archives")
        .join(format!(".{digest}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let f = fs::File::open(file)?;
    tar::Archive::new(f)
        .unpack(&tmp)
        .with_context(|| format!("{}: not a readable OCI archive (tar)", file.display()))?;
    if !tmp.join("oci-layout").exists() {
        let _ = fs::remove_dir_all(&tmp);
        bail!(
            "{}: a tar file but not an OCI archive (no oci-layout inside)",
            file.display()
        );
    }
    if fs::rename(&tmp, &dir).is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| anyhow!("malformed digest {digest:?}"))?;
    if alg != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("unsupported or malformed digest {digest:?}");
    }
    Ok(layout.join("blobs").join(alg).join(hex))
}

fn from_layout(layout: &Path, tag: Option<&str>, store: &Path) -> Result<Prepared> {
    let index = ImageIndex::from_file(layout.join("index.json"))
        .with_context(|| format!("{}: unreadable index.json", layout.display()))?;
    let manifests = index.manifests();
    let pick = match tag {
        Some(t) => manifests.iter().find(|m| {
            m.annotations()
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .is_some_and(|n| n == t)
        }),
        None if manifests.len() == 1 => manifests.first(),
        None => manifests.iter().find(|m| {
            m.annotations()
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .is_some_and(|n| n == "latest")
        }),
    };
    let desc = pick.ok_or_else(|| {
        let names: Vec<String> = manifests
            .iter()
            .filter_map(|m| {
                m.annotations()
                    .as_ref()
                    .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned())
            })
            .collect();
        anyhow!(
            "{}: no image {} in this layout (tags: {})",
            layout.display(),
            tag.map(|t| format!("tagged {t:?}"))
                .unwrap_or_else(|| "without a tag".into()),
            names.join(", ")
        )
    })?;
    let mdigest = desc.digest().to_string();
    let manifest = ImageManifest::from_file(blob_path(layout, &mdigest)?)
        .with_context(|| format!("manifest {mdigest}"))?;
    let config =
        ImageConfiguration::from_file(blob_path(layout, manifest.config().digest().as_ref())?)
            .context("image config")?;
    let layers: Vec<(PathBuf, String)> = manifest
        .layers()
        .iter()
        .map(|l| {
            Ok((
                blob_path(layout, l.digest().as_ref())?,
                l.media_type().to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    let rootfs = flatten(store, &mdigest, &layers)?;
    Ok(Prepared {
        rootfs,
        config: ImageConfig::from_oci(&config),
    })
}

/// Unpack `layers` in order into `<store>/rootfs/<manifest digest>`, once.
pub fn flatten(
    store: &Path,
    manifest_digest: &str,
    layers: &[(PathBuf, String)],
) -> Result<PathBuf> {
    let key = manifest_digest.replace(':', "-");
    let dir = store.join("rootfs").join(&key);
    if dir.join(".bulkhead-complete").exists() {
        return Ok(dir.join("rootfs"));
    }
    let tmp = store
        .join("rootfs")
        .join(format!(".{key}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(tmp.join("rootfs"))?;
    for (path, media) in layers {
        unpack_layer(path, media, &tmp.join("rootfs"))
            .with_context(|| format!("layer {}", path.display()))?;
    }
    fs::write(tmp.join(".bulkhead-complete"), manifest_digest)?;
    if fs::rename(&tmp, &dir).is_err() {
        // Another command unpacked the same image first: use theirs.
        let _ = fs::remove_dir_all(&tmp);
    }
    Ok(dir.join("rootfs"))
}

fn open_layer(path: &Path, media: &str) -> Result<Box<dyn Read>> {
    let f = fs::File::open(path)?;
    Ok(
        if media.ends_with("+gzip") || media.ends_with(".gzip") || media.ends_with("tar.gzip") {
            Box::new(flate2::read::GzDecoder::new(f))
        } else if media.ends_with("+zstd") {
            Box::new(crate::zstd::Frames::new(f))
        } else {
            // Plain tar, or a media type we do not know: sniff gzip's and zstd's magic.
            let mut head = [0u8; 4];
            let n = fs::File::open(path)?.read(&mut head)?;
            if n >= 2 && head[..2] == [0x1f, 0x8b] {
                Box::new(flate2::read::GzDecoder::new(f))
            } else if n == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
                Box::new(crate::zstd::Frames::new(f))
            } else {
                Box::new(f)
            }
        },
    )
}

/// A path inside `root` for a layer entry's path, refusing `..`, absolute escapes and
/// symlinked parents (so a deletion can never reach outside the root).
pub fn safe_join(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    let parts: Vec<_> = rel
        .components()
        .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
        .collect();
    for (i, c) in parts.iter().enumerate() {
        match c {
            Component::Normal(p) => out.push(p),
            _ => return None,
        }
        if i + 1 < parts.len() {
            if let Ok(m) = fs::symlink_metadata(&out) {
                if m.file_type().is_symlink() {
                    return None;
                }
            }
        }
    }
    (out != root).then_some(out)
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Apply one layer: first its whiteouts (they hide lower layers only), then its files.
pub fn unpack_layer(path: &Path, media: &str, root: &Path) -> Result<()> {
    let mut ar = tar::Archive::new(open_layer(path, media)?);
    for e in ar.entries()? {
        let e = e?;
        let p = e.path()?.into_owned();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let parent = p.parent().unwrap_or(Path::new(""));
        if name == ".wh..wh..opq" {
            let dir = if parent.as_os_str().is_empty() {
                Some(root.to_path_buf())
            } else {
                safe_join(root, parent)
            };
            if let Some(dir) = dir.filter(|d| d.is_dir()) {
                for child in fs::read_dir(&dir)?.flatten() {
                    remove_any(&child.path());
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            if let Some(t) = safe_join(root, &parent.join(hidden)) {
                remove_any(&t);
            }
        }
    }
    let mut ar = tar::Archive::new(open_layer(path, media)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    for e in ar.entries()? {
        let mut e = e?;
        let p = e.path()?.into_owned();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
        {
            continue;
        }
        let kind = e.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            make_node(&mut e, root, &p)?;
            continue;
        }
        // Replacing a directory with a file (or the reverse) needs the old one gone.
        if let Some(t) = safe_join(root, &p) {
            if let Ok(m) = fs::symlink_metadata(&t) {
                if m.is_dir() != kind.is_dir() {
                    remove_any(&t);
                }
            }
        }
        e.unpack_in(root)
            .with_context(|| format!("cannot unpack {}", p.display()))?;
    }
    Ok(())
}

fn make_node<R: Read>(e: &mut tar::Entry<'_, R>, root: &Path, rel: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some(t) = safe_join(root, rel) else {
        return Ok(());
    };
    if let Some(dir) = t.parent() {
        fs::create_dir_all(dir)?;
    }
    remove_any(&t);
    let h = e.header();
    let kind = h.entry_type();
    let mode = h.mode()? & 0o7777;
    // A device node an image names is never made on the host: `b 8 0` there, read by
    // whoever reaches the file, is the host's disk. The guest's own /dev has its devices.
    if kind.is_block_special() || kind.is_character_special() {
        tracing::warn!(
            "image layer: device node {} not unpacked on the host",
            rel.display()
        );
        return Ok(());
    }
    let fmt = libc::S_IFIFO;
    let dev = libc::makedev(
        h.device_major()?.unwrap_or(0),
        h.device_minor()?.unwrap_or(0),
    );
    let c = std::ffi::CString::new(t.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated path; mknod creates one node and reads nothing else.
    if unsafe { libc::mknod(c.as_ptr(), fmt | mode, dev) } != 0 {
        let err = std::io::Error::last_os_error();
        // Without CAP_MKNOD (rootless), device nodes are skipped, as other unpackers do.
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(anyhow!("mknod {}: {err}", t.display()));
        }
        return Ok(());
    }
    let (uid, gid) = (h.uid()? as u32, h.gid()? as u32);
    // SAFETY: NUL-terminated path; lchown changes ownership only.
    unsafe { libc::lchown(c.as_ptr(), uid, gid) };
    Ok(())
}

/// Set the spec's user from an image's `user` (name or uid, optional `:group`), using
/// the image's /etc/passwd and /etc/group for names.
pub fn apply_user(spec: &mut Value, user: &str, rootfs: &Path) -> Result<()> {
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = image_etc(rootfs, file)?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| {
                (
                    f.get(2).and_then(|x| x.parse().ok()).unwrap_or(0),
                    f.get(3).and_then(|x| x.parse().ok()).unwrap_or(0),
                )
            })
        })
    };
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(n) => (n, lookup_uid_gid(rootfs, n).unwrap_or(0)),
        Err(_) => {
            lookup("passwd", u).ok_or_else(|| anyhow!("image user {u:?} not in /etc/passwd"))?
        }
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("group", g)
                .map(|x| x.0)
                .ok_or_else(|| anyhow!("image group {g:?} not in /etc/group"))?,
        };
    }
    spec["process"]["user"] = serde_json::json!({"uid": uid, "gid": gid});
    Ok(())
}

/// Most an image's /etc/passwd or /etc/group may hold.
const MAX_ETC_FILE: u64 = 1 << 20;

/// An image's `/etc/<file>`, read as the container would see it and bounded
/// ([`bulkhead_host::untrusted::read_in_root`]): a link to a host file or to
/// `/dev/zero` reads nothing of the host's. `None` when it cannot be read (said why).
fn image_etc(rootfs: &Path, file: &str) -> Option<String> {
    let rel = Path::new("etc").join(file);
    match bulkhead_host::untrusted::read_in_root(rootfs, &rel, MAX_ETC_FILE) {
        Ok(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Err(bulkhead_host::untrusted::UntrustedError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => {
            tracing::warn!("image user lookup: {e}");
            None
        }
    }
}

fn lookup_uid_gid(rootfs: &Path, uid: u32) -> Option<u32> {
    let text = image_etc(rootfs, "passwd")?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2).and_then(|x| x.parse::<u32>().ok()) == Some(uid))
            .then(|| f.get(3).and_then(|x| x.parse().ok()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bh-img-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn layer(
        dir: &Path,
        name: &str,
        entries: &[(&str, Option<&[u8]>)],
        links: &[(&str, &str, tar::EntryType)],
    ) -> PathBuf {
        let p = dir.join(name);
        let f = fs::File::create(&p).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let header = || {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h
        };
        for (path, data) in entries {
            let mut h = header();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        for (path, target, kind) in links {
            let mut h = header();
            h.set_entry_type(*kind);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, path, target).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        p
    }

    #[test]
    fn whiteouts_opaque_dirs_and_hard_links() {
        let d = tmp("layers");
        let root = d.join("root");
        fs::create_dir_all(&root).unwrap();
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        let l1 = layer(
            &d,
            "l1",
            &[
                ("a", None),
                ("a/keep", Some(b"1")),
                ("a/gone", Some(b"2")),
                ("o", None),
                ("o/old", Some(b"3")),
            ],
            &[("a/hard", "a/keep", tar::EntryType::Link)],
        );
        let l2 = layer(
            &d,
            "l2",
            &[
                ("a/.wh.gone", Some(b"")),
                ("o/.wh..wh..opq", Some(b"")),
                ("o/new", Some(b"4")),
            ],
            &[],
        );
        unpack_layer(&l1, gz, &root).unwrap();
        unpack_layer(&l2, gz, &root).unwrap();
        assert_eq!(fs::read(root.join("a/keep")).unwrap(), b"1");
        assert!(
            !root.join("a/gone").exists(),
            "whiteout removes the lower file"
        );
        assert!(
            !root.join("a/.wh.gone").exists(),
            "whiteout markers are not unpacked"
        );
        assert!(
            !root.join("o/old").exists(),
            "opaque dir hides lower entries"
        );
        assert_eq!(
            fs::read(root.join("o/new")).unwrap(),
            b"4",
            "same-layer entries stay"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("a/hard")).unwrap().ino(),
            fs::metadata(root.join("a/keep")).unwrap().ino(),
            "hard link"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn whiteouts_cannot_escape_through_symlinks() {
        let d = tmp("escape");
        let root = d.join("root");
        let outside = d.join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("victim"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        let l = layer(&d, "l", &[("link/.wh.victim", Some(b""))], &[]);
        unpack_layer(&l, gz, &root).unwrap();
        assert!(
            outside.join("victim").exists(),
            "a whiteout must not follow a symlink out"
        );
        assert_eq!(safe_join(&root, Path::new("../x")), None);
        assert_eq!(safe_join(&root, Path::new("/a/b")), Some(root.join("a/b")));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn command_from_image_config() {
        let c = ImageConfig {
            entrypoint: vec!["/bin/ep".into()],
            cmd: vec!["default".into()],
            ..Default::default()
        };
        assert_eq!(c.command(&[]), vec!["/bin/ep", "default"]);
        assert_eq!(c.command(&["x".into()]), vec!["/bin/ep", "x"]);
    }
}
