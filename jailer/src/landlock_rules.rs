//! Step 7, last: a landlock ruleset that limits the file system to the jail's own paths
//! (even a process that escaped its mount namespace sees nothing else), and scopes
//! signals and abstract unix sockets to the jail. Best effort across ABI versions: what
//! the kernel enforced goes into the report.

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::posture::LandlockReport;
use crate::{Jail, JailError};

/// The newest ABI this ruleset asks for; older kernels enforce what they know.
const WANT: ABI = ABI::V6;

/// The kernel's landlock ABI version, or 0 without landlock.
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    v.max(0) as i32
}

pub fn restrict(j: &Jail) -> Result<LandlockReport, JailError> {
    let err = |e: landlock::RulesetError| JailError::Invalid(format!("landlock: {e}"));
    let read = AccessFs::from_read(WANT);
    let device: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let mut rules: Vec<(std::path::PathBuf, BitFlags<AccessFs>)> = vec![];
    rules.extend(j.read_only.iter().map(|p| (p.clone(), read)));
    rules.extend(
        j.read_write
            .iter()
            .map(|p| (p.clone(), AccessFs::from_all(WANT))),
    );
    rules.extend(
        j.devices
            .iter()
            .map(|d| (format!("/dev/{}", d.name()).into(), device)),
    );
    rules.push(("/proc".into(), read));
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(WANT))
        .map_err(err)?
        .scope(Scope::from_all(WANT))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for (path, access) in rules {
        // A symlink is opened through to its target, which has a rule of its own.
        let fd = PathFd::new(&path)
            .map_err(|e| JailError::Invalid(format!("landlock {}: {e}", path.display())))?;
        // Directory rights on a file are refused: keep those a file can have.
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(WANT)
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    let status = created.restrict_self().map_err(err)?;
    Ok(LandlockReport {
        kernel_abi: kernel_abi(),
        status: match status.ruleset {
            RulesetStatus::FullyEnforced => "fully enforced",
            RulesetStatus::PartiallyEnforced => "partially enforced",
            RulesetStatus::NotEnforced => "not enforced",
        }
        .into(),
    })
}
