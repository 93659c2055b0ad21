//! After a (re)start of podvisord: every sandbox and container record loaded again. A
//! sandbox whose VMM still runs and whose agent answers stays ready, its running containers'
//! output and exits watched again; the others become NotReady with their containers exited.
//! Pod directories no record names (a podvisord that died during RunPodSandbox) are swept
//! first: their VMM, network, namespace, cgroup and directory go.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use podvisor_common::{IoError, error_chain, lock};
use podvisor_proto::AgentClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::agent::{AGENT_RECONNECT_TIMEOUT, connect_agent};
use super::error::PodError;
use super::{Container, LOST_EXIT_CODE, PODS_DIR, PodManager, Sandbox, VM_EXITED};
use crate::logs::CriLogWriter;
use crate::network;
use crate::state::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use crate::vmm::{self, VmmHandle};

impl PodManager {
    /// Loads every record after a (re)start: sandboxes whose VMM still runs and whose agent
    /// answers stay ready, with their containers' exits watched again; the others become
    /// NotReady with their containers exited. Container records without a sandbox are
    /// removed.
    pub async fn recover(&self) -> Result<(), PodError> {
        let sandboxes = self.inner.state.sandboxes.load_all()?;
        let mut by_sandbox = self.containers_by_sandbox(&sandboxes)?;
        let recorded: HashSet<PathBuf> = sandboxes.iter().map(|(_, r)| r.vmm.dir.clone()).collect();
        self.sweep_orphans(&recorded).await;
        for (id, record) in sandboxes {
            let containers = by_sandbox.remove(&id).unwrap_or_default();
            self.recover_sandbox(id, record, containers).await?;
        }
        Ok(())
    }

