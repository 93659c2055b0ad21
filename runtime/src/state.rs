//! Persisted sandbox and container records: one JSON file per object,
//! `<state_root>/sandboxes/<id>.json` and `<state_root>/containers/<id>.json`, so podvisord
//! finds its pods and containers again after a restart.
//!
//! A record is replaced atomically (a temporary file in the same directory, written, fsynced,
//! renamed over the old one, then the directory fsynced): a crash leaves the old record or
//! the new one, never half of one. Record types are plain (no CRI types), so what is on disk
//! does not change with the gRPC crate.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use podvisor_common::IoError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::vmm::VmmHandle;

/// The directory of sandbox records under the state root.
pub const SANDBOXES_DIR: &str = "sandboxes";
/// The directory of container records under the state root.
pub const CONTAINERS_DIR: &str = "containers";

/// The longest id: 128 bytes (CRI ids are 64 hex digits).
pub const MAX_ID_LEN: usize = 128;
/// A record file larger than this is not ours.
const MAX_RECORD_BYTES: u64 = 4 * 1024 * 1024;
const RECORD_SUFFIX: &str = ".json";

/// Why a record could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An id that cannot name a file: empty, too long, or not `[A-Za-z0-9][A-Za-z0-9_.-]*`.
    #[error("invalid id {0:?}")]
    InvalidId(String),
    /// The store directory exists and is not a directory (a symlink, say).
    #[error("state directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A file system operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A record could not be turned into JSON or back.
    #[error("record {path}")]
    Json {
        /// The record's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io(IoError::new(what, path, source))
}

/// Checks that `id` is `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`: a file name of its own, never a
/// path, never hidden (temporary files start with a dot).
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && id.len() <= MAX_ID_LEN {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_string()))
    }
}

/// One directory of records of type `T`, one `<id>.json` file each.
#[derive(Debug)]
pub struct Store<T> {
    dir: PathBuf,
    records: PhantomData<fn() -> T>,
}

/// Makes temporary names unique among the puts of this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl<T: Serialize + DeserializeOwned> Store<T> {
    /// Opens the store in `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create directory", &dir))?;
        let meta = dir
            .symlink_metadata()
            .map_err(io_err("inspect directory", &dir))?;
        if !meta.is_dir() {
            return Err(StateError::NotADirectory(dir));
        }
        Ok(Self {
            dir,
            records: PhantomData,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        Ok(self.dir.join(format!("{id}{RECORD_SUFFIX}")))
    }

    /// Writes `record` as `id`, replacing any earlier one atomically and durably.
    pub fn put(&self, id: &str, record: &T) -> Result<(), StateError> {
        let path = self.path_of(id)?;
        let json = serde_json::to_vec(record).map_err(|source| StateError::Json {
            path: path.clone(),
            source,
        })?;
        let temp = self.dir.join(format!(
            ".{id}{RECORD_SUFFIX}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_new_file(&temp, &json)
            .and_then(|()| std::fs::rename(&temp, &path).map_err(io_err("rename", &temp)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        self.sync_dir()
    }

    /// Reads the record `id`; `None` when there is none.
    pub fn get(&self, id: &str) -> Result<Option<T>, StateError> {
        let path = self.path_of(id)?;
        let json = match read_record_file(&path) {
            Ok(json) => json,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|source| StateError::Json { path, source })
    }

    /// Removes the record `id`; no record is not an error.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let path = self.path_of(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Every record, sorted by id. Files that are not records of ours (other names, symlinks,
    /// non-regular files, unreadable or corrupt JSON) are skipped with a warning; temporary
    /// files of unfinished puts are skipped silently.
    pub fn load_all(&self) -> Result<Vec<(String, T)>, StateError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!("skipping {}: not a record name", path.display());
                continue;
            };
            if name.starts_with('.') {
                tracing::debug!("skipping {}: temporary file", path.display());
                continue;
            }
            let Some(id) = name
                .strip_suffix(RECORD_SUFFIX)
                .filter(|id| validate_id(id).is_ok())
            else {
                tracing::warn!("skipping {}: not a record name", path.display());
                continue;
            };
            let json = match read_record_file(&path) {
                Ok(json) => json,
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", path.display());
                    continue;
                }
            };
            match serde_json::from_slice(&json) {
                Ok(record) => records.push((id.to_string(), record)),
                Err(e) => tracing::warn!("skipping {}: corrupt record: {e}", path.display()),
            }
        }
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(records)
    }

    /// Makes renames and removals in the directory durable.
    fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync directory", &self.dir))
    }
}

