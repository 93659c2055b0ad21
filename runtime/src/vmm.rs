//! One `podvisor-vmm` process per pod, detached so that it outlives podvisord, and found
//! again after a restart through a [`VmmHandle`] kept in the sandbox record.
//!
//! Everything of one VM lives in the pod's directory ([`VmmSpec::dir`]):
//!
//! | file           | what                                                          |
//! |----------------|---------------------------------------------------------------|
//! | `vmm.json`     | the VM configuration the VMM was started with (`--config`)    |
//! | `vmm.log`      | the VMM's stdout and stderr (appended across launches)        |
//! | `console.log`  | the guest's serial console (appended)                         |
//! | `api.sock`     | the VMM's control API                                         |
//! | `vsock.sock`   | the vsock device's host side; `vsock.sock_<port>` are the     |
//! |                | host listeners guest connections to `<port>` go to            |
//!
//! Detaching: the VMM runs in a session of its own (`setsid`), so neither a terminal nor a
//! signal to podvisord's process group reaches it. While podvisord runs it is the VMM's
//! parent, and one reaper thread per VMM waits for it, so an ended VMM never stays a zombie;
//! after a restart of podvisord the VMMs it started are reparented to init (or the nearest
//! subreaper), which reaps them. A reaper thread rather than a double fork: `spawn` then
//! still reports an exec failure (missing binary, bad permissions) as an error, we know the
//! VMM's pid without passing it back through a pipe, and its exit status is logged.
//!
//! A pid alone does not identify a process once it may have been reaped: every check and
//! signal goes through a pidfd and compares the process start time (`/proc/<pid>/stat` field
//! 22) with the one recorded at launch, so a recycled pid is never taken for our VMM.
//!
//! The control API calls are blocking: call them from `spawn_blocking` in async code.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_vmm::api::client::{self, ClientError};
use podvisor_vmm::api::{DriveSwap, VmInfo};
use podvisor_vmm::config::{DriveConfig, SerialOutput, VmConfig, VsockDeviceConfig};
use serde::{Deserialize, Serialize};

/// The VM configuration file in the pod directory.
pub const CONFIG_FILE: &str = "vmm.json";
/// The VMM's stdout and stderr.
pub const VMM_LOG: &str = "vmm.log";
/// The guest's serial console.
pub const CONSOLE_LOG: &str = "console.log";
/// The control API socket.
pub const API_SOCK: &str = "api.sock";
/// The vsock device's Unix socket.
pub const VSOCK_UDS: &str = "vsock.sock";

/// The root image's drive id (the guest's `/dev/vda`).
pub const ROOT_DRIVE_ID: &str = "root";
/// The guest's vsock CID. Hybrid vsock keeps every VM's connections on its own Unix socket,
/// so all VMs can share one CID.
pub const GUEST_CID: u64 = 3;
/// The kernel command line every pod VM boots with; [`VmmSpec::cmdline_extra`] follows it.
pub const BASE_CMDLINE: &str = "quiet root=/dev/vda ro rootfstype=ext4 init=/sbin/podvisor-agent";

/// How long a SIGKILLed VMM may take to go away before we report it stuck.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often [`VmmHandle::wait_api`] asks.
const API_POLL: Duration = Duration::from_millis(20);
/// `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// The longest suffix the VMM appends to the vsock socket path: `_` and a 32-bit port.
const VSOCK_PORT_SUFFIX: usize = 11;
/// Lines of `vmm.log` an [`VmmError::Exited`] quotes.
const LOG_TAIL_LINES: usize = 20;

