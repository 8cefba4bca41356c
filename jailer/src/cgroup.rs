//! Step 3: the sandbox's cgroup, `<own cgroup>/<path>` in the v2 hierarchy and in every
//! v1 hierarchy the host mounts (a hybrid host has both), so the component's resources
//! are counted with its sandbox's wherever the host looks.
//!
//! The jailer joins each v1 hierarchy itself. The v2 group it only opens: the fork in
//! step 5 starts the component there (`clone3` with `CLONE_INTO_CGROUP`), because moving
//! a running process takes the kernel's cgroup threadgroup lock for writing, whose
//! first writer waits out an RCU grace period (5-20 ms). The jailer's own process, the
//! component's parent, stays where it was in v2; on a kernel without `clone3` it joins
//! as before.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::JailError;

/// One mounted hierarchy and the jailer's own place in it.
struct Hierarchy {
    mount: PathBuf,
    own: String,
    v2: bool,
    cpuset: bool,
}

fn hierarchies() -> Vec<Hierarchy> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = vec![];
    for line in mounts.lines() {
        // mountinfo: id parent maj:min root mountpoint options [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let superopts = r.nth(1).unwrap_or("");
        let mountpoint = left.split_whitespace().nth(4).unwrap_or("");
        let key: Option<Vec<&str>> = match fstype {
            "cgroup2" => Some(vec![]),
            "cgroup" => Some(
                superopts
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
                    .collect(),
            ),
            _ => None,
        };
        let Some(key) = key else { continue };
        // /proc/self/cgroup: "id:controllers:path"; v2 has empty controllers.
        let place = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            let names: Vec<&str> = ctl.split(',').filter(|s| !s.is_empty()).collect();
            let same = if key.is_empty() {
                names.is_empty()
            } else {
                !names.is_empty() && names.iter().all(|n| key.contains(n))
            };
            same.then(|| path.to_string())
        });
        if let Some(own) = place {
            out.push(Hierarchy {
                mount: crate::unescape_mountinfo(mountpoint).into(),
                own,
                v2: fstype == "cgroup2",
                cpuset: key.contains(&"cpuset"),
            });
        }
    }
    out
}

fn dir(h: &Hierarchy, rel: &str) -> PathBuf {
    h.mount.join(h.own.trim_start_matches('/')).join(rel)
}

/// Where step 3 left the jailer: the report's list of groups, and the v2 group the
/// component is still to be started in.
#[derive(Debug, Default)]
pub struct Placement {
    /// Each hierarchy's directory, marked where it could not be joined.
    pub joined: Vec<String>,
    /// The v2 group, opened for `CLONE_INTO_CGROUP`, and its directory.
    v2: Option<(OwnedFd, PathBuf)>,
}

impl Placement {
    /// The v2 group the child is to be cloned into, if any.
    pub fn v2_fd(&self) -> Option<BorrowedFd<'_>> {
        self.v2.as_ref().map(|(fd, _)| fd.as_fd())
    }

    /// Done with the v2 group's descriptor.
    pub fn close(&mut self) {
        self.v2 = None;
    }

    /// The kernel cannot clone into a cgroup: join the v2 group the old way.
    pub fn join_v2_now(&mut self) {
        if let Some((_, d)) = self.v2.take() {
            if let Err(e) = write_procs(&d) {
                eprintln!("bulkhead-jailer: {e}; not joined");
                if let Some(v2) = self.joined.iter_mut().find(|j| j.starts_with("v2:")) {
                    v2.push_str(&format!(" (not joined: {e})"));
                }
            }
        }
    }
}

fn write_procs(d: &Path) -> Result<(), JailError> {
    std::fs::write(d.join("cgroup.procs"), b"0")
        .map_err(|e| JailError::sys(format!("join cgroup {}", d.display()), e))
}

/// Make `rel` below the jailer's cgroup in every hierarchy; join it in v1, open it in
/// v2. A hierarchy that refuses (a read-only cgroup file system, as in some containers)
/// costs accounting, not isolation: the component starts, and the report and its log
/// say so.
pub fn join(rel: Option<&str>) -> Placement {
    let mut placement = Placement::default();
    let Some(rel) = rel else { return placement };
    for h in hierarchies() {
        let d = dir(&h, rel);
        let tag = if h.v2 { "v2" } else { "v1" };
        let r = std::fs::create_dir_all(&d)
            .map_err(|e| JailError::sys(format!("create cgroup {}", d.display()), e))
            .and_then(|()| {
                if h.cpuset {
                    inherit_cpuset(&h, rel)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                if h.v2 {
                    open_dir(&d).map(|fd| placement.v2 = Some((fd, d.clone())))
                } else {
                    write_procs(&d)
                }
            });
        match r {
            Ok(()) => placement.joined.push(format!("{tag}:{}", d.display())),
            Err(e) => {
                eprintln!("bulkhead-jailer: {e}; not joined");
                placement
                    .joined
                    .push(format!("{tag}:{} (not joined: {e})", d.display()));
            }
        }
    }
    placement
}

fn open_dir(d: &Path) -> Result<OwnedFd, JailError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(d)
        .map(OwnedFd::from)
        .map_err(|e| JailError::sys(format!("open cgroup {}", d.display()), e))
}

/// A new v1 cpuset starts with no CPUs and no memory nodes: copy them down.
fn inherit_cpuset(h: &Hierarchy, rel: &str) -> Result<(), JailError> {
    let mut parent = h.mount.join(h.own.trim_start_matches('/'));
    for part in Path::new(rel).components() {
        let child = parent.join(part);
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let have = std::fs::read_to_string(child.join(f)).unwrap_or_default();
            if have.trim().is_empty() {
                let up = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                std::fs::write(child.join(f), up.trim())
                    .map_err(|e| JailError::sys(format!("{}", child.join(f).display()), e))?;
            }
        }
        parent = child;
    }
    Ok(())
}

/// Remove `rel` and everything below it (deepest first) in every hierarchy; a cgroup
/// still holding a process stays, and so do `rel`'s parents.
pub fn remove(rel: &str) {
    for h in hierarchies() {
        let d = dir(&h, rel);
        remove_tree(&d);
    }
}

fn remove_tree(d: &Path) {
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(d);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::waitpid;
    use nix::unistd::ForkResult;

    fn v2_line(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .unwrap_or_default()
    }

    /// The child is born in the v2 group it was cloned into; the parent stays put.
    #[test]
    fn a_child_cloned_into_a_v2_cgroup_starts_there() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let Some(h) = hierarchies().into_iter().find(|h| h.v2) else {
            eprintln!("skipped: no cgroup2 hierarchy here");
            return;
        };
        let rel = format!("bulkhead-clone-test-{}", std::process::id());
        let d = dir(&h, &rel);
        std::fs::create_dir_all(&d).unwrap();
        let fd = open_dir(&d).unwrap();
        let before = v2_line(std::process::id());
        match crate::supervise::clone_into_cgroup(fd.as_fd()).expect("clone3") {
            ForkResult::Child => loop {
                // SAFETY: pause only waits; the parent kills this child.
                unsafe { libc::pause() };
            },
            ForkResult::Parent { child } => {
                let theirs = v2_line(child.as_raw() as u32);
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                drop(fd);
                remove_tree(&d);
                assert!(theirs.ends_with(&format!("/{rel}")), "child in {theirs:?}");
                assert_eq!(v2_line(std::process::id()), before, "the parent moved");
                assert!(!d.exists(), "{} left behind", d.display());
            }
        }
    }
}
