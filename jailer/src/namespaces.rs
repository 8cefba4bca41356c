//! Steps 4 and 5: the network namespace the component must have, then new PID, IPC and
//! UTS namespaces (and, in the child, a mount namespace of its own).

use std::os::fd::AsFd;

use nix::sched::{setns, unshare, CloneFlags};

use crate::{JailError, Net};

pub fn enter_net(net: &Net) -> Result<(), JailError> {
    match net {
        Net::Host => Ok(()),
        Net::None => unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| JailError::sys("new network namespace", e)),
        Net::Join(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| JailError::sys(format!("open {}", path.display()), e))?;
            setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| JailError::sys(format!("join {}", path.display()), e))
        }
    }
}

/// The PID namespace applies to children only: the next fork makes the component.
pub fn unshare_pid_ipc_uts() -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(|e| JailError::sys("new PID, IPC and UTS namespaces", e))
}

/// The child's own mount namespace. Not the parent's: pivot_root moves every process
/// of the namespace, and the parent must keep the host's view to write the report.
pub fn unshare_mount() -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| JailError::sys("new mount namespace", e))
}
