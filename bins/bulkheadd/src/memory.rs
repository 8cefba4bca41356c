//! A pod's memory follows its containers. A sandbox with a virtio-mem region
//! (`hotplug_mib`) boots with `memory_mib`; whenever a container with a memory limit is
//! created, updated or deleted, the manager asks the VMM to have as much of the region
//! plugged as the containers' limits need beside the guest's own share:
//!
//! `plugged = max(floor, sum(limits) + GUEST_OVERHEAD_MIB - memory_mib)`, in 2 MiB
//! blocks, at most the region. `floor` is what `SetHotplugMemory` last asked for by
//! hand. Containers without a limit add nothing (they share what the VM has).
//!
//! Growth is waited for (bounded) before a container is created or its limit raised, so
//! the memory is in the guest when the container needs it; shrinking is not: the guest
//! gives blocks back as it can empty them.

use std::time::Duration;

pub use bulkhead_host::config::GUEST_OVERHEAD_MIB;

/// How long a container's creation (or a raised limit) waits for the guest to plug
/// what it needs before it goes on without.
pub const PLUG_WAIT: Duration = Duration::from_secs(10);

/// virtio-mem's block: the VMM plugs whole 2 MiB blocks.
const BLOCK_MIB: u64 = 2;

/// What an OCI `linux.resources` object says of the memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// No `memory.limit` in it: an update that leaves the limit as it was.
    Absent,
    /// Unlimited (-1, 0, or a value no VM could have).
    None,
    Mib(u64),
}

impl Limit {
    /// From `linux.resources` (a spec's, or an update's).
    pub fn of(resources: &serde_json::Value) -> Limit {
        match &resources["memory"]["limit"] {
            serde_json::Value::Null => Limit::Absent,
            v => match v.as_i64() {
                // More than the manager could give any VM counts as no limit.
                Some(b) if b > 0 && b < (1 << 40) => Limit::Mib((b as u64).div_ceil(1 << 20)),
                _ => Limit::None,
            },
        }
    }

    /// What a container record keeps: `None` without a limit.
    pub fn mib(self) -> Option<u64> {
        match self {
            Limit::Mib(m) => Some(m),
            Limit::Absent | Limit::None => None,
        }
    }
}

/// What an update does to what the VM is sized by, from the container's recorded
/// limit and the update's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitChange {
    /// Nothing to refit: no memory limit in the update, or the same one.
    Same,
    /// The sum grows (a higher limit, or a first one): the VM grows before the guest
    /// is told, and back if the guest refuses.
    Grow(Option<u64>),
    /// The sum falls (a lower limit, or none: a container without one adds nothing): the
    /// VM shrinks once the guest has the new limit.
    Shrink(Option<u64>),
}

impl LimitChange {
    pub fn of(old: Option<u64>, update: Limit) -> LimitChange {
        let new = update.mib();
        match (old, new) {
            _ if update == Limit::Absent || new == old => LimitChange::Same,
            (None, _) => LimitChange::Grow(new),
            (Some(o), Some(n)) if n > o => LimitChange::Grow(new),
            _ => LimitChange::Shrink(new),
        }
    }
}

/// How much of the region to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub mib: u64,
    /// The containers' limits summed.
    pub limits_mib: u64,
    /// MiB the limits need beyond what the region holds (0 when it fits).
    pub short_mib: u64,
}

/// See the module's text.
pub fn target(
    memory_mib: u64,
    region_mib: u64,
    floor_mib: u64,
    limits: impl IntoIterator<Item = u64>,
) -> Target {
    let sum: u64 = limits.into_iter().fold(0, u64::saturating_add);
    let need = if sum == 0 {
        0
    } else {
        sum.saturating_add(GUEST_OVERHEAD_MIB)
            .saturating_sub(memory_mib)
            .div_ceil(BLOCK_MIB)
            .saturating_mul(BLOCK_MIB)
    };
    let want = need.max(floor_mib);
    Target {
        mib: want.min(region_mib),
        limits_mib: sum,
        short_mib: need.saturating_sub(region_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limits_from_oci_resources() {
        assert_eq!(Limit::of(&json!({})), Limit::Absent);
        assert_eq!(Limit::of(&json!({"cpu": {"quota": 5}})), Limit::Absent);
        assert_eq!(Limit::of(&json!({"memory": {"limit": -1}})), Limit::None);
        assert_eq!(Limit::of(&json!({"memory": {"limit": 0}})), Limit::None);
        assert_eq!(
            Limit::of(&json!({"memory": {"limit": "lots"}})),
            Limit::None
        );
        assert_eq!(
            Limit::of(&json!({"memory": {"limit": u64::MAX}})),
            Limit::None
        );
        assert_eq!(
            Limit::of(&json!({"memory": {"limit": 512u64 << 20}})),
            Limit::Mib(512)
        );
        // A part of a MiB counts as a whole one.
        assert_eq!(Limit::of(&json!({"memory": {"limit": 1}})), Limit::Mib(1));
        assert_eq!(Limit::Mib(3).mib(), Some(3));
        assert_eq!(Limit::None.mib(), None);
    }

    #[test]
    fn an_update_grows_first_and_shrinks_after() {
        use LimitChange::*;
        assert_eq!(LimitChange::of(Some(256), Limit::Absent), Same);
        assert_eq!(LimitChange::of(Some(256), Limit::Mib(256)), Same);
        assert_eq!(LimitChange::of(None, Limit::None), Same);
        assert_eq!(LimitChange::of(None, Limit::Mib(64)), Grow(Some(64)));
        assert_eq!(LimitChange::of(Some(256), Limit::Mib(768)), Grow(Some(768)));
        assert_eq!(
            LimitChange::of(Some(768), Limit::Mib(128)),
            Shrink(Some(128))
        );
        // Unlimited adds nothing to the VM's size.
        assert_eq!(LimitChange::of(Some(768), Limit::None), Shrink(None));
    }

    #[test]
    fn the_region_covers_what_the_limits_need_beyond_boot_memory() {
        // 256 MiB at boot, a 1 GiB region.
        let t = |floor, limits: &[u64]| target(256, 1024, floor, limits.iter().copied());
        let fits = |mib, limits_mib| Target {
            mib,
            limits_mib,
            short_mib: 0,
        };
        // No limits: nothing, or the hand-set floor.
        assert_eq!(t(0, &[]), fits(0, 0));
        assert_eq!(t(512, &[]), fits(512, 0));
        // Limits that fit in boot memory with the guest's share: nothing.
        assert_eq!(t(0, &[100, 92]).mib, 0);
        // 512 + 64 - 256 = 320.
        assert_eq!(t(0, &[512]), fits(320, 512));
        assert_eq!(t(0, &[256, 256]).mib, 320);
        // Odd MiB round up to whole 2 MiB blocks.
        assert_eq!(t(0, &[513]).mib, 322);
        // The floor wins when it is higher, the limits when they are.
        assert_eq!(t(400, &[512]).mib, 400);
        assert_eq!(t(100, &[512]).mib, 320);
        // Past the region: all of it, and by how much it falls short.
        assert_eq!(
            t(0, &[2048]),
            Target {
                mib: 1024,
                limits_mib: 2048,
                short_mib: 832
            }
        );
        // Sums never overflow.
        assert_eq!(t(0, &[u64::MAX, u64::MAX]).mib, 1024);
    }
}
