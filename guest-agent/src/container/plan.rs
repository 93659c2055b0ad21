//! What the agent prepares for a container process before cloning it: the [`ChildPlan`]
//! (namespaces, rootfs paths, identity, argv/envp as C strings, descriptors) and the
//! [`Stage`]s the child reports its setup failures at. Plain data shared by the parent side
//! ([`super::spawn`]) and the child side ([`super::child`]).

use std::ffi::CString;
use std::os::fd::OwnedFd;

use super::caps::{CapSets, RlimitSpec};

/// Steps of the child's setup, reported with errno on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    Ready = 0,
    Setns = 1,
    MountPrivate = 2,
    MountProc = 3,
    Sysctl = 4,
    MaskPath = 5,
    ReadonlyPath = 6,
    PivotRoot = 7,
    Hostname = 8,
    Stdio = 9,
    Rlimits = 10,
    Capabilities = 11,
    SetUser = 12,
    Chdir = 13,
    NoNewPrivs = 14,
    WaitStart = 15,
    Exec = 16,
    Unknown = 99,
}

impl Stage {
    /// The stage a report names ([`Stage::Unknown`] for a number no stage has).
    pub fn from_u32(v: u32) -> Self {
        use Stage::*;
        [
            Ready,
            Setns,
            MountPrivate,
            MountProc,
            Sysctl,
            MaskPath,
            ReadonlyPath,
            PivotRoot,
            Hostname,
            Stdio,
            Rlimits,
            Capabilities,
            SetUser,
            Chdir,
            NoNewPrivs,
            WaitStart,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
        .unwrap_or(Unknown)
    }
}

/// Paths inside the rootfs the child handles itself (they need its PID namespace).
#[derive(Debug)]
pub struct RootfsPlan {
    /// Absolute rootfs path in the agent's mount namespace.
    pub rootfs: CString,
    /// `<rootfs>/proc`
    pub proc: CString,
    /// (path relative to the rootfs, absolute path) of masked paths.
    pub masked: Vec<(CString, CString)>,
    pub readonly: Vec<(CString, CString)>,
    /// (`<rootfs>/proc/sys/...`, value)
    pub sysctls: Vec<(CString, CString)>,
}

/// Standard I/O descriptors for the child.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub tty: bool,
    /// The terminal's path inside the container (`/dev/pts/N` of the container's devpts): the
    /// child reopens it there so that the descriptors it execs with name a path it can see
    /// (ttyname(3)). Falls back to the inherited descriptors if that path is not the same
    /// terminal.
    pub tty_name: Option<CString>,
}

/// Everything the child needs, prepared by the agent.
#[derive(Debug)]
pub struct ChildPlan {
    /// Namespace flags for clone3 (CLONE_NEWNS, CLONE_NEWPID, ...).
    pub clone_flags: u64,
    /// Joined before cloning (pod-shared or the container's PID namespace).
    pub pid_ns: Option<OwnedFd>,
    /// Joined by the child (exec into a container: mnt, ipc, uts).
    pub setns: Vec<(OwnedFd, i32)>,
    pub cgroup: Option<OwnedFd>,
    pub rootfs: Option<RootfsPlan>,
    pub hostname: Option<CString>,
    pub rlimits: Vec<RlimitSpec>,
    pub caps: CapSets,
    pub last_cap: u32,
    pub no_new_privs: bool,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub cwd: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Paths to try with execve, in order (PATH search done in advance).
    pub exec_candidates: Vec<CString>,
    pub stdio: ChildStdio,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_round_trip() {
        for s in [Stage::Ready, Stage::PivotRoot, Stage::Exec] {
            assert_eq!(Stage::from_u32(s as u32), s);
        }
        assert_eq!(Stage::from_u32(12345), Stage::Unknown);
    }
}