    /// Pod directories no sandbox record names: what a podvisord that died during
    /// RunPodSandbox left (the record is written once the VMM runs; `network.json` before
    /// CNI ADD). Each one's VMM is killed, its network released (TAP, CNI DEL: the IP
    /// lease), its namespace, cgroup and directory removed. Failures are logged: the next
    /// start tries again.
    async fn sweep_orphans(&self, recorded: &HashSet<PathBuf>) {
        let pods = self.inner.config.state_dir.join(PODS_DIR);
        let Ok(entries) = std::fs::read_dir(&pods) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if recorded.contains(&dir) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            tracing::warn!(dir = %dir.display(), "a pod directory no sandbox record names (podvisord died making it): removing what it holds");
            if let Err(e) = self.sweep_pod_dir(&dir).await {
                tracing::warn!(dir = %dir.display(), "sweep: {}", error_chain(&e));
            }
        }
    }

    async fn sweep_pod_dir(&self, dir: &Path) -> Result<(), PodError> {
        let config = dir.join(vmm::CONFIG_FILE);
        let killed = tokio::task::spawn_blocking(move || vmm::kill_vmms_with_config(&config))
            .await
            .map_err(|e| PodError::Internal(format!("sweep task: {e}")))?
            .map_err(|e| PodError::Io(IoError::new("kill the VMM of", dir, e)))?;
        if !killed.is_empty() {
            tracing::warn!(dir = %dir.display(), ?killed, "killed the VMM of an unrecorded pod");
        }
        if let Some(id) = network::recorded_sandbox_id(dir)? {
            network::release_recorded(&self.inner.config.cni, &id, dir).await?;
            network::delete_netns(&id).await?;
            let vmm_err = |source| PodError::Vmm {
                sandbox: id.clone(),
                source,
            };
            let cgroup = match vmm::recorded_cgroup(dir, &id).map_err(vmm_err)? {
                Some(path) => path,
                None => vmm::CgroupPath::podvisor(&id).map_err(vmm_err)?,
            };
            vmm::remove_cgroup(&cgroup).map_err(vmm_err)?;
        }
        vmm::remove_pod_dir(dir).map_err(|source| PodError::Vmm {
            sandbox: dir.display().to_string(),
            source,
        })
    }

    /// The container records grouped by sandbox; the records of containers without a
    /// sandbox are removed.
    fn containers_by_sandbox(
        &self,
        sandboxes: &[(String, SandboxRecord)],
    ) -> Result<HashMap<String, Vec<ContainerRecord>>, PodError> {
        let containers = self.inner.state.containers.load_all()?;
        let mut by_sandbox: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for (id, r) in containers {
            if sandboxes.iter().any(|(sid, _)| *sid == r.sandbox_id) {
                by_sandbox.entry(r.sandbox_id.clone()).or_default().push(r);
            } else {
                tracing::warn!(container = %id, sandbox = %r.sandbox_id, "removing the record of a container without a sandbox");
                self.inner.state.containers.remove(&id)?;
            }
        }
        Ok(by_sandbox)
    }

    /// One sandbox and its containers again: ready if its agent answers.
    async fn recover_sandbox(
        &self,
        id: String,
        record: SandboxRecord,
        containers: Vec<ContainerRecord>,
    ) -> Result<(), PodError> {
        let handle = record.vmm.clone();
        let was_ready = record.state == SandboxState::Ready;
        let client = if was_ready && handle.is_alive() {
            reconnect(&id, &handle).await
        } else {
            None
        };
        let ready = client.is_some();
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            record: Mutex::new(SandboxRecord {
                state: if ready {
                    SandboxState::Ready
                } else {
                    SandboxState::NotReady
                },
                ..record
            }),
            agent: Mutex::new(client.clone()),
            stopping: AtomicBool::new(false),
            lifecycle: tokio::sync::Mutex::new(Default::default()),
        });
        self.put_sandbox(&sb)?;
        lock(&self.inner.sandboxes).insert(id.clone(), sb.clone());
        let message = if handle.is_alive() {
            "the pod's VM stopped answering while podvisord restarted"
        } else {
            VM_EXITED
        };
        for r in containers {
            self.recover_container(&id, r, client.as_ref(), message);
        }
        if ready {
            self.watch_vmm(sb);
        }
        tracing::info!(sandbox = %id, ready, "sandbox recovered");
        Ok(())
    }

    /// One container of a recovered sandbox: watched again when it still runs in a VM
    /// whose agent answered (`client`), else exited with `message`.
    fn recover_container(
        &self,
        sandbox_id: &str,
        r: ContainerRecord,
        client: Option<&AgentClient<Channel>>,
        message: &str,
    ) {
        let lease = match self.inner.images.acquire(&r.image_id) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(container = %r.id, "image {}: {e}", r.image_id);
                None
            }
        };
        let log = reopen_log(&r);
        let exited = r.state == ContainerState::Exited;
        let c = Arc::new(Container {
            id: r.id.clone(),
            sandbox_id: sandbox_id.to_string(),
            record: Mutex::new(r),
            lease: Mutex::new(lease),
            log: Arc::new(Mutex::new(log)),
            exited: watch::Sender::new(exited),
            attach: Default::default(),
        });
        lock(&self.inner.containers).insert(c.id.clone(), c.clone());
        match (client, exited) {
            (_, true) => {}
            (Some(client), false) => self.supervise(c, client.clone(), true),
            (None, false) => self.mark_exited(&c, LOST_EXIT_CODE, "Error", message),
        }
    }
}

/// The agent of a VM that ran before the restart, if it answers.
async fn reconnect(id: &str, handle: &VmmHandle) -> Option<AgentClient<Channel>> {
    match connect_agent(id, handle, AGENT_RECONNECT_TIMEOUT).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(sandbox = %id, "agent of a running VM unreachable: {e}");
            None
        }
    }
}

/// The log of a running container, opened again to append to.
fn reopen_log(r: &ContainerRecord) -> Option<CriLogWriter> {
    if r.state != ContainerState::Running || r.log_path.as_os_str().is_empty() {
        return None;
    }
    match CriLogWriter::open(&r.log_path) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(container = %r.id, "reopen log: {e}");
            None
        }
    }
}
