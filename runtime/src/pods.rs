//! The pod sandbox and container manager behind the CRI RuntimeService: one microVM per
//! sandbox (`vmm`), containers run by the guest agent in it, records persisted (`state`),
//! container output copied to CRI log files (`logs`), images attached as VM drives.
//!
//! Nothing here knows CRI types: `cri::runtime_service` validates and translates requests
//! into [`SandboxSpec`] and [`ContainerSpec`] and records back into CRI statuses.
//!
//! Images reach a VM through [`IMAGE_SLOTS`] spare read-only drives (`img0`..`img3`) the VM
//! boots with, backed by one shared placeholder file; CreateContainer hot-swaps an image's
//! ext4 file into a slot. Containers of one image in one sandbox share its slot.
//!
//! A pod's directory is `<state_dir>/pods/<first 16 hex digits of the sandbox id>`, not the
//! whole id: the VMM's Unix sockets live there and a socket path holds only 107 bytes, so
//! the whole id would leave the state directory 15 bytes.
//!
//! Locking: std mutexes guard records and maps and are never held across an await; one
//! async lock per sandbox (`Sandbox::lifecycle`) serialises CreateContainer, StopPodSandbox
//! and RemovePodSandbox of that sandbox and owns its image slots.

pub mod network;
pub mod process;
pub mod template;
pub mod volumes;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::config::{Config, Handler};
use crate::image::{ImageError, ImageLease, ImageStore};
use crate::logs::{CriLogWriter, LogError, Stream};
use crate::state::{
    ContainerRecord, ContainerState, DnsConfig, MountRecord, PortMapping, SandboxRecord,
    SandboxState, StateError, StateStore,
};
use crate::vmm::{self, DriveSpec, VmmError, VmmHandle, VmmSpec};
use process::{ExecDefaults, ProcessError, UserSpec};
use volumes::{Budget, VolumeError, VolumeSource, VolumeWatch};

/// Spare image drives every pod VM boots with.
pub const IMAGE_SLOTS: usize = 4;
/// The directory of pod directories under the state directory.
pub const PODS_DIR: &str = "pods";
/// The placeholder behind unused image slots, under the root directory.
pub const PLACEHOLDER_FILE: &str = "placeholder.img";
/// The placeholder's size: one block of zeros.
pub const PLACEHOLDER_BYTES: u64 = 4096;
/// How many hex digits of the sandbox id name its pod directory.
const POD_DIR_NAME_LEN: usize = 16;
/// How long a new VM may take until its agent answers (40-120 s on an emulating kvm_pvm
/// host; far less on real KVM).
const AGENT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a VM restored from a template may take until its agent answers: far less than
/// a boot; past it the pod boots the kernel instead.
const AGENT_RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Host random bytes a new VM's agent mixes into its RNG.
const RANDOM_SEED_BYTES: usize = 64;
/// One connect-and-Ping attempt.
const AGENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts, growing from the first to the last. A restored VM answers
/// within milliseconds of its VMM's start: short first pauses do not make it wait; a failed
/// attempt (no socket yet) costs next to nothing.
const AGENT_RETRY_FIRST: Duration = Duration::from_millis(10);
const AGENT_RETRY_MAX: Duration = Duration::from_millis(500);
/// How long a reconnect after a podvisord restart may take.
const AGENT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One agent call (creating a container takes seconds where the guest kernel is emulated).
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a VMM may take to stop before it is killed.
const VMM_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a container may take to end after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);
/// How long StopPodSandbox waits for killed containers to report their exit codes.
const POD_KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a running sandbox's VMM is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(3);
/// The most ExecSync output kept per stream.
const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// The exit code of a container whose VM went away (as containerd reports unknown exits).
const LOST_EXIT_CODE: i32 = 255;
/// The message of containers whose VM went away.
const VM_EXITED: &str = "the pod's VM exited";
/// How long a broken agent connection waits for the VMM to show as ended.
const VMM_END_GRACE: Duration = Duration::from_secs(2);
/// How long re-attaching to a container's output after a restart may be refused.
const ATTACH_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a container's copied host paths are compared with the host.
const VOLUME_REFRESH_INTERVAL: Duration = Duration::from_secs(3);

/// Why a sandbox or container operation failed; [`PodError::code`] is its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A request that cannot be served as asked.
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown sandbox, container or image.
    #[error("{0}")]
    NotFound(String),
    /// The object is in the wrong state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No image slot, too much volume data.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The container's process cannot be composed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A host path cannot be mounted.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The image store failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guest agent refused or failed a call.
    #[error("{what}: the guest agent answered {}: {}", .status.code(), .status.message())]
    Agent {
        /// The call.
        what: String,
        /// Its answer.
        status: tonic::Status,
    },
    /// The guest agent did not answer a call in time.
    #[error("{what}: the guest agent did not answer within {timeout:?}")]
    AgentTimeout {
        /// The call.
        what: String,
        /// How long it had.
        timeout: Duration,
    },
    /// The guest agent of a new or recovered VM never answered.
    #[error("sandbox {sandbox}: the guest agent did not answer within {timeout:?} (last: {last})")]
    AgentUnreachable {
        /// The sandbox.
        sandbox: String,
        /// How long it was given.
        timeout: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// The VM ended while it was needed.
    #[error("sandbox {sandbox}: the VM exited; the end of its log:\n{log_tail}")]
    VmExited {
        /// The sandbox.
        sandbox: String,
        /// The end of `vmm.log`.
        log_tail: String,
    },
    /// Launching, stopping or cleaning up the VMM failed.
    #[error("sandbox {sandbox}: VMM")]
    Vmm {
        /// The sandbox.
        sandbox: String,
        /// Why.
        #[source]
        source: VmmError,
    },
    /// A record could not be stored.
    #[error("persist state")]
    State(#[from] StateError),
    /// A container log could not be opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A file operation of podvisord failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pod's network could not be set up or released.
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PodError {
    /// The gRPC code a CRI server answers with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            PodError::InvalidArgument(_) | PodError::Process(_) => Code::InvalidArgument,
            PodError::NotFound(_) => Code::NotFound,
            PodError::FailedPrecondition(_) => Code::FailedPrecondition,
            PodError::ResourceExhausted(_) => Code::ResourceExhausted,
            PodError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            PodError::Volume(VolumeError::TooLarge { .. }) => Code::ResourceExhausted,
            PodError::Volume(VolumeError::Io { .. }) => Code::Internal,
            PodError::Volume(_) => Code::InvalidArgument,
            PodError::Image(e) => e.code(),
            PodError::Agent { status, .. } => match status.code() {
                c @ (Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::ResourceExhausted
                | Code::Unimplemented) => c,
                Code::Unavailable | Code::Unknown | Code::Cancelled => Code::Unavailable,
                _ => Code::Internal,
            },
            PodError::AgentTimeout { .. } => Code::DeadlineExceeded,
            PodError::AgentUnreachable { .. } | PodError::VmExited { .. } => Code::Unavailable,
            PodError::Network(e) if e.is_not_ready() => Code::FailedPrecondition,
            PodError::Network(_) => Code::Internal,
            PodError::Vmm { .. }
            | PodError::State(_)
            | PodError::Log(_)
            | PodError::Io { .. }
            | PodError::Internal(_) => Code::Internal,
        }
    }
}

