//! A container's guest cgroup figures (`Sandbox1.Stats`) in the shape containerd decodes
//! for `ctr task metrics` and CRI's ContainerStats: cgroup v1 `Metrics`, whatever the
//! guest's hierarchy is.

use std::collections::HashMap;

use containerd_shim::protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};

pub const METRICS_V1: &str = "io.containerd.cgroups.v1.Metrics";

pub fn metrics(s: &HashMap<String, u64>) -> Metrics {
    let get = |k: &str| s.get(k).copied().unwrap_or(0);
    let mut m = Metrics::new();
    m.cpu = MessageField::some(CPUStat {
        usage: MessageField::some(CPUUsage {
            // containerd's figures are nanoseconds; the guest's are microseconds (from
            // the guest: saturate, never overflow).
            total: get("cpu_usage_usec").saturating_mul(1000),
            user: get("cpu_user_usec").saturating_mul(1000),
            kernel: get("cpu_system_usec").saturating_mul(1000),
            ..Default::default()
        }),
        ..Default::default()
    });
    m.memory = MessageField::some(MemoryStat {
        usage: MessageField::some(MemoryEntry {
            usage: get("memory_current"),
            limit: get("memory_limit"),
            failcnt: get("memory_oom_kills"),
            ..Default::default()
        }),
        ..Default::default()
    });
    m.pids = MessageField::some(PidsStat {
        current: get("pids_current"),
        limit: get("pids_limit"),
        ..Default::default()
    });
    let entry = |op: &str, value: u64| BlkIOEntry {
        op: op.into(),
        value,
        ..Default::default()
    };
    m.blkio = MessageField::some(BlkIOStat {
        io_service_bytes_recursive: vec![
            entry("Read", get("io_read_bytes")),
            entry("Write", get("io_write_bytes")),
        ],
        ..Default::default()
    });
    m
}

pub fn to_any(m: &Metrics) -> Result<Any, String> {
    Ok(Any {
        type_url: METRICS_V1.into(),
        value: m.write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_land_in_v1_fields() {
        let s: HashMap<String, u64> = [
            ("cpu_usage_usec", 5),
            ("memory_current", 4096),
            ("memory_limit", 8192),
            ("pids_current", 3),
            ("io_write_bytes", 7),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let any = to_any(&metrics(&s)).unwrap();
        assert_eq!(any.type_url, METRICS_V1);
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 5000);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 8192);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.blkio.io_service_bytes_recursive[1].value, 7);
    }
}
