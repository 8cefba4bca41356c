//! The states a sandbox and its containers go through, the moves allowed between them,
//! and the roles of a sandbox's host processes. Records on disk and the D-Bus
//! properties carry the states by their lowercase names (`running`, ...), as before
//! these types existed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A sandbox: `creating` (its components start, its guest boots) then `running`, then
/// `stopping` once its teardown began (from either: a create that fails is torn down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Stopping,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Stopping => "stopping",
        }
    }

    /// May a sandbox in this state move to `next`? Staying put is allowed.
    pub fn may_become(self, next: SandboxState) -> bool {
        use SandboxState::*;
        self == next || matches!((self, next), (Creating, Running) | (_, Stopping))
    }
}

/// A container: `creating` while bulkheadd mounts its root and the agent makes it,
/// `created`, `running` once started, `paused` and back, and `stopped` when its init
/// exited (from any state: a process can die while paused, or before it was started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl ContainerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Creating => "creating",
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Stopped => "stopped",
        }
    }

    /// May a container in this state move to `next`? Staying put is allowed; nothing
    /// leaves `stopped`.
    pub fn may_become(self, next: ContainerState) -> bool {
        use ContainerState::*;
        self == next
            || matches!(
                (self, next),
                (Creating, Created)
                    | (Created, Running)
                    | (Running, Paused)
                    | (Paused, Running)
                    | (Creating | Created | Running | Paused, Stopped)
            )
    }

    /// Has a process that can be running in the guest (what a removal without `force`
    /// refuses to stop).
    pub fn is_live(self) -> bool {
        matches!(self, ContainerState::Running | ContainerState::Paused)
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state with its allowed moves.
pub trait Lifecycle: Copy + PartialEq + fmt::Display {
    fn may_become(self, next: Self) -> bool;
}

impl Lifecycle for SandboxState {
    fn may_become(self, next: Self) -> bool {
        SandboxState::may_become(self, next)
    }
}

impl Lifecycle for ContainerState {
    fn may_become(self, next: Self) -> bool {
        ContainerState::may_become(self, next)
    }
}

/// Move `state` to `next` where that is allowed; otherwise leave it, say so (of the
/// sandbox or container `id`) and return false.
pub fn step<S: Lifecycle>(state: &mut S, next: S, id: &str) -> bool {
    if state.may_become(next) {
        *state = next;
        return true;
    }
    tracing::warn!(id, "not moving from {state} to {next}: not an allowed move");
    false
}

/// What a host process of a sandbox is for. Its name (the record's, the log's, the
/// D-Bus `Components` entry's) is [`Role::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The VMM: bulkhead-vmm or QEMU.
    Vmm,
    Virtiofsd,
    /// The vhost-user vsock back end QEMU needs.
    VsockBackend,
    /// bulkhead-net for the pod's interface `n`: restarted when it dies.
    Net(u32),
}

impl Role {
    pub fn name(self) -> String {
        match self {
            Role::Vmm => "vmm".into(),
            Role::Virtiofsd => "virtiofsd".into(),
            Role::VsockBackend => "vhost-device-vsock".into(),
            Role::Net(n) => format!("net{n}"),
        }
    }

    /// The role a component's name says; `None` for a name no bulkheadd gives.
    pub fn of(name: &str) -> Option<Role> {
        match name {
            "vmm" => Some(Role::Vmm),
            "virtiofsd" => Some(Role::Virtiofsd),
            "vhost-device-vsock" => Some(Role::VsockBackend),
            n => n
                .strip_prefix("net")
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse().ok())
                .map(Role::Net),
        }
    }

    /// Started again when it dies while its sandbox runs (a guest keeps its network
    /// across it); any other component's death ends the sandbox.
    pub fn restartable(self) -> bool {
        matches!(self, Role::Net(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SANDBOX: [SandboxState; 3] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Stopping,
    ];
    const CONTAINER: [ContainerState; 5] = [
        ContainerState::Creating,
        ContainerState::Created,
        ContainerState::Running,
        ContainerState::Paused,
        ContainerState::Stopped,
    ];

    /// Every pair of states, against the table of allowed moves written out.
    #[test]
    fn a_sandbox_moves_only_forward() {
        use SandboxState::*;
        let allowed = [
            (Creating, Running),
            (Creating, Stopping),
            (Running, Stopping),
        ];
        for a in SANDBOX {
            for b in SANDBOX {
                assert_eq!(
                    a.may_become(b),
                    a == b || allowed.contains(&(a, b)),
                    "{a} -> {b}"
                );
            }
        }
    }

    #[test]
    fn a_container_pauses_and_resumes_and_never_leaves_stopped() {
        use ContainerState::*;
        let allowed = [
            (Creating, Created),
            (Created, Running),
            (Running, Paused),
            (Paused, Running),
            (Creating, Stopped),
            (Created, Stopped),
            (Running, Stopped),
            (Paused, Stopped),
        ];
        for a in CONTAINER {
            for b in CONTAINER {
                assert_eq!(
                    a.may_become(b),
                    a == b || allowed.contains(&(a, b)),
                    "{a} -> {b}"
                );
            }
        }
        assert!(Running.is_live() && Paused.is_live());
        assert!(!Created.is_live() && !Stopped.is_live() && !Creating.is_live());
    }

    /// Records written before these types carry the same lowercase words.
    #[test]
    fn states_keep_their_words_on_disk() {
        for s in SANDBOX {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<SandboxState>(&j).unwrap(), s);
        }
        for s in CONTAINER {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<ContainerState>(&j).unwrap(), s);
        }
        assert!(serde_json::from_str::<SandboxState>("\"Running\"").is_err());
    }

    #[test]
    fn a_forbidden_move_leaves_the_state() {
        let mut s = ContainerState::Stopped;
        assert!(!step(&mut s, ContainerState::Paused, "c"));
        assert_eq!(s, ContainerState::Stopped);
        let mut s = ContainerState::Running;
        assert!(step(&mut s, ContainerState::Paused, "c"));
        assert_eq!(s, ContainerState::Paused);
        let mut s = SandboxState::Stopping;
        assert!(!step(&mut s, SandboxState::Running, "p"));
        assert_eq!(s, SandboxState::Stopping);
    }

    #[test]
    fn roles_by_name_and_back() {
        for r in [
            Role::Vmm,
            Role::Virtiofsd,
            Role::VsockBackend,
            Role::Net(0),
            Role::Net(12),
        ] {
            assert_eq!(Role::of(&r.name()), Some(r));
        }
        for bad in ["net", "netx", "net-1", "qemu", ""] {
            assert_eq!(Role::of(bad), None, "{bad:?}");
        }
        assert!(Role::Net(3).restartable() && !Role::Vmm.restartable());
    }
}