/// Why launching or talking to a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Creating or using a file of the pod directory failed.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pod directory exists and is not a directory (a symlink, say).
    #[error("pod directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A socket path is longer than a Unix socket address holds.
    #[error("socket path {0} is too long for a Unix socket")]
    SocketPathTooLong(PathBuf),
    /// A socket of the pod directory is served by a live process.
    #[error("socket {0} is in use by a running process")]
    SocketInUse(PathBuf),
    /// The VM configuration is invalid.
    #[error("VM configuration of sandbox {sandbox_id}")]
    Config {
        /// The sandbox.
        sandbox_id: String,
        /// What is wrong.
        #[source]
        source: podvisor_vmm::config::ConfigError,
    },
    /// The network namespace could not be opened.
    #[error("network namespace {path}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The VMM could not be started.
    #[error("spawn {binary}")]
    Spawn {
        /// The VMM executable.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or signalling the VMM process failed.
    #[error("VMM process {pid}: {what}")]
    Process {
        /// The pid.
        pid: u32,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The VMM ended (before its API answered).
    #[error("VMM process {pid} ended; the end of its log:\n{log_tail}")]
    Exited {
        /// The pid.
        pid: u32,
        /// The last lines of `vmm.log`.
        log_tail: String,
    },
    /// The control API did not answer in time.
    #[error("the control API {0} did not answer in time")]
    ApiTimeout(PathBuf),
    /// A control API call failed.
    #[error("control API")]
    Api(#[from] ClientError),
    /// The control API answered something that is not what it documents.
    #[error("control API {path}: bad answer {body:?}")]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// The answer.
        body: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A drive id that cannot be put in an API path.
    #[error("drive id {0:?} must be 1 to 20 of [A-Za-z0-9_.-]")]
    DriveId(String),
    /// The VMM still runs, so its directory stays.
    #[error("VMM process {0} is still running")]
    StillRunning(u32),
    /// SIGKILL did not end the VMM within [`KILL_WAIT`].
    #[error("VMM process {0} did not end after SIGKILL")]
    NotGone(u32),
}

/// An extra drive of the VM (the root image is always the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    /// Drive id, also the guest's virtio serial; 1 to 20 bytes.
    pub id: String,
    /// The raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// What to launch for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmSpec {
    /// The pod sandbox id (for logs).
    pub sandbox_id: String,
    /// The pod's directory, e.g. `<state_dir>/pods/<id>`; created if missing.
    pub dir: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest root image, attached read-only as `/dev/vda`.
    pub rootfs: PathBuf,
    /// Appended to [`BASE_CMDLINE`].
    pub cmdline_extra: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Drives after the root drive.
    pub drives: Vec<DriveSpec>,
    /// A TAP device for virtio-net (it must exist in `netns`).
    pub tap: Option<String>,
    /// The guest NIC's MAC, "aa:bb:cc:dd:ee:ff" (None: derived from the TAP's name).
    pub mac: Option<String>,
    /// A network namespace file (`/var/run/netns/NAME`) the VMM runs in.
    pub netns: Option<PathBuf>,
    /// Continue this snapshot (a VM template) instead of booting `kernel`: the devices above
    /// must be the template's kinds in its order.
    pub restore: Option<podvisor_vmm::config::RestoreConfig>,
}

/// A launched VMM, as persisted in the sandbox record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmHandle {
    /// The VMM's pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// The pod directory.
    pub dir: PathBuf,
    /// Control API socket.
    pub api_sock: PathBuf,
    /// vsock Unix socket (dial it and send `CONNECT <port>\n`).
    pub vsock_uds: PathBuf,
    /// The guest console.
    pub console_log: PathBuf,
    /// The VMM's own output.
    pub vmm_log: PathBuf,
}

/// How [`VmmHandle::stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It stopped through the control API within the timeout.
    Stopped,
    /// It was killed with SIGKILL.
    Killed,
    /// It was not running (any more).
    AlreadyGone,
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VmmError + 'a {
    move |source| VmmError::File {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the pod directory (mode 0700) unless it exists; refuses anything but a directory.
fn create_pod_dir(dir: &Path) -> Result<(), VmmError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(file_err("create directory", parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = dir
                .symlink_metadata()
                .map_err(file_err("inspect pod directory", dir))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(VmmError::NotADirectory(dir.to_path_buf()))
            }
        }
        Err(e) => Err(file_err("create pod directory", dir)(e)),
    }
}

/// Removes a socket left by an earlier VMM of this pod; the VMM refuses to bind over one.
/// A socket someone still serves is an error: two VMMs must never share a pod directory.
fn clear_stale_socket(path: &Path) -> Result<(), VmmError> {
    let meta = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err("inspect", path)(e)),
    };
    if meta.file_type().is_socket() && UnixStream::connect(path).is_ok() {
        return Err(VmmError::SocketInUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("remove stale socket", path)(e)),
    }
}

/// Opens a file of the pod directory for writing without following a symlink.
fn open_for_write(path: &Path, append: bool, mode: u32) -> Result<File, VmmError> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).mode(mode);
    if append {
        o.append(true);
    } else {
        o.truncate(true);
    }
    o.custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(file_err("open", path))
}

/// The VM configuration `spec` asks for.
fn vm_config(spec: &VmmSpec, handle: &VmmHandle) -> Result<VmConfig, VmmError> {
    let config_err = |source| VmmError::Config {
        sandbox_id: spec.sandbox_id.clone(),
        source,
    };
    let mut drives = vec![DriveConfig {
        path: spec.rootfs.clone(),
        read_only: true,
        id: ROOT_DRIVE_ID.to_string(),
    }];
    drives.extend(spec.drives.iter().map(|d| DriveConfig {
        path: d.path.clone(),
        read_only: d.read_only,
        id: d.id.clone(),
    }));
    let net = spec
        .tap
        .as_deref()
        .map(|tap| {
            let value = match &spec.mac {
                Some(mac) => format!("tap={tap},mac={mac}"),
                None => format!("tap={tap}"),
            };
            podvisor_vmm::config::parse_net(&value)
        })
        .transpose()
        .map_err(config_err)?;
    let cmdline = match spec.cmdline_extra.trim() {
        "" => BASE_CMDLINE.to_string(),
        extra => format!("{BASE_CMDLINE} {extra}"),
    };
    let config = VmConfig {
        kernel: spec.kernel.clone(),
        initrd: None,
        cmdline,
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        drives,
        net,
        vsock: Some(VsockDeviceConfig {
            cid: GUEST_CID,
            uds: handle.vsock_uds.clone(),
        }),
        api_sock: Some(handle.api_sock.clone()),
        serial: SerialOutput::File(handle.console_log.clone()),
        restore: spec.restore.clone(),
    };
    config.validate().map_err(config_err)?;
    Ok(config)
}

