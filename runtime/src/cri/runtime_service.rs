//! The CRI `RuntimeService`: validates requests, translates them for [`PodManager`], and
//! translates records back into CRI statuses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use super::{error_chain, invalid, status};
use crate::pods::network;
use crate::pods::process::UserSpec;
use crate::pods::{ContainerSpec, MountSpec, NamespaceMode, PodManager, Resources, SandboxSpec};
use crate::state::{
    ContainerRecord, ContainerState, DnsConfig, PortMapping, Protocol, SandboxRecord, SandboxState,
};

/// The runtime name in `Version`.
pub const RUNTIME_NAME: &str = "podvisor";
/// The CRI version served.
pub const RUNTIME_API_VERSION: &str = "v1";

/// The CRI runtime service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CriRuntimeService {
    pods: PodManager,
}

impl CriRuntimeService {
    /// Serves `pods`.
    pub fn new(pods: PodManager) -> Self {
        Self { pods }
    }
}

type Rsp<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> Rsp<T> {
    Ok(Response::new(t))
}

fn unimplemented(what: &str, why: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by podvisor yet: {why}"))
}

const NO_STREAMING: &str = "it needs a streaming server (SPDY/WebSocket) podvisord does not have";

/// Refuses a namespace shared with the host: a VM cannot share the host's.
fn refuse_node_namespaces(ns: &cri::NamespaceOption) -> Result<(), Status> {
    let node = cri::NamespaceMode::Node as i32;
    for (mode, what) in [(ns.network, "network"), (ns.pid, "PID"), (ns.ipc, "IPC")] {
        if mode == node {
            return Err(invalid(format!(
                "a VM cannot share the host's {what} namespace (host{} pods are not supported by \
                 podvisor)",
                match what {
                    "network" => "Network",
                    "PID" => "PID",
                    _ => "IPC",
                }
            )));
        }
    }
    if ns.userns_options.as_ref().is_some_and(|u| u.mode == node) {
        // User namespaces: NODE is the default and the only mode podvisor runs.
    }
    Ok(())
}

fn sandbox_spec(req: cri::RunPodSandboxRequest) -> Result<SandboxSpec, Status> {
    let config = req
        .config
        .ok_or_else(|| invalid("RunPodSandbox: config is missing"))?;
    let meta = config
        .metadata
        .ok_or_else(|| invalid("RunPodSandbox: metadata is missing"))?;
    for (value, what) in [
        (&meta.name, "name"),
        (&meta.namespace, "namespace"),
        (&meta.uid, "uid"),
    ] {
        if value.is_empty() {
            return Err(invalid(format!("RunPodSandbox: metadata.{what} is empty")));
        }
    }
    let linux = config.linux.unwrap_or_default();
    if let Some(sc) = &linux.security_context {
        if let Some(ns) = &sc.namespace_options {
            refuse_node_namespaces(ns)?;
        }
        if sc.privileged {
            return Err(invalid(
                "privileged pods are not supported: a VM runtime does not hand out the host's \
                 devices",
            ));
        }
    }
    let port_mappings = config
        .port_mappings
        .iter()
        .map(|p| {
            let protocol = match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Tcp) => Protocol::Tcp,
                Ok(cri::Protocol::Udp) => Protocol::Udp,
                Ok(cri::Protocol::Sctp) => Protocol::Sctp,
                Err(_) => return Err(invalid(format!("unknown port protocol {}", p.protocol))),
            };
            Ok(PortMapping {
                protocol,
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip.clone(),
            })
        })
        .collect::<Result<_, Status>>()?;
    let dns = config.dns_config.unwrap_or_default();
    Ok(SandboxSpec {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        attempt: meta.attempt,
        labels: config.labels,
        annotations: config.annotations,
        runtime_handler: req.runtime_handler,
        hostname: config.hostname,
        log_directory: PathBuf::from(config.log_directory),
        dns: DnsConfig {
            servers: dns.servers,
            searches: dns.searches,
            options: dns.options,
        },
        port_mappings,
        sysctls: linux.sysctls,
    })
}

