//! The pod sandbox and container manager behind the CRI RuntimeService: one microVM per
//! sandbox (`vmm`), containers run by the guest agent in it, records persisted (`state`),
//! container output copied to CRI log files (`logs`), images attached as VM drives.
//!
//! Nothing here knows CRI types: `cri::runtime_service` validates and translates requests
//! into [`SandboxSpec`] and [`ContainerSpec`] and records back into CRI statuses.
//!
//! Images reach a VM through [`IMAGE_SLOTS`] spare read-only drives (`img0`..`img3`) the VM
//! boots with, backed by one shared placeholder file; CreateContainer hot-swaps an image's
//! ext4 file into a slot ([`image_slots`]). Containers of one image in one sandbox share
//! its slot.
//!
//! A pod's directory is `<state_dir>/pods/<first 16 hex digits of the sandbox id>`, not the
//! whole id: the VMM's Unix sockets live there and a socket path holds only 107 bytes, so
//! the whole id would leave the state directory 15 bytes.
//!
//! Locking: std mutexes guard records and maps and are never held across an await; one
//! async lock per sandbox (`Sandbox::lifecycle`) serialises CreateContainer, StopPodSandbox
//! and RemovePodSandbox of that sandbox and owns its image slots.
//!
//! This module holds the manager itself (its state, small accessors, the records of
//! sandboxes and containers in memory); each operation lives in a room of its own, as
//! `impl PodManager` blocks:
//! - [`spec`]: what a sandbox or container is to be, and its translation to agent requests.
//! - [`error`]: [`PodError`] and its gRPC codes.
//! - [`agent`]: connecting to a guest agent and calling it with a deadline.
//! - [`vm`]: a pod VM's process: how long it may take to stop, whether it has ended.
//! - [`sandbox`]: RunPodSandbox, StopPodSandbox, RemovePodSandbox, the VM's watcher and the
//!   VM templates' preparation.
//! - [`container`]: CreateContainer, Start, Stop, Remove, UpdateContainerResources and
//!   ReopenContainerLog.
//! - [`detached`]: RunPodSandbox and CreateContainer finished even when their request is
//!   cancelled, and then undone.
//! - [`image_slots`]: the image drives, the placeholder and the drive swaps.
//! - [`supervise`]: a container's background tasks: its output to its log, its exit, its
//!   copied host paths kept current.
//! - [`exec`]: ExecSync and the exec defaults recorded per container.
//! - [`interactive`]: streaming exec and attach (CRI Exec and Attach behind the streaming
//!   server), and the fanout of a container's output to attach sessions.
//! - [`stats`]: container statistics.
//! - [`port_forward`]: PortForward, dialled by the guest agent inside the VM.
//! - [`recovery`]: finding sandboxes and containers again after a restart, and sweeping
//!   what a crash during RunPodSandbox left.
//! - [`process`], [`template`]: composing a container's process, VM templates.
//! - [`readiness`]: whether a pod VM could be launched now (Status's RuntimeReady).
//! - [`sizing`]: a pod's VM size from its limits and overhead, in size classes.

mod agent;
mod container;
mod detached;
mod error;
mod exec;
mod image_slots;
mod interactive;
mod names;
mod port_forward;
pub mod process;
pub mod readiness;
mod recovery;
mod sandbox;
mod sizing;
mod spec;
mod stats;
mod supervise;
pub mod template;
mod vm;

pub use error::PodError;
pub use exec::ExecOutput;
pub use image_slots::{IMAGE_SLOTS, PLACEHOLDER_BYTES, PLACEHOLDER_FILE};
pub use interactive::{ClientIo, TermSize};
// The hub type every container holds (a re-export, not a use: see module-cycles.py).
pub(in crate::pods) use interactive::AttachHub;
pub use port_forward::{PortForwardConn, PortForwardReceiver, PortForwardSender};
pub use spec::{ContainerSpec, MountSpec, NamespaceMode, Resources, SandboxSpec};
pub use stats::{ContainerStats, PodStats};

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_common::{IoError, error_chain, lock, now_ns};
use podvisor_proto::AgentClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::config::Config;
use crate::image::{ImageLease, ImageStore};
use crate::logs::CriLogWriter;
use crate::state::{ContainerRecord, ContainerState, SandboxRecord, SandboxState, StateStore};

/// The directory of pod directories under the state directory.
pub const PODS_DIR: &str = "pods";
/// How many hex digits of the sandbox id name its pod directory.
const POD_DIR_NAME_LEN: usize = 16;
/// How long a container may take to end after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);
/// The exit code of a container whose VM went away (as containerd reports unknown exits).
const LOST_EXIT_CODE: i32 = 255;
/// The message of containers whose VM went away.
const VM_EXITED: &str = "the pod's VM exited";

