//! The VMM's cgroup: `podvisor/<name>` in every cgroup hierarchy mounted on the host (the
//! unified one, and each v1 controller's), created before the launch and joined by the VMM
//! between fork and exec, so it never runs in podvisord's cgroup: stopping podvisord's
//! service does not kill the VMMs, and the pod's resources are accounted to the pod.
//! Removed with the pod directory, once the VMM has ended.
//!
//! (Kubelet's cgroup parent and the pod's limits are the node-integration issue's part.)

use std::fs::File;
use std::io::{self, BufRead};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{VmmError, file_err};

/// The directory every VMM's cgroup sits in, in each hierarchy.
pub const CGROUP_PARENT: &str = "podvisor";
/// How long a removal waits for the kernel to let go of an ended VMM's cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// Where cgroup hierarchies are mounted, from `/proc/self/mountinfo`.
fn hierarchies() -> Result<Vec<PathBuf>, VmmError> {
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

/// A VMM's cgroup in every hierarchy, with `cgroup.procs` of each open for the VMM to join.
pub(super) struct PodCgroup {
    procs: Vec<File>,
}

impl PodCgroup {
    /// Creates `podvisor/<name>` in every hierarchy (an existing one is reused).
    pub(super) fn create(name: &str) -> Result<Self, VmmError> {
        check_name(name)?;
        let mut procs = Vec::new();
        for h in hierarchies()? {
            let parent = h.join(CGROUP_PARENT);
            let dir = parent.join(name);
            for d in [&parent, &dir] {
                match std::fs::create_dir(d) {
                    Ok(()) => inherit_cpuset(d)?,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(file_err("create cgroup", d)(e)),
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

/// Removes `podvisor/<name>` from every hierarchy; one that is not there is not an error.
/// Only for a cgroup no VMM runs in any more (the kernel refuses it otherwise: it waits a
/// moment for an ended one to be released, then reports it).
pub fn remove_cgroup(name: &str) -> Result<(), VmmError> {
    check_name(name)?;
    for h in hierarchies()? {
        let dir = h.join(CGROUP_PARENT).join(name);
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

/// The pids in `podvisor/<name>` of the first hierarchy (for tests and checks).
pub fn cgroup_pids(name: &str) -> Result<Vec<u32>, VmmError> {
    check_name(name)?;
    let Some(h) = hierarchies()?.into_iter().next() else {
        return Ok(Vec::new());
    };
    let p = h.join(CGROUP_PARENT).join(name).join("cgroup.procs");
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
        let cg = PodCgroup::create(&name).unwrap();
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
        assert_eq!(cgroup_pids(&name).unwrap(), [child.id()]);
        let e = remove_cgroup(&name).unwrap_err();
        assert!(e.to_string().contains("remove cgroup"), "{e}");
        child.kill().unwrap();
        child.wait().unwrap();
        remove_cgroup(&name).unwrap();
        for h in hierarchies().unwrap() {
            assert!(!h.join(CGROUP_PARENT).join(&name).exists());
        }
        assert!(matches!(
            remove_cgroup("../x"),
            Err(VmmError::CgroupName(_))
        ));
    }
}
