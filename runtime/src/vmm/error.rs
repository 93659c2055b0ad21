//! [`VmmError`]: why launching or talking to a VMM failed.

use std::io;
use std::path::{Path, PathBuf};

use podvisor_common::IoError;
use podvisor_vmm_api::client::ClientError;

/// Why launching or talking to a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Creating or using a file of the pod directory failed.
    #[error(transparent)]
    File(#[from] IoError),
    /// The pod directory exists and is not a directory (a symlink, say).
    #[error("pod directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A container id that cannot name a directory of the pod's share.
    #[error("container id {0:?} cannot name a directory of the pod's share")]
    ShareId(String),
    /// A volume's host path that is neither a file nor a directory.
    #[error(
        "host path {0} is neither a regular file nor a directory: only those can be shared \
         with a VM"
    )]
    VolumeKind(PathBuf),
    /// A volume's host path that is not absolute.
    #[error("host path {0} is not absolute")]
    NotAbsolute(PathBuf),
    /// Something is still mounted beneath the share after the unmount.
    #[error("{0} is still mounted; the pod's share is left in place")]
    StillMounted(PathBuf),
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
        source: podvisor_vmm_api::config::ConfigError,
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
    /// SIGKILL did not end the VMM within `KILL_WAIT`.
    #[error("VMM process {0} did not end after SIGKILL")]
    NotGone(u32),
    /// The VMM's user cannot be used.
    #[error("VMM user {user:?}: {why}")]
    JailUser {
        /// As configured.
        user: String,
        /// What is wrong.
        why: String,
    },
    /// A path the jailed VMM needs that is neither in the pod directory nor bound.
    #[error("{0} is outside the VMM's jail")]
    OutsideJail(PathBuf),
    /// A cgroup name that is not `[A-Za-z0-9_-]{1,128}`.
    #[error("cgroup name {0:?} must be 1 to 128 of [A-Za-z0-9_-]")]
    CgroupName(String),
    /// A recorded cgroup path that is not a plain relative path.
    #[error("cgroup path {path:?}: {why}")]
    CgroupPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Kubelet's cgroup parent for a pod podvisord cannot place a VMM under.
    #[error("cgroup_parent {parent:?}: {why}")]
    CgroupParent {
        /// The parent as given.
        parent: String,
        /// What is wrong with it.
        why: String,
    },
}

/// A closure for `map_err`: a failed file operation of the pod directory.
pub(super) fn file_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> VmmError + 'a {
    move |source| VmmError::File(IoError::new(what, path, source))
}