/// Starts the VMM for `spec` with the executable `binary`, detached (see the module docs).
/// Returns once the process runs; [`VmmHandle::wait_api`] waits for its control API.
pub fn launch(binary: &Path, spec: &VmmSpec) -> Result<VmmHandle, VmmError> {
    let dir = &spec.dir;
    // Paths from here on are the handle's: it is what finds this VM again.
    let mut handle = VmmHandle {
        pid: 0,
        start_time: 0,
        dir: dir.clone(),
        api_sock: dir.join(API_SOCK),
        vsock_uds: dir.join(VSOCK_UDS),
        console_log: dir.join(CONSOLE_LOG),
        vmm_log: dir.join(VMM_LOG),
    };
    if handle.api_sock.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmmError::SocketPathTooLong(handle.api_sock));
    }
    if handle.vsock_uds.as_os_str().len() + VSOCK_PORT_SUFFIX > MAX_SOCKET_PATH {
        return Err(VmmError::SocketPathTooLong(handle.vsock_uds));
    }
    let config = vm_config(spec, &handle)?;

    create_pod_dir(dir)?;
    clear_stale_socket(&handle.api_sock)?;
    clear_stale_socket(&handle.vsock_uds)?;

    let config_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&config).map_err(|e| VmmError::File {
        what: "serialize",
        path: config_path.clone(),
        source: e.into(),
    })?;
    io::Write::write_all(&mut open_for_write(&config_path, false, 0o600)?, &json)
        .map_err(file_err("write", &config_path))?;

    let log = open_for_write(&handle.vmm_log, true, 0o640)?;
    let log_for_stdout = log
        .try_clone()
        .map_err(file_err("duplicate", &handle.vmm_log))?;
    let netns = spec
        .netns
        .as_ref()
        .map(|path| {
            File::open(path).map_err(|source| VmmError::Netns {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;

    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(&config_path)
        .current_dir("/")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_for_stdout)
        .stderr(log);
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls setsid(2) and setns(2), on a descriptor that stays open
    // in the parent (`netns` lives until after spawn) and so is valid in the child; it
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own: no controlling terminal, not in podvisord's process group.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    drop(netns);
    handle.pid = child.id();

    // Until the reaper waits for it, the pid cannot be reused (an ended child stays a zombie),
    // so this start time is our VMM's.
    let start_time = match process_start_time(handle.pid) {
        Ok(Some(t)) => t,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmmError::Process {
                pid: handle.pid,
                what: "read start time",
                source: other
                    .err()
                    .unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
            });
        }
    };
    handle.start_time = start_time;

    let sandbox_id = spec.sandbox_id.clone();
    let pid = handle.pid;
    let reaper = std::thread::Builder::new()
        .name(format!("vmm-reaper-{pid}"))
        .stack_size(256 * 1024)
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => {
                tracing::info!(sandbox = %sandbox_id, pid, "VMM ended: {status}");
            }
            Ok(status) => tracing::warn!(sandbox = %sandbox_id, pid, "VMM ended: {status}"),
            Err(e) => tracing::warn!(sandbox = %sandbox_id, pid, "wait for the VMM: {e}"),
        });
    if let Err(e) = reaper {
        // The VMM still runs; it stays a zombie after it ends, until podvisord exits.
        tracing::warn!(sandbox = %spec.sandbox_id, pid, "no reaper thread for the VMM: {e}");
    }
    tracing::info!(
        sandbox = %spec.sandbox_id,
        pid,
        dir = %dir.display(),
        "VMM launched"
    );
    Ok(handle)
}

/// What [`VmmHandle`] needs from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    /// Field 3: R, S, D, Z, X, ...
    state: char,
    /// Field 6.
    session: i32,
    /// Field 22.
    start_time: u64,
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let after_comm = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        session: fields.get(6 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// The start time of process `pid` (`/proc/<pid>/stat` field 22), as a [`VmmHandle`] records
/// it; `None` when there is no such process.
pub(crate) fn process_start_time(pid: u32) -> io::Result<Option<u64>> {
    Ok(read_proc_stat(pid)?.map(|s| s.start_time))
}

/// `None` when there is no process `pid`.
fn read_proc_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(line) => parse_proc_stat(&line).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected /proc/{pid}/stat"),
            )
        }),
        // ESRCH: the process went away between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A process descriptor: signals and waits reach exactly the process it was opened for.
#[derive(Debug)]
struct PidFd(OwnedFd);

