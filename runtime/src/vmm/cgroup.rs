//! The VMM's cgroup, created before the launch and joined by the VMM between fork and exec,
//! so it never runs in podvisord's cgroup: stopping podvisord's service does not kill the
//! VMMs, and the pod's resources are accounted to the pod. Removed with the pod directory,
//! once the VMM has ended.
//!
//! Where it is ([`CgroupPath`], the same path in every cgroup hierarchy mounted on the
//! host, the unified one and each v1 controller's):
//! - a pod with kubelet's `cgroup_parent`: a leaf of the pod's cgroup, so kubelet's QoS
//!   limits, allocatable and eviction see the VM's memory and CPU. With the `cgroupfs`
//!   driver the parent is a path (`/kubepods/burstable/pod<uid>`) and the leaf is
//!   `podvisor-<sandbox>`; with the `systemd` driver the parent is a slice
//!   (`kubepods-burstable-pod<uid>.slice`, found at
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`) and the
//!   leaf is `podvisor-<sandbox>.scope`. A leaf, not the pod's cgroup itself: under cgroup
//!   v2 a cgroup that hands controllers to children holds no processes.
//! - a pod without one, and a template's VM: `podvisor/<name>`.
//!
//! With the systemd driver podvisord writes the scope's directory itself, as with cgroupfs;
//! it does not register the scope with systemd over D-Bus (runc does). The slices are
//! kubelet's; podvisord creates a missing one's directories and removes only its leaf.

use std::fs::File;
use std::io::{self, BufRead};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{VmmError, file_err};

/// The file in the pod directory naming the VMM's cgroup, so that a pod directory left by a
/// crash before its record was written still leads to its cgroup.
pub const CGROUP_FILE: &str = "cgroup";

/// The directory the VMM cgroups of pods without a cgroup parent, and of templates, sit
/// in, in each hierarchy.
pub const CGROUP_PARENT: &str = "podvisor";
/// How long a removal waits for the kernel to let go of an ended VMM's cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// Where cgroup hierarchies are mounted, from `/proc/self/mountinfo`.
pub(super) fn hierarchies() -> Result<Vec<PathBuf>, VmmError> {
    let path = Path::new("/proc/self/mountinfo");
    let f = File::open(path).map_err(file_err("read", path))?;
    let mut found = Vec::new();
    for line in io::BufReader::new(f).lines() {
        let line = line.map_err(file_err("read", path))?;
        // "<id> <parent> <dev> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or_default();
        let root = left.split(' ').nth(3).unwrap_or_default();
        if matches!(fstype, "cgroup" | "cgroup2")
            && root == "/"
            && let Some(mount_point) = left.split(' ').nth(4)
            && !mount_point.contains('\\')
        {
            found.push(PathBuf::from(mount_point));
        }
    }
    Ok(found)
}

/// How the host names cgroups: kubelet's `--cgroup-driver`, podvisord's `cgroup_driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// Parents are paths (`/kubepods/burstable/pod<uid>`).
    #[default]
    Cgroupfs,
    /// Parents are systemd slices (`kubepods-burstable-pod<uid>.slice`).
    Systemd,
}

/// The longest cgroup path podvisord makes or follows.
const MAX_PATH_LEN: usize = 1024;

/// A VMM's cgroup: its path below the root of every hierarchy, checked to be a plain
/// relative path (no `.`, `..` or empty components). Recorded as that path; an older
/// record's bare name means `podvisor/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CgroupPath(String);

impl CgroupPath {
    /// `podvisor/<name>`: a pod without a cgroup parent, or a template's VM.
    pub fn podvisor(name: &str) -> Result<Self, VmmError> {
        check_name(name)?;
        Ok(Self(format!("{CGROUP_PARENT}/{name}")))
    }

