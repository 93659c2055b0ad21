//! The CRI `RuntimeService`: validates requests, translates them for [`PodManager`], and
//! translates records back into CRI statuses.
//!
//! This file holds the service's RPC methods; [`requests`] turns CRI requests into the pod
//! manager's specs (refusing what a VM cannot do) and [`statuses`] turns records into CRI
//! statuses, summaries and stats.

mod requests;
mod statuses;

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use podvisor_common::error_chain;
use tonic::{Request, Response, Status};

use super::{invalid, status};
use crate::config::CgroupDriver;
use crate::network;
use crate::pods::{PodManager, readiness};
use crate::state::{ContainerRecord, ContainerState};
use crate::stream::{StreamRequest, StreamServer, TokenError};
use requests::{container_spec, resources, sandbox_spec};
use statuses::{
    container_state, container_status, container_summary, id_matches, labels_match, pod_stats_of,
    sandbox_meta, sandbox_state, sandbox_status, stats_of, verbose_info,
};

/// The runtime name in `Version`.
pub const RUNTIME_NAME: &str = "podvisor";
/// The CRI version served.
pub const RUNTIME_API_VERSION: &str = "v1";

/// The CRI runtime service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CriRuntimeService {
    pods: PodManager,
    streams: StreamServer,
}

impl CriRuntimeService {
    /// Serves `pods`, with `streams` for exec, attach and port-forward sessions.
    pub fn new(pods: PodManager, streams: StreamServer) -> Self {
        Self { pods, streams }
    }

    /// The URL for a validated streaming request.
    fn stream_url(&self, request: StreamRequest) -> Result<String, Status> {
        self.streams.url(request).map_err(|e| match e {
            TokenError::Full => Status::resource_exhausted(e.to_string()),
            TokenError::Random(_) => Status::internal(error_chain(&e)),
        })
    }
}

type Rsp<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> Rsp<T> {
    Ok(Response::new(t))
}

fn unimplemented(what: &str, why: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by podvisor yet: {why}"))
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
        let id = self
            .pods
            .run_sandbox_detached(spec)
            .await
            .map_err(|e| status(&e))?;
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
            timestamp: podvisor_common::now_ns(),
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
            .create_container_detached(&req.pod_sandbox_id, spec)
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

    async fn exec(&self, req: Request<cri::ExecRequest>) -> Rsp<cri::ExecResponse> {
        let req = req.into_inner();
        self.pods
            .check_exec(
                &req.container_id,
                &req.cmd,
                req.tty,
                req.stdin,
                req.stdout,
                req.stderr,
            )
            .map_err(|e| status(&e))?;
        let url = self.stream_url(StreamRequest::Exec(req))?;
        ok(cri::ExecResponse { url })
    }

    async fn attach(&self, req: Request<cri::AttachRequest>) -> Rsp<cri::AttachResponse> {
        let req = req.into_inner();
        self.pods
            .check_attach(
                &req.container_id,
                req.tty,
                req.stdin,
                req.stdout,
                req.stderr,
            )
            .map_err(|e| status(&e))?;
        let url = self.stream_url(StreamRequest::Attach(req))?;
        ok(cri::AttachResponse { url })
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Rsp<cri::PortForwardResponse> {
        let req = req.into_inner();
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(invalid(format!("port forward: invalid port {p}")));
        }
        self.pods
            .check_port_forward(&req.pod_sandbox_id)
            .map_err(|e| status(&e))?;
        let url = self.stream_url(StreamRequest::PortForward(req))?;
        ok(cri::PortForwardResponse { url })
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
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Rsp<cri::PodSandboxStatsResponse> {
        let id = req.into_inner().pod_sandbox_id;
        let record = self.pods.sandbox(&id).map_err(|e| status(&e))?;
        let stats = self.pods.pod_stats(vec![record]).await;
        ok(cri::PodSandboxStatsResponse {
            stats: stats.first().map(pod_stats_of),
        })
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Rsp<cri::ListPodSandboxStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let records = self
            .pods
            .sandboxes()
            .into_iter()
            .filter(|r| id_matches(&r.id, &filter.id))
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .collect();
        let stats = self.pods.pod_stats(records).await;
        ok(cri::ListPodSandboxStatsResponse {
            stats: stats.iter().map(pod_stats_of).collect(),
        })
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Rsp<cri::UpdateRuntimeConfigResponse> {
        // Kubelet sends the node's pod CIDR here. With a CNI config template (containerd's
        // conf_template) it becomes the node's CNI config; otherwise the network add-on's
        // own config carries the CIDR.
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        let cni = &self.pods.config().cni;
        if let (Some(template), false) = (&cni.conf_template, cidr.is_empty()) {
            let (template, conf_dir, c) = (template.clone(), cni.conf_dir.clone(), cidr.clone());
            let written = tokio::task::spawn_blocking(move || {
                network::cni::template::write(&template, &conf_dir, &c)
            })
            .await
            .map_err(|e| Status::internal(format!("CNI template task: {e}")))?;
            match written {
                Ok(path) => {
                    tracing::info!(pod_cidr = %cidr, path = %path.display(), "CNI config written from the template");
                }
                Err(e @ network::cni::template::TemplateError::Cidr(_)) => {
                    return Err(invalid(format!("UpdateRuntimeConfig: {}", error_chain(&e))));
                }
                Err(e) => {
                    return Err(Status::failed_precondition(format!(
                        "UpdateRuntimeConfig: {}",
                        error_chain(&e)
                    )));
                }
            }
        }
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
        // Ready while a pod VM could be launched (KVM, the VMM, kernels and images).
        let runtime = match readiness::check(self.pods.config()) {
            Ok(()) => cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(e) => cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: false,
                reason: "CannotLaunchVMs".into(),
                message: error_chain(&e),
            },
        };
        let conditions = vec![runtime, network];
        // The default handler answers to "" (no RuntimeClass) as well as to its name.
        let runtime_handlers = std::iter::once("")
            .chain(self.pods.config().handler_names())
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
        let cgroup_driver = match self.pods.config().cgroup_driver {
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
        };
        ok(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cgroup_driver as i32,
            }),
        })
    }
}
