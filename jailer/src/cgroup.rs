//! Step 3: the sandbox's cgroup, `<own cgroup>/<path>` in the v2 hierarchy and in every
//! v1 hierarchy the host mounts (a hybrid host has both), so the component's resources
//! are counted with its sandbox's wherever the host looks.
//!
//! Moving a running process with a write to `cgroup.procs` takes the kernel's global
//! cgroup threadgroup lock for writing, whose first writer waits out an RCU grace
//! period (5-20 ms measured). Neither join here takes it:
//! - the v2 group is only opened: the fork in step 5 starts the component there
//!   (`clone3` with `CLONE_INTO_CGROUP`), and the jailer's own process, the component's
//!   parent, stays where it was (on a kernel without `clone3` it joins the old way);
//! - each v1 hierarchy the jailer joins itself by writing `0` to `tasks`: the kernel
//!   moves one thread, the caller, without the global lock (Linux 6.1 on). The jailer is
//!   single-threaded, so that thread is the whole process, and the fork inherits the
//!   groups. Were it ever not, it falls back to `cgroup.procs`.

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
    write_zero(&d.join("cgroup.procs"))
}

/// Join the v1 group `d`: as the calling thread alone when it is the only one (no
/// global lock, no grace period), else as the whole process.
fn join_v1(d: &Path, single_threaded: bool) -> Result<(), JailError> {
    if single_threaded {
        write_zero(&d.join("tasks"))
    } else {
        write_procs(d)
    }
}

fn write_zero(file: &Path) -> Result<(), JailError> {
    std::fs::write(file, b"0")
        .map_err(|e| JailError::sys(format!("join cgroup {}", file.display()), e))
}

/// This process's thread count (`Threads:` in /proc/self/status); 0 if unreadable.
fn own_threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Make `rel` below the jailer's cgroup in every hierarchy; join it in v1, open it in
/// v2. A hierarchy that refuses (a read-only cgroup file system, as in some containers)
/// costs accounting, not isolation: the component starts, and the report and its log
/// say so.
pub fn join(rel: Option<&str>) -> Placement {
    let mut placement = Placement::default();
    let Some(rel) = rel else { return placement };
    let single_threaded = own_threads() == 1;
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
                    join_v1(&d, single_threaded)
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

    /// A single-threaded process joins every v1 hierarchy (through `tasks`), and the
    /// process that forked it stays put.
    #[test]
    fn a_single_threaded_process_joins_every_v1_hierarchy() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let v1 = hierarchies().iter().filter(|h| !h.v2).count();
        if v1 == 0 {
            eprintln!("skipped: no v1 hierarchy here");
            return;
        }
        let rel = format!("bulkhead-v1-test-{}", std::process::id());
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only reads and writes files, then _exit()s.
        match unsafe { nix::unistd::fork() }.unwrap() {
            ForkResult::Child => {
                let placement = join(Some(&rel));
                let text = format!(
                    "{}\n{}",
                    own_threads(),
                    std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default()
                );
                let not_joined = placement.joined.iter().any(|j| j.contains("not joined"));
                let _ = nix::unistd::write(&wr, text.as_bytes());
                // SAFETY: _exit ends the forked child without running the harness's
                // exit handlers.
                unsafe { libc::_exit(i32::from(not_joined)) };
            }
            ForkResult::Parent { child } => {
                drop(wr);
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::fs::File::from(rd), &mut text).unwrap();
                let status = waitpid(child, None).unwrap();
                remove(&rel);
                let mut lines = text.lines();
                assert_eq!(lines.next(), Some("1"), "the child had other threads");
                let v1_lines: Vec<&str> = lines.filter(|l| !l.starts_with("0::")).collect();
                assert_eq!(v1_lines.len(), v1, "{text}");
                for l in v1_lines {
                    assert!(l.ends_with(&format!("/{rel}")), "not joined: {l}");
                }
                assert!(
                    matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
                    "a hierarchy refused: {status:?}"
                );
                assert_eq!(
                    std::fs::read_to_string("/proc/self/cgroup").unwrap(),
                    own,
                    "the parent moved"
                );
            }
        }
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