/// Creates `path` (never an existing file, never through a symlink), writes `data`, fsyncs.
fn write_new_file(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(data).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))
}

/// Reads a record file without following a symlink and without blocking on a FIFO; only a
/// regular file of reasonable size is read.
fn read_record_file(path: &Path) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(io::ErrorKind::InvalidData, "a symlink"),
            _ => e,
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_RECORD_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_RECORD_BYTES} bytes"),
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut data)?;
    Ok(data)
}

/// The two stores under one state root.
#[derive(Debug)]
pub struct StateStore {
    /// `<state_root>/sandboxes`.
    pub sandboxes: Store<SandboxRecord>,
    /// `<state_root>/containers`.
    pub containers: Store<ContainerRecord>,
}

impl StateStore {
    /// Opens (and creates) both stores under `state_root`.
    pub fn open(state_root: &Path) -> Result<Self, StateError> {
        Ok(Self {
            sandboxes: Store::open(state_root.join(SANDBOXES_DIR))?,
            containers: Store::open(state_root.join(CONTAINERS_DIR))?,
        })
    }
}

/// A pod sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// The VM runs and the pod is set up.
    Ready,
    /// Stopped, or not (yet) usable.
    NotReady,
}

/// The pod's DNS settings (its `resolv.conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Name servers.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Search domains.
    #[serde(default)]
    pub searches: Vec<String>,
    /// `options` entries.
    #[serde(default)]
    pub options: Vec<String>,
}

/// A port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A port of the pod published on the host, as the CRI request gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Protocol.
    pub protocol: Protocol,
    /// Port in the pod.
    pub container_port: i32,
    /// Port on the host (0: none).
    pub host_port: i32,
    /// Host address to bind ("" for all).
    #[serde(default)]
    pub host_ip: String,
}

/// A pod sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id.
    pub id: String,
    /// Pod name (metadata).
    pub name: String,
    /// Pod namespace (metadata).
    pub namespace: String,
    /// Pod UID (metadata).
    pub uid: String,
    /// Attempt (metadata).
    pub attempt: u32,
    /// Labels.
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The RuntimeClass handler as asked ("" for the default).
    pub runtime_handler: String,
    /// Creation time, nanoseconds since the epoch.
    pub created_at_ns: i64,
    /// Ready or not.
    pub state: SandboxState,
    /// The pod's VMM.
    pub vmm: VmmHandle,
    /// Where kubelet wants container logs ("" when it did not say).
    #[serde(default)]
    pub log_directory: PathBuf,
    /// The pod's hostname.
    #[serde(default)]
    pub hostname: String,
    /// DNS settings.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Published ports.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// The pod's IP addresses, the primary first.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The pod's network namespace file (CNI needs it again for DEL), if it has one.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Privileged inside its VM: its containers may be too.
    #[serde(default)]
    pub privileged: bool,
    /// Its VM's vCPUs (0: a record from before pods were sized).
    #[serde(default)]
    pub vcpus: u8,
    /// Its VM's memory, MiB (0: a record from before pods were sized).
    #[serde(default)]
    pub memory_mib: u64,
}

/// A container's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Ended.
    Exited,
    /// Lost track (the VM went away under it, say).
    Unknown,
}