    /// Sandbox `sandbox`'s VMM cgroup under kubelet's `parent` (empty: `podvisor/<sandbox>`),
    /// named as `driver` names cgroups. A parent in the other driver's form is refused.
    pub fn for_sandbox(
        driver: CgroupDriver,
        parent: &str,
        sandbox: &str,
    ) -> Result<Self, VmmError> {
        check_name(sandbox)?;
        if parent.is_empty() {
            return Self::podvisor(sandbox);
        }
        let bad = |why: &str| VmmError::CgroupParent {
            parent: parent.to_string(),
            why: why.to_string(),
        };
        let is_slice = parent.ends_with(".slice") && !parent.contains('/');
        let path = match driver {
            CgroupDriver::Cgroupfs if is_slice => {
                return Err(bad(
                    "a systemd slice, but podvisord's cgroup_driver is cgroupfs",
                ));
            }
            CgroupDriver::Cgroupfs => {
                let parts: Vec<&str> = parent.split('/').filter(|p| !p.is_empty()).collect();
                if parts.is_empty() {
                    return Err(bad("names no cgroup below the root"));
                }
                format!("{}/{}", parts.join("/"), leaf_name(driver, sandbox))
            }
            CgroupDriver::Systemd if !is_slice => {
                return Err(bad(
                    "not a systemd slice (name.slice), but podvisord's cgroup_driver is systemd",
                ));
            }
            CgroupDriver::Systemd => format!(
                "{}{}",
                expand_slice(parent).map_err(&bad)?,
                leaf_name(driver, sandbox)
            ),
        };
        Self::checked(path).map_err(|e| match e {
            VmmError::CgroupPath { why, .. } => bad(&why),
            other => other,
        })
    }

    /// The path below a hierarchy's root.
    pub fn relative(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl TryFrom<String> for CgroupPath {
    type Error = VmmError;

    fn try_from(path: String) -> Result<Self, VmmError> {
        if check_name(&path).is_ok() {
            return Self::podvisor(&path);
        }
        Self::checked(path)
    }
}

impl CgroupPath {
    /// `path` if it is a plain relative path.
    fn checked(path: String) -> Result<Self, VmmError> {
        let bad = |why: &str| VmmError::CgroupPath {
            path: path.clone(),
            why: why.to_string(),
        };
        if path.len() > MAX_PATH_LEN {
            return Err(bad("too long"));
        }
        for part in path.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(bad("an empty, . or .. component"));
            }
            if part.bytes().any(|b| b.is_ascii_control() || b == b'\\') {
                return Err(bad("a control character or a backslash"));
            }
        }
        Ok(Self(path))
    }
}

impl From<CgroupPath> for String {
    fn from(p: CgroupPath) -> Self {
        p.0
    }
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The VMM's own cgroup below kubelet's pod cgroup, as `driver` names it.
fn leaf_name(driver: CgroupDriver, sandbox: &str) -> String {
    match driver {
        CgroupDriver::Cgroupfs => format!("podvisor-{sandbox}"),
        CgroupDriver::Systemd => format!("podvisor-{sandbox}.scope"),
    }
}

/// The directory of systemd slice `slice` below the root, with a trailing `/` (empty for
/// the root slice `-.slice`): each `-` opens a level, `a-b-c.slice` is at
/// `a.slice/a-b.slice/a-b-c.slice/`.
fn expand_slice(slice: &str) -> Result<String, &'static str> {
    let name = slice.strip_suffix(".slice").ok_or("not a .slice")?;
    if name == "-" {
        return Ok(String::new());
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if part.is_empty() {
            return Err("an empty part between dashes");
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push_str(&prefix);
        path.push_str(".slice/");
    }
    Ok(path)
}

/// A VMM's cgroup in every hierarchy, with `cgroup.procs` of each open for the VMM to join.
pub(super) struct PodCgroup {
    procs: Vec<File>,
}

impl PodCgroup {
    /// Creates `path` in every hierarchy with the parents it lacks (an existing one is
    /// reused).
    pub(super) fn create(path: &CgroupPath) -> Result<Self, VmmError> {
        let mut procs = Vec::new();
        for h in hierarchies()? {
            let mut dir = h.clone();
            for part in path.relative().components() {
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) => inherit_cpuset(&dir)?,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(file_err("create cgroup", &dir)(e)),
                }
            }
            let p = dir.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(file_err("open", &p))?;
            procs.push(f);
        }
        Ok(Self { procs })
    }

    /// The descriptors the child writes "0" (itself) to, between fork and exec.
    pub(super) fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// A v1 cpuset cgroup starts with no CPUs and no memory nodes, and no task may join it so:
