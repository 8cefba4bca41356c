//! The containerd shim v2 for bulkhead. containerd starts one shim per pod (CRI) or per
//! container (`ctr run`); the shim serves containerd's task API over ttrpc and carries
//! every call to bulkheadd over D-Bus: the pod's VM is a sandbox, each task a container
//! in it. Stdio moves between containerd's fifos and the streams bulkheadd hands out
//! (`Sandbox1.Attach`), which run straight to the guest.
//!
//! - `pod.rs`: which sandbox a task belongs to, and how big the pod's VM is;
//! - `task.rs`: the task service (create, start, exec, kill, wait, delete, ...);
//! - `process.rs`: one process (a container's init or an exec) and its exit;
//! - `io.rs`: containerd's fifos;
//! - `metrics.rs`: guest cgroup figures in the shape `ctr task metrics` decodes;
//! - `shim.rs`: start (one shim per pod) and delete (cleanup after a shim died).

pub mod io;
pub mod metrics;
pub mod pod;
pub mod process;
pub mod shim;
pub mod task;

/// The runtime name containerd knows us by.
pub const RUNTIME: &str = "io.containerd.bulkhead.v2";

pub fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(containerd_shim::asynchronous::run::<shim::BulkheadShim>(
        RUNTIME, None,
    ));
}
