//! A snapshotter's overlay as containerd describes it in mount options: read by the
//! shim to decide whether bulkheadd can take it, and by bulkheadd to mount it.

use std::path::PathBuf;

/// A snapshotter's overlay, as containerd hands a container's root: image layers
/// (topmost first) and the container's writable layer with its work directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOverlay {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl SnapshotOverlay {
    /// Most layers an overlay takes here; containerd's deepest images stay far below.
    pub const MAX_LAYERS: usize = 128;

    /// containerd's overlay mount options (`lowerdir=A:B,upperdir=U,workdir=W`, and
    /// `index=off`, accepted as harmless: the index serves layers shared between
    /// overlays, and this writable layer has one overlay only).
    /// Every path must be absolute; any other option is refused, so nothing a client
    /// asks for is silently dropped.
    pub fn parse(options: &str) -> Result<Self, String> {
        let (mut lowers, mut upper, mut work): (Option<Vec<PathBuf>>, _, _) = (None, None, None);
        for o in options.split(',') {
            match o.split_once('=') {
                Some(("lowerdir", v)) => lowers = Some(v.split(':').map(PathBuf::from).collect()),
                Some(("upperdir", v)) => upper = Some(PathBuf::from(v)),
                Some(("workdir", v)) => work = Some(PathBuf::from(v)),
                Some(("index", "off")) => {}
                _ => return Err(format!("overlay option {o:?} is not supported")),
            }
        }
        let (Some(lowers), Some(upper), Some(work)) = (lowers, upper, work) else {
            return Err("an overlay rootfs needs lowerdir, upperdir and workdir".into());
        };
        if lowers.len() > Self::MAX_LAYERS {
            return Err(format!("more than {} layers", Self::MAX_LAYERS));
        }
        for p in lowers.iter().chain([&upper, &work]) {
            if !p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
                return Err(format!("{} is not an absolute path", p.display()));
            }
        }
        Ok(Self {
            lowers,
            upper,
            work,
        })
    }

    /// Every directory exists.
    pub fn check_dirs(&self) -> Result<(), String> {
        for p in self.lowers.iter().chain([&self.upper, &self.work]) {
            if !p.is_dir() {
                return Err(format!("{} is not a directory", p.display()));
            }
        }
        Ok(())
    }
}