/// `bytes` random bytes from the kernel, in hex.
fn random_bytes(n: usize) -> Result<Vec<u8>, PodError> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(IoError::at("read", "/dev/urandom"))?;
    Ok(buf)
}

fn random_hex(bytes: usize) -> Result<String, PodError> {
    random_bytes(bytes).map(hex::encode)
}

/// A new sandbox or container id: 64 hex digits.
fn new_id() -> Result<String, PodError> {
    random_hex(32)
}

/// One sandbox in memory.
struct Sandbox {
    id: String,
    record: Mutex<SandboxRecord>,
    agent: Mutex<Option<AgentClient<Channel>>>,
    /// Set once StopPodSandbox begins: the VMM's end is then expected.
    stopping: AtomicBool,
    /// Serialises lifecycle changes; holds the image id last swapped into each slot.
    lifecycle: tokio::sync::Mutex<[Option<String>; IMAGE_SLOTS]>,
}

impl Sandbox {
    fn record(&self) -> SandboxRecord {
        lock(&self.record).clone()
    }

    fn state(&self) -> SandboxState {
        lock(&self.record).state
    }

    fn agent(&self) -> Result<AgentClient<Channel>, PodError> {
        lock(&self.agent).clone().ok_or_else(|| {
            PodError::FailedPrecondition(format!("sandbox {} has no running VM", self.id))
        })
    }

    fn exec_defaults_path(&self, container_id: &str) -> PathBuf {
        lock(&self.record)
            .vmm
            .dir
            .join(format!("exec-{container_id}.json"))
    }
}

/// One container in memory.
struct Container {
    id: String,
    sandbox_id: String,
    record: Mutex<ContainerRecord>,
    /// Keeps the image from being removed while the container exists.
    lease: Mutex<Option<ImageLease>>,
    /// The log writer, shared with the task copying output (ReopenContainerLog).
    log: Arc<Mutex<Option<CriLogWriter>>>,
    /// True once the container has exited (its record says so).
    exited: watch::Sender<bool>,
    /// Its output fanned out to attach sessions, their stdin in (fed by `supervise`).
    attach: AttachHub,
}

impl Container {
    fn record(&self) -> ContainerRecord {
        lock(&self.record).clone()
    }

    fn state(&self) -> ContainerState {
        lock(&self.record).state
    }

    /// Waits until the container has exited or `timeout` passed; true if it exited.
    async fn wait_exited(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|e| *e))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

struct Inner {
    config: Config,
    state: StateStore,
    images: ImageStore,
    placeholder: PathBuf,
    /// The user VMMs run as, jailed (None: unjailed, `vmm_user = ""`).
    jail: Option<crate::vmm::JailUser>,
    /// The id map of jailed VMMs' shares, made at the first volume.
    idmap: Mutex<Option<Arc<crate::vmm::IdMap>>>,
    templates: template::Templates,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Pod names of sandboxes being created.
    pending_names: names::PendingNames,
}

/// The sandbox and container manager. Cheap to clone: clones share one manager.
#[derive(Clone)]
pub struct PodManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager")
            .field("state_dir", &self.inner.config.state_dir)
            .finish_non_exhaustive()
    }
}

