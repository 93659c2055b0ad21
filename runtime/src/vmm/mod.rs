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
//! | `cgroup`       | the VMM's cgroup path, written before the cgroup is made      |
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
//!
//! Modules: `spec` ([`VmmSpec`], the file names, `vmm.json`), `launch` ([`launch`]: the
//! detached process and its reaper), `handle` ([`VmmHandle`]: a launched VMM, its control
//! API, stop and kill), `process` (`/proc/<pid>/stat` and pidfds), `pod_dir` (the directory
//! on disk), `jail` ([`JailUser`], the configuration rewritten for the VMM's jail), `cgroup`
//! (the VMM's cgroup), `usage` (what its cgroup and TAP count) and `error` ([`VmmError`]).
//!
//! The VMM is jailed unless the spec says otherwise ([`VmmSpec::jail`]): its own mount
//! namespace with only the pod directory, its files and two device nodes, its own cgroup,
//! a clean environment, rlimits, and from the VM's build on an unprivileged user with no
//! capability under seccomp. The pod directory then belongs to that user.

mod cgroup;
mod error;
mod handle;
mod idmap;
mod jail;
mod launch;
mod pod_dir;
mod process;
mod share;
mod spec;
#[cfg(test)]
mod test_support;
mod usage;

pub use cgroup::{
    CGROUP_FILE, CGROUP_PARENT, CgroupDriver, CgroupPath, cgroup_pids, recorded_cgroup,
    remove_cgroup,
};
pub use error::VmmError;
pub use handle::{StopOutcome, VmmHandle};
pub use idmap::IdMap;
pub use jail::JailUser;
pub use launch::launch;
pub use pod_dir::remove_pod_dir;
pub use process::kill_vmms_with_config;
pub use share::{
    GUEST_SHARE_ROOT, Propagation, SHARE_TAG, SharedVolume, Volume, bind_volumes, create_share,
    remove_share, unbind_volumes,
};
pub use usage::{CgroupUsage, NetUsage, cgroup_usage, tap_usage};
// Only the template tests need it outside this module (to stand a process in for a VM).
#[cfg(test)]
pub(crate) use process::process_start_time;
pub use spec::{
    API_SOCK, BASE_CMDLINE, CONFIG_FILE, CONSOLE_LOG, DriveSpec, GUEST_CID, ROOT_DRIVE_ID, VMM_LOG,
    VSOCK_UDS, VmmSpec,
};
