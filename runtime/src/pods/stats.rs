//! Statistics. Containers': the cgroup statistics of running containers, one agent call per
//! sandbox, all at once with a short deadline. Pods': the VMM's host cgroup (every guest
//! cycle and page is the VMM's, so this is what the pod costs the node), its TAP's
//! counters, and its containers'.

use std::collections::HashMap;
use std::time::Duration;

use podvisor_proto::v1 as agent;

use super::PodManager;
use super::agent::call;
use crate::network::tap::DEFAULT_TAP_NAME;
use crate::state::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use crate::vmm::{self, CgroupUsage, NetUsage};

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
    /// Its writable layer's usage, when its VM answered.
    pub writable_layer: Option<agent::FsUsage>,
}

/// One pod's statistics.
#[derive(Debug, Clone)]
pub struct PodStats {
    /// The sandbox.
    pub record: SandboxRecord,
    /// When they were read, ns since the epoch.
    pub timestamp_ns: i64,
    /// The VMM's cgroup (none for a stopped pod or an unreadable cgroup).
    pub usage: Option<CgroupUsage>,
    /// Its TAP, the pod's side (none for a stopped pod).
    pub network: Option<NetUsage>,
    /// Its running containers'.
    pub containers: Vec<ContainerStats>,
}

impl PodManager {
    /// Statistics of the sandboxes `records`, their running containers' included (asked of
    /// every guest at once, as [`PodManager::stats`]).
    pub async fn pod_stats(&self, records: Vec<SandboxRecord>) -> Vec<PodStats> {
        let running: Vec<ContainerRecord> = self
            .containers()
            .into_iter()
            .filter(|c| c.state == ContainerState::Running)
            .filter(|c| records.iter().any(|r| r.id == c.sandbox_id))
            .collect();
        let mut containers: HashMap<String, Vec<ContainerStats>> = HashMap::new();
        for s in self.stats(running).await {
            containers
                .entry(s.record.sandbox_id.clone())
                .or_default()
                .push(s);
        }
        let host = records.into_iter().map(|record| {
            tokio::task::spawn_blocking(move || {
                let (usage, network) = host_usage(&record);
                (record, usage, network)
            })
        });
        let mut out = Vec::new();
        for task in futures::future::join_all(host).await {
            let Ok((record, usage, network)) = task else {
                continue;
            };
            out.push(PodStats {
                containers: containers.remove(&record.id).unwrap_or_default(),
                timestamp_ns: podvisor_common::now_ns(),
                record,
                usage,
                network,
            });
        }
        out
    }

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
        let mut stats: HashMap<String, agent::ContainerStats> = HashMap::new();
        if let (Some(mut client), false) = (client, running.is_empty()) {
            let req = agent::StatsRequest {
                container_ids: running,
            };
            match call("Stats", STATS_TIMEOUT, client.stats(req)).await {
                Ok(resp) => {
                    for cs in resp.containers {
                        stats.insert(cs.container_id.clone(), cs);
                    }
                }
                Err(e) => tracing::warn!(sandbox = %sandbox_id, "stats: {e}"),
            }
        }
        records
            .into_iter()
            .map(|r| {
                let (stats, writable_layer) = stats
                    .remove(&r.agent_container_id)
                    .map_or((None, None), |s| (s.stats, s.writable_layer));
                ContainerStats {
                    stats,
                    writable_layer,
                    record: r,
                }
            })
            .collect()
    }
}

/// A ready sandbox's VMM cgroup and TAP counters (none for a stopped one, or one whose VMM
/// is gone).
fn host_usage(record: &SandboxRecord) -> (Option<CgroupUsage>, Option<NetUsage>) {
    if record.state != SandboxState::Ready || !record.vmm.is_alive() {
        return (None, None);
    }
    let usage = record.vmm.cgroup.as_ref().and_then(|path| {
        vmm::cgroup_usage(path)
            .inspect_err(|e| tracing::warn!(sandbox = %record.id, "cgroup usage: {e}"))
            .ok()
    });
    let network = record.netns.as_ref().and_then(|_| {
        vmm::tap_usage(record.vmm.pid, DEFAULT_TAP_NAME)
            .inspect_err(|e| tracing::warn!(sandbox = %record.id, "TAP counters: {e}"))
            .ok()
            .flatten()
    });
    (usage, network)
}
