//! A container's cgroup: resource updates, its processes and its statistics.

use std::path::PathBuf;

use bulkhead_protocol::{AgentError, ContainerStats};
use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use oci_spec::runtime::LinuxResources;

use super::{runtime_err, Runtime};

impl Runtime {
    fn cgroup(&self, id: &str) -> Result<AnyCgroupManager, AgentError> {
        self.get_init(id)?;
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: PathBuf::from(Self::cgroup_rel(id)),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(runtime_err)
    }

    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), AgentError> {
        let res: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI resources: {e}")))?;
        let m = self.cgroup(id)?;
        m.apply(&ControllerOpt {
            resources: &res,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(runtime_err)
    }

    pub fn processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let m = self.cgroup(id)?;
        let mut pids: Vec<u32> = m
            .get_all_pids()
            .map_err(runtime_err)?
            .into_iter()
            .map(|p| p.as_raw() as u32)
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStats, AgentError> {
        self.get_init(id)?;
        Ok(crate::cgroupfs::stats(&Self::cgroup_dir(id)))
    }
}