/// it gets its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), VmmError> {
    for key in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(key);
        let Some(parent) = dir.parent() else {
            continue;
        };
        let Ok(value) = std::fs::read_to_string(parent.join(key)) else {
            continue; // not the cpuset hierarchy
        };
        if std::fs::read_to_string(&own).is_ok_and(|v| v.trim().is_empty()) {
            std::fs::write(&own, value.trim()).map_err(file_err("write", &own))?;
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), VmmError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(VmmError::CgroupName(name.to_string()))
    }
}

/// Writes `path` to the pod directory's [`CGROUP_FILE`] (before the cgroup is made).
pub(super) fn record_cgroup(dir: &Path, path: &CgroupPath) -> Result<(), VmmError> {
    let file = dir.join(CGROUP_FILE);
    std::fs::write(&file, &path.0).map_err(file_err("write", &file))
}

/// The cgroup recorded in pod directory `dir` of sandbox `sandbox`: `None` without a
/// record. The file sits in a directory the jailed VMM may write to, so only a path this
/// module would make for `sandbox` is taken.
pub fn recorded_cgroup(dir: &Path, sandbox: &str) -> Result<Option<CgroupPath>, VmmError> {
    let file = dir.join(CGROUP_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err("read", &file)(e)),
    };
    let path = CgroupPath::try_from(text)?;
    let leaf = path.relative().file_name().and_then(|n| n.to_str());
    let ours = path.0 == format!("{CGROUP_PARENT}/{sandbox}")
        || [CgroupDriver::Cgroupfs, CgroupDriver::Systemd]
            .iter()
            .any(|d| leaf == Some(leaf_name(*d, sandbox).as_str()));
    if ours {
        Ok(Some(path))
    } else {
        Err(VmmError::CgroupPath {
            path: path.0,
            why: format!("not a cgroup of sandbox {sandbox}"),
        })
    }
}

/// Removes the leaf of `path` from every hierarchy (its parents are kubelet's or shared);
/// one that is not there is not an error. Only for a cgroup no VMM runs in any more (the
/// kernel refuses it otherwise: it waits a moment for an ended one to be released, then
/// reports it).
pub fn remove_cgroup(path: &CgroupPath) -> Result<(), VmmError> {
    for h in hierarchies()? {
        let dir = h.join(path.relative());
        let deadline = Instant::now() + REMOVE_WAIT;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(file_err("remove cgroup", &dir)(e)),
            }
        }
    }
    Ok(())
}

