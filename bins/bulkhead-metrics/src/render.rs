//! A [`Snapshot`] as an OpenMetrics text exposition (what Prometheus scrapes), built
//! with the `prometheus-client` crate: a fresh registry per scrape, so a sandbox that
//! went away leaves no stale series behind.
//!
//! Every label value goes through [`Lv`], which escapes it: the crate writes label
//! values as they are, and a quote or a newline in one would break the exposition.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::snapshot::{Sandbox, Snapshot};

/// The content type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value, escaped as the exposition format requires.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Lv(pub String);

impl EncodeLabelValue for Lv {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => e.write_str("\\\\")?,
                '"' => e.write_str("\\\"")?,
                '\n' => e.write_str("\\n")?,
                c => e.write_char(c)?,
            }
        }
        Ok(())
    }
}

type Labels = Vec<(&'static str, Lv)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter<f64, AtomicU64>>;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k, Lv(v.to_string())))
        .collect()
}

/// Exporter-wide figures that outlive one scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExporterFigures {
    pub scrape_duration: Duration,
    /// D-Bus calls that failed, since the exporter started.
    pub failed_calls_total: u64,
}

struct Out(Registry);

impl Out {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>) -> G {
        let f = G::default();
        match unit {
            Some(u) => self.0.register_with_unit(name, help, u, f.clone()),
            None => self.0.register(name, help, f.clone()),
        }
        f
    }

    /// `name` without `_total`: the encoder adds it.
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> C {
        let f = C::default();
        match unit {
            Some(u) => self.0.register_with_unit(name, help, u, f.clone()),
            None => self.0.register(name, help, f.clone()),
        }
        f
    }
}

fn set(f: &G, l: Labels, v: f64) {
    f.get_or_create(&l).set(v);
}

fn add(f: &C, l: Labels, v: f64) {
    f.get_or_create(&l).inc_by(v);
}

const MIB: f64 = 1024.0 * 1024.0;

/// A container statistic: its key in `Sandbox1.Stats`, metric name, help, unit, scale
/// to that unit, and whether it is a counter.
struct Stat {
    key: &'static str,
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    scale: f64,
    counter: bool,
}

fn container_stats() -> Vec<Stat> {
    let s = |key, name, help, unit, scale, counter| Stat {
        key,
        name,
        help,
        unit,
        scale,
        counter,
    };
    vec![
        s(
            "cpu_usage_usec",
            "bulkhead_container_cpu_usage",
            "CPU time of the container's cgroup in the guest",
            Some(Unit::Seconds),
            1e-6,
            true,
        ),
        s(
            "cpu_user_usec",
            "bulkhead_container_cpu_user",
            "User CPU time of the container's cgroup",
            Some(Unit::Seconds),
            1e-6,
            true,
        ),
        s(
            "cpu_system_usec",
            "bulkhead_container_cpu_system",
            "System CPU time of the container's cgroup",
            Some(Unit::Seconds),
            1e-6,
            true,
        ),
        s(
            "memory_current",
            "bulkhead_container_memory_usage",
            "Memory the container's cgroup uses in the guest",
            Some(Unit::Bytes),
            1.0,
            false,
        ),
        s(
            "memory_limit",
            "bulkhead_container_memory_limit",
            "The container's memory limit",
            Some(Unit::Bytes),
            1.0,
            false,
        ),
        s(
            "memory_oom_kills",
            "bulkhead_container_oom_kills",
            "Processes of the container the guest's OOM killer ended",
            None,
            1.0,
            true,
        ),
        s(
            "pids_current",
            "bulkhead_container_pids",
            "Processes in the container",
            None,
            1.0,
            false,
        ),
        s(
            "pids_limit",
            "bulkhead_container_pids_limit",
            "The container's process limit",
            None,
            1.0,
            false,
        ),
        s(
            "io_read_bytes",
            "bulkhead_container_io_read",
            "Bytes the container read from block devices",
            Some(Unit::Bytes),
            1.0,
            true,
        ),
        s(
            "io_write_bytes",
            "bulkhead_container_io_write",
            "Bytes the container wrote to block devices",
            Some(Unit::Bytes),
            1.0,
            true,
        ),
    ]
}