/// A namespace's sharing within the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NamespaceMode {
    /// Shared by the pod's containers.
    #[default]
    Pod,
    /// The container's own.
    Container,
}

impl NamespaceMode {
    fn agent(self) -> i32 {
        match self {
            NamespaceMode::Pod => agent::NamespaceMode::Pod as i32,
            NamespaceMode::Container => agent::NamespaceMode::Container as i32,
        }
    }
}

/// A new pod sandbox, validated.
#[derive(Debug, Clone, Default)]
pub struct SandboxSpec {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// Attempt.
    pub attempt: u32,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Annotations.
    pub annotations: HashMap<String, String>,
    /// RuntimeClass handler ("" for the default).
    pub runtime_handler: String,
    /// Hostname ("" for the pod name).
    pub hostname: String,
    /// Where container logs go ("" for nowhere).
    pub log_directory: PathBuf,
    /// DNS.
    pub dns: DnsConfig,
    /// Published ports (recorded; no networking yet).
    pub port_mappings: Vec<PortMapping>,
    /// Pod-level sysctls.
    pub sysctls: HashMap<String, String>,
}

/// Container resources (cgroup v2 in the guest); zero means unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// cgroup v1 shares.
    pub cpu_shares: u64,
    /// CFS quota in microseconds.
    pub cpu_quota: i64,
    /// CFS period in microseconds.
    pub cpu_period: u64,
    /// cpuset.cpus.
    pub cpuset_cpus: String,
    /// cpuset.mems.
    pub cpuset_mems: String,
    /// memory.max in bytes.
    pub memory_limit_bytes: i64,
    /// pids.max.
    pub pids_limit: i64,
}

impl Resources {
    fn agent(&self) -> agent::LinuxResources {
        agent::LinuxResources {
            cpu_shares: self.cpu_shares,
            cpu_quota: self.cpu_quota,
            cpu_period: self.cpu_period,
            cpuset_cpus: self.cpuset_cpus.clone(),
            cpuset_mems: self.cpuset_mems.clone(),
            memory_limit_bytes: self.memory_limit_bytes,
            pids_limit: self.pids_limit,
        }
    }
}

/// A host path to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute path in the container.
    pub container_path: String,
    /// Absolute path on the host.
    pub host_path: PathBuf,
    /// Read-only.
    pub readonly: bool,
}

/// A new container, validated.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Attempt.
    pub attempt: u32,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Annotations.
    pub annotations: HashMap<String, String>,
    /// The image as named in the request.
    pub image: String,
    /// Replaces the image's Entrypoint (and drops its Cmd).
    pub command: Vec<String>,
    /// Replaces the image's Cmd.
    pub args: Vec<String>,
    /// Working directory ("" for the image's).
    pub working_dir: String,
    /// Environment over the image's.
    pub envs: Vec<(String, String)>,
    /// Host paths.
    pub mounts: Vec<MountSpec>,
    /// Log file relative to the sandbox's log directory ("" for none).
    pub log_path: String,
    /// Allocate a terminal.
    pub tty: bool,
    /// User.
    pub user: UserSpec,
    /// Capabilities added.
    pub cap_add: Vec<String>,
    /// Capabilities dropped.
    pub cap_drop: Vec<String>,
    /// no_new_privs.
    pub no_new_privs: bool,
    /// Read-only root file system.
    pub readonly_rootfs: bool,
    /// Paths masked.
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
    /// PID namespace.
    pub pid_namespace: NamespaceMode,
    /// IPC namespace.
    pub ipc_namespace: NamespaceMode,
    /// Resources.
    pub resources: Resources,
}

/// What ExecSync returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Standard output (at most 16 MiB).
    pub stdout: Vec<u8>,
    /// Standard error (at most 16 MiB).
    pub stderr: Vec<u8>,
    /// Exit code (128+n when killed by signal n).
    pub exit_code: i32,
}

