//! CreateContainer, StartContainer, StopContainer, RemoveContainer,
//! UpdateContainerResources and ReopenContainerLog.
//!
//! CreateContainer is a sequence of named steps: lease the image, compose the process,
//! open the log, read the host paths, put the image in a slot, copy the host paths in,
//! create the container in the guest, record it, then hand it to its background tasks
//! ([`super::supervise`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podvisor_common::{IoError, lock, now_ns};
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::agent::{AGENT_CALL_TIMEOUT, call, ignore_gone};
use super::error::PodError;
use super::exec::write_exec_defaults;
use super::image_slots::{IMAGE_SLOTS, choose_slot, slot_index, slot_name, swap_in};
use super::process::{self, ExecDefaults};
use super::spec::{self, ContainerSpec, MountSpec, Resources, container_process};
use super::{Container, KILL_WAIT, LOST_EXIT_CODE, PodManager, Sandbox, VM_EXITED, new_id};
use crate::image::{ImageError, ImageLease, ImageRecord};
use crate::logs::CriLogWriter;
use crate::state::{ContainerRecord, ContainerState, MountRecord, SandboxRecord, SandboxState};
use crate::vmm;

impl PodManager {
    /// CreateContainer: attaches the image, copies host paths in, creates the container in
    /// the VM (stopped before exec) and starts copying its output to its log. Returns its
    /// id.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        spec: ContainerSpec,
    ) -> Result<String, PodError> {
        let sb = self
            .sandbox_arc(sandbox_id)
            .ok_or_else(|| PodError::NotFound(format!("pod sandbox {sandbox_id:?} not found")))?;
        let mut slots = sb.lifecycle.lock().await;
        self.check_container_name(&sb, &spec.name, spec.attempt)?;
        if sb.state() != SandboxState::Ready {
            return Err(PodError::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not ready"
            )));
        }
        let mut client = sb.agent()?;
        let sandbox = sb.record();
        if spec.privileged && !sandbox.privileged {
            return Err(PodError::InvalidArgument(format!(
                "container {:?} is privileged but its pod sandbox {sandbox_id} is not: a \
                 privileged container needs a privileged pod",
                spec.name
            )));
        }
        let (lease, image_bytes) = self.lease_image(&spec.image)?;
        let image = lease.record().clone();
        let (process, defaults) = container_process(&spec, &image.config, &sandbox.hostname)?;

        let id = new_id()?;
        let log_path = log_path(&sandbox, &spec)?;
        let writer = if log_path.as_os_str().is_empty() {
            None
        } else {
            Some(CriLogWriter::create(&log_path)?)
        };
        let idmap = self.share_idmap()?;
        let mounts = bind_volumes(&sandbox.vmm.dir, &id, &spec.mounts, idmap).await?;
        // Everything after the binds: on error, the binds go again.
        let created = async {
            let slot = choose_slot(&sb.id, &self.slot_users(&sb.id), &slots, &image.id)?;
            swap_in(
                &sb.id,
                &sandbox.vmm,
                &mut slots,
                slot,
                &image.id,
                &lease.rootfs(),
            )
            .await?;
            let serial = slot_name(slot);
            let image_drive = agent::Image {
                block_device_serial: serial.clone(),
                subpath: String::new(),
                size_bytes: image_bytes,
            };
            let req = spec::create_request(&id, &spec, process, image_drive, mounts);
            let t = Instant::now();
            let created = call(
                format!("CreateContainer {id}"),
                AGENT_CALL_TIMEOUT,
                client.create_container(req),
            )
            .await?;
            tracing::info!(container = %id, sandbox = %sb.id, pid = created.pid, ms = t.elapsed().as_millis(), "container created");
            let record = new_record(&id, &sb.id, &spec, &image, log_path, created.pid, serial);
            self.persist_created(&sb, &mut client, &record, &defaults)
                .await?;
            Ok::<_, PodError>(record)
        }
        .await;
        if created.is_err()
            && let Err(e) = vmm::unbind_volumes(&sandbox.vmm.dir, &id)
        {
            tracing::warn!(container = %id, "unbinding its volumes: {e}");
        }
        let record = created?;
        let c = Arc::new(Container {
            id: id.clone(),
            sandbox_id: sb.id.clone(),
            record: Mutex::new(record),
            lease: Mutex::new(Some(lease)),
            log: Arc::new(Mutex::new(writer)),
            exited: watch::Sender::new(false),
            attach: Default::default(),
        });
        lock(&self.inner.containers).insert(id.clone(), c.clone());
        drop(slots);
        self.supervise(c, client, true);
        Ok(id)
    }

    /// Refuses a container name (with attempt) another container of the pod has, in any
    /// state, as containerd does. The caller holds the sandbox's lifecycle lock, which
    /// every CreateContainer of the pod takes, so no second one passes this check before
    /// the first is recorded.
    fn check_container_name(&self, sb: &Sandbox, name: &str, attempt: u32) -> Result<(), PodError> {
        let taken = self.containers_of(&sb.id).into_iter().find(|c| {
            let r = lock(&c.record);
            r.name == name && r.attempt == attempt
        });
        match taken {
            Some(c) => Err(PodError::AlreadyExists(format!(
                "container name {name:?} (attempt {attempt}) in pod sandbox {} is reserved for \
                 container {}; remove it first",
                sb.id, c.id
            ))),
            None => Ok(()),
        }
    }

    /// A lease on the image named `name` (it stays while the container does) and the size
    /// of its ext4 file.
    fn lease_image(&self, name: &str) -> Result<(ImageLease, u64), PodError> {
        let lease = self.inner.images.acquire(name).map_err(|e| match e {
            ImageError::NotFound(_) => {
                PodError::NotFound(format!("image {name:?} not found: pull it first"))
            }
            e => PodError::Image(e),
        })?;
        let rootfs = lease.rootfs();
        let bytes = std::fs::metadata(&rootfs)
            .map_err(IoError::at("inspect image file", &rootfs))?
            .len();
        Ok((lease, bytes))
    }

    /// The image each of the sandbox's image slots is used for by its containers.
    fn slot_users(&self, sandbox_id: &str) -> [Option<String>; IMAGE_SLOTS] {
        let mut users: [Option<String>; IMAGE_SLOTS] = Default::default();
        for c in self.containers_of(sandbox_id) {
            let r = lock(&c.record);
            if let Some(slot) = slot_index(&r.image_drive_id) {
                users[slot] = Some(r.image_id.clone());
            }
        }
        users
    }

    /// Records a container the guest has created: its exec defaults and its record. On
    /// failure the container is deleted in the guest again.
    async fn persist_created(
        &self,
        sb: &Sandbox,
        client: &mut AgentClient<Channel>,
        record: &ContainerRecord,
        defaults: &ExecDefaults,
    ) -> Result<(), PodError> {
        let id = &record.id;
        let path = sb.exec_defaults_path(id);
        let persisted = write_exec_defaults(&path, defaults)
            .and_then(|()| Ok(self.inner.state.containers.put(id, record)?));
        if let Err(e) = persisted {
            let req = agent::DeleteContainerRequest {
                container_id: id.clone(),
                force: true,
            };
            let _ = call("DeleteContainer", KILL_WAIT, client.delete_container(req)).await;
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(())
    }

    /// StartContainer.
    pub async fn start_container(&self, id: &str) -> Result<(), PodError> {
        let (c, sb) = self.container_of(id)?;
        let state = c.state();
        if state != ContainerState::Created {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} is {} and cannot be started",
                state_name(state)
            )));
        }
        let mut client = sb.agent()?;
        let agent_id = lock(&c.record).agent_container_id.clone();
        let t = Instant::now();
        call(
            format!("StartContainer {id}"),
            AGENT_CALL_TIMEOUT,
            client.start_container(agent::StartContainerRequest {
                container_id: agent_id,
            }),
        )
        .await?;
        {
            let mut r = lock(&c.record);
            if r.started_at_ns == 0 {
                r.started_at_ns = now_ns();
            }
            // It may have exited already; that is recorded by now and stays.
            if r.state == ContainerState::Created {
                r.state = ContainerState::Running;
            }
        }
        self.put_container(&c)?;
        tracing::info!(
            container = id,
            ms = t.elapsed().as_millis(),
            "container started"
        );
        Ok(())
    }

    /// StopContainer: the image's stop signal (SIGTERM), `timeout` to exit, then SIGKILL.
    /// An unknown or exited container is not an error.
    pub async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), PodError> {
        let Some(c) = self.container_arc(id) else {
            return Ok(());
        };
        if c.state() == ContainerState::Exited {
            return Ok(());
        }
        let Some(sb) = self.sandbox_arc(&c.sandbox_id) else {
            return Ok(());
        };
        let Ok(mut client) = sb.agent() else {
            self.mark_exited(&c, LOST_EXIT_CODE, "Error", VM_EXITED);
            return Ok(());
        };
        let agent_id = lock(&c.record).agent_container_id.clone();
        if c.state() == ContainerState::Created {
            // Never started: deleting it in the guest ends its waiting init.
            let req = agent::DeleteContainerRequest {
                container_id: agent_id,
                force: true,
            };
            ignore_gone(call("DeleteContainer", KILL_WAIT, client.delete_container(req)).await)?;
            if !c.wait_exited(KILL_WAIT).await {
                self.mark_exited(&c, 137, "Error", "stopped before it started");
            }
            return Ok(());
        }
        let signal = |signal: u32, all: bool| agent::SignalProcessRequest {
            container_id: agent_id.clone(),
            exec_id: String::new(),
            signal,
            all,
        };
        if !timeout.is_zero() {
            let stop_signal = lock(&c.lease)
                .as_ref()
                .map(|l| process::stop_signal(&l.record().config.stop_signal))
                .unwrap_or(libc::SIGTERM as u32);
            ignore_gone(
                call(
                    "SignalProcess",
                    AGENT_CALL_TIMEOUT,
                    client.signal_process(signal(stop_signal, false)),
                )
                .await,
            )?;
            if c.wait_exited(timeout).await {
                return Ok(());
            }
            tracing::info!(container = id, "did not stop within {timeout:?}: SIGKILL");
        }
        let kill = call(
            "SignalProcess",
            AGENT_CALL_TIMEOUT,
            client.signal_process(signal(libc::SIGKILL as u32, true)),
        )
        .await;
        if kill.is_err() {
            // No cgroup in the guest: the init process alone.
            ignore_gone(
                call(
                    "SignalProcess",
                    AGENT_CALL_TIMEOUT,
                    client.signal_process(signal(libc::SIGKILL as u32, false)),
                )
                .await,
            )?;
        }
        if c.wait_exited(KILL_WAIT).await {
            Ok(())
        } else {
            Err(PodError::DeadlineExceeded(format!(
                "container {id} did not exit within {KILL_WAIT:?} of SIGKILL"
            )))
        }
    }

    /// RemoveContainer: kills it if needed, deletes it in the VM, forgets it. An unknown id
    /// is not an error.
    pub async fn remove_container(&self, id: &str) -> Result<(), PodError> {
        let Some(c) = self.container_arc(id) else {
            return Ok(());
        };
        let Some(sb) = self.sandbox_arc(&c.sandbox_id) else {
            lock(&self.inner.containers).remove(id);
            self.inner.state.containers.remove(id)?;
            return Ok(());
        };
        if c.state() != ContainerState::Exited {
            self.stop_container(id, Duration::ZERO).await?;
        }
        let _slots = sb.lifecycle.lock().await;
        if let Ok(mut client) = sb.agent() {
            let req = agent::DeleteContainerRequest {
                container_id: lock(&c.record).agent_container_id.clone(),
                force: true,
            };
            ignore_gone(call("DeleteContainer", KILL_WAIT, client.delete_container(req)).await)?;
        }
        self.forget_container(&sb, &c)?;
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    /// ReopenContainerLog: opens the log path again (after kubelet rotated it).
    pub fn reopen_log(&self, id: &str) -> Result<(), PodError> {
        let (c, _) = self.container_of(id)?;
        if c.state() != ContainerState::Running {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let mut log = lock(&c.log);
        match log.as_mut() {
            Some(w) => Ok(w.reopen()?),
            None => Err(PodError::FailedPrecondition(format!(
                "container {id} has no log being written"
            ))),
        }
    }

    /// UpdateContainerResources.
    pub async fn update_resources(&self, id: &str, resources: Resources) -> Result<(), PodError> {
        let (c, sb) = self.container_of(id)?;
        if c.state() == ContainerState::Exited {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} has exited"
            )));
        }
        super::sizing::check_fits(sb.record().memory_mib, &resources)?;
        let mut client = sb.agent()?;
        let req = agent::UpdateResourcesRequest {
            container_id: lock(&c.record).agent_container_id.clone(),
            resources: Some(resources.agent()),
        };
        call(
            "UpdateResources",
            AGENT_CALL_TIMEOUT,
            client.update_resources(req),
        )
        .await?;
        Ok(())
    }
}

