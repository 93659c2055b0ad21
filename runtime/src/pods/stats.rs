//! Container statistics: the cgroup statistics of running containers, one agent call per
//! sandbox.

use std::collections::HashMap;

use podvisor_proto::v1 as agent;

use super::PodManager;
use super::agent::{AGENT_CALL_TIMEOUT, call};
use crate::state::{ContainerRecord, ContainerState};

/// One container's statistics.
#[derive(Debug, Clone)]
pub struct ContainerStats {
    /// The container.
    pub record: ContainerRecord,
    /// Its cgroup statistics, when its VM answered.
    pub stats: Option<agent::CgroupStats>,
}

impl PodManager {
    /// Statistics of the containers `ids` (all when empty) that run; others get none.
    pub async fn stats(&self, records: Vec<ContainerRecord>) -> Vec<ContainerStats> {
        let mut by_sandbox: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for r in records {
            by_sandbox.entry(r.sandbox_id.clone()).or_default().push(r);
        }
        let mut out = Vec::new();
        for (sandbox_id, records) in by_sandbox {
            let client = self.sandbox_arc(&sandbox_id).and_then(|sb| sb.agent().ok());
            let running: Vec<String> = records
                .iter()
                .filter(|r| r.state == ContainerState::Running)
                .map(|r| r.agent_container_id.clone())
                .collect();
            let mut stats: HashMap<String, agent::CgroupStats> = HashMap::new();
            if let (Some(mut client), false) = (client, running.is_empty()) {
                let req = agent::StatsRequest {
                    container_ids: running,
                };
                match call("Stats", AGENT_CALL_TIMEOUT, client.stats(req)).await {
                    Ok(resp) => {
                        for cs in resp.containers {
                            if let Some(s) = cs.stats {
                                stats.insert(cs.container_id, s);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(sandbox = %sandbox_id, "stats: {e}"),
                }
            }
            out.extend(records.into_iter().map(|r| ContainerStats {
                stats: stats.remove(&r.agent_container_id),
                record: r,
            }));
        }
        out
    }
}