/// One container's statistics.
#[derive(Debug, Clone)]
pub struct ContainerStats {
    /// The container.
    pub record: ContainerRecord,
    /// Its cgroup statistics, when its VM answered.
    pub stats: Option<agent::CgroupStats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

/// `bytes` random bytes from the kernel, in hex.
fn random_bytes(n: usize) -> Result<Vec<u8>, PodError> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| PodError::Io {
            what: "read",
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(buf)
}

fn random_hex(bytes: usize) -> Result<String, PodError> {
    random_bytes(bytes).map(hex::encode)
}

/// A new sandbox or container id: 64 hex digits.
fn new_id() -> Result<String, PodError> {
    random_hex(32)
}

fn slot_name(slot: usize) -> String {
    format!("img{slot}")
}

fn slot_index(name: &str) -> Option<usize> {
    name.strip_prefix("img")?
        .parse()
        .ok()
        .filter(|i| *i < IMAGE_SLOTS)
}

/// The `resolv.conf` of a pod.
fn resolv_conf(dns: &DnsConfig) -> String {
    let mut s = String::new();
    for server in &dns.servers {
        s.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

/// Runs one agent call with a deadline.
async fn call<T>(
    what: impl Into<String>,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, PodError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(PodError::Agent {
            what: what.into(),
            status,
        }),
        Err(_) => Err(PodError::AgentTimeout {
            what: what.into(),
            timeout,
        }),
    }
}

/// Connects to the agent behind `handle` and pings it until it answers, the VMM ends or
/// `timeout` passes.
async fn connect_agent(
    sandbox: &str,
    handle: &VmmHandle,
    timeout: Duration,
) -> Result<AgentClient<Channel>, PodError> {
    let started = Instant::now();
    let mut pause = AGENT_RETRY_FIRST;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = async {
            let mut client = podvisor_proto::hybrid::agent_client(&handle.vsock_uds)
                .await
                .map_err(|e| format!("{e}: {}", error_sources(&e)))?;
            let pong = client
                .ping(agent::PingRequest {})
                .await
                .map_err(|s| format!("Ping: {}", s.message()))?
                .into_inner();
            Ok::<_, String>((client, pong))
        };
        let last = match tokio::time::timeout(AGENT_ATTEMPT_TIMEOUT, attempt).await {
            Ok(Ok((client, pong))) => {
                tracing::info!(
                    sandbox,
                    agent_version = %pong.agent_version,
                    guest_uptime_s = pong.uptime_ns as f64 / 1e9,
                    waited_s = started.elapsed().as_secs_f64(),
                    attempts,
                    "guest agent answered"
                );
                return Ok(client);
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {AGENT_ATTEMPT_TIMEOUT:?}"),
        };
        tracing::trace!(sandbox, "agent not up yet: {last}");
        if !handle.is_alive() {
            return Err(PodError::VmExited {
                sandbox: sandbox.to_string(),
                log_tail: handle.log_tail(),
            });
        }
        if started.elapsed() >= timeout {
            return Err(PodError::AgentUnreachable {
                sandbox: sandbox.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(AGENT_RETRY_MAX);
    }
}

/// The sources of an error, `: `-separated.
fn error_sources(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
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
    templates: template::Templates,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
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

/// Creates `<root_dir>/placeholder.img` (4096 zeros) unless a file of that size is there.
fn ensure_placeholder(root_dir: &Path) -> Result<PathBuf, PodError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root_dir.join(PLACEHOLDER_FILE);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| PodError::Io { what, path, source }
    };
    std::fs::create_dir_all(root_dir).map_err(io("create directory", root_dir))?;
    match path.symlink_metadata() {
        Ok(m) if m.is_file() && m.len() == PLACEHOLDER_BYTES => return Ok(path),
        Ok(_) => std::fs::remove_file(&path).map_err(io("remove bad placeholder", &path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", &path)(e)),
    }
    let tmp = root_dir.join(format!(".{PLACEHOLDER_FILE}.{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.set_len(PLACEHOLDER_BYTES)
        .and_then(|()| f.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
    Ok(path)
}

impl PodManager {
    /// A manager over the stores; creates the image placeholder. Call
    /// [`PodManager::recover`] before serving.
    pub fn new(config: Config, state: StateStore, images: ImageStore) -> Result<Self, PodError> {
        let placeholder = ensure_placeholder(&config.root_dir)?;
        let templates = template::Templates::new(&config.root_dir);
        Ok(Self {
            inner: Arc::new(Inner {
                templates,
                config,
                state,
                images,
                placeholder,
                sandboxes: Mutex::new(HashMap::new()),
                containers: Mutex::new(HashMap::new()),
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
            tracing::error!(container = %c.id, "persist exit: {e}: {}", error_sources(&e));
        }
        c.exited.send_replace(true);
        let r = c.record();
        tracing::info!(container = %c.id, exit_code = r.exit_code, reason = %r.reason, "container exited");
    }

    // ---- sandboxes ----

    /// RunPodSandbox: boots the pod's VM, waits for its agent and sets the pod up. Returns
    /// the sandbox id. On failure nothing of the sandbox is left.
    pub async fn run_sandbox(&self, spec: SandboxSpec) -> Result<String, PodError> {
        let handler = self
            .inner
            .config
            .handler(&spec.runtime_handler)
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?
            .clone();
        let id = new_id()?;
        let dir = self
            .inner
            .config
            .state_dir
            .join(PODS_DIR)
            .join(&id[..POD_DIR_NAME_LEN]);
        if dir.symlink_metadata().is_ok() {
            return Err(PodError::Internal(format!(
                "pod directory {} exists already",
                dir.display()
            )));
        }
        // The network first: the VMM starts inside its namespace, on its TAP.
        let pod_ref = crate::cni::PodRef {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            uid: spec.uid.clone(),
        };
        let net = network::PodNetwork::setup(
            &self.inner.config.cni,
            &id,
            &dir,
            pod_ref,
            &spec.port_mappings,
        )
        .await?;
        let drives = self.slot_drives();
        let template = if handler.template {
            match self
                .inner
                .templates
                .get(&self.template_inputs(&handler))
                .await
            {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(
                        sandbox = %id,
                        handler = %handler.name,
                        "no VM template, booting the kernel: {}",
                        error_sources(&e)
                    );
                    None
                }
            }
        } else {
            None
        };
        let vmm_spec = VmmSpec {
            sandbox_id: id.clone(),
            dir: dir.clone(),
            kernel: handler.kernel.clone(),
            rootfs: handler.image.clone(),
            cmdline_extra: handler.kernel_cmdline_extra.clone(),
            vcpus: handler.vcpus,
            mem_mib: handler.memory_mib,
            drives,
            tap: Some(net.link().tap.clone()),
            mac: Some(net.link().mac.clone()),
            netns: Some(net.netns_path().to_owned()),
            restore: template.as_ref().map(template::Template::restore_config),
        };
        let started = Instant::now();
        let handle = match self.launch(&id, &vmm_spec).await {
            Ok(h) => h,
            Err(e) => {
                net.abandon().await;
                let _ = vmm::remove_pod_dir(&dir);
                return Err(e);
            }
        };
        let hostname = if spec.hostname.is_empty() {
            spec.name.clone()
        } else {
            spec.hostname.clone()
        };
        let record = SandboxRecord {
            id: id.clone(),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            uid: spec.uid.clone(),
            attempt: spec.attempt,
            labels: spec.labels.clone(),
            annotations: spec.annotations.clone(),
            runtime_handler: spec.runtime_handler.clone(),
            created_at_ns: now_ns(),
            state: SandboxState::NotReady,
            vmm: handle.clone(),
            log_directory: spec.log_directory.clone(),
            hostname: hostname.clone(),
            dns: spec.dns.clone(),
            port_mappings: spec.port_mappings.clone(),
            ips: net.ips(),
            netns: Some(net.netns_path().to_owned()),
        };
        // Recorded before the long wait: a crash now leaves a NotReady sandbox to clean up.
        let mut handle = handle;
        let mut booted = match self.inner.state.sandboxes.put(&id, &record) {
            Ok(()) => {
                self.boot(&id, &handle, &spec, &hostname, &net, template.is_some())
                    .await
            }
            Err(e) => Err(e.into()),
        };
        if let (Err(e), Some(t)) = (&booted, &template) {
            // A template that does not restore is dropped (the next pod builds a new one);
            // this pod boots the kernel in the same directory and namespace.
            tracing::warn!(
                sandbox = %id,
                template = %t.key,
                "restore from the VM template failed, booting the kernel: {e}"
            );
            t.discard();
            let h = handle.clone();
            let _ = tokio::task::spawn_blocking(move || h.kill()).await;
            let cold = VmmSpec {
                restore: None,
                ..vmm_spec
            };
            booted = match self.launch(&id, &cold).await {
                Ok(h) => {
                    handle = h;
                    let record = SandboxRecord {
                        vmm: handle.clone(),
                        ..record.clone()
                    };
                    match self.inner.state.sandboxes.put(&id, &record) {
                        Ok(()) => self.boot(&id, &handle, &spec, &hostname, &net, false).await,
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e),
            };
        }
        let client = match booted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(sandbox = %id, "RunPodSandbox failed, cleaning up: {e}");
                self.discard_vm(&id, &handle).await;
                net.abandon().await;
                return Err(e);
            }
        };
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            record: Mutex::new(SandboxRecord {
                state: SandboxState::Ready,
                vmm: handle.clone(),
                ..record
            }),
            agent: Mutex::new(Some(client)),
            stopping: AtomicBool::new(false),
            lifecycle: tokio::sync::Mutex::new(Default::default()),
        });
        if let Err(e) = self.put_sandbox(&sb) {
            self.discard_vm(&id, &handle).await;
            net.abandon().await;
            return Err(e);
        }
        lock(&self.inner.sandboxes).insert(id.clone(), sb.clone());
        self.watch_vmm(sb);
        tracing::info!(
            sandbox = %id,
            pod = %format!("{}/{}", spec.namespace, spec.name),
            secs = started.elapsed().as_secs_f64(),
            restored = template.is_some(),
            "sandbox ready"
        );
        Ok(id)
    }

    /// A pod VM's image slots, each on the placeholder until an image is swapped in.
    fn slot_drives(&self) -> Vec<DriveSpec> {
        (0..IMAGE_SLOTS)
            .map(|slot| DriveSpec {
                id: slot_name(slot),
                path: self.inner.placeholder.clone(),
                read_only: true,
            })
            .collect()
    }

    fn template_inputs(&self, handler: &Handler) -> template::TemplateInputs {
        template::TemplateInputs {
            handler: handler.clone(),
            vmm_binary: self.inner.config.vmm_binary.clone(),
            drives: self.slot_drives(),
        }
    }

    /// In the background: removes the templates no handler uses any more (an earlier VMM,
    /// kernel, image or configuration), then builds the VM template of every handler that
    /// uses one, so that the first pod of a handler restores instead of waiting for a kernel
    /// boot. Failures are logged: those pods boot cold.
    pub fn prepare_templates(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let config = &this.inner.config;
            let wanted: Vec<(String, template::TemplateInputs)> = config
                .handler_names()
                .into_iter()
                .filter_map(|name| config.handler(name).ok())
                .filter(|h| h.template)
                .map(|h| (h.name.clone(), this.template_inputs(h)))
                .collect();
            let (t, w) = (this.clone(), wanted.clone());
            let pruned = tokio::task::spawn_blocking(move || {
                let mut keep = Vec::new();
                for (name, inputs) in &w {
                    match t.inner.templates.key(inputs) {
                        Ok(key) => keep.push(key),
                        // Its pods fail the same way; nothing of it is worth keeping.
                        Err(e) => tracing::warn!(handler = %name, "template inputs: {}", error_sources(&e)),
                    }
                }
                t.inner.templates.prune(&keep);
            })
            .await;
            if let Err(e) = pruned {
                tracing::error!("template prune task: {e}");
            }
            for (name, inputs) in &wanted {
                if let Err(e) = this.inner.templates.get(inputs).await {
                    if this.inner.templates.stopping() {
                        tracing::info!(handler = %name, "template build ended: podvisord stops");
                        return;
                    }
                    tracing::warn!(
                        handler = %name,
                        "no VM template; its pods will boot the kernel: {e}: {}",
                        error_sources(&e)
                    );
                }
            }
        })
    }

    /// For podvisord's shutdown: stops a template VM being built (pod VMs keep running).
    pub async fn shutdown(&self) {
        self.inner.templates.shutdown().await;
    }

    /// Starts the VMM of `spec` (a blocking launch).
    async fn launch(&self, id: &str, spec: &VmmSpec) -> Result<VmmHandle, PodError> {
        let binary = self.inner.config.vmm_binary.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || vmm::launch(&binary, &spec))
            .await
            .map_err(|e| PodError::Internal(format!("launch task: {e}")))?
            .map_err(|source| PodError::Vmm {
                sandbox: id.to_string(),
                source,
            })
    }

    /// Waits for the new VM's agent and sets the pod up in it. A VM `restored` from a
    /// template still has the template's NIC MAC, random state and clock: the agent takes
    /// the pod's MAC, mixes in host random bytes and steps its clock (done on cold boots
    /// too: the guest clock then starts exact).
    async fn boot(
        &self,
        id: &str,
        handle: &VmmHandle,
        spec: &SandboxSpec,
        hostname: &str,
        net: &network::PodNetwork,
        restored: bool,
    ) -> Result<AgentClient<Channel>, PodError> {
        let timeout = if restored {
            AGENT_RESTORE_TIMEOUT
        } else {
            AGENT_BOOT_TIMEOUT
        };
        let mut client = connect_agent(id, handle, timeout).await?;
        let mut net_config = net.guest_config()?;
        if restored {
            for i in &mut net_config.interfaces {
                i.current_mac = template::TEMPLATE_MAC.to_string();
            }
        }
        call(
            "ConfigureNetwork",
            AGENT_CALL_TIMEOUT,
            client.configure_network(net_config),
        )
        .await?;
        let req = agent::SetupSandboxRequest {
            sandbox_id: id.to_string(),
            hostname: hostname.to_string(),
            resolv_conf: resolv_conf(&spec.dns),
            hosts: Vec::new(),
            sysctls: spec.sysctls.clone(),
            random_seed: random_bytes(RANDOM_SEED_BYTES)?,
            time_unix_nanos: now_ns(),
        };
        call(
            "SetupSandbox",
            AGENT_CALL_TIMEOUT,
            client.setup_sandbox(req),
        )
        .await?;
        Ok(client)
    }

    /// Kills a VM that never became a usable sandbox and removes all trace of it.
    async fn discard_vm(&self, id: &str, handle: &VmmHandle) {
        let h = handle.clone();
        let done = tokio::task::spawn_blocking(move || {
            h.kill()?;
            h.remove_dir()
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sandbox = id, "clean up VM: {e}: {}", error_sources(&e)),
            Err(e) => tracing::error!(sandbox = id, "clean up task: {e}"),
        }
        if let Err(e) = self.inner.state.sandboxes.remove(id) {
            tracing::error!(sandbox = id, "remove record: {e}");
        }
    }

    /// Watches a ready sandbox's VMM: if it ends unasked, the sandbox becomes NotReady and
    /// its containers exited.
    fn watch_vmm(&self, sb: Arc<Sandbox>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                if sb.stopping.load(Ordering::SeqCst)
                    || sb.state() != SandboxState::Ready
                    || this.sandbox_arc(&sb.id).is_none()
                {
                    return;
                }
                let handle = lock(&sb.record).vmm.clone();
                if !handle.is_alive() {
                    if sb.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    tracing::warn!(
                        sandbox = %sb.id,
                        "the pod's VM exited; the end of its log:\n{}",
                        handle.log_tail()
                    );
                    this.vm_gone(&sb, VM_EXITED);
                    return;
                }
            }
        });
    }

    /// The sandbox's VM is gone: NotReady, containers exited.
    fn vm_gone(&self, sb: &Sandbox, message: &str) {
        lock(&sb.record).state = SandboxState::NotReady;
        lock(&sb.agent).take();
        if let Err(e) = self.put_sandbox(sb) {
            tracing::error!(sandbox = %sb.id, "persist: {e}");
        }
        for c in self.containers_of(&sb.id) {
            self.mark_exited(&c, LOST_EXIT_CODE, "Error", message);
        }
    }

    /// StopPodSandbox: kills the containers, stops the VM. Idempotent; an unknown id is not
    /// an error.
    pub async fn stop_sandbox(&self, id: &str) -> Result<(), PodError> {
        let Some(sb) = self.sandbox_arc(id) else {
            return Ok(());
        };
        let _slots = sb.lifecycle.lock().await;
        sb.stopping.store(true, Ordering::SeqCst);
        let handle = lock(&sb.record).vmm.clone();
        let live: Vec<Arc<Container>> = self
            .containers_of(id)
            .into_iter()
            .filter(|c| c.state() != ContainerState::Exited)
            .collect();
        let client = lock(&sb.agent).clone();
        if let (false, Some(mut client)) = (live.is_empty(), client) {
            for c in &live {
                let req = agent::DeleteContainerRequest {
                    container_id: lock(&c.record).agent_container_id.clone(),
                    force: true,
                };
                if let Err(e) =
                    call("DeleteContainer", KILL_WAIT, client.delete_container(req)).await
                {
                    tracing::warn!(container = %c.id, "kill with its pod: {e}");
                }
            }
            for c in &live {
                c.wait_exited(POD_KILL_WAIT).await;
            }
        }
        lock(&sb.agent).take();
        let h = handle.clone();
        let stopped = tokio::task::spawn_blocking(move || h.stop(VMM_STOP_TIMEOUT))
            .await
            .map_err(|e| PodError::Internal(format!("stop task: {e}")))?
            .map_err(|source| PodError::Vmm {
                sandbox: id.to_string(),
                source,
            })?;
        tracing::info!(sandbox = id, outcome = ?stopped, "sandbox VM stopped");
        for c in self.containers_of(id) {
            self.mark_exited(&c, 137, "Error", "stopped with its pod");
        }
        lock(&sb.record).state = SandboxState::NotReady;
        self.put_sandbox(&sb)?;
        let pod_dir = lock(&sb.record).vmm.dir.clone();
        network::release_recorded(&self.inner.config.cni, id, &pod_dir).await?;
        Ok(())
    }

    /// RemovePodSandbox: stops it if needed, removes its containers, its pod directory and
    /// its record. An unknown id is not an error.
    pub async fn remove_sandbox(&self, id: &str) -> Result<(), PodError> {
        if self.sandbox_arc(id).is_none() {
            return Ok(());
        }
        self.stop_sandbox(id).await?;
        let Some(sb) = self.sandbox_arc(id) else {
            return Ok(());
        };
        let _slots = sb.lifecycle.lock().await;
        for c in self.containers_of(id) {
            self.forget_container(&sb, &c)?;
        }
        let handle = lock(&sb.record).vmm.clone();
        tokio::task::spawn_blocking(move || {
            if handle.is_alive() {
                handle.kill()?;
            }
            handle.remove_dir()
        })
        .await
        .map_err(|e| PodError::Internal(format!("remove task: {e}")))?
        .map_err(|source| PodError::Vmm {
            sandbox: id.to_string(),
            source,
        })?;
        network::delete_netns(id).await?;
        self.inner.state.sandboxes.remove(id)?;
        lock(&self.inner.sandboxes).remove(id);
        tracing::info!(sandbox = id, "sandbox removed");
        Ok(())
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

    // ---- containers ----

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
        if sb.state() != SandboxState::Ready {
            return Err(PodError::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not ready"
            )));
        }
        let mut client = sb.agent()?;
        let sandbox = sb.record();
        let lease = self
            .inner
            .images
            .acquire(&spec.image)
            .map_err(|e| match e {
                ImageError::NotFound(_) => {
                    PodError::NotFound(format!("image {:?} not found: pull it first", spec.image))
                }
                e => PodError::Image(e),
            })?;
        let image = lease.record().clone();
        let rootfs = lease.rootfs();
        let image_bytes = std::fs::metadata(&rootfs)
            .map_err(|source| PodError::Io {
                what: "inspect image file",
                path: rootfs.clone(),
                source,
            })?
            .len();

        let argv = process::compose_args(&spec.image, &image.config, &spec.command, &spec.args)?;
        let mut env = process::compose_env(&image.config.env, &spec.envs)?;
        if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
            env.push(format!("HOSTNAME={}", sandbox.hostname));
        }
        let mut defaults = process::compose_user(&image.config.user, &spec.user);
        defaults.env = env;
        defaults.cwd = if spec.working_dir.is_empty() {
            image.config.working_dir.clone()
        } else {
            spec.working_dir.clone()
        };
        let capabilities = process::compose_capabilities(&spec.cap_add, &spec.cap_drop)?;

