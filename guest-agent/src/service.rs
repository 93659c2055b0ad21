//! The gRPC service: request validation and mapping of errors to tonic Status codes. The work is
//! done in [`crate::container`], [`crate::sandbox`] and [`crate::files`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use podvisor_proto::v1::{self, *};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::paths::Paths;
use crate::reaper::Reaper;
use crate::sandbox::SandboxFiles;

use podvisor_common::error_chain;

/// Agent state shared by all RPCs.
pub struct AgentService {
    started: Instant,
    pid1: bool,
    paths: Paths,
    sandbox_files: SandboxFiles,
    manager: Arc<crate::container::Manager>,
    port_forwards: crate::portforward::PortForwards,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("pid1", &self.pid1)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl AgentService {
    /// `pid1`: the agent is the guest's init and may change kernel-wide state (hostname,
    /// sysctls, power-off).
    pub fn new(paths: Paths, reaper: Reaper, pid1: bool) -> Self {
        let sandbox_files = SandboxFiles::new(&paths.sandbox());
        let manager = Arc::new(crate::container::Manager::new(
            paths.clone(),
            sandbox_files.clone(),
            reaper,
        ));
        Self {
            started: Instant::now(),
            pid1,
            paths,
            sandbox_files,
            manager,
            port_forwards: crate::portforward::PortForwards::default(),
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn uptime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or_default()
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::agent_server::Agent for AgentService {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let _ = self.started;
        Ok(Response::new(PingResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ns: uptime_ns(),
            boot_id: boot_id(),
        }))
    }

    async fn setup_sandbox(
        &self,
        req: Request<SetupSandboxRequest>,
    ) -> Result<Response<SetupSandboxResponse>, Status> {
        let req = req.into_inner();
        crate::sandbox::setup(&self.sandbox_files, &req, self.pid1).map_err(|e| {
            let msg = format!("setup sandbox: {}", error_chain(&e));
            if e.is_invalid_argument() {
                Status::invalid_argument(msg)
            } else {
                Status::internal(msg)
            }
        })?;
        self.manager.set_sandbox_id(&req.sandbox_id)?;
        tracing::info!(sandbox = %req.sandbox_id, hostname = %req.hostname, "sandbox set up");
        Ok(Response::new(SetupSandboxResponse {}))
    }

    async fn configure_network(
        &self,
        req: Request<ConfigureNetworkRequest>,
    ) -> Result<Response<ConfigureNetworkResponse>, Status> {
        if !self.pid1 {
            return Err(Status::failed_precondition(
                "the agent is not PID 1: refusing to reconfigure this machine's network",
            ));
        }
        crate::network::configure(&req.into_inner()).await?;
        Ok(Response::new(ConfigureNetworkResponse {}))
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let m = self.manager.clone();
        let pid = m.create(req.into_inner()).await?;
        Ok(Response::new(CreateContainerResponse { pid }))
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        self.manager.start(&req.into_inner().container_id).await?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn wait_process(
        &self,
        req: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let req = req.into_inner();
        let r = self.manager.wait(&req.container_id, &req.exec_id).await?;
        Ok(Response::new(r))
    }

    async fn signal_process(
        &self,
        req: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        let req = req.into_inner();
        self.manager.signal(&req)?;
        Ok(Response::new(SignalProcessResponse {}))
    }

    async fn delete_container(
        &self,
        req: Request<DeleteContainerRequest>,
    ) -> Result<Response<DeleteContainerResponse>, Status> {
        let req = req.into_inner();
        self.manager.delete(&req.container_id, req.force).await?;
        Ok(Response::new(DeleteContainerResponse {}))
    }

    async fn kill_all(
        &self,
        req: Request<KillAllRequest>,
    ) -> Result<Response<KillAllResponse>, Status> {
        let resp = self.manager.kill_all(&req.into_inner()).await?;
        Ok(Response::new(resp))
    }

    async fn exec_process(
        &self,
        req: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let m = self.manager.clone();
        let pid = m.exec(req.into_inner()).await?;
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    type ProcessIoStream = BoxStream<ProcessOutput>;

    async fn process_io(
        &self,
        req: Request<Streaming<ProcessInput>>,
    ) -> Result<Response<Self::ProcessIoStream>, Status> {
        let stream = self.manager.attach_io(req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn close_stdin(
        &self,
        req: Request<CloseStdinRequest>,
    ) -> Result<Response<CloseStdinResponse>, Status> {
        let req = req.into_inner();
        self.manager.close_stdin(&req.container_id, &req.exec_id)?;
        Ok(Response::new(CloseStdinResponse {}))
    }

    async fn resize_pty(
        &self,
        req: Request<ResizePtyRequest>,
    ) -> Result<Response<ResizePtyResponse>, Status> {
        let req = req.into_inner();
        self.manager.resize_pty(&req)?;
        Ok(Response::new(ResizePtyResponse {}))
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(self.manager.stats(&req.into_inner())?))
    }

    async fn update_resources(
        &self,
        req: Request<UpdateResourcesRequest>,
    ) -> Result<Response<UpdateResourcesResponse>, Status> {
        self.manager.update_resources(&req.into_inner())?;
        Ok(Response::new(UpdateResourcesResponse {}))
    }

    async fn copy_file(
        &self,
        req: Request<CopyFileRequest>,
    ) -> Result<Response<CopyFileResponse>, Status> {
        let req = req.into_inner();
        let roots = self.paths.copy_file_roots();
        tokio::task::spawn_blocking(move || crate::files::copy_file(&roots, &req))
            .await
            .map_err(|e| Status::internal(format!("copy file task: {e}")))?
            .map_err(Status::from)?;
        Ok(Response::new(CopyFileResponse {}))
    }

    async fn list_processes(
        &self,
        req: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let processes = self
            .manager
            .list_processes(&req.into_inner().container_id)?;
        Ok(Response::new(ListProcessesResponse { processes }))
    }

    type PortForwardStream = BoxStream<PortForwardOutput>;

    async fn port_forward(
        &self,
        req: Request<Streaming<PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let stream = self.port_forwards.open(req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        if !self.pid1 {
            return Err(Status::failed_precondition(
                "the agent is not PID 1: refusing to power off this machine",
            ));
        }
        tracing::info!("shutdown requested: syncing and powering off");
        // Answer first; power off shortly after so the reply reaches the host.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            crate::init::console_line("podvisor-agent: powering off");
            let e = crate::init::power_off();
            tracing::error!("reboot(RB_POWER_OFF): {e}");
        });
        Ok(Response::new(ShutdownResponse {}))
    }
}