fn resources(r: &cri::LinuxContainerResources) -> Result<Resources, Status> {
    let non_negative = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| invalid(format!("resources: {what} {v} is negative")))
    };
    if r.memory_limit_in_bytes < 0 || r.cpu_quota < -1 {
        return Err(invalid("resources: negative memory limit or CPU quota"));
    }
    Ok(Resources {
        cpu_shares: non_negative(r.cpu_shares, "cpu_shares")?,
        // -1 is "no limit" in CRI; the agent's 0.
        cpu_quota: r.cpu_quota.max(0),
        cpu_period: non_negative(r.cpu_period, "cpu_period")?,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        memory_limit_bytes: r.memory_limit_in_bytes,
        pids_limit: 0,
    })
}

fn id_u32(v: i64, what: &str) -> Result<u32, Status> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} {v} is not a valid id")))
}

fn container_spec(config: cri::ContainerConfig) -> Result<ContainerSpec, Status> {
    let meta = config
        .metadata
        .ok_or_else(|| invalid("CreateContainer: metadata is missing"))?;
    if meta.name.is_empty() {
        return Err(invalid("CreateContainer: metadata.name is empty"));
    }
    let image = config
        .image
        .map(|i| i.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| invalid("CreateContainer: image is missing"))?;
    if !config.devices.is_empty() || !config.cdi_devices.is_empty() {
        return Err(invalid(
            "devices are not supported: a VM runtime does not hand out the host's devices",
        ));
    }
    let mut mounts = Vec::new();
    for m in config.mounts {
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(invalid(format!(
                "mount {}: image volumes are not supported",
                m.container_path
            )));
        }
        if m.propagation == cri::MountPropagation::PropagationBidirectional as i32 {
            return Err(invalid(format!(
                "mount {}: bidirectional propagation cannot cross a VM boundary",
                m.container_path
            )));
        }
        if !m.container_path.starts_with('/') {
            return Err(invalid(format!(
                "mount container path {:?} is not absolute",
                m.container_path
            )));
        }
        mounts.push(MountSpec {
            container_path: m.container_path,
            host_path: PathBuf::from(m.host_path),
            readonly: m.readonly,
        });
    }
    let linux = config.linux.unwrap_or_default();
    let sc = linux.security_context.unwrap_or_default();
    if sc.privileged {
        return Err(invalid(
            "privileged containers are not supported: a VM runtime does not hand out the host's \
             devices",
        ));
    }
    let ns = sc.namespace_options.clone().unwrap_or_default();
    refuse_node_namespaces(&ns)?;
    let mode = |v: i32, what: &str| match cri::NamespaceMode::try_from(v) {
        Ok(cri::NamespaceMode::Pod) => Ok(NamespaceMode::Pod),
        Ok(cri::NamespaceMode::Container) => Ok(NamespaceMode::Container),
        Ok(cri::NamespaceMode::Target) => Err(invalid(format!(
            "targeting another container's {what} namespace is not supported"
        ))),
        _ => Err(invalid(format!("unknown {what} namespace mode {v}"))),
    };
    let caps = sc.capabilities.clone().unwrap_or_default();
    let user = UserSpec {
        uid: sc
            .run_as_user
            .as_ref()
            .map(|v| id_u32(v.value, "run_as_user"))
            .transpose()?,
        gid: sc
            .run_as_group
            .as_ref()
            .map(|v| id_u32(v.value, "run_as_group"))
            .transpose()?,
        username: sc.run_as_username.clone(),
        supplemental_groups: sc
            .supplemental_groups
            .iter()
            .map(|g| id_u32(*g, "supplemental group"))
            .collect::<Result<_, _>>()?,
    };
    Ok(ContainerSpec {
        name: meta.name,
        attempt: meta.attempt,
        labels: config.labels,
        annotations: config.annotations,
        image,
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        envs: config
            .envs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect(),
        mounts,
        log_path: config.log_path,
        tty: config.tty,
        user,
        cap_add: caps.add_capabilities,
        cap_drop: caps.drop_capabilities,
        no_new_privs: sc.no_new_privs,
        readonly_rootfs: sc.readonly_rootfs,
        masked_paths: sc.masked_paths,
        readonly_paths: sc.readonly_paths,
        pid_namespace: mode(ns.pid, "PID")?,
        ipc_namespace: mode(ns.ipc, "IPC")?,
        resources: linux
            .resources
            .as_ref()
            .map(resources)
            .transpose()?
            .unwrap_or_default(),
    })
}