/// The pids in `path` of the first hierarchy (for tests and checks).
pub fn cgroup_pids(path: &CgroupPath) -> Result<Vec<u32>, VmmError> {
    let Some(h) = hierarchies()?.into_iter().next() else {
        return Ok(Vec::new());
    };
    let p = h.join(path.relative()).join("cgroup.procs");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_err("read", &p)(e)),
    };
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_joins_and_the_cgroup_goes() {
        let name = format!("unit-{}", std::process::id());
        let path = CgroupPath::podvisor(&name).unwrap();
        let cg = PodCgroup::create(&path).unwrap();
        assert!(!cg.procs_fds().is_empty(), "this host mounts cgroups");
        let fds = cg.procs_fds();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: only write(2) on descriptors that stay open in the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for fd in &fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        assert_eq!(cgroup_pids(&path).unwrap(), [child.id()]);
        let e = remove_cgroup(&path).unwrap_err();
        assert!(e.to_string().contains("remove cgroup"), "{e}");
        child.kill().unwrap();
        child.wait().unwrap();
        remove_cgroup(&path).unwrap();
        for h in hierarchies().unwrap() {
            assert!(!h.join(CGROUP_PARENT).join(&name).exists());
        }
        assert!(matches!(
            CgroupPath::podvisor("../x"),
            Err(VmmError::CgroupName(_))
        ));
    }

    #[test]
    fn parents_by_driver() {
        let id = "abc123";
        let fs = |parent| CgroupPath::for_sandbox(CgroupDriver::Cgroupfs, parent, id);
        let sd = |parent| CgroupPath::for_sandbox(CgroupDriver::Systemd, parent, id);
        assert_eq!(fs("").unwrap().to_string(), "podvisor/abc123");
        assert_eq!(sd("").unwrap().to_string(), "podvisor/abc123");
        assert_eq!(
            fs("/kubepods/burstable/pod1234").unwrap().to_string(),
            "kubepods/burstable/pod1234/podvisor-abc123"
        );
        assert_eq!(
            fs("kubepods//podx/").unwrap().to_string(),
            "kubepods/podx/podvisor-abc123"
        );
        assert_eq!(
            sd("kubepods-burstable-pod1234.slice").unwrap().to_string(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/\
             podvisor-abc123.scope"
        );
        assert_eq!(sd("-.slice").unwrap().to_string(), "podvisor-abc123.scope");
        for (bad, result) in [
            ("/kubepods/../../etc", fs("/kubepods/../../etc")),
            ("/", fs("/")),
            ("kubepods.slice", fs("kubepods.slice")),
            ("/kubepods/pod1", sd("/kubepods/pod1")),
            ("kubepods--x.slice", sd("kubepods--x.slice")),
            ("kubepods-.slice", sd("kubepods-.slice")),
            ("a/b.slice", sd("a/b.slice")),
        ] {
            assert!(
                matches!(result, Err(VmmError::CgroupParent { .. })),
                "{bad}: {result:?}"
            );
        }
        assert!(CgroupPath::for_sandbox(CgroupDriver::Cgroupfs, "/kubepods", "../x").is_err());
    }

    #[test]
    fn recorded_paths_are_checked() {
        let p: CgroupPath = serde_json::from_str("\"name-1\"").unwrap();
        assert_eq!(
            p.to_string(),
            "podvisor/name-1",
            "an older record's bare name"
        );
        let p: CgroupPath = serde_json::from_str("\"kubepods/pod1/podvisor-x\"").unwrap();
        assert_eq!(p.relative(), Path::new("kubepods/pod1/podvisor-x"));
        for bad in [
            "\"a/../b\"",
            "\"/a/b\"",
            "\"a//b\"",
            "\"a/./b\"",
            "\"a/b\\n\"",
        ] {
            assert!(serde_json::from_str::<CgroupPath>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_recorded_cgroup_must_be_the_sandboxs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(recorded_cgroup(dir.path(), "sb1").unwrap().is_none());
        for (parent, driver) in [
            ("", CgroupDriver::Cgroupfs),
            ("/kubepods/pod1", CgroupDriver::Cgroupfs),
            ("kubepods-pod1.slice", CgroupDriver::Systemd),
        ] {
            let path = CgroupPath::for_sandbox(driver, parent, "sb1").unwrap();
            record_cgroup(dir.path(), &path).unwrap();
            assert_eq!(recorded_cgroup(dir.path(), "sb1").unwrap(), Some(path));
            assert!(
                recorded_cgroup(dir.path(), "sb2").is_err(),
                "another sandbox's"
            );
        }
        std::fs::write(dir.path().join(CGROUP_FILE), "kubepods/../x").unwrap();
        assert!(recorded_cgroup(dir.path(), "sb1").is_err());
    }

    #[test]
    fn a_leaf_is_made_under_missing_parents_and_only_it_goes() {
        let parent = format!("/unit-parent-{}/pod1", std::process::id());
        let path = CgroupPath::for_sandbox(CgroupDriver::Cgroupfs, &parent, "sb1").unwrap();
        let cg = PodCgroup::create(&path).unwrap();
        drop(cg);
        let hs = hierarchies().unwrap();
        for h in &hs {
            assert!(h.join(path.relative()).is_dir());
        }
        remove_cgroup(&path).unwrap();
        for h in &hs {
            let pod = h.join(parent.trim_start_matches('/'));
            assert!(!h.join(path.relative()).exists());
            assert!(pod.is_dir(), "the parent is kubelet's and stays");
            std::fs::remove_dir(&pod).unwrap();
            std::fs::remove_dir(pod.parent().unwrap()).unwrap();
        }
    }
}