/// A host path mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Path in the container.
    pub container_path: PathBuf,
    /// Path on the host.
    pub host_path: PathBuf,
    /// Mounted read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// A container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Container id.
    pub id: String,
    /// Its pod sandbox.
    pub sandbox_id: String,
    /// Container name (metadata).
    pub name: String,
    /// Attempt (metadata).
    pub attempt: u32,
    /// Labels.
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The image as the request named it.
    pub image: String,
    /// The image id (`sha256:<config digest>`).
    pub image_id: String,
    /// The image reference by digest (`repo@sha256:...`).
    pub image_ref: String,
    /// Creation time, nanoseconds since the epoch.
    pub created_at_ns: i64,
    /// Start time (0: not started).
    #[serde(default)]
    pub started_at_ns: i64,
    /// End time (0: not ended).
    #[serde(default)]
    pub finished_at_ns: i64,
    /// Exit code once ended.
    #[serde(default)]
    pub exit_code: i32,
    /// Short reason of the end (`Completed`, `Error`, `OOMKilled`).
    #[serde(default)]
    pub reason: String,
    /// Longer message about the end.
    #[serde(default)]
    pub message: String,
    /// Created, running, exited, unknown.
    pub state: ContainerState,
    /// The full path of the log file ("" when kubelet asked for none).
    #[serde(default)]
    pub log_path: PathBuf,
    /// Host paths mounted into it.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// The container's id in the guest agent.
    pub agent_container_id: String,
    /// Its init process's pid in the guest (0: not created there yet).
    #[serde(default)]
    pub guest_pid: u32,
    /// The VM drive (virtio serial) carrying its image.
    #[serde(default)]
    pub image_drive_id: String,
    /// Created with a terminal (CRI `tty`).
    #[serde(default)]
    pub tty: bool,
    /// Created with an open stdin (CRI `stdin`) that attach sessions write to.
    #[serde(default)]
    pub stdin: bool,
    /// Its stdin is closed when the first attach session that had stdin ends (CRI
    /// `stdin_once`).
    #[serde(default)]
    pub stdin_once: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> VmmHandle {
        VmmHandle {
            pid: 42,
            start_time: 1234,
            dir: "/run/podvisor/pods/sb1".into(),
            api_sock: "/run/podvisor/pods/sb1/api.sock".into(),
            vsock_uds: "/run/podvisor/pods/sb1/vsock.sock".into(),
            console_log: "/run/podvisor/pods/sb1/console.log".into(),
            vmm_log: "/run/podvisor/pods/sb1/vmm.log".into(),
            cgroup: None,
        }
    }

    fn sandbox(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            name: "web".into(),
            namespace: "default".into(),
            uid: "u-1".into(),
            attempt: 1,
            labels: HashMap::from([("app".into(), "web".into())]),
            annotations: HashMap::from([("a".into(), "b".into())]),
            runtime_handler: "podvisor".into(),
            created_at_ns: 1_700_000_000_000_000_000,
            state: SandboxState::Ready,
            vmm: handle(),
            log_directory: "/var/log/pods/default_web_u-1".into(),
            hostname: "web".into(),
            privileged: false,
            vcpus: 1,
            memory_mib: 256,
            dns: DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            },
            port_mappings: vec![PortMapping {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: 8080,
                host_ip: String::new(),
            }],
            ips: vec!["10.88.0.5".into()],
            netns: Some("/var/run/netns/cni-1".into()),
        }
    }

    fn container(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: "sb1".into(),
            name: "nginx".into(),
            attempt: 0,
            labels: HashMap::new(),
            annotations: HashMap::new(),
            image: "nginx:1.27".into(),
            image_id: "sha256:abc".into(),
            image_ref: "docker.io/library/nginx@sha256:def".into(),
            created_at_ns: 1,
            started_at_ns: 2,
            finished_at_ns: 3,
            exit_code: 137,
            reason: "Error".into(),
            message: "killed".into(),
            state: ContainerState::Exited,
            log_path: "/var/log/pods/x/nginx/0.log".into(),
            mounts: vec![MountRecord {
                container_path: "/data".into(),
                host_path: "/srv/data".into(),
                readonly: true,
            }],
            agent_container_id: id.into(),
            guest_pid: 7,
            image_drive_id: "img0".into(),
            tty: false,
            stdin: true,
            stdin_once: true,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn ids_are_file_names_only() {
        for ok in ["a", "0", "abc-DEF_1.2", &"f".repeat(128)] {
            assert!(validate_id(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "-x",
            "_x",
            "a/b",
            "../etc",
            "a\\b",
            "a b",
            "a\0b",
            "é",
            &"f".repeat(129),
        ] {
            assert!(
                matches!(validate_id(bad), Err(StateError::InvalidId(i)) if i == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn records_round_trip_and_replace_atomically() {
        let root = tempfile::tempdir().unwrap();
        let state = StateStore::open(root.path()).unwrap();
        assert_eq!(names(root.path()), ["containers", "sandboxes"]);

        let mut sb = sandbox("sb1");
        state.sandboxes.put("sb1", &sb).unwrap();
        state.containers.put("c1", &container("c1")).unwrap();
        assert_eq!(names(state.sandboxes.dir()), ["sb1.json"]);
        assert_eq!(state.sandboxes.get("sb1").unwrap(), Some(sb.clone()));
        assert_eq!(state.containers.get("c1").unwrap(), Some(container("c1")));
        assert_eq!(state.sandboxes.get("nope").unwrap(), None);

        sb.state = SandboxState::NotReady;
        state.sandboxes.put("sb1", &sb).unwrap();
        assert_eq!(
            names(state.sandboxes.dir()),
            ["sb1.json"],
            "no temporary file left"
        );
        // A store opened afresh (a restarted podvisord) sees the latest record.
        let again = StateStore::open(root.path()).unwrap();
        assert_eq!(again.sandboxes.load_all().unwrap(), [("sb1".into(), sb)]);
        assert_eq!(
            again.containers.load_all().unwrap(),
            [("c1".into(), container("c1"))]
        );
        let mode = std::os::unix::fs::MetadataExt::mode(
            &state.sandboxes.dir().join("sb1.json").metadata().unwrap(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn remove_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let store: Store<ContainerRecord> = Store::open(root.path().join("c")).unwrap();
        store.put("c1", &container("c1")).unwrap();
        store.put("c2", &container("c2")).unwrap();
        store.remove("c1").unwrap();
        store.remove("c1").unwrap();
        let ids: Vec<String> = store.load_all().unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(ids, ["c2"]);
    }

    #[test]
    fn invalid_ids_never_reach_the_file_system() {
        let root = tempfile::tempdir().unwrap();
        let store: Store<ContainerRecord> = Store::open(root.path().join("c")).unwrap();
        for bad in ["../escape", "a/b", ".x", ""] {
            assert!(matches!(
                store.put(bad, &container("c")),
                Err(StateError::InvalidId(_))
            ));
            assert!(matches!(store.get(bad), Err(StateError::InvalidId(_))));
            assert!(matches!(store.remove(bad), Err(StateError::InvalidId(_))));
        }
        assert_eq!(names(root.path()), ["c"]);
        assert!(names(store.dir()).is_empty());
    }

    #[test]
    fn load_all_skips_what_is_not_a_record_of_ours() {
        let root = tempfile::tempdir().unwrap();
        let store: Store<ContainerRecord> = Store::open(root.path().join("c")).unwrap();
        store.put("good", &container("good")).unwrap();
        let dir = store.dir();
        std::fs::write(dir.join("corrupt.json"), "{\"id\": ").unwrap();
        std::fs::write(dir.join("wrongtype.json"), "[1, 2]").unwrap();
        std::fs::write(dir.join("notes.txt"), "hello").unwrap();
        std::fs::write(
            dir.join("-bad.json"),
            serde_json::to_vec(&container("x")).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join(".c9.json.1.2.tmp"), "{").unwrap();
        std::fs::create_dir(dir.join("adir.json")).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        // A symlink to a valid record elsewhere must not be followed.
        let outside = root.path().join("outside.json");
        std::fs::write(&outside, serde_json::to_vec(&container("evil")).unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("evil.json")).unwrap();

        assert_eq!(
            store.load_all().unwrap(),
            [("good".into(), container("good"))]
        );
        assert!(matches!(store.get("evil"), Err(StateError::Io(_))));
        assert!(matches!(store.get("corrupt"), Err(StateError::Json { .. })));
    }

    #[test]
    fn put_never_writes_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let store: Store<ContainerRecord> = Store::open(root.path().join("c")).unwrap();
        let outside = root.path().join("outside");
        std::fs::write(&outside, "precious").unwrap();
        std::os::unix::fs::symlink(&outside, store.dir().join("c1.json")).unwrap();
        store.put("c1", &container("c1")).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
        assert_eq!(store.get("c1").unwrap(), Some(container("c1")));
    }

    #[test]
    fn a_symlinked_store_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, root.path().join("sandboxes")).unwrap();
        assert!(matches!(
            StateStore::open(root.path()),
            Err(StateError::NotADirectory(_))
        ));
    }

    #[test]
    fn states_are_stable_on_disk() {
        let json = serde_json::to_value(sandbox("sb1")).unwrap();
        assert_eq!(json["state"], "ready");
        assert_eq!(json["port_mappings"][0]["protocol"], "tcp");
        let mut c = serde_json::to_value(container("c1")).unwrap();
        assert_eq!(c["state"], "exited");
        // Fields added later read as their defaults from older records.
        let obj = c.as_object_mut().unwrap();
        for optional in [
            "mounts",
            "guest_pid",
            "image_drive_id",
            "reason",
            "log_path",
            "tty",
            "stdin",
            "stdin_once",
        ] {
            obj.remove(optional);
        }
        let old: ContainerRecord = serde_json::from_value(c).unwrap();
        assert!(old.mounts.is_empty() && old.guest_pid == 0 && old.log_path.as_os_str().is_empty());
        assert!(!old.tty && !old.stdin && !old.stdin_once);
    }
}