fn sandbox_state(s: SandboxState) -> i32 {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

fn sandbox_meta(r: &SandboxRecord) -> cri::PodSandboxMetadata {
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

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Ids match exactly or, as containerd allows, by a prefix.
fn id_matches(id: &str, wanted: &str) -> bool {
    wanted.is_empty() || id.starts_with(wanted)
}

fn sandbox_status(r: &SandboxRecord) -> cri::PodSandboxStatus {
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

fn container_status(r: &ContainerRecord) -> cri::ContainerStatus {
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

fn container_summary(r: &ContainerRecord) -> cri::Container {
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

fn verbose_info<T: serde::Serialize>(verbose: bool, record: &T) -> HashMap<String, String> {
    if !verbose {
        return HashMap::new();
    }
    match serde_json::to_string(record) {
        Ok(json) => HashMap::from([("info".to_string(), json)]),
        Err(e) => HashMap::from([("error".to_string(), e.to_string())]),
    }
}

fn stats_of(s: &crate::pods::ContainerStats) -> cri::ContainerStats {
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
        writable_layer: None,
        swap: None,
    }
}

#[tonic::async_trait]
impl RuntimeService for CriRuntimeService {
    async fn version(&self, _: Request<cri::VersionRequest>) -> Rsp<cri::VersionResponse> {
        ok(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        })
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Rsp<cri::RunPodSandboxResponse> {
        let spec = sandbox_spec(req.into_inner())?;
        self.pods
            .config()
            .handler(&spec.runtime_handler)
            .map_err(|e| invalid(e.to_string()))?;
        let id = self.pods.run_sandbox(spec).await.map_err(|e| status(&e))?;
        ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Rsp<cri::StopPodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        self.pods.stop_sandbox(&id).await.map_err(|e| status(&e))?;
        ok(cri::StopPodSandboxResponse {})
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Rsp<cri::RemovePodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        self.pods
            .remove_sandbox(&id)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::RemovePodSandboxResponse {})
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Rsp<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let r = self
            .pods
            .sandbox(&req.pod_sandbox_id)
            .map_err(|e| status(&e))?;
        let containers_statuses = self
            .pods
            .containers()
            .iter()
            .filter(|c| c.sandbox_id == r.id)
            .map(container_status)
            .collect();
        ok(cri::PodSandboxStatusResponse {
            status: Some(sandbox_status(&r)),
            info: verbose_info(req.verbose, &r),
            containers_statuses,
            timestamp: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        })
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Rsp<cri::ListPodSandboxResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let items = self
            .pods
            .sandboxes()
            .into_iter()
            .filter(|r| id_matches(&r.id, &filter.id))
            .filter(|r| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == sandbox_state(r.state))
            })
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .map(|r| cri::PodSandbox {
                id: r.id.clone(),
                metadata: Some(sandbox_meta(&r)),
                state: sandbox_state(r.state),
                created_at: r.created_at_ns,
                labels: r.labels.clone(),
                annotations: r.annotations.clone(),
                runtime_handler: r.runtime_handler.clone(),
            })
            .collect();
        ok(cri::ListPodSandboxResponse { items })
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Rsp<cri::CreateContainerResponse> {
        let req = req.into_inner();
        if req.pod_sandbox_id.is_empty() {
            return Err(invalid("CreateContainer: pod_sandbox_id is empty"));
        }
        let config = req
            .config
            .ok_or_else(|| invalid("CreateContainer: config is missing"))?;
        let spec = container_spec(config)?;
        let id = self
            .pods
            .create_container(&req.pod_sandbox_id, spec)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::CreateContainerResponse { container_id: id })
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Rsp<cri::StartContainerResponse> {
        let id = req.into_inner().container_id;
        self.pods
            .start_container(&id)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::StartContainerResponse {})
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Rsp<cri::StopContainerResponse> {
        let req = req.into_inner();
        let timeout = Duration::from_secs(u64::try_from(req.timeout).unwrap_or(0));
        self.pods
            .stop_container(&req.container_id, timeout)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::StopContainerResponse {})
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Rsp<cri::RemoveContainerResponse> {
        let id = req.into_inner().container_id;
        self.pods
            .remove_container(&id)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::RemoveContainerResponse {})
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Rsp<cri::ListContainersResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let containers = self
            .pods
            .containers()
            .iter()
            .filter(|r| id_matches(&r.id, &filter.id))
            .filter(|r| id_matches(&r.sandbox_id, &filter.pod_sandbox_id))
            .filter(|r| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == container_state(r.state))
            })
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .map(container_summary)
            .collect();
        ok(cri::ListContainersResponse { containers })
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Rsp<cri::ContainerStatusResponse> {
        let req = req.into_inner();
        let r = self
            .pods
            .container(&req.container_id)
            .map_err(|e| status(&e))?;
        ok(cri::ContainerStatusResponse {
            status: Some(container_status(&r)),
            info: verbose_info(req.verbose, &r),
        })
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Rsp<cri::UpdateContainerResourcesResponse> {
        let req = req.into_inner();
        let linux = req
            .linux
            .ok_or_else(|| invalid("UpdateContainerResources: linux resources are missing"))?;
        self.pods
            .update_resources(&req.container_id, resources(&linux)?)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::UpdateContainerResourcesResponse {})
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Rsp<cri::ReopenContainerLogResponse> {
        let id = req.into_inner().container_id;
        self.pods.reopen_log(&id).map_err(|e| status(&e))?;
        ok(cri::ReopenContainerLogResponse {})
    }

    async fn exec_sync(&self, req: Request<cri::ExecSyncRequest>) -> Rsp<cri::ExecSyncResponse> {
        let req = req.into_inner();
        let timeout = u64::try_from(req.timeout)
            .ok()
            .filter(|t| *t > 0)
            .map(Duration::from_secs);
        let out = self
            .pods
            .exec_sync(&req.container_id, req.cmd, timeout)
            .await
            .map_err(|e| status(&e))?;
        ok(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        })
    }

    async fn exec(&self, _: Request<cri::ExecRequest>) -> Rsp<cri::ExecResponse> {
        Err(unimplemented("Exec", NO_STREAMING))
    }

    async fn attach(&self, _: Request<cri::AttachRequest>) -> Rsp<cri::AttachResponse> {
        Err(unimplemented("Attach", NO_STREAMING))
    }

    async fn port_forward(
        &self,
        _: Request<cri::PortForwardRequest>,
    ) -> Rsp<cri::PortForwardResponse> {
        Err(unimplemented(
            "PortForward",
            "it needs pod networking and a streaming server",
        ))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Rsp<cri::ContainerStatsResponse> {
        let id = req.into_inner().container_id;
        let r = self.pods.container(&id).map_err(|e| status(&e))?;
        let stats = self.pods.stats(vec![r]).await;
        ok(cri::ContainerStatsResponse {
            stats: stats.first().map(stats_of),
        })
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Rsp<cri::ListContainerStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let records: Vec<ContainerRecord> = self
            .pods
            .containers()
            .into_iter()
            .filter(|r| id_matches(&r.id, &filter.id))
            .filter(|r| id_matches(&r.sandbox_id, &filter.pod_sandbox_id))
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .filter(|r| r.state == ContainerState::Running)
            .collect();
        let stats = self.pods.stats(records).await;
        ok(cri::ListContainerStatsResponse {
            stats: stats.iter().map(stats_of).collect(),
        })
    }

    async fn pod_sandbox_stats(
        &self,
        _: Request<cri::PodSandboxStatsRequest>,
    ) -> Rsp<cri::PodSandboxStatsResponse> {
        Err(unimplemented(
            "PodSandboxStats",
            "pod-level statistics come later",
        ))
    }

    async fn list_pod_sandbox_stats(
        &self,
        _: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Rsp<cri::ListPodSandboxStatsResponse> {
        Err(unimplemented(
            "ListPodSandboxStats",
            "pod-level statistics come later",
        ))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Rsp<cri::UpdateRuntimeConfigResponse> {
        // kubelet sends the pod CIDR here; it matters once pods have networking (issue 5).
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "UpdateRuntimeConfig accepted");
        ok(cri::UpdateRuntimeConfigResponse {})
    }

    async fn status(&self, req: Request<cri::StatusRequest>) -> Rsp<cri::StatusResponse> {
        let verbose = req.into_inner().verbose;
        // Ready while a valid CNI config with installed plugins is there (read each time:
        // the config directory is usually filled by a network add-on after we start).
        let network = match network::load(&self.pods.config().cni) {
            Ok(_) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(e) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: error_chain(&e),
            },
        };
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            network,
        ];
        let runtime_handlers = self
            .pods
            .config()
            .handler_names()
            .into_iter()
            .map(|name| cri::RuntimeHandler {
                name: name.to_string(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        let info = if verbose {
            HashMap::from([("config".to_string(), format!("{:?}", self.pods.config()))])
        } else {
            HashMap::new()
        };
        ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            runtime_handlers,
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
            info,
        })
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Rsp<cri::CheckpointContainerResponse> {
        Err(unimplemented(
            "CheckpointContainer",
            "no checkpoint support",
        ))
    }

    type GetContainerEventsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>,
    >;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Rsp<Self::GetContainerEventsStream> {
        Err(unimplemented(
            "GetContainerEvents",
            "kubelet's evented PLEG is not supported; it polls instead",
        ))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Rsp<cri::ListMetricDescriptorsResponse> {
        Err(unimplemented("ListMetricDescriptors", "no CRI metrics"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Rsp<cri::ListPodSandboxMetricsResponse> {
        Err(unimplemented("ListPodSandboxMetrics", "no CRI metrics"))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Rsp<cri::RuntimeConfigResponse> {
        ok(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ns: &str, uid: &str) -> cri::RunPodSandboxRequest {
        cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    namespace: ns.into(),
                    uid: uid.into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        }
    }

    #[test]
    fn sandbox_metadata_is_required() {
        assert!(sandbox_spec(pod("a", "b", "c")).is_ok());
        for (req, what) in [
            (pod("", "b", "c"), "name"),
            (pod("a", "", "c"), "namespace"),
            (pod("a", "b", ""), "uid"),
        ] {
            let e = sandbox_spec(req).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(what), "{}", e.message());
        }
        let e = sandbox_spec(cri::RunPodSandboxRequest::default()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn host_namespaces_are_refused() {
        for (ns, what) in [
            (
                cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                },
                "network",
            ),
            (
                cri::NamespaceOption {
                    pid: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                },
                "PID",
            ),
            (
                cri::NamespaceOption {
                    ipc: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                },
                "IPC",
            ),
        ] {
            let mut req = pod("a", "b", "c");
            if let Some(c) = req.config.as_mut() {
                c.linux = Some(cri::LinuxPodSandboxConfig {
                    security_context: Some(cri::LinuxSandboxSecurityContext {
                        namespace_options: Some(ns),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            let e = sandbox_spec(req).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message()
                    .contains(&format!("a VM cannot share the host's {what} namespace")),
                "{}",
                e.message()
            );
        }
    }

    fn container(name: &str) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn container_requests_are_validated() {
        let spec = container_spec(container("c")).unwrap();
        assert_eq!(spec.pid_namespace, NamespaceMode::Pod);
        assert_eq!(spec.image, "busybox");
        assert!(container_spec(container("")).is_err());

        let mut c = container("c");
        c.devices.push(cri::Device {
            container_path: "/dev/x".into(),
            host_path: "/dev/x".into(),
            permissions: "rwm".into(),
        });
        assert_eq!(
            container_spec(c).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        let mut c = container("c");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = container_spec(c).unwrap_err();
        assert!(e.message().contains("privileged"), "{}", e.message());

        let mut c = container("c");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                ..Default::default()
            }),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_quota: -1,
                ..Default::default()
            }),
        });
        let spec = container_spec(c).unwrap();
        assert_eq!(spec.pid_namespace, NamespaceMode::Container);
        assert_eq!(spec.user.uid, Some(1000));
        assert_eq!(spec.resources.memory_limit_bytes, 64 << 20);
        assert_eq!(spec.resources.cpu_quota, 0);
    }

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