/// The container's log file: `spec.log_path` under the sandbox's log directory; empty for
/// none.
fn log_path(sandbox: &SandboxRecord, spec: &ContainerSpec) -> Result<PathBuf, PodError> {
    if sandbox.log_directory.as_os_str().is_empty() || spec.log_path.is_empty() {
        return Ok(PathBuf::new());
    }
    let rel = Path::new(&spec.log_path);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(PodError::InvalidArgument(format!(
            "log path {:?} must be relative to the pod's log directory, without ..",
            spec.log_path
        )));
    }
    Ok(sandbox.log_directory.join(rel))
}

/// Binds the container's host paths into the pod's share (on a blocking thread); returns
/// the container's mounts of them in the guest.
async fn bind_volumes(
    pod_dir: &Path,
    id: &str,
    mounts: &[MountSpec],
    idmap: Option<Arc<vmm::IdMap>>,
) -> Result<Vec<agent::Mount>, PodError> {
    let volumes: Vec<vmm::Volume> = mounts
        .iter()
        .map(|m| vmm::Volume {
            host_path: m.host_path.clone(),
            readonly: m.readonly,
            propagation: m.propagation,
        })
        .collect();
    let (dir, cid) = (pod_dir.to_path_buf(), id.to_string());
    let shared = tokio::task::spawn_blocking(move || {
        vmm::bind_volumes(&dir, &cid, &volumes, idmap.as_deref())
    })
    .await
    .map_err(|e| PodError::Internal(format!("volume task: {e}")))?
    .map_err(PodError::Volume)?;
    Ok(mounts
        .iter()
        .zip(shared)
        .map(|(m, v)| spec::bind_mount(v.guest_path, m))
        .collect())
}

