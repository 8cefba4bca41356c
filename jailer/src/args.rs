//! A [`Jail`] as command-line arguments and back: bulkheadd writes them, the jailer
//! binary reads them, and `ps` shows them.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::{Device, Jail, JailError, Net};

pub const USAGE: &str = "\
usage: bulkhead-jailer --sandbox ID --name NAME --root DIR --uid N --gid N [options] -- PROGRAM [ARGS...]
  --ro PATH         bind PATH read-only at the same place in the jail (repeatable)
  --rw PATH         bind PATH read-write (repeatable)
  --dev NAME        make /dev/NAME: kvm, null, zero, urandom, random (repeatable)
  --net MODE        none (a new, empty namespace; default), host, or a netns path
  --cgroup PATH     join PATH below the jailer's cgroup in every hierarchy
  --keep-fd N       hand descriptor N on (repeatable)
  --start-gate N    with the jail set up, wait for one byte on descriptor N before the
                    exec (EOF: give up); N is not handed on
  --cap NAME        keep capability NAME, e.g. CAP_NET_ADMIN (repeatable)
  --userns N        run as root of a new user namespace whose ids 0..N map to the host's
                    --uid.. and --gid.. (the capabilities kept hold only inside it)
  --max-files N     RLIMIT_NOFILE (default 4096)
  --landlock on|off apply the landlock ruleset and the baseline filter (default on)
  --seccomp NAME    also install the jailer's allow list NAME (vhost-device-vsock), for
                    a program that brings no filter of its own
  --env K=V         the component's environment, nothing else (repeatable)
  --report FILE     write what was enforced, as JSON";