impl PodManager {
    /// A manager over the stores; creates the image placeholder. Call
    /// [`PodManager::recover`] before serving.
    pub fn new(config: Config, state: StateStore, images: ImageStore) -> Result<Self, PodError> {
        let placeholder = image_slots::ensure_placeholder(&config.root_dir)?;
        let jail = crate::vmm::JailUser::resolve(&config.vmm_user).map_err(PodError::VmmUser)?;
        if jail.is_none() {
            tracing::warn!("vmm_user is empty: VMMs run unjailed, as root");
        }
        let templates = template::Templates::new(&config.root_dir);
        Ok(Self {
            inner: Arc::new(Inner {
                idmap: Mutex::new(None),
                templates,
                config,
                state,
                images,
                placeholder,
                jail,
                sandboxes: Mutex::new(HashMap::new()),
                containers: Mutex::new(HashMap::new()),
                pending_names: names::PendingNames::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.inner.images
    }

    /// For podvisord's shutdown: stops a template VM being built (pod VMs keep running).
    pub async fn shutdown(&self) {
        self.inner.templates.shutdown().await;
    }

    fn sandbox_arc(&self, id: &str) -> Option<Arc<Sandbox>> {
        lock(&self.inner.sandboxes).get(id).cloned()
    }

    fn container_arc(&self, id: &str) -> Option<Arc<Container>> {
        lock(&self.inner.containers).get(id).cloned()
    }

    fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<Container>> {
        lock(&self.inner.containers)
            .values()
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
            .collect()
    }

    fn container_of(&self, id: &str) -> Result<(Arc<Container>, Arc<Sandbox>), PodError> {
        let c = self
            .container_arc(id)
            .ok_or_else(|| PodError::NotFound(format!("container {id:?} not found")))?;
        let sb = self.sandbox_arc(&c.sandbox_id).ok_or_else(|| {
            PodError::Internal(format!("container {id} has no sandbox {}", c.sandbox_id))
        })?;
        Ok((c, sb))
    }

    fn put_sandbox(&self, sb: &Sandbox) -> Result<(), PodError> {
        let rec = sb.record();
        self.inner.state.sandboxes.put(&sb.id, &rec)?;
        Ok(())
    }

    fn put_container(&self, c: &Container) -> Result<(), PodError> {
        let rec = c.record();
        self.inner.state.containers.put(&c.id, &rec)?;
        Ok(())
    }

    /// Marks `c` exited (once) and persists it.
    fn mark_exited(&self, c: &Container, exit_code: i32, reason: &str, message: &str) {
        self.mark_exited_with(c, |r| {
            r.exit_code = exit_code;
            r.reason = reason.to_string();
            r.message = message.to_string();
            r.finished_at_ns = now_ns();
        });
    }

    fn mark_exited_with(&self, c: &Container, f: impl FnOnce(&mut ContainerRecord)) {
        {
            let mut r = lock(&c.record);
            if r.state == ContainerState::Exited {
                return;
            }
            f(&mut r);
            r.state = ContainerState::Exited;
            if r.finished_at_ns == 0 {
                r.finished_at_ns = now_ns();
            }
        }
        if let Err(e) = self.put_container(c) {
            tracing::error!(container = %c.id, "persist exit: {}", error_chain(&e));
        }
        c.exited.send_replace(true);
        let r = c.record();
        tracing::info!(container = %c.id, exit_code = r.exit_code, reason = %r.reason, "container exited");
    }

    /// Drops everything podvisord holds for a container.
    fn forget_container(&self, sb: &Sandbox, c: &Container) -> Result<(), PodError> {
        lock(&c.log).take();
        lock(&c.lease).take();
        if let Err(e) = crate::vmm::unbind_volumes(&sb.record().vmm.dir, &c.id) {
            tracing::warn!(container = %c.id, "unbinding its volumes: {e}");
        }
        let _ = std::fs::remove_file(sb.exec_defaults_path(&c.id));
        self.inner.state.containers.remove(&c.id)?;
        lock(&self.inner.containers).remove(&c.id);
        c.exited.send_replace(true);
        Ok(())
    }

    /// The id map a jailed VMM's share is bound through (None: VMMs run unjailed, as root).
    fn share_idmap(&self) -> Result<Option<Arc<crate::vmm::IdMap>>, PodError> {
        let Some(user) = self.inner.jail else {
            return Ok(None);
        };
        let mut held = lock(&self.inner.idmap);
        if let Some(m) = held.as_ref() {
            return Ok(Some(m.clone()));
        }
        let made = crate::vmm::IdMap::new(
            user.uid,
            user.gid,
            podvisor_vmm_api::config::DEFAULT_ID_MAP_BASE,
        )
        .map_err(|e| PodError::Internal(format!("the share's id map (a user namespace): {e}")))?;
        let made = Arc::new(made);
        *held = Some(made.clone());
        Ok(Some(made))
    }

    /// The sandbox's record.
    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord, PodError> {
        self.sandbox_arc(id)
            .map(|sb| sb.record())
            .ok_or_else(|| PodError::NotFound(format!("pod sandbox {id:?} not found")))
    }

    /// Every sandbox's record, oldest first.
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        let mut all: Vec<SandboxRecord> = lock(&self.inner.sandboxes)
            .values()
            .map(|sb| sb.record())
            .collect();
        all.sort_by_key(|r| (r.created_at_ns, r.id.clone()));
        all
    }

    /// The container's record.
    pub fn container(&self, id: &str) -> Result<ContainerRecord, PodError> {
        self.container_arc(id)
            .map(|c| c.record())
            .ok_or_else(|| PodError::NotFound(format!("container {id:?} not found")))
    }

    /// Every container's record, oldest first.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        let mut all: Vec<ContainerRecord> = lock(&self.inner.containers)
            .values()
            .map(|c| c.record())
            .collect();
        all.sort_by_key(|r| (r.created_at_ns, r.id.clone()));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex_digits_and_differ() {
        let a = new_id().unwrap();
        let b = new_id().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
