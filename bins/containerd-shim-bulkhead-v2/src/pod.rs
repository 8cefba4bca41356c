//! Pods: one VM per pod. CRI marks each container's spec with annotations: the pod's
//! sandbox container (`io.kubernetes.cri.container-type: sandbox`) creates the VM, and
//! every later container of the pod (`container`, with `io.kubernetes.cri.sandbox-id`)
//! joins it. A spec without them (`ctr run`) is a pod of its own.
//!
//! Sizing: the VM is sized once, when it is created, with the configured defaults as a
//! floor. Under Kubernetes the sandbox container's spec carries the whole pod's limits
//! (the sum of its containers', from kubelet 1.23) in CRI's `io.kubernetes.cri.sandbox-*`
//! annotations, and those come first; otherwise the creating spec's own limits
//! (`linux.resources.cpu.quota/period` and `memory.limit`). Each container's own limits
//! are enforced by its cgroup in the guest; with a hot-plug region (the config's
//! `hotplug_mib`) bulkheadd also grows the VM as the containers' memory limits need.

use bulkhead_host::config::GUEST_OVERHEAD_MIB;
use serde_json::Value;

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's memory limit in bytes, and its CPU quota and period (µs), on the sandbox
/// container's spec; "0" (or absent) when the pod sets none.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This task creates the pod's VM (and owns it: deleting it removes the VM).
    Sandbox,
    /// This task joins the VM of the pod `sandbox`.
    Container { sandbox: String },
}

impl Role {
    pub fn of(spec: &Value, id: &str) -> Result<Role, String> {
        let ann = &spec["annotations"];
        match ann[CONTAINER_TYPE].as_str() {
            None | Some("sandbox") => Ok(Role::Sandbox),
            Some("container") => match ann[SANDBOX_ID].as_str() {
                Some(s) if !s.is_empty() && s != id => Ok(Role::Container { sandbox: s.into() }),
                Some(s) if s == id => Err(format!(
                    "container {id}: {SANDBOX_ID} names the container itself"
                )),
                _ => Err(format!(
                    "container {id}: {CONTAINER_TYPE} is container but {SANDBOX_ID} is missing"
                )),
            },
            Some(other) => Err(format!(
                "container {id}: unknown {CONTAINER_TYPE} {other:?}"
            )),
        }
    }

    /// The sandbox (VM) this task lives in.
    pub fn sandbox<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Sandbox => id,
            Role::Container { sandbox } => sandbox,
        }
    }
}

/// vCPUs and MiB for a pod's VM from the pod's limits (CRI's sandbox annotations) or
/// else the creating spec's; `None` keeps the configured default.
pub fn size(spec: &Value) -> (Option<u32>, Option<u32>) {
    let r = &spec["linux"]["resources"];
    // An annotation is a string; anything but a positive number counts as unset.
    let ann = |k: &str| {
        spec["annotations"][k]
            .as_str()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    let positive = |v: &Value| v.as_i64().filter(|n| *n > 0).map(|n| n as u64);
    let quota_period = match (ann(SANDBOX_CPU_QUOTA), ann(SANDBOX_CPU_PERIOD)) {
        (Some(q), Some(p)) => Some((q, p)),
        _ => positive(&r["cpu"]["quota"]).zip(positive(&r["cpu"]["period"])),
    };
    let cpus = quota_period.map(|(q, p)| q.div_ceil(p).clamp(1, 64) as u32);
    let mem = ann(SANDBOX_MEMORY)
        .or_else(|| positive(&r["memory"]["limit"]))
        .map(|l| (l.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB).clamp(64, 65536) as u32);
    (cpus, mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_from_cri_annotations() {
        assert_eq!(Role::of(&json!({}), "a"), Ok(Role::Sandbox));
        let sb = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p"}});
        assert_eq!(Role::of(&sb, "p"), Ok(Role::Sandbox));
        let c = json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "p"}});
        let role = Role::of(&c, "c1").unwrap();
        assert_eq!(role.sandbox("c1"), "p");
        assert!(Role::of(&c, "p").is_err());
        let bad = json!({"annotations": {CONTAINER_TYPE: "container"}});
        assert!(Role::of(&bad, "c").unwrap_err().contains("missing"));
        let odd = json!({"annotations": {CONTAINER_TYPE: "pod"}});
        assert!(Role::of(&odd, "c").unwrap_err().contains("unknown"));
    }

    #[test]
    fn vm_size_follows_limits() {
        assert_eq!(size(&json!({})), (None, None));
        let s = json!({"linux": {"resources": {
            "cpu": {"quota": 150000, "period": 100000},
            "memory": {"limit": 268435456}}}});
        assert_eq!(size(&s), (Some(2), Some(256 + 64)));
        let unlimited = json!({"linux": {"resources": {"cpu": {"quota": -1, "period": 100000}}}});
        assert_eq!(size(&unlimited), (None, None));
    }

    #[test]
    fn a_kubernetes_pod_is_sized_by_its_sandbox_annotations() {
        // A pause container's spec: no limits of its own, the pod's sums in annotations.
        let pause = json!({"annotations": {
            CONTAINER_TYPE: "sandbox",
            SANDBOX_MEMORY: "629145600",
            SANDBOX_CPU_QUOTA: "250000",
            SANDBOX_CPU_PERIOD: "100000"},
            "linux": {"resources": {"memory": {"limit": 16 << 20}}}});
        assert_eq!(size(&pause), (Some(3), Some(600 + 64)));
        // "0" is a pod without limits: the spec's own, or the defaults.
        let unset = json!({"annotations": {SANDBOX_MEMORY: "0", SANDBOX_CPU_QUOTA: "0",
            SANDBOX_CPU_PERIOD: "100000"}});
        assert_eq!(size(&unset), (None, None));
        let junk = json!({"annotations": {SANDBOX_MEMORY: "lots", SANDBOX_CPU_QUOTA: "-5",
            SANDBOX_CPU_PERIOD: "100000"},
            "linux": {"resources": {"memory": {"limit": 268435456}}}});
        assert_eq!(size(&junk), (None, Some(256 + 64)));
        // Past the manager's bounds: clamped, not refused.
        let huge = json!({"annotations": {SANDBOX_MEMORY: "18446744073709551615"}});
        assert_eq!(size(&huge).1, Some(65536));
    }
}