impl Jail {
    /// The arguments the jailer binary takes for this jail, program last.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![];
        let mut push = |k: &str, v: &OsStr| {
            a.push(k.into());
            a.push(v.into());
        };
        push("--sandbox", self.sandbox.as_ref());
        push("--name", self.name.as_ref());
        push("--root", self.root.as_os_str());
        push("--uid", self.uid.to_string().as_ref());
        push("--gid", self.gid.to_string().as_ref());
        for p in &self.read_only {
            push("--ro", p.as_os_str());
        }
        for p in &self.read_write {
            push("--rw", p.as_os_str());
        }
        for d in &self.devices {
            push("--dev", d.name().as_ref());
        }
        match &self.net {
            Net::None => push("--net", "none".as_ref()),
            Net::Host => push("--net", "host".as_ref()),
            Net::Join(p) => push("--net", p.as_os_str()),
        }
        if let Some(c) = &self.cgroup {
            push("--cgroup", c.as_ref());
        }
        for fd in &self.keep_fds {
            push("--keep-fd", fd.to_string().as_ref());
        }
        if let Some(fd) = self.start_gate {
            push("--start-gate", fd.to_string().as_ref());
        }
        for c in &self.keep_caps {
            push("--cap", c.as_ref());
        }
        if let Some(n) = self.userns {
            push("--userns", n.to_string().as_ref());
        }
        push("--max-files", self.max_files.to_string().as_ref());
        if !self.landlock {
            push("--landlock", "off".as_ref());
        }
        if let Some(n) = &self.allow_list {
            push("--seccomp", n.as_ref());
        }
        for (k, v) in &self.env {
            push("--env", format!("{k}={v}").as_ref());
        }
        if let Some(r) = &self.report {
            push("--report", r.as_os_str());
        }
        a.push("--".into());
        a.push(self.program.clone().into());
        a.extend(self.args.iter().cloned());
        a
    }

    /// Read the jailer's arguments (without the program name).
    pub fn parse(args: &[OsString]) -> Result<Jail, JailError> {
        let bad = |m: String| JailError::Invalid(m);
        let mut j = Jail::new("", "", PathBuf::new(), PathBuf::new());
        j.uid = u32::MAX;
        j.gid = u32::MAX;
        j.devices.clear();
        let mut it = args.iter();
        let mut program = None;
        while let Some(flag) = it.next() {
            let flag = flag.to_string_lossy();
            if flag == "--" {
                program = it.next().cloned();
                j.args = it.cloned().collect();
                break;
            }
            let val = it
                .next()
                .ok_or_else(|| bad(format!("{flag} needs a value")))?;
            let text = || {
                val.to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("{flag}: not UTF-8")))
            };
            let num = |what: &str| -> Result<u64, JailError> {
                text()?
                    .parse()
                    .map_err(|_| bad(format!("{what}: not a number: {val:?}")))
            };
            match &*flag {
                "--sandbox" => j.sandbox = text()?,
                "--name" => j.name = text()?,
                "--root" => j.root = absolute(val, &flag)?,
                "--uid" => j.uid = id(num("--uid")?)?,
                "--gid" => j.gid = id(num("--gid")?)?,
                "--ro" => j.read_only.push(absolute(val, &flag)?),
                "--rw" => j.read_write.push(absolute(val, &flag)?),
                "--dev" => j.devices.push(
                    Device::parse(&text()?)
                        .ok_or_else(|| bad(format!("--dev {val:?}: unknown device")))?,
                ),
                "--net" => {
                    j.net = match val.as_bytes() {
                        b"none" => Net::None,
                        b"host" => Net::Host,
                        _ => Net::Join(absolute(val, &flag)?),
                    }
                }
                "--cgroup" => {
                    let c = text()?;
                    if c.split('/').any(|p| p == ".." || p == ".") || c.starts_with('/') {
                        return Err(bad(format!("--cgroup {c:?}: want a relative path")));
                    }
                    j.cgroup = Some(c)
                }
                "--keep-fd" => {
                    let n = num("--keep-fd")?;
                    if !(3..=65535).contains(&n) {
                        return Err(bad(format!("--keep-fd {n}: want 3 to 65535")));
                    }
                    j.keep_fds.push(n as i32)
                }
                "--start-gate" => {
                    let n = num("--start-gate")?;
                    if !(3..=65535).contains(&n) {
                        return Err(bad(format!("--start-gate {n}: want 3 to 65535")));
                    }
                    j.start_gate = Some(n as i32)
                }
                "--cap" => j.keep_caps.push(text()?),
                "--userns" => {
                    let n = num("--userns")?;
                    if !(1..=1 << 24).contains(&n) {
                        return Err(bad(format!("--userns {n}: want 1 to 2^24 ids")));
                    }
                    j.userns = Some(n as u32)
                }
                "--max-files" => j.max_files = num("--max-files")?,
                "--landlock" => {
                    j.landlock = match text()?.as_str() {
                        "on" => true,
                        "off" => false,
                        v => return Err(bad(format!("--landlock {v:?}: want on or off"))),
                    }
                }
                "--seccomp" => {
                    let n = text()?;
                    if !crate::seccomp::allow_list_known(&n) {
                        return Err(bad(format!("--seccomp {n:?}: no such allow list")));
                    }
                    j.allow_list = Some(n)
                }
                "--env" => {
                    let kv = text()?;
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| bad(format!("--env {kv:?}: want K=V")))?;
                    j.env.push((k.into(), v.into()))
                }
                "--report" => j.report = Some(absolute(val, &flag)?),
                other => return Err(bad(format!("unknown option {other}"))),
            }
        }
        j.program = PathBuf::from(program.ok_or_else(|| bad("no program after --".into()))?);
        if j.sandbox.is_empty() || j.name.is_empty() || j.root.as_os_str().is_empty() {
            return Err(bad("--sandbox, --name and --root are required".into()));
        }
        if j.uid == u32::MAX || j.gid == u32::MAX {
            return Err(bad("--uid and --gid are required".into()));
        }
        if j.allow_list.is_some() && !j.landlock {
            return Err(bad(
                "--seccomp: a program that sandboxes itself (--landlock off) brings its own filter"
                    .into(),
            ));
        }
        if let Some(n) = j.userns {
            if j.uid == 0
                || j.gid == 0
                || j.uid.checked_add(n).is_none()
                || j.gid.checked_add(n).is_none()
            {
                return Err(bad(format!(
                    "--userns {n}: the host ids from --uid {} and --gid {} must be above 0 and fit",
                    j.uid, j.gid
                )));
            }
        }
        if j.start_gate.is_some_and(|g| j.keep_fds.contains(&g)) {
            return Err(bad(
                "--start-gate: a descriptor handed on cannot be the gate".into(),
            ));
        }
        if !j.program.is_absolute() {
            return Err(bad(format!(
                "{}: want an absolute path",
                j.program.display()
            )));
        }
        Ok(j)
    }
}

