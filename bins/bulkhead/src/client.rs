//! Reaching the manager: see `bulkhead-client`, shared with the containerd shim.

pub use bulkhead_client::{explain, state_dir, Client};