/// Network back end counters (`Sandbox1.NetworkStats`), all counters.
const NETWORK: [(&str, &str, &str, bool); 7] = [
    (
        "rx_bytes",
        "bulkhead_network_receive",
        "Bytes delivered to the guest interface",
        true,
    ),
    (
        "rx_frames",
        "bulkhead_network_receive_frames",
        "Frames delivered to the guest interface",
        false,
    ),
    (
        "rx_dropped",
        "bulkhead_network_receive_dropped_frames",
        "Frames for the guest dropped (no room in its queue)",
        false,
    ),
    (
        "tx_bytes",
        "bulkhead_network_transmit",
        "Bytes the guest interface sent",
        true,
    ),
    (
        "tx_frames",
        "bulkhead_network_transmit_frames",
        "Frames the guest interface sent",
        false,
    ),
    (
        "tx_malformed",
        "bulkhead_network_transmit_malformed_frames",
        "Frames from the guest refused as malformed",
        false,
    ),
    (
        "tx_errors",
        "bulkhead_network_transmit_errors",
        "Frames from the guest the tap did not take",
        false,
    ),
];

/// A VM figure: key, metric, help, to bytes (`None`: a count), counter.
pub(crate) type Figure = (&'static str, &'static str, &'static str, Option<f64>, bool);

/// Balloon figures.
pub(crate) const BALLOON: [Figure; 6] = [
    (
        "target_mib",
        "bulkhead_vm_balloon_target",
        "Memory the host asked the guest to give back",
        Some(MIB),
        false,
    ),
    (
        "actual_mib",
        "bulkhead_vm_balloon_actual",
        "Memory the guest has given to the balloon",
        Some(MIB),
        false,
    ),
    (
        "inflated_bytes",
        "bulkhead_vm_balloon_inflated",
        "Memory discarded on the host because the guest inflated the balloon",
        Some(1.0),
        true,
    ),
    (
        "reported_bytes",
        "bulkhead_vm_balloon_reported",
        "Free memory the guest reported and the host discarded",
        Some(1.0),
        true,
    ),
    (
        "refused",
        "bulkhead_vm_balloon_refused_ranges",
        "Balloon pages or ranges from the guest refused as invalid",
        None,
        true,
    ),
    (
        "discard_errors",
        "bulkhead_vm_balloon_discard_errors",
        "Host discards that failed",
        None,
        true,
    ),
];

/// virtio-mem figures.
pub(crate) const HOTPLUG: [Figure; 8] = [
    (
        "region_mib",
        "bulkhead_vm_hotplug_region",
        "Size of the VM's hot-plug (virtio-mem) region",
        Some(MIB),
        false,
    ),
    (
        "requested_mib",
        "bulkhead_vm_hotplug_requested",
        "Hot-plug memory the host asked the guest to have plugged",
        Some(MIB),
        false,
    ),
    (
        "plugged_mib",
        "bulkhead_vm_hotplug_plugged",
        "Hot-plug memory the guest has plugged",
        Some(MIB),
        false,
    ),
    (
        "plugs",
        "bulkhead_vm_hotplug_plugs",
        "Plug requests from the guest acknowledged",
        None,
        true,
    ),
    (
        "unplugs",
        "bulkhead_vm_hotplug_unplugs",
        "Unplug requests from the guest acknowledged",
        None,
        true,
    ),
    (
        "refused",
        "bulkhead_vm_hotplug_refused_requests",
        "Hot-plug requests from the guest refused or invalid",
        None,
        true,
    ),
    (
        "limits_mib",
        "bulkhead_vm_hotplug_container_limits",
        "Sum of the VM's containers' memory limits, which the hot-plug request follows",
        Some(MIB),
        false,
    ),
    (
        "short_mib",
        "bulkhead_vm_hotplug_short",
        "What the containers' memory limits need beyond the hot-plug region",
        Some(MIB),
        false,
    ),
];

/// The guest's balloon statistics: key, metric, help, is bytes, counter.
const GUEST: [(&str, &str, &str, bool, bool); 10] = [
    (
        "swap_in",
        "bulkhead_vm_guest_swap_in",
        "Memory the guest swapped in",
        true,
        true,
    ),
    (
        "swap_out",
        "bulkhead_vm_guest_swap_out",
        "Memory the guest swapped out",
        true,
        true,
    ),
    (
        "major_faults",
        "bulkhead_vm_guest_major_faults",
        "Major page faults in the guest",
        false,
        true,
    ),
    (
        "minor_faults",
        "bulkhead_vm_guest_minor_faults",
        "Minor page faults in the guest",
        false,
        true,
    ),
    (
        "free_memory",
        "bulkhead_vm_guest_memory_free",
        "Free memory in the guest",
        true,
        false,
    ),
    (
        "total_memory",
        "bulkhead_vm_guest_memory_size",
        "Memory the guest kernel manages",
        true,
        false,
    ),
    (
        "available_memory",
        "bulkhead_vm_guest_memory_available",
        "Memory available to the guest's programs",
        true,
        false,
    ),
    (
        "disk_caches",
        "bulkhead_vm_guest_memory_cached",
        "Guest page cache",
        true,
        false,
    ),
    (
        "hugetlb_allocations",
        "bulkhead_vm_guest_hugetlb_allocations",
        "Huge page allocations in the guest",
        false,
        true,
    ),
    (
        "hugetlb_failures",
        "bulkhead_vm_guest_hugetlb_failures",
        "Failed huge page allocations in the guest",
        false,
        true,
    ),
];

/// The exposition for one scrape.
pub fn render(s: &Snapshot, x: ExporterFigures) -> String {
    let mut o = Out(Registry::default());
    let up = Gauge::<f64, AtomicU64>::default();
    up.set(if s.manager.is_some() { 1.0 } else { 0.0 });
    o.0.register("bulkhead_up", "1 when bulkheadd answered this scrape", up);
    let took = Gauge::<f64, AtomicU64>::default();
    took.set(x.scrape_duration.as_secs_f64());
    let help = "How long reading bulkheadd took";
    o.0.register_with_unit("bulkhead_scrape_duration", help, Unit::Seconds, took);
    let failed = Counter::<f64, AtomicU64>::default();
    failed.inc_by(x.failed_calls_total as f64);
    let help = "D-Bus calls of scrapes that failed or timed out (their series are left out)";
    o.0.register("bulkhead_scrape_failed_calls", help, failed);
    if let Some(m) = &s.manager {
        let info = o.gauge("bulkhead_manager_info", "bulkheadd's version", None);
        set(&info, labels([("version", &m.version)]), 1.0);
        sandboxes(&mut o, &m.sandboxes);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &o.0)
        .expect("writing to a String cannot fail");
    text
}

fn sandboxes(o: &mut Out, list: &[Sandbox]) {
    let count = o.gauge("bulkhead_sandboxes", "Sandboxes by backend and state", None);
    let info = o.gauge(
        "bulkhead_sandbox_info",
        "One series per sandbox, with its backend and state",
        None,
    );
    let vcpus = o.gauge("bulkhead_sandbox_vcpus", "vCPUs of the sandbox's VM", None);
    let mem = o.gauge(
        "bulkhead_sandbox_memory",
        "Memory of the sandbox's VM",
        Some(Unit::Bytes),
    );
    let created = o.gauge(
        "bulkhead_sandbox_created_timestamp",
        "When the sandbox was created",
        Some(Unit::Seconds),
    );
    let start = o.gauge(
        "bulkhead_sandbox_start",
        "Time from CreateSandbox to each start step (vmm_exec, components_started, agent_ready)",
        Some(Unit::Seconds),
    );
    let c_up = o.gauge(
        "bulkhead_component_up",
        "1 when the host process of a sandbox component is there",
        None,
    );
    let c_cpu = o.counter(
        "bulkhead_component_cpu",
        "Host CPU time of a component and the processes below it",
        Some(Unit::Seconds),
    );
    let c_rss = o.gauge("bulkhead_component_resident_memory", "Host resident memory of a component and the processes below it (a VMM's includes guest RAM it touched)", Some(Unit::Bytes));
    let k_info = o.gauge(
        "bulkhead_container_info",
        "One series per container, with its state",
        None,
    );
    let stats: Vec<(Stat, G, C)> = container_stats()
        .into_iter()
        .map(|st| {
            let (g, c) = if st.counter {
                (G::default(), o.counter(st.name, st.help, st.unit.clone()))
            } else {
                (o.gauge(st.name, st.help, st.unit.clone()), C::default())
            };
            (st, g, c)
        })
        .collect();
    let net: Vec<C> = NETWORK
        .iter()
        .map(|(_, name, help, bytes)| o.counter(name, help, bytes.then_some(Unit::Bytes)))
        .collect();

    let mut by_state = std::collections::BTreeMap::new();
    for sb in list {
        *by_state
            .entry((sb.backend.as_str(), sb.state.as_str()))
            .or_insert(0.0) += 1.0;
        let id = sb.id.as_str();
        set(
            &info,
            labels([
                ("sandbox", id),
                ("backend", &sb.backend),
                ("state", &sb.state),
            ]),
            1.0,
        );
        set(&vcpus, labels([("sandbox", id)]), sb.cpus.into());
        set(
            &mem,
            labels([("sandbox", id)]),
            f64::from(sb.memory_mib) * MIB,
        );
        set(
            &created,
            labels([("sandbox", id)]),
            sb.created_at_us as f64 / 1e6,
        );
        for (step, us) in &sb.timings {
            set(
                &start,
                labels([("sandbox", id), ("step", step)]),
                *us as f64 / 1e6,
            );
        }
        for c in &sb.components {
            let l = labels([("sandbox", id), ("component", &c.name)]);
            set(&c_up, l.clone(), if c.usage.is_some() { 1.0 } else { 0.0 });
            if let Some(u) = c.usage {
                add(&c_cpu, l.clone(), u.cpu_ms as f64 / 1e3);
                set(&c_rss, l, u.rss_kib as f64 * 1024.0);
            }
        }
        for k in &sb.containers {
            set(
                &k_info,
                labels([("sandbox", id), ("container", &k.id), ("state", &k.state)]),
                1.0,
            );
            for (st, g, c) in &stats {
                let Some(v) = k.stats.get(st.key) else {
                    continue;
                };
                let l = labels([("sandbox", id), ("container", &k.id)]);
                let v = *v as f64 * st.scale;
                if st.counter {
                    add(c, l, v)
                } else {
                    set(g, l, v)
                }
            }
        }
        for (iface, counters) in &sb.network {
            for ((key, ..), f) in NETWORK.iter().zip(&net) {
                if let Some(v) = counters.get(*key) {
                    add(
                        f,
                        labels([("sandbox", id), ("interface", iface)]),
                        *v as f64,
                    );
                }
            }
        }
    }
    for ((backend, state), n) in by_state {
        set(&count, labels([("backend", backend), ("state", state)]), n);
    }
    vms(o, list);
}

fn vms(o: &mut Out, list: &[Sandbox]) {
    let vm_list: Vec<_> = list
        .iter()
        .filter_map(|s| Some((s.id.as_str(), s.vm.as_ref()?)))
        .collect();
    if vm_list.is_empty() {
        return;
    }
    let mem = o.gauge(
        "bulkhead_vm_memory_info",
        "How the VMM backs guest RAM (backing: private|shared; pages: thp|hugetlb-2m|4k)",
        None,
    );
    let phase = o.gauge(
        "bulkhead_vm_start_phase",
        "Time from the VMM's exec to each of its start phases",
        Some(Unit::Seconds),
    );
    let mut figures = |table: &[Figure]| -> Vec<(G, C)> {
        table
            .iter()
            .map(|(_, name, help, scale, counter)| {
                let unit = scale.map(|_| Unit::Bytes);
                if *counter {
                    (G::default(), o.counter(name, help, unit))
                } else {
                    (o.gauge(name, help, unit), C::default())
                }
            })
            .collect()
    };
    let balloon = figures(&BALLOON);
    let hotplug = figures(&HOTPLUG);
    let guest: Vec<(G, C)> = GUEST
        .iter()
        .map(|(_, name, help, bytes, counter)| {
            let unit = bytes.then_some(Unit::Bytes);
            if *counter {
                (G::default(), o.counter(name, help, unit))
            } else {
                (o.gauge(name, help, unit), C::default())
            }
        })
        .collect();
    for (id, vm) in vm_list {
        if !vm.backing.is_empty() {
            set(
                &mem,
                labels([
                    ("sandbox", id),
                    ("backing", &vm.backing),
                    ("pages", &vm.pages),
                ]),
                1.0,
            );
        }
        for (name, secs) in &vm.start_phases {
            set(&phase, labels([("sandbox", id), ("phase", name)]), *secs);
        }
        let tables = [
            (&BALLOON[..], &balloon, &vm.balloon),
            (&HOTPLUG[..], &hotplug, &vm.hotplug),
        ];
        for (table, metrics, got) in tables {
            for ((key, _, _, scale, counter), (g, c)) in table.iter().zip(metrics) {
                let Some(v) = got.get(*key) else {
                    continue;
                };
                let v = *v as f64 * scale.unwrap_or(1.0);
                if *counter {
                    add(c, labels([("sandbox", id)]), v)
                } else {
                    set(g, labels([("sandbox", id)]), v)
                }
            }
        }
        for ((key, _, _, _, counter), (g, c)) in GUEST.iter().zip(&guest) {
            let Some(v) = vm.guest.get(*key) else {
                continue;
            };
            if *counter {
                add(c, labels([("sandbox", id)]), *v as f64)
            } else {
                set(g, labels([("sandbox", id)]), *v as f64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Component, Container, Manager, Vm};
    use bulkhead_proctree::Usage;

    fn sample() -> Snapshot {
        let mut stats = std::collections::BTreeMap::new();
        stats.insert("cpu_usage_usec".to_string(), 2_500_000);
        stats.insert("memory_current".to_string(), 4096);
        let mut net = std::collections::BTreeMap::new();
        net.insert(
            "eth0".to_string(),
            [("rx_bytes".to_string(), 10), ("tx_frames".to_string(), 3)].into(),
        );
        Snapshot {
            manager: Some(Manager {
                version: "0.1.0 \"x\"\nnext\\".into(),
                sandboxes: vec![Sandbox {
                    id: "pod1".into(),
                    backend: "bulkhead-vmm".into(),
                    state: "running".into(),
                    cpus: 2,
                    memory_mib: 512,
                    created_at_us: 1_500_000,
                    timings: [("agent_ready".to_string(), 250_000)].into(),
                    components: vec![
                        Component {
                            name: "vmm".into(),
                            pid: 7,
                            supervisor: 6,
                            usage: Some(Usage {
                                cpu_ms: 1500,
                                rss_kib: 2,
                            }),
                        },
                        Component {
                            name: "virtiofsd".into(),
                            pid: 0,
                            supervisor: 0,
                            usage: None,
                        },
                    ],
                    containers: vec![Container {
                        id: "web".into(),
                        state: "running".into(),
                        stats,
                    }],
                    network: net,
                    vm: Some(Vm {
                        backing: "shared".into(),
                        pages: "thp".into(),
                        start_phases: vec![("kernel_loaded".into(), 0.5)],
                        balloon: [("target_mib".to_string(), 2), ("refused".to_string(), 4)].into(),
                        hotplug: [
                            ("plugged_mib".to_string(), 512),
                            ("plugs".to_string(), 3),
                            ("short_mib".to_string(), 64),
                        ]
                        .into(),
                        guest: [
                            ("free_memory".to_string(), 1000),
                            ("major_faults".to_string(), 9),
                        ]
                        .into(),
                    }),
                }],
            }),
            failed_calls: 0,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn every_figure_under_its_name_and_labels() {
        let x = ExporterFigures {
            scrape_duration: Duration::from_millis(20),
            failed_calls_total: 3,
        };
        let text = render(&sample(), x);
        assert!(text.ends_with("# EOF\n"), "{text}");
        let got = lines(&text);
        for want in [
            "bulkhead_up 1.0",
            "bulkhead_scrape_duration_seconds 0.02",
            "bulkhead_scrape_failed_calls_total 3.0",
            "bulkhead_sandboxes{backend=\"bulkhead-vmm\",state=\"running\"} 1.0",
            "bulkhead_sandbox_info{sandbox=\"pod1\",backend=\"bulkhead-vmm\",state=\"running\"} 1.0",
            "bulkhead_sandbox_vcpus{sandbox=\"pod1\"} 2.0",
            "bulkhead_sandbox_memory_bytes{sandbox=\"pod1\"} 536870912.0",
            "bulkhead_sandbox_created_timestamp_seconds{sandbox=\"pod1\"} 1.5",
            "bulkhead_sandbox_start_seconds{sandbox=\"pod1\",step=\"agent_ready\"} 0.25",
            "bulkhead_component_up{sandbox=\"pod1\",component=\"vmm\"} 1.0",
            "bulkhead_component_up{sandbox=\"pod1\",component=\"virtiofsd\"} 0.0",
            "bulkhead_component_cpu_seconds_total{sandbox=\"pod1\",component=\"vmm\"} 1.5",
            "bulkhead_component_resident_memory_bytes{sandbox=\"pod1\",component=\"vmm\"} 2048.0",
            "bulkhead_container_info{sandbox=\"pod1\",container=\"web\",state=\"running\"} 1.0",
            "bulkhead_container_cpu_usage_seconds_total{sandbox=\"pod1\",container=\"web\"} 2.5",
            "bulkhead_container_memory_usage_bytes{sandbox=\"pod1\",container=\"web\"} 4096.0",
            "bulkhead_network_receive_bytes_total{sandbox=\"pod1\",interface=\"eth0\"} 10.0",
            "bulkhead_network_transmit_frames_total{sandbox=\"pod1\",interface=\"eth0\"} 3.0",
            "bulkhead_vm_memory_info{sandbox=\"pod1\",backing=\"shared\",pages=\"thp\"} 1.0",
            "bulkhead_vm_start_phase_seconds{sandbox=\"pod1\",phase=\"kernel_loaded\"} 0.5",
            "bulkhead_vm_balloon_target_bytes{sandbox=\"pod1\"} 2097152.0",
            "bulkhead_vm_balloon_refused_ranges_total{sandbox=\"pod1\"} 4.0",
            "bulkhead_vm_hotplug_plugged_bytes{sandbox=\"pod1\"} 536870912.0",
            "bulkhead_vm_hotplug_plugs_total{sandbox=\"pod1\"} 3.0",
            "bulkhead_vm_hotplug_short_bytes{sandbox=\"pod1\"} 67108864.0",
            "bulkhead_vm_guest_memory_free_bytes{sandbox=\"pod1\"} 1000.0",
            "bulkhead_vm_guest_major_faults_total{sandbox=\"pod1\"} 9.0",
        ] {
            assert!(got.contains(&want), "missing {want:?} in\n{text}");
        }
        // A statistic the container did not report is absent, not zero.
        assert!(!text.contains("bulkhead_container_pids{"), "{text}");
        // A component that is not running has no CPU or memory series.
        assert!(
            !text.contains("component_cpu_seconds_total{sandbox=\"pod1\",component=\"virtiofsd\"")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&sample(), ExporterFigures::default());
        let line = lines(&text)
            .into_iter()
            .find(|l| l.starts_with("bulkhead_manager_info"))
            .unwrap();
        assert_eq!(
            line,
            r#"bulkhead_manager_info{version="0.1.0 \"x\"\nnext\\"} 1.0"#
        );
    }

    #[test]
    fn a_manager_that_is_down_is_one_line_and_no_sandbox() {
        let text = render(&Snapshot::default(), ExporterFigures::default());
        let got = lines(&text);
        assert!(got.contains(&"bulkhead_up 0.0"), "{text}");
        assert!(!text.contains("bulkhead_sandbox"), "{text}");
    }
}