fn absolute(v: &OsStr, flag: &str) -> Result<PathBuf, JailError> {
    let p = PathBuf::from(v);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(JailError::Invalid(format!(
            "{flag} {v:?}: want an absolute path without '..'"
        )));
    }
    Ok(p)
}

fn id(n: u64) -> Result<u32, JailError> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n != u32::MAX)
        .ok_or_else(|| JailError::Invalid(format!("id {n} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut j = Jail::new("sb", "vmm", "/run/j/vmm".into(), "/usr/bin/x".into());
        j.uid = 1000;
        j.gid = 1001;
        j.read_only = vec!["/usr/lib".into(), "/a b".into()];
        j.read_write = vec!["/run/sb/vm".into()];
        j.devices.push(Device::Kvm);
        j.net = Net::Join("/run/netns/p".into());
        j.cgroup = Some("bulkhead/sb".into());
        j.keep_fds = vec![3];
        j.start_gate = Some(4);
        j.keep_caps = vec!["CAP_CHOWN".into()];
        j.userns = Some(65536);
        j.env = vec![("BULKHEAD_LOG".into(), "info=x".into())];
        j.report = Some("/run/sb/vmm.jail.json".into());
        j.landlock = false;
        j.args = vec!["--kernel".into(), "-- x".into()];
        assert_eq!(Jail::parse(&j.to_args()).unwrap(), j);
        j.landlock = true;
        j.allow_list = Some("vhost-device-vsock".into());
        assert_eq!(Jail::parse(&j.to_args()).unwrap(), j);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let base = |extra: &[&str]| -> Vec<OsString> {
            let mut v: Vec<OsString> = [
                "--sandbox",
                "s",
                "--name",
                "n",
                "--root",
                "/r",
                "--uid",
                "5",
                "--gid",
                "5",
            ]
            .iter()
            .map(Into::into)
            .collect();
            v.extend(extra.iter().map(Into::into));
            v
        };
        assert!(Jail::parse(&base(&["--", "/bin/true"])).is_ok());
        for bad in [
            &["--", "true"][..],
            &["--ro", "lib", "--", "/bin/true"],
            &["--ro", "/usr/../etc", "--", "/bin/true"],
            &["--cgroup", "../up", "--", "/bin/true"],
            &["--keep-fd", "2", "--", "/bin/true"],
            &["--start-gate", "1", "--", "/bin/true"],
            &["--keep-fd", "3", "--start-gate", "3", "--", "/bin/true"],
            &["--dev", "sda", "--", "/bin/true"],
            &["--uid"],
            &["--userns", "0", "--", "/bin/true"],
            &["--userns", "4294967295", "--", "/bin/true"],
            &["--what", "x", "--", "/bin/true"],
            &["--seccomp", "no-such-list", "--", "/bin/true"],
            &[
                "--seccomp",
                "vhost-device-vsock",
                "--landlock",
                "off",
                "--",
                "/bin/true",
            ],
            &[],
        ] {
            assert!(Jail::parse(&base(bad)).is_err(), "{bad:?} was accepted");
        }
        let mut no_uid = base(&["--", "/bin/true"]);
        no_uid.drain(6..10);
        assert!(Jail::parse(&no_uid).is_err());
        // A namespace's root must not be the host's root.
        let mut host_root = base(&["--userns", "10", "--", "/bin/true"]);
        host_root[7] = "0".into();
        assert!(Jail::parse(&host_root).is_err());
    }
}
