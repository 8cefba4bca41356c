//! One VM per pod: how a container's OCI spec is made to fit the guest when it joins a
//! pod. Namespace paths in a spec name the caller's host (`/proc/<pid>/ns/...`, a CNI
//! netns file); inside the VM they mean nothing, so they are rewritten to the pod's own
//! namespaces, which the guest agent holds for the sandbox's lifetime.

use serde_json::{json, Value};

/// Where the guest agent keeps the pod's shared namespaces.
pub const POD_NS_DIR: &str = "/run/bulkhead/pod/ns";

/// Namespaces a pod's containers share (the agent holds one of each per sandbox).
const POD_SHARED: [&str; 2] = ["uts", "ipc"];

/// A container joining an existing sandbox shares the pod's UTS and IPC namespaces (its
/// hostname included): each becomes a join of the pod's, and the spec's own hostname is
/// dropped (the pod's is set when the sandbox is created).
pub fn join_pod_namespaces(spec: &mut Value) {
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        for ns in list.iter_mut() {
            if let Some(t) = ns["type"].as_str().filter(|t| POD_SHARED.contains(t)) {
                ns["path"] = json!(format!("{POD_NS_DIR}/{t}"));
            }
        }
    }
    if let Some(o) = spec.as_object_mut() {
        o.remove("hostname");
    }
}

/// The host network namespace the spec names (a CNI or netavark netns file,
/// `/proc/<pid>/ns/net`): the pod's network, which bulkheadd mirrors into the VM.
pub fn network_namespace(spec: &Value) -> Option<String> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

/// Make a spec written for the host (containerd, CRI) fit the guest: a `network`
/// namespace that names a host path is dropped (the VM is the pod's network boundary,
/// and every container in it shares the guest's network), and any other namespace that
/// names a host path either joins the pod's (`uts`, `ipc`) or gets a fresh one.
pub fn host_paths_to_guest(spec: &mut Value) {
    let Some(list) = spec["linux"]["namespaces"].as_array_mut() else {
        return;
    };
    list.retain(|ns| !(ns["type"] == "network" && ns.get("path").is_some()));
    for ns in list.iter_mut() {
        let Some(t) = ns["type"].as_str().map(str::to_owned) else {
            continue;
        };
        if ns.get("path").is_none() {
            continue;
        }
        if POD_SHARED.contains(&t.as_str()) {
            ns["path"] = json!(format!("{POD_NS_DIR}/{t}"));
        } else if let Some(o) = ns.as_object_mut() {
            o.remove("path");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_rewrites_uts_and_ipc_and_drops_hostname() {
        let mut s = json!({"hostname": "x", "linux": {"namespaces": [
            {"type": "uts"}, {"type": "ipc"}, {"type": "pid"}, {"type": "mount"}]}});
        join_pod_namespaces(&mut s);
        assert!(s.get("hostname").is_none());
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns[0]["path"], "/run/bulkhead/pod/ns/uts");
        assert_eq!(ns[1]["path"], "/run/bulkhead/pod/ns/ipc");
        assert!(ns[2].get("path").is_none() && ns[3].get("path").is_none());
    }

    #[test]
    fn host_paths_never_reach_the_guest() {
        // What CRI writes for a container of a pod whose sandbox is host pid 4242.
        let mut s = json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "cgroup", "path": "/proc/4242/ns/cgroup"}]}});
        assert_eq!(
            network_namespace(&s).as_deref(),
            Some("/var/run/netns/cni-1234")
        );
        host_paths_to_guest(&mut s);
        assert_eq!(network_namespace(&s), None);
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        let types: Vec<_> = ns.iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["pid", "ipc", "uts", "mount", "cgroup"]);
        assert_eq!(ns[1]["path"], "/run/bulkhead/pod/ns/ipc");
        assert_eq!(ns[2]["path"], "/run/bulkhead/pod/ns/uts");
        assert!(ns[4].get("path").is_none());
        // A network namespace without a path (a fresh one) is the spec's own choice.
        let mut s = json!({"linux": {"namespaces": [{"type": "network"}]}});
        host_paths_to_guest(&mut s);
        assert_eq!(s["linux"]["namespaces"].as_array().unwrap().len(), 1);
    }
}