impl PidFd {
    /// `None` when there is no process `pid`.
    fn open(pid: u32) -> io::Result<Option<Self>> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; no
        // memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        let fd = i32::try_from(fd).map_err(|_| io::ErrorKind::InvalidData)?;
        // SAFETY: `fd` is a descriptor pidfd_open just returned; nothing else owns it.
        Ok(Some(Self(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Sends SIGKILL; a process that already ended is not an error.
    fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on a descriptor we own, with no siginfo (null) and no
        // flags; no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until the process has ended (a pidfd polls readable then); false on timeout.
    fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up: a timeout rounded down to 0 ms would spin until the deadline.
            let ms = PollTimeout::try_from(left.as_nanos().div_ceil(1_000_000))
                .unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) if Instant::now() >= deadline => return Ok(false),
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(true),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl VmmHandle {
    fn proc_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
        let pid = self.pid;
        move |source| VmmError::Process { pid, what, source }
    }

    /// Our VMM's current `/proc` status, `None` when it is gone (including a pid now used by
    /// another process).
    fn stat(&self) -> io::Result<Option<ProcStat>> {
        Ok(read_proc_stat(self.pid)?
            .filter(|s| s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X')))
    }

    /// Whether the VMM still runs. A pid reused by another process, or an ended VMM not yet
    /// reaped, is not alive. When `/proc` cannot be read the VMM is taken to be alive, so
    /// nothing of a VM that may still run is cleaned up.
    pub fn is_alive(&self) -> bool {
        match self.stat() {
            Ok(s) => s.is_some(),
            Err(e) => {
                tracing::warn!(pid = self.pid, "read /proc/{}/stat: {e}", self.pid);
                true
            }
        }
    }

    /// A pidfd for our VMM, `None` when it is gone. The pidfd is opened before the start time
    /// is compared, so it cannot refer to a process that took the pid over afterwards.
    fn pidfd(&self) -> Result<Option<PidFd>, VmmError> {
        let Some(fd) = PidFd::open(self.pid).map_err(self.proc_err("open pidfd"))? else {
            return Ok(None);
        };
        let ours = self.stat().map_err(self.proc_err("read /proc stat"))?;
        Ok(ours.map(|_| fd))
    }

    /// `GET /vm`.
    pub fn info(&self) -> Result<VmInfo, VmmError> {
        let body = client::call(&self.api_sock, "GET", "/vm", None)?;
        serde_json::from_str(&body).map_err(|source| VmmError::BadAnswer {
            path: self.api_sock.clone(),
            body,
            source,
        })
    }

    /// Waits until the control API answers `GET /vm`. Fails when the VMM ends first (quoting
    /// the end of its log) or `timeout` passes.
    pub fn wait_api(&self, timeout: Duration) -> Result<VmInfo, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.info() {
                Ok(info) => return Ok(info),
                Err(e @ VmmError::BadAnswer { .. }) => return Err(e),
                Err(e) => tracing::trace!(pid = self.pid, "control API not up yet: {e}"),
            }
            if !self.is_alive() {
                return Err(VmmError::Exited {
                    pid: self.pid,
                    log_tail: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmmError::ApiTimeout(self.api_sock.clone()));
            }
            std::thread::sleep(API_POLL);
        }
    }

    /// The last lines of `vmm.log`, for error messages.
    pub fn log_tail(&self) -> String {
        let text = match std::fs::read(&self.vmm_log) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => return format!("<cannot read {}: {e}>", self.vmm_log.display()),
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// `PUT /drives/{id}`: a new backing file for a running drive.
    pub fn swap_drive(&self, id: &str, path: &Path, read_only: bool) -> Result<(), VmmError> {
        let valid = (1..=20).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err(VmmError::DriveId(id.to_string()));
        }
        let body = serde_json::to_string(&DriveSwap {
            path: path.to_path_buf(),
            read_only,
        })
        .map_err(|e| VmmError::File {
            what: "serialize drive swap for",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        client::call(&self.api_sock, "PUT", &format!("/drives/{id}"), Some(&body))?;
        Ok(())
    }

    /// Stops the VM: `PUT /vm/stop`, then waits up to `timeout` for the VMM to end, then
    /// SIGKILL. Returns once the process is gone.
    pub fn stop(&self, timeout: Duration) -> Result<StopOutcome, VmmError> {
        let Some(pidfd) = self.pidfd()? else {
            return Ok(StopOutcome::AlreadyGone);
        };
        // The client waits up to 30 s for an answer; a VMM too stuck to answer must not hold
        // the stop past `timeout`, so the call runs on a thread of its own.
        let (tx, rx) = std::sync::mpsc::channel();
        let sock = self.api_sock.clone();
        let asked = std::thread::Builder::new()
            .name(format!("vmm-stop-{}", self.pid))
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = tx.send(client::call(&sock, "PUT", "/vm/stop", None));
            });
        let started = Instant::now();
        let answer = match asked {
            Ok(_) => rx.recv_timeout(timeout).ok(),
            Err(e) => {
                tracing::warn!(pid = self.pid, "no thread for PUT /vm/stop: {e}");
                None
            }
        };
        match answer {
            Some(Ok(_)) => {
                let left = timeout.saturating_sub(started.elapsed());
                if pidfd
                    .wait_exit(left)
                    .map_err(self.proc_err("wait for exit"))?
                {
                    return Ok(StopOutcome::Stopped);
                }
                tracing::warn!(pid = self.pid, "VMM did not stop within {timeout:?}");
            }
            Some(Err(e)) => {
                if pidfd
                    .wait_exit(Duration::ZERO)
                    .map_err(self.proc_err("wait for exit"))?
                {
                    return Ok(StopOutcome::AlreadyGone);
                }
                tracing::warn!(pid = self.pid, "PUT /vm/stop: {e}");
            }
            None => tracing::warn!(pid = self.pid, "PUT /vm/stop: no answer in {timeout:?}"),
        }
        self.kill_with(&pidfd)?;
        Ok(StopOutcome::Killed)
    }

    /// SIGKILLs the VMM and waits for it to go away; a VMM already gone is not an error.
    pub fn kill(&self) -> Result<(), VmmError> {
        match self.pidfd()? {
            Some(pidfd) => self.kill_with(&pidfd),
            None => Ok(()),
        }
    }

    fn kill_with(&self, pidfd: &PidFd) -> Result<(), VmmError> {
        pidfd.kill().map_err(self.proc_err("send SIGKILL"))?;
        if pidfd
            .wait_exit(KILL_WAIT)
            .map_err(self.proc_err("wait for exit"))?
        {
            tracing::info!(pid = self.pid, "VMM killed");
            Ok(())
        } else {
            Err(VmmError::NotGone(self.pid))
        }
    }

    /// Removes the pod directory and everything in it, once the VMM has ended.
    pub fn remove_dir(&self) -> Result<(), VmmError> {
        if self.is_alive() {
            return Err(VmmError::StillRunning(self.pid));
        }
        remove_pod_dir(&self.dir)
    }
}

/// Removes a pod directory and everything in it without following a symlink: a symlink in it
/// is removed, not what it points to, and a symlink in place of the directory is removed
/// itself. Nothing there is not an error. Only for a directory no VMM runs in any more.
pub fn remove_pod_dir(dir: &Path) -> Result<(), VmmError> {
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err("inspect pod directory", dir)(e)),
    };
    let removed = if meta.is_dir() {
        // std's remove_dir_all opens every level with O_NOFOLLOW and unlinks relative to it.
        std::fs::remove_dir_all(dir)
    } else {
        tracing::warn!(
            "pod directory {} is not a directory; removing it",
            dir.display()
        );
        std::fs::remove_file(dir)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("remove pod directory", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixListener;

    /// A stand-in for podvisor-vmm: a shell script (it ignores `--config`).
    struct FakeVmm {
        dir: tempfile::TempDir,
        binary: PathBuf,
        kernel: PathBuf,
    }

    impl FakeVmm {
        fn new(script: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let binary = dir.path().join("podvisor-vmm");
            std::fs::write(&binary, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
            let kernel = dir.path().join("vmlinux");
            std::fs::write(&kernel, "not a kernel").unwrap();
            Self {
                dir,
                binary,
                kernel,
            }
        }

        fn spec(&self) -> VmmSpec {
            VmmSpec {
                sandbox_id: "sb1".into(),
                dir: self.dir.path().join("pods").join("sb1"),
                kernel: self.kernel.clone(),
                rootfs: self.dir.path().join("rootfs.ext4"),
                cmdline_extra: "debug".into(),
                vcpus: 2,
                mem_mib: 256,
                drives: vec![DriveSpec {
                    id: "img0".into(),
                    path: self.dir.path().join("img0.ext4"),
                    read_only: true,
                }],
                tap: Some("tap0".into()),
                mac: None,
                netns: None,
                restore: None,
            }
        }

        /// Launches, retrying while the script is busy: a fork on another test thread may
        /// still hold the descriptor it was written through (ETXTBSY).
        fn launch(&self, spec: &VmmSpec) -> Result<VmmHandle, VmmError> {
            for _ in 0..50 {
                match launch(&self.binary, spec) {
                    Err(VmmError::Spawn { source, .. })
                        if source.raw_os_error() == Some(libc::ETXTBSY) =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    other => return other,
                }
            }
            panic!("{} stayed busy", self.binary.display());
        }
    }

    /// A `sleep` through the whole launch path.
    fn sleeping_vmm() -> (FakeVmm, VmmHandle) {
        let fake = FakeVmm::new("exec sleep 30");
        let handle = fake.launch(&fake.spec()).unwrap();
        (fake, handle)
    }

    /// Whether `pid` has gone entirely (reaped, not a zombie), waiting up to 5 s.
    fn reaped(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Serves one control API request on `sock` with `status` and `body`; hands the request
    /// back and then runs `after`.
    fn serve_once(
        sock: &Path,
        status: u16,
        body: &'static str,
        after: impl FnOnce() + Send + 'static,
    ) -> std::thread::JoinHandle<podvisor_vmm::api::http::Request> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req = podvisor_vmm::api::http::read_request(&mut s).unwrap();
            podvisor_vmm::api::http::write_response(&mut s, status, body).unwrap();
            drop(s);
            after();
            req
        })
    }

    #[test]
    fn proc_stat_parses_past_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 \
                    2 3 4";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                state: 'S',
                session: 4242,
                start_time: 987654
            })
        );
        assert_eq!(parse_proc_stat("1 (x) S 1 1"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
        let own = read_proc_stat(std::process::id()).unwrap().unwrap();
        assert!(own.start_time > 0);
        assert_eq!(read_proc_stat(u32::MAX).unwrap(), None);
    }

    #[test]
    fn launch_detaches_writes_the_config_and_kill_reaps() {
        // The script notes how it was started, then becomes the long-running process.
        let fake = FakeVmm::new(
            "{ printf '%s\\n' \"$@\"; pwd; echo \"NO_COLOR=$NO_COLOR\"; } > \"$0.args\"\nexec sleep 30",
        );
        let spec = fake.spec();
        let handle = fake.launch(&spec).unwrap();
        assert!(handle.is_alive());
        assert_eq!(handle.dir, spec.dir);
        assert_eq!(handle.api_sock, spec.dir.join("api.sock"));
        assert_eq!(handle.vsock_uds, spec.dir.join("vsock.sock"));
        assert_eq!(handle.console_log, spec.dir.join("console.log"));
        let mode = spec.dir.metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let stat = read_proc_stat(handle.pid).unwrap().unwrap();
        assert_eq!(stat.start_time, handle.start_time);
        assert_eq!(stat.session, handle.pid as i32, "a session of its own");
        let args_file = PathBuf::from(format!("{}.args", fake.binary.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&args_file).map_or(true, |a| !a.contains("NO_COLOR")) {
            assert!(Instant::now() < deadline, "the fake VMM never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let config_arg = spec.dir.join("vmm.json").display().to_string();
        assert_eq!(
            std::fs::read_to_string(&args_file).unwrap(),
            format!("--config\n{config_arg}\n/\nNO_COLOR=1\n")
        );

        let config: VmConfig =
            serde_json::from_slice(&std::fs::read(spec.dir.join("vmm.json")).unwrap()).unwrap();
        assert_eq!(config.kernel, spec.kernel);
        assert_eq!(config.cmdline, format!("{BASE_CMDLINE} debug"));
        assert_eq!((config.vcpus, config.mem_mib), (2, 256));
        let drives: Vec<_> = config
            .drives
            .iter()
            .map(|d| (d.id.as_str(), d.path.clone(), d.read_only))
            .collect();
        assert_eq!(
            drives,
            [
                ("root", spec.rootfs.clone(), true),
                ("img0", spec.drives[0].path.clone(), true)
            ]
        );
        assert_eq!(config.net.as_ref().unwrap().tap, "tap0");
        let vsock = config.vsock.as_ref().unwrap();
        assert_eq!((vsock.cid, &vsock.uds), (GUEST_CID, &handle.vsock_uds));
        assert_eq!(config.api_sock.as_ref(), Some(&handle.api_sock));
        assert_eq!(
            config.serial,
            SerialOutput::File(handle.console_log.clone())
        );

        handle.kill().unwrap();
        assert!(!handle.is_alive());
        assert!(reaped(handle.pid), "the reaper thread waited for it");
        handle.kill().unwrap();
        assert_eq!(
            handle.stop(Duration::from_secs(1)).unwrap(),
            StopOutcome::AlreadyGone
        );
    }

    #[test]
    fn a_recycled_pid_is_not_our_vmm() {
        let (_fake, handle) = sleeping_vmm();
        let stranger = VmmHandle {
            start_time: handle.start_time + 1,
            ..handle.clone()
        };
        assert!(!stranger.is_alive());
        assert_eq!(
            stranger.stop(Duration::from_secs(1)).unwrap(),
            StopOutcome::AlreadyGone
        );
        stranger.kill().unwrap();
        assert!(
            handle.is_alive(),
            "the process with that pid was left alone"
        );
        handle.kill().unwrap();
    }

    #[test]
    fn stop_through_the_api() {
        let (_fake, handle) = sleeping_vmm();
        // The fake VMM's API: answer PUT /vm/stop, then end the way the VMM would.
        let pid = handle.pid;
        let server = serve_once(&handle.api_sock, 204, "", move || {
            // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        });
        let started = Instant::now();
        assert_eq!(
            handle.stop(Duration::from_secs(20)).unwrap(),
            StopOutcome::Stopped
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let req = server.join().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("PUT", "/vm/stop")
        );
        assert!(!handle.is_alive());
    }

    #[test]
    fn stop_kills_when_the_api_is_missing_or_silent() {
        let (_fake, handle) = sleeping_vmm();
        assert_eq!(
            handle.stop(Duration::from_secs(20)).unwrap(),
            StopOutcome::Killed,
            "no API socket: killed at once"
        );
        assert!(!handle.is_alive());

        // An API that accepts and never answers costs the timeout, not the client's 30 s.
        let (_fake, handle) = sleeping_vmm();
        let listener = UnixListener::bind(&handle.api_sock).unwrap();
        let started = Instant::now();
        assert_eq!(
            handle.stop(Duration::from_millis(300)).unwrap(),
            StopOutcome::Killed
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!handle.is_alive());
        drop(listener);

        // An API that answers but a VMM that does not end.
        let (_fake, handle) = sleeping_vmm();
        let server = serve_once(&handle.api_sock, 204, "", || {});
        assert_eq!(
            handle.stop(Duration::from_millis(300)).unwrap(),
            StopOutcome::Killed
        );
        server.join().unwrap();
        assert!(!handle.is_alive());
    }

    #[test]
    fn info_and_swap_drive_speak_the_api() {
        let (fake, handle) = sleeping_vmm();
        let info = r#"{"state":"running","pid":7,"vcpus":2,"mem_mib":256,
            "boot":{"first_vcpu_entry_ms":1.5,"init_ms":null},"devices":[]}"#;
        let server = serve_once(&handle.api_sock, 200, info, || {});
        let got = handle.info().unwrap();
        assert_eq!((got.pid, got.vcpus, got.mem_mib), (7, 2, 256));
        let req = server.join().unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", "/vm"));
        std::fs::remove_file(&handle.api_sock).unwrap();

        let server = serve_once(&handle.api_sock, 204, "", || {});
        let image = fake.dir.path().join("image.ext4");
        handle.swap_drive("img0", &image, true).unwrap();
        let req = server.join().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("PUT", "/drives/img0")
        );
        let swap: DriveSwap = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            swap,
            DriveSwap {
                path: image.clone(),
                read_only: true
            }
        );
        std::fs::remove_file(&handle.api_sock).unwrap();

        let server = serve_once(&handle.api_sock, 404, r#"{"error":"no drive"}"#, || {});
        let e = handle.swap_drive("nope", &image, false).unwrap_err();
        assert!(matches!(
            e,
            VmmError::Api(ClientError::Status { status: 404, .. })
        ));
        server.join().unwrap();
        for bad in [
            "",
            "a/b",
            "../x",
            "id with space",
            "x?y",
            "abcdefghijklmnopqrstu",
        ] {
            assert!(
                matches!(
                    handle.swap_drive(bad, &image, false),
                    Err(VmmError::DriveId(_))
                ),
                "{bad:?}"
            );
        }
        handle.kill().unwrap();
    }

    #[test]
    fn wait_api_reports_an_early_exit_with_the_log() {
        let fake = FakeVmm::new("echo 'podvisor-vmm: error: no tap0' >&2\nexit 1");
        let handle = fake.launch(&fake.spec()).unwrap();
        let e = handle.wait_api(Duration::from_secs(20)).unwrap_err();
        let VmmError::Exited { pid, log_tail } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(*pid, handle.pid);
        assert!(log_tail.contains("no tap0"), "{log_tail}");

        let (_fake, handle) = sleeping_vmm();
        let e = handle.wait_api(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, VmmError::ApiTimeout(_)), "{e:?}");
        handle.kill().unwrap();
    }

    #[test]
    fn launch_enters_the_network_namespace() {
        // A network namespace held by a process of its own.
        let mut holder = Command::new("unshare")
            .args(["--net", "sh", "-c", "echo ready; exec sleep 30"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready, "ready\n");
        let netns = PathBuf::from(format!("/proc/{}/ns/net", holder.id()));

        let fake = FakeVmm::new("exec sleep 30");
        let spec = VmmSpec {
            netns: Some(netns.clone()),
            ..fake.spec()
        };
        let handle = fake.launch(&spec).unwrap();
        let ns_of = |p: &Path| p.metadata().unwrap().ino();
        let vmm_ns = ns_of(Path::new(&format!("/proc/{}/ns/net", handle.pid)));
        assert_eq!(vmm_ns, ns_of(&netns));
        assert_ne!(vmm_ns, ns_of(Path::new("/proc/self/ns/net")));
        handle.kill().unwrap();
        holder.kill().unwrap();
        holder.wait().unwrap();

        let spec = VmmSpec {
            netns: Some(fake.dir.path().join("no-such-netns")),
            ..fake.spec()
        };
        assert!(matches!(fake.launch(&spec), Err(VmmError::Netns { .. })));
        // A file that is not a network namespace: setns fails in the child, spawn reports it.
        let spec = VmmSpec {
            netns: Some(fake.kernel.clone()),
            ..fake.spec()
        };
        let e = fake.launch(&spec).unwrap_err();
        assert!(
            matches!(&e, VmmError::Spawn { source, .. } if source.raw_os_error() == Some(libc::EINVAL)),
            "{e:?}"
        );
    }

    #[test]
    fn launch_refuses_what_cannot_work() {
        let fake = FakeVmm::new("exec sleep 30");
        let missing = VmmSpec {
            kernel: fake.dir.path().join("no-vmlinux"),
            ..fake.spec()
        };
        let e = fake.launch(&missing).unwrap_err();
        assert!(matches!(e, VmmError::Config { .. }), "{e:?}");
        assert!(!missing.dir.exists(), "nothing created for a bad spec");

        let dup = VmmSpec {
            drives: vec![DriveSpec {
                id: ROOT_DRIVE_ID.into(),
                path: "/x".into(),
                read_only: false,
            }],
            ..fake.spec()
        };
        assert!(matches!(fake.launch(&dup), Err(VmmError::Config { .. })));

        let long = VmmSpec {
            dir: fake.dir.path().join("d".repeat(100)),
            ..fake.spec()
        };
        assert!(matches!(
            fake.launch(&long),
            Err(VmmError::SocketPathTooLong(_))
        ));

        let e = launch(&fake.dir.path().join("no-vmm"), &fake.spec()).unwrap_err();
        assert!(
            matches!(&e, VmmError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(e.to_string().contains("no-vmm"), "{e}");

        // A symlink in place of the pod directory is not followed.
        let elsewhere = fake.dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let spec = VmmSpec {
            dir: fake.dir.path().join("pods").join("linked"),
            ..fake.spec()
        };
        std::fs::create_dir_all(spec.dir.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &spec.dir).unwrap();
        assert!(matches!(
            fake.launch(&spec),
            Err(VmmError::NotADirectory(_))
        ));
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn stale_sockets_are_cleared_and_live_ones_refused() {
        let fake = FakeVmm::new("exec sleep 30");
        let spec = fake.spec();
        std::fs::create_dir_all(&spec.dir).unwrap();
        // A socket nobody serves any more (its listener is gone).
        drop(UnixListener::bind(spec.dir.join(API_SOCK)).unwrap());
        std::fs::write(spec.dir.join(VSOCK_UDS), "").unwrap();
        let handle = fake.launch(&spec).unwrap();
        assert!(!handle.api_sock.exists() && !handle.vsock_uds.exists());
        handle.kill().unwrap();

        let live = UnixListener::bind(spec.dir.join(API_SOCK)).unwrap();
        assert!(matches!(fake.launch(&spec), Err(VmmError::SocketInUse(_))));
        drop(live);
    }

    #[test]
    fn remove_dir_waits_for_the_end_and_follows_no_symlink() {
        let (fake, handle) = sleeping_vmm();
        let outside = fake.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "keep").unwrap();
        std::os::unix::fs::symlink(&outside, handle.dir.join("link")).unwrap();
        std::fs::create_dir(handle.dir.join("sub")).unwrap();
        std::fs::write(handle.dir.join("sub/f"), "x").unwrap();

        assert!(matches!(
            handle.remove_dir(),
            Err(VmmError::StillRunning(p)) if p == handle.pid
        ));
        assert!(handle.dir.exists());
        handle.kill().unwrap();
        handle.remove_dir().unwrap();
        assert!(!handle.dir.exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("keep")).unwrap(),
            "keep"
        );
        handle.remove_dir().unwrap();

        // A symlink in place of the directory: the link goes, its target stays.
        let link = fake.dir.path().join("pod-link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        remove_pod_dir(&link).unwrap();
        assert!(link.symlink_metadata().is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn the_guest_nic_gets_the_mac_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, "").unwrap();
        let h = VmmHandle {
            pid: 0,
            start_time: 0,
            dir: dir.path().into(),
            api_sock: dir.path().join("api.sock"),
            vsock_uds: dir.path().join("vsock.sock"),
            console_log: dir.path().join("console.log"),
            vmm_log: dir.path().join("vmm.log"),
        };
        let spec = VmmSpec {
            sandbox_id: "sb".into(),
            dir: dir.path().into(),
            kernel: kernel.clone(),
            rootfs: kernel,
            cmdline_extra: String::new(),
            vcpus: 1,
            mem_mib: 128,
            drives: vec![],
            tap: Some("tap0_pv".into()),
            mac: Some("0a:3d:f2:9b:98:6c".into()),
            netns: None,
            restore: None,
        };
        let net = vm_config(&spec, &h).unwrap().net.unwrap();
        assert_eq!(
            (net.tap.as_str(), net.mac),
            ("tap0_pv", [0x0a, 0x3d, 0xf2, 0x9b, 0x98, 0x6c])
        );
        let bad = VmmSpec {
            mac: Some("0a:3d".into()),
            ..spec
        };
        assert!(vm_config(&bad, &h).is_err());
    }

    #[test]
    fn handle_round_trips_through_json() {
        let h = VmmHandle {
            pid: 4242,
            start_time: 123_456_789,
            dir: "/run/podvisor/pods/abc".into(),
            api_sock: "/run/podvisor/pods/abc/api.sock".into(),
            vsock_uds: "/run/podvisor/pods/abc/vsock.sock".into(),
            console_log: "/run/podvisor/pods/abc/console.log".into(),
            vmm_log: "/run/podvisor/pods/abc/vmm.log".into(),
        };
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains("\"start_time\":123456789"), "{json}");
        assert_eq!(serde_json::from_str::<VmmHandle>(&json).unwrap(), h);
    }
}