        let id = new_id()?;
        let log_path = if sandbox.log_directory.as_os_str().is_empty() || spec.log_path.is_empty() {
            PathBuf::new()
        } else {
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
            sandbox.log_directory.join(rel)
        };
        let writer = if log_path.as_os_str().is_empty() {
            None
        } else {
            Some(CriLogWriter::open(&log_path)?)
        };

        // Host paths, read on a blocking thread.
        let mounts_spec = spec.mounts.clone();
        let cid = id.clone();
        let collected = tokio::task::spawn_blocking(move || {
            let mut budget = Budget::default();
            mounts_spec
                .iter()
                .enumerate()
                .map(|(n, m)| volumes::collect(&cid, n, &m.host_path, &mut budget))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| PodError::Internal(format!("volume task: {e}")))??;

        // The image's slot.
        let slot = self.choose_slot(&sb.id, &slots, &image.id)?;
        let serial = slot_name(slot);
        if slots[slot].as_deref() != Some(image.id.as_str()) {
            slots[slot] = None;
            let handle = sandbox.vmm.clone();
            let (s, path) = (serial.clone(), rootfs.clone());
            let t = Instant::now();
            tokio::task::spawn_blocking(move || handle.swap_drive(&s, &path, true))
                .await
                .map_err(|e| PodError::Internal(format!("swap task: {e}")))?
                .map_err(|source| PodError::Vmm {
                    sandbox: sb.id.clone(),
                    source,
                })?;
            slots[slot] = Some(image.id.clone());
            tracing::info!(sandbox = %sb.id, slot = %serial, image = %image.id, ms = t.elapsed().as_millis(), "image drive swapped in");
        }

        let mut mounts = Vec::new();
        let mut watch = VolumeWatch::new(&id);
        for (n, (m, source)) in spec.mounts.iter().zip(collected).enumerate() {
            match source {
                VolumeSource::Copied { source, files } => {
                    watch.add(n, &m.host_path, &files);
                    for f in files {
                        copy_volume_file(&mut client, f).await?;
                    }
                    mounts.push(agent::Mount {
                        source,
                        destination: m.container_path.clone(),
                        r#type: "bind".into(),
                        options: vec!["rbind".into()],
                        readonly: m.readonly,
                    });
                }
                VolumeSource::Empty => mounts.push(agent::Mount {
                    source: "tmpfs".into(),
                    destination: m.container_path.clone(),
                    r#type: "tmpfs".into(),
                    options: vec!["nosuid".into(), "nodev".into(), "mode=0755".into()],
                    readonly: m.readonly,
                }),
            }
        }

        let req = agent::CreateContainerRequest {
            container_id: id.clone(),
            process: Some(agent::Process {
                args: argv,
                env: defaults.env.clone(),
                cwd: defaults.cwd.clone(),
                user: Some(defaults.user()),
                capabilities,
                no_new_privs: spec.no_new_privs,
                rlimits: Vec::new(),
                terminal: spec.tty,
                console_width: 0,
                console_height: 0,
                stdin: false,
            }),
            image: Some(agent::Image {
                block_device_serial: serial.clone(),
                subpath: String::new(),
                size_bytes: image_bytes,
            }),
            mounts,
            namespaces: Some(agent::NamespaceOptions {
                pid: spec.pid_namespace.agent(),
                ipc: spec.ipc_namespace.agent(),
                uts: NamespaceMode::Pod.agent(),
            }),
            resources: Some(spec.resources.agent()),
            readonly_rootfs: spec.readonly_rootfs,
            masked_paths: spec.masked_paths.clone(),
            readonly_paths: spec.readonly_paths.clone(),
            sysctls: HashMap::new(),
        };
        let t = Instant::now();
        let created = call(
            format!("CreateContainer {id}"),
            AGENT_CALL_TIMEOUT,
            client.create_container(req),
        )
        .await?;
        tracing::info!(container = %id, sandbox = %sb.id, pid = created.pid, ms = t.elapsed().as_millis(), "container created");

        let record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sb.id.clone(),
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
            agent_container_id: id.clone(),
            guest_pid: created.pid,
            image_drive_id: serial,
        };
        let persisted = serde_json::to_vec(&defaults)
            .map_err(|e| PodError::Internal(format!("encode exec defaults: {e}")))
            .and_then(|json| {
                let path = sb.exec_defaults_path(&id);
                std::fs::write(&path, json).map_err(|source| PodError::Io {
                    what: "write",
                    path,
                    source,
                })
            })
            .and_then(|()| Ok(self.inner.state.containers.put(&id, &record)?));
        if let Err(e) = persisted {
            let req = agent::DeleteContainerRequest {
                container_id: id.clone(),
                force: true,
            };
            let _ = call("DeleteContainer", KILL_WAIT, client.delete_container(req)).await;
            let _ = std::fs::remove_file(sb.exec_defaults_path(&id));
            return Err(e);
        }
        let c = Arc::new(Container {
            id: id.clone(),
            sandbox_id: sb.id.clone(),
            record: Mutex::new(record),
            lease: Mutex::new(Some(lease)),
            log: Arc::new(Mutex::new(writer)),
            exited: watch::Sender::new(false),
        });
        lock(&self.inner.containers).insert(id.clone(), c.clone());
        drop(slots);
        refresh_volumes(c.clone(), client.clone(), watch);
        self.supervise(c, client, true);
        Ok(id)
    }

    /// A slot for `image_id` in the sandbox: the one a container of the image uses, else a
    /// free one (preferring one still backed by the image).
    fn choose_slot(
        &self,
        sandbox_id: &str,
        backing: &[Option<String>; IMAGE_SLOTS],
        image_id: &str,
    ) -> Result<usize, PodError> {
        let mut users: [Option<String>; IMAGE_SLOTS] = Default::default();
        for c in self.containers_of(sandbox_id) {
            let r = lock(&c.record);
            if let Some(slot) = slot_index(&r.image_drive_id) {
                users[slot] = Some(r.image_id.clone());
            }
        }
        if let Some(slot) = users.iter().position(|u| u.as_deref() == Some(image_id)) {
            return Ok(slot);
        }
        let free = |slot: &usize| users[*slot].is_none();
        (0..IMAGE_SLOTS)
            .filter(free)
            .find(|s| backing[*s].as_deref() == Some(image_id))
            .or_else(|| (0..IMAGE_SLOTS).find(free))
            .ok_or_else(|| {
                PodError::ResourceExhausted(format!(
                    "pod sandbox {sandbox_id} already runs {IMAGE_SLOTS} different images, the \
                     most a podvisor pod can hold"
                ))
            })
    }

    /// Copies the container's output to its log (when `attach`), then waits for its exit.
    fn supervise(&self, c: Arc<Container>, mut client: AgentClient<Channel>, attach: bool) {
        let this = self.clone();
        tokio::spawn(async move {
            let agent_id = lock(&c.record).agent_container_id.clone();
            if attach {
                match attach_output(&mut client, &agent_id).await {
                    Ok(stream) => pump_output(&c, stream).await,
                    Err(s) => tracing::warn!(
                        container = %c.id,
                        "attach output: {}; the container's output is not logged",
                        s.message()
                    ),
                }
                if let Some(w) = lock(&c.log).take()
                    && let Err(e) = w.close()
                {
                    tracing::warn!(container = %c.id, "close log: {e}");
                }
            }
            let wait = client
                .wait_process(agent::WaitProcessRequest {
                    container_id: agent_id,
                    exec_id: String::new(),
                })
                .await;
            match wait {
                Ok(w) => {
                    let w = w.into_inner();
                    let reason = if w.oom_killed {
                        "OOMKilled"
                    } else if w.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    };
                    this.mark_exited_with(&c, |r| {
                        r.exit_code = w.exit_code;
                        r.reason = reason.to_string();
                        r.message = String::new();
                        if r.started_at_ns == 0 && w.started_at_unix_nanos > 0 {
                            r.started_at_ns = w.started_at_unix_nanos;
                        }
                        r.finished_at_ns = if w.finished_at_unix_nanos > 0 {
                            w.finished_at_unix_nanos
                        } else {
                            now_ns()
                        };
                    });
                }
                Err(s) => {
                    let message = if s.code() == tonic::Code::NotFound {
                        "the container is gone from the pod's VM".to_string()
                    } else {
                        format!("lost the container's VM: {}", s.message())
                    };
                    // A stopping VM is reported by StopPodSandbox, a dead one as the VM's exit
                    // (here, as the connection usually breaks before the watcher looks).
                    tracing::info!(container = %c.id, "wait: {}", s.message());
                    let Some(sb) = this.sandbox_arc(&c.sandbox_id) else {
                        return;
                    };
                    if sb.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let handle = lock(&sb.record).vmm.clone();
                    if vmm_ended(&handle).await {
                        if !sb.stopping.load(Ordering::SeqCst) {
                            tracing::warn!(sandbox = %sb.id, "the pod's VM exited");
                            this.vm_gone(&sb, VM_EXITED);
                        }
                        return;
                    }
                    this.mark_exited(&c, LOST_EXIT_CODE, "Error", &message);
                }
            }
        });
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

    /// Drops everything podvisord holds for a container.
    fn forget_container(&self, sb: &Sandbox, c: &Container) -> Result<(), PodError> {
        lock(&c.log).take();
        lock(&c.lease).take();
        let _ = std::fs::remove_file(sb.exec_defaults_path(&c.id));
        self.inner.state.containers.remove(&c.id)?;
        lock(&self.inner.containers).remove(&c.id);
        c.exited.send_replace(true);
        Ok(())
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

    /// ExecSync: runs `cmd` in the running container with its user, environment and working
    /// directory; past `timeout` the process is killed and DeadlineExceeded returned.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, PodError> {
        let (c, sb) = self.container_of(id)?;
        if c.state() != ContainerState::Running {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        if cmd.is_empty() {
            return Err(PodError::InvalidArgument("exec: empty command".into()));
        }
        let mut client = sb.agent()?;
        let path = sb.exec_defaults_path(id);
        let defaults: ExecDefaults = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| {
                tracing::warn!(container = id, "no {}: exec as root", path.display());
                ExecDefaults::default()
            });
        let agent_id = lock(&c.record).agent_container_id.clone();
        let exec_id = random_hex(8)?;
        let t = Instant::now();
        call(
            "ExecProcess",
            AGENT_CALL_TIMEOUT,
            client.exec_process(agent::ExecProcessRequest {
                container_id: agent_id.clone(),
                exec_id: exec_id.clone(),
                process: Some(defaults.process(cmd)),
            }),
        )
        .await?;
        let mut io_client = client.clone();
        let (cid, eid) = (agent_id.clone(), exec_id.clone());
        let run = async move {
            let first = agent::ProcessInput {
                container_id: cid.clone(),
                exec_id: eid.clone(),
                ..Default::default()
            };
            let mut out = ExecOutput::default();
            let mut stream = io_client
                .process_io(tokio_stream::iter([first]))
                .await
                .map_err(|status| PodError::Agent {
                    what: "ProcessIo".into(),
                    status,
                })?
                .into_inner();
            while let Some(m) = stream.message().await.map_err(|status| PodError::Agent {
                what: "ProcessIo".into(),
                status,
            })? {
                let buf = if m.stream == agent::Stream::Stderr as i32 {
                    &mut out.stderr
                } else {
                    &mut out.stdout
                };
                let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
                buf.extend_from_slice(&m.data[..m.data.len().min(room)]);
            }
            let w = io_client
                .wait_process(agent::WaitProcessRequest {
                    container_id: cid,
                    exec_id: eid,
                })
                .await
                .map_err(|status| PodError::Agent {
                    what: "WaitProcess".into(),
                    status,
                })?
                .into_inner();
            out.exit_code = w.exit_code;
            Ok::<_, PodError>(out)
        };
        let result = match timeout {
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(r) => r,
                Err(_) => {
                    let req = agent::SignalProcessRequest {
                        container_id: agent_id,
                        exec_id,
                        signal: libc::SIGKILL as u32,
                        all: false,
                    };
                    let _ = call(
                        "SignalProcess",
                        AGENT_CALL_TIMEOUT,
                        client.signal_process(req),
                    )
                    .await;
                    return Err(PodError::DeadlineExceeded(format!(
                        "exec in container {id} did not finish within {limit:?}; killed"
                    )));
                }
            },
            None => run.await,
        };
        tracing::debug!(
            container = id,
            ms = t.elapsed().as_millis(),
            "exec finished"
        );
        result
    }

    /// UpdateContainerResources.
    pub async fn update_resources(&self, id: &str, resources: Resources) -> Result<(), PodError> {
        let (c, sb) = self.container_of(id)?;
        if c.state() == ContainerState::Exited {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} has exited"
            )));
        }
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

    // ---- restart ----

    /// Loads every record after a (re)start: sandboxes whose VMM still runs and whose agent
    /// answers stay ready, with their containers' exits watched again; the others become
    /// NotReady with their containers exited. Container records without a sandbox are
    /// removed.
    pub async fn recover(&self) -> Result<(), PodError> {
        let sandboxes = self.inner.state.sandboxes.load_all()?;
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
        for (id, record) in sandboxes {
            let handle = record.vmm.clone();
            let was_ready = record.state == SandboxState::Ready;
            let client = if was_ready && handle.is_alive() {
                match connect_agent(&id, &handle, AGENT_RECONNECT_TIMEOUT).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(sandbox = %id, "agent of a running VM unreachable: {e}");
                        None
                    }
                }
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
            for r in by_sandbox.remove(&id).unwrap_or_default() {
                let lease = match self.inner.images.acquire(&r.image_id) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(container = %r.id, "image {}: {e}", r.image_id);
                        None
                    }
                };
                let log =
                    if r.state == ContainerState::Running && !r.log_path.as_os_str().is_empty() {
                        match CriLogWriter::open(&r.log_path) {
                            Ok(w) => Some(w),
                            Err(e) => {
                                tracing::warn!(container = %r.id, "reopen log: {e}");
                                None
                            }
                        }
                    } else {
                        None
                    };
                let exited = r.state == ContainerState::Exited;
                let c = Arc::new(Container {
                    id: r.id.clone(),
                    sandbox_id: id.clone(),
                    record: Mutex::new(r),
                    lease: Mutex::new(lease),
                    log: Arc::new(Mutex::new(log)),
                    exited: watch::Sender::new(exited),
                });
                lock(&self.inner.containers).insert(c.id.clone(), c.clone());
                match (&client, exited) {
                    (_, true) => {}
                    (Some(client), false) => {
                        // What is in the guest is unknown: the first poll copies it all again.
                        let mut watch = VolumeWatch::new(&c.id);
                        for (n, m) in lock(&c.record).mounts.iter().enumerate() {
                            watch.add(n, &m.host_path, &[]);
                        }
                        refresh_volumes(c.clone(), client.clone(), watch);
                        self.supervise(c, client.clone(), true);
                    }
                    (None, false) => self.mark_exited(&c, LOST_EXIT_CODE, "Error", message),
                }
            }
            if ready {
                self.watch_vmm(sb);
            }
            tracing::info!(sandbox = %id, ready, "sandbox recovered");
        }
        Ok(())
    }
}

