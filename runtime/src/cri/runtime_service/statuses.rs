//! Records into CRI: sandbox and container statuses, list summaries, stats, the verbose
//! `info` map, and the list filters (labels, id prefixes).

use std::collections::HashMap;

use k8s_cri::v1 as cri;

use crate::state::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};

pub(super) fn sandbox_state(s: SandboxState) -> i32 {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

pub(super) fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

pub(super) fn sandbox_meta(r: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: r.name.clone(),
        uid: r.uid.clone(),
        namespace: r.namespace.clone(),
        attempt: r.attempt,
    }
}

fn container_meta(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

fn image_spec(r: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: r.image.clone(),
        ..Default::default()
    }
}

pub(super) fn labels_match(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Ids match exactly or, as containerd allows, by a prefix.
pub(super) fn id_matches(id: &str, wanted: &str) -> bool {
    wanted.is_empty() || id.starts_with(wanted)
}

pub(super) fn sandbox_status(r: &SandboxRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: Some(sandbox_meta(r)),
        state: sandbox_state(r.state),
        created_at: r.created_at_ns,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: r.ips.first().cloned().unwrap_or_default(),
            additional_ips: r
                .ips
                .iter()
                .skip(1)
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
            }),
        }),
        labels: r.labels.clone(),
        annotations: r.annotations.clone(),
        runtime_handler: r.runtime_handler.clone(),
    }
}

pub(super) fn container_status(r: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_meta(r)),
        state: container_state(r.state),
        created_at: r.created_at_ns,
        started_at: r.started_at_ns,
        finished_at: r.finished_at_ns,
        exit_code: r.exit_code,
        image: Some(image_spec(r)),
        image_ref: r.image_ref.clone(),
        image_id: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        mounts: r
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.display().to_string(),
                host_path: m.host_path.display().to_string(),
                readonly: m.readonly,
                ..Default::default()
            })
            .collect(),
        log_path: r.log_path.display().to_string(),
        labels: r.labels.clone(),
        annotations: r.annotations.clone(),
        ..Default::default()
    }
}

pub(super) fn container_summary(r: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.sandbox_id.clone(),
        metadata: Some(container_meta(r)),
        image: Some(image_spec(r)),
        image_ref: r.image_ref.clone(),
        state: container_state(r.state),
        created_at: r.created_at_ns,
        labels: r.labels.clone(),
        annotations: r.annotations.clone(),
        image_id: r.image_id.clone(),
    }
}

pub(super) fn verbose_info<T: serde::Serialize>(
    verbose: bool,
    record: &T,
) -> HashMap<String, String> {
    if !verbose {
        return HashMap::new();
    }
    match serde_json::to_string(record) {
        Ok(json) => HashMap::from([("info".to_string(), json)]),
        Err(e) => HashMap::from([("error".to_string(), e.to_string())]),
    }
}

pub(super) fn stats_of(s: &crate::pods::ContainerStats) -> cri::ContainerStats {
    let r = &s.record;
    let u = |value: u64| Some(cri::UInt64Value { value });
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_meta(r)),
            labels: r.labels.clone(),
            annotations: r.annotations.clone(),
        }),
        cpu: s.stats.as_ref().map(|st| cri::CpuUsage {
            timestamp: st.timestamp_unix_nanos,
            usage_core_nano_seconds: u(st.cpu_usage_usec.saturating_mul(1000)),
            usage_nano_cores: None,
        }),
        memory: s.stats.as_ref().map(|st| cri::MemoryUsage {
            timestamp: st.timestamp_unix_nanos,
            working_set_bytes: u(st.memory_working_set_bytes),
            usage_bytes: u(st.memory_usage_bytes),
            rss_bytes: u(st.memory_rss_bytes),
            ..Default::default()
        }),
        // The layer is a tmpfs inside the VM (guest memory, charged to the pod's cgroup),
        // on no host file system: no fs_id, so kubelet does not look one up.
        writable_layer: s.writable_layer.as_ref().map(|w| cri::FilesystemUsage {
            timestamp: s
                .stats
                .as_ref()
                .map_or_else(podvisor_common::now_ns, |st| st.timestamp_unix_nanos),
            fs_id: None,
            used_bytes: u(w.used_bytes),
            inodes_used: u(w.inodes_used),
        }),
        swap: s.stats.as_ref().and_then(|st| {
            Some(cri::SwapUsage {
                timestamp: st.timestamp_unix_nanos,
                swap_usage_bytes: u(st.swap_usage_bytes?),
                swap_available_bytes: st.swap_available_bytes.and_then(u),
            })
        }),
    }
}

/// A pod's statistics for kubelet: the VMM's host cgroup as the pod's CPU and memory, its
/// TAP as the pod's `eth0`, and its running containers'.
pub(super) fn pod_stats_of(s: &crate::pods::PodStats) -> cri::PodSandboxStats {
    let r = &s.record;
    let u = |value: u64| Some(cri::UInt64Value { value });
    let ts = s.timestamp_ns;
    let usage = s.usage.unwrap_or_default();
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: r.id.clone(),
            metadata: Some(sandbox_meta(r)),
            labels: r.labels.clone(),
            annotations: r.annotations.clone(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: usage.cpu_ns.map(|ns| cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u(ns),
                usage_nano_cores: None,
            }),
            memory: usage.memory_bytes.map(|bytes| cri::MemoryUsage {
                timestamp: ts,
                usage_bytes: u(bytes),
                working_set_bytes: usage.working_set_bytes.and_then(u),
                rss_bytes: usage.rss_bytes.and_then(u),
                ..Default::default()
            }),
            network: s.network.map(|n| {
                let eth0 = cri::NetworkInterfaceUsage {
                    name: "eth0".into(),
                    rx_bytes: u(n.rx_bytes),
                    rx_errors: u(n.rx_errors),
                    tx_bytes: u(n.tx_bytes),
                    tx_errors: u(n.tx_errors),
                };
                cri::NetworkUsage {
                    timestamp: ts,
                    default_interface: Some(eth0.clone()),
                    interfaces: vec![eth0],
                }
            }),
            process: usage.pids.map(|pids| cri::ProcessUsage {
                timestamp: ts,
                process_count: u(pids),
            }),
            containers: s.containers.iter().map(stats_of).collect(),
        }),
        windows: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let sel = HashMap::from([("app".to_string(), "web".to_string())]);
        let labels = HashMap::from([
            ("app".to_string(), "web".to_string()),
            ("x".to_string(), "y".to_string()),
        ]);
        assert!(labels_match(&labels, &sel));
        assert!(!labels_match(&HashMap::new(), &sel));
        assert!(labels_match(&HashMap::new(), &HashMap::new()));
        assert!(id_matches("abcdef", "abc"));
        assert!(id_matches("abcdef", ""));
        assert!(!id_matches("abcdef", "abd"));
    }
}