/// The record of a container just created in sandbox `sandbox_id`.
fn new_record(
    id: &str,
    sandbox_id: &str,
    spec: &ContainerSpec,
    image: &ImageRecord,
    log_path: PathBuf,
    guest_pid: u32,
    image_drive_id: String,
) -> ContainerRecord {
    ContainerRecord {
        id: id.to_string(),
        sandbox_id: sandbox_id.to_string(),
        name: spec.name.clone(),
        attempt: spec.attempt,
        labels: spec.labels.clone(),
        annotations: spec.annotations.clone(),
        image: spec.image.clone(),
        image_id: image.id.clone(),
        image_ref: image
            .repo_digests
            .first()
            .cloned()
            .unwrap_or_else(|| image.id.clone()),
        created_at_ns: now_ns(),
        started_at_ns: 0,
        finished_at_ns: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        state: ContainerState::Created,
        log_path,
        mounts: spec
            .mounts
            .iter()
            .map(|m| MountRecord {
                container_path: m.container_path.clone().into(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
            })
            .collect(),
        agent_container_id: id.to_string(),
        guest_pid,
        image_drive_id,
        tty: spec.tty,
        stdin: spec.stdin,
        stdin_once: spec.stdin_once,
    }
}

/// A state's name for messages.
fn state_name(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "created",
        ContainerState::Running => "running",
        ContainerState::Exited => "exited",
        ContainerState::Unknown => "in an unknown state",
    }
}