/// Writes one host file into the guest: renamed into place, except the file of a
/// single-file mount, which the container binds itself and so must be rewritten in place.
async fn copy_volume_file(
    client: &mut AgentClient<Channel>,
    f: volumes::VolumeFile,
) -> Result<(), PodError> {
    let req = agent::CopyFileRequest {
        path: f.guest_path,
        mode: f.mode,
        uid: f.uid,
        gid: f.gid,
        contents: f.contents,
        atomic: !f.in_place,
        create_parents: true,
        dir_mode: 0o755,
    };
    call("CopyFile", AGENT_CALL_TIMEOUT, client.copy_file(req)).await?;
    Ok(())
}

/// Copies the container's host paths into its guest again whenever they change on the
/// host, every [`VOLUME_REFRESH_INTERVAL`], until the container exits or is removed (both
/// set `exited`, as does StopPodSandbox). Files removed on the host stay in the guest.
fn refresh_volumes(c: Arc<Container>, mut client: AgentClient<Channel>, watch: VolumeWatch) {
    if watch.is_empty() {
        return;
    }
    let mut exited = c.exited.subscribe();
    tokio::spawn(async move {
        let mut watch = Some(watch);
        // Warn once per run of failures, not every poll.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = exited.wait_for(|e| *e) => return,
                () = tokio::time::sleep(VOLUME_REFRESH_INTERVAL) => {}
            }
            let Some(w) = watch.take() else { return };
            let (w, changes) = match tokio::task::spawn_blocking(move || {
                let changes = w.changes();
                (w, changes)
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(container = %c.id, "volume refresh task: {e}");
                    return;
                }
            };
            let w = watch.insert(w);
            let result = match changes {
                Ok(files) => {
                    let mut result = Ok(());
                    let count = files.len();
                    for f in files {
                        let (path, fingerprint) = (f.guest_path.clone(), f.fingerprint);
                        if let Err(e) = copy_volume_file(&mut client, f).await {
                            result = Err(e);
                            break;
                        }
                        w.copied(path, fingerprint);
                    }
                    if result.is_ok() && count > 0 {
                        tracing::info!(container = %c.id, files = count, "volume files copied again");
                    }
                    result
                }
                Err(e) => Err(PodError::from(e)),
            };
            match result {
                Ok(()) => failing = false,
                Err(e) if !failing && !*exited.borrow() => {
                    failing = true;
                    tracing::warn!(container = %c.id, "refreshing the container's volumes: {e}");
                }
                Err(_) => {}
            }
        }
    });
}

