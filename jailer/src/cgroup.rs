//! Step 3: the sandbox's cgroup. The jailer joins `<own cgroup>/<path>` in the v2
//! hierarchy and in every v1 hierarchy the host mounts (a hybrid host has both), so the
//! component's resources are counted with its sandbox's wherever the host looks.

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

/// Join `rel` below the jailer's cgroup in every hierarchy; returns each hierarchy's
/// directory, marked where it could not be joined. A hierarchy that refuses (a
/// read-only cgroup file system, as in some containers) costs accounting, not
/// isolation: the component starts, and the report and its log say so.
pub fn join(rel: Option<&str>) -> Vec<String> {
    let Some(rel) = rel else { return vec![] };
    let mut joined = vec![];
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
                std::fs::write(d.join("cgroup.procs"), b"0")
                    .map_err(|e| JailError::sys(format!("join cgroup {}", d.display()), e))
            });
        match r {
            Ok(()) => joined.push(format!("{tag}:{}", d.display())),
            Err(e) => {
                eprintln!("bulkhead-jailer: {e}; not joined");
                joined.push(format!("{tag}:{} (not joined: {e})", d.display()));
            }
        }
    }
    joined
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
