//! Container statistics: the cgroup statistics of running containers, one agent call per
//! sandbox, all at once with a short deadline.

use std::collections::HashMap;
use std::time::Duration;

use podvisor_proto::v1 as agent;

use super::PodManager;
use super::agent::call;
use crate::state::{ContainerRecord, ContainerState};

/// How long one sandbox's agent may take to answer a statistics call. Kubelet asks for the
/// node's statistics every few seconds; a guest that does not answer (stopped, wedged or
/// hostile) must not hold them up.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// One container's statistics.
#[derive(Debug, Clone)]
pub struct ContainerStats {
    /// The container.
    pub record: ContainerRecord,
    /// Its cgroup statistics, when its VM answered.
    pub stats: Option<agent::CgroupStats>,
}

impl PodManager {
    /// Statistics of the containers `records` that run; others get none. Every sandbox's
    /// agent is asked at once, each with [`STATS_TIMEOUT`]: a silent guest costs the call
    /// that long at most, and its containers get no statistics.
    pub async fn stats(&self, records: Vec<ContainerRecord>) -> Vec<ContainerStats> {
        let mut by_sandbox: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for r in records {
            by_sandbox.entry(r.sandbox_id.clone()).or_default().push(r);
        }
        let asks = by_sandbox
            .into_iter()
            .map(|(sandbox_id, records)| self.sandbox_stats(sandbox_id, records));
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// One sandbox's part of [`PodManager::stats`].
    async fn sandbox_stats(
        &self,
        sandbox_id: String,
        records: Vec<ContainerRecord>,
    ) -> Vec<ContainerStats> {
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
            match call("Stats", STATS_TIMEOUT, client.stats(req)).await {
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
        records
            .into_iter()
            .map(|r| ContainerStats {
                stats: stats.remove(&r.agent_container_id),
                record: r,
            })
            .collect()
    }
}