/// Whether the VMM has ended or ends within [`VMM_END_GRACE`]: a killed VMM's sockets close
/// a moment before `/proc` shows it gone.
async fn vmm_ended(handle: &VmmHandle) -> bool {
    let until = Instant::now() + VMM_END_GRACE;
    loop {
        if !handle.is_alive() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Agent answers meaning "already gone" are success for stop and remove.
fn ignore_gone<T>(r: Result<T, PodError>) -> Result<(), PodError> {
    match r {
        Ok(_) => Ok(()),
        Err(PodError::Agent { status, .. })
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Attaches to a container's output. After a podvisord restart the agent may not have seen
/// the previous attachment's connection end yet and answers FailedPrecondition ("already
/// attached") until it has: that is retried for [`ATTACH_RETRY_TIMEOUT`].
async fn attach_output(
    client: &mut AgentClient<Channel>,
    agent_id: &str,
) -> Result<tonic::Streaming<agent::ProcessOutput>, tonic::Status> {
    let until = Instant::now() + ATTACH_RETRY_TIMEOUT;
    loop {
        let first = agent::ProcessInput {
            container_id: agent_id.to_string(),
            ..Default::default()
        };
        match client.process_io(tokio_stream::iter([first])).await {
            Ok(stream) => return Ok(stream.into_inner()),
            Err(s) if s.code() == tonic::Code::FailedPrecondition && Instant::now() < until => {
                tracing::debug!(
                    container = agent_id,
                    "attach output: {}; retrying",
                    s.message()
                );
                tokio::time::sleep(AGENT_RETRY_MAX).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Copies a container's output stream to its log until both streams end.
async fn pump_output(c: &Container, mut stream: tonic::Streaming<agent::ProcessOutput>) {
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if m.data.is_empty() {
                    continue;
                }
                let which = if m.stream == agent::Stream::Stderr as i32 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                if let Some(w) = lock(&c.log).as_mut()
                    && let Err(e) = w.write(which, &m.data)
                {
                    tracing::warn!(container = %c.id, "write log: {e}");
                }
            }
            Ok(None) => return,
            Err(s) => {
                tracing::info!(container = %c.id, "output stream ended: {}", s.message());
                return;
            }
        }
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

    #[test]
    fn slots_are_named_img0_to_img3() {
        assert_eq!(slot_name(3), "img3");
        assert_eq!(slot_index("img2"), Some(2));
        assert_eq!(slot_index("img4"), None);
        assert_eq!(slot_index("root"), None);
    }

    #[test]
    fn resolv_conf_lists_servers_searches_options() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into(), "1.1.1.1".into()],
            searches: vec!["a.svc".into(), "svc".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "nameserver 10.96.0.10\nnameserver 1.1.1.1\nsearch a.svc svc\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&DnsConfig::default()), "");
    }

    #[test]
    fn placeholder_is_created_once_and_repaired() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let p = ensure_placeholder(&root).unwrap();
        assert_eq!(p, root.join(PLACEHOLDER_FILE));
        let meta = p.metadata().unwrap();
        assert_eq!(meta.len(), PLACEHOLDER_BYTES);
        assert!(std::fs::read(&p).unwrap().iter().all(|b| *b == 0));
        let ino = meta.ino();
        assert_eq!(ensure_placeholder(&root).unwrap(), p);
        assert_eq!(p.metadata().unwrap().ino(), ino, "kept, not rewritten");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        ensure_placeholder(&root).unwrap();
        let meta = p.symlink_metadata().unwrap();
        assert!(meta.is_file() && meta.len() == PLACEHOLDER_BYTES);
    }

    #[test]
    fn error_codes() {
        use tonic::Code;
        assert_eq!(
            PodError::InvalidArgument("x".into()).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            PodError::Volume(VolumeError::TooLarge { path: "/x".into() }).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            PodError::Volume(VolumeError::Symlink("/x".into())).code(),
            Code::InvalidArgument
        );
        let agent = |code| PodError::Agent {
            what: "x".into(),
            status: tonic::Status::new(code, "m"),
        };
        assert_eq!(agent(Code::NotFound).code(), Code::NotFound);
        assert_eq!(agent(Code::Unknown).code(), Code::Unavailable);
        assert_eq!(agent(Code::DataLoss).code(), Code::Internal);
        assert!(ignore_gone::<()>(Err(agent(Code::NotFound))).is_ok());
        assert!(ignore_gone::<()>(Err(agent(Code::Internal))).is_err());
    }
}
