//! cgroup v2: one cgroup per container under `<root>/podvisor/<sandbox>/<container>`.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use podvisor_proto::v1::LinuxResources;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid resources: {0}")]
    Invalid(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// cgroup v1 cpu.shares (2..262144) → cgroup v2 cpu.weight (1..10000), the conversion runc
/// and the kubelet use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// `cpu.max` contents: "<quota|max> <period>".
pub fn cpu_max(quota: i64, period: u64) -> String {
    let period = if period == 0 { 100_000 } else { period };
    if quota <= 0 {
        format!("max {period}")
    } else {
        format!("{quota} {period}")
    }
}

/// "max" for 0 or negative, the number otherwise.
pub fn limit(v: i64) -> String {
    if v <= 0 {
        "max".to_owned()
    } else {
        v.to_string()
    }
}

fn valid_cpuset(s: &str) -> bool {
    s.split(',').all(|part| {
        let mut it = part.splitn(2, '-');
        let ok = |x: Option<&str>| {
            x.is_some_and(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        };
        let a = it.next();
        match it.next() {
            None => ok(a),
            b => ok(a) && ok(b),
        }
    })
}

/// The control files to write for `r`, in order. Unset fields are left alone except the limits,
/// which are written as "max".
pub fn resource_files(r: &LinuxResources) -> Result<Vec<(&'static str, String)>, CgroupError> {
    let mut files = Vec::new();
    if r.cpu_shares != 0 {
        files.push(("cpu.weight", shares_to_weight(r.cpu_shares).to_string()));
    }
    if r.cpu_quota != 0 || r.cpu_period != 0 {
        if r.cpu_period != 0 && !(1000..=1_000_000).contains(&r.cpu_period) {
            return Err(CgroupError::Invalid(format!(
                "cpu period {} outside 1000..=1000000 us",
                r.cpu_period
            )));
        }
        if r.cpu_quota > 0 && r.cpu_quota < 1000 {
            return Err(CgroupError::Invalid(format!(
                "cpu quota {} below 1000 us",
                r.cpu_quota
            )));
        }
        files.push(("cpu.max", cpu_max(r.cpu_quota, r.cpu_period)));
    }
    for (name, v) in [
        ("cpuset.cpus", &r.cpuset_cpus),
        ("cpuset.mems", &r.cpuset_mems),
    ] {
        if !v.is_empty() {
            if !valid_cpuset(v) {
                return Err(CgroupError::Invalid(format!("{name} {v:?}")));
            }
            files.push((name, v.clone()));
        }
    }
    files.push(("memory.max", limit(r.memory_limit_bytes)));
    if r.memory_limit_bytes > 0 {
        // No swap in the VM, but be explicit so a limit is a limit.
        files.push(("memory.swap.max", "0".to_owned()));
    }
    files.push(("pids.max", limit(r.pids_limit)));
    Ok(files)
}

/// Values parsed from a flat-keyed file such as cpu.stat or memory.stat.
pub fn flat_keyed(s: &str, key: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Writes a control file that must already exist (cgroupfs cannot create files).
fn write_existing(p: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .open(p)?
        .write_all(value.as_bytes())
}

/// A container's cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `<podvisor>/<sandbox>/<container>`, enabling the controllers in the parents.
    pub fn create(podvisor: &Path, sandbox: &str, container: &str) -> Result<Self, CgroupError> {
        let sandbox_dir = podvisor.join(sandbox);
        for dir in [podvisor, sandbox_dir.as_path()] {
            match fs::create_dir(dir) {
                Ok(()) => {
                    if let Some(parent) = dir.parent() {
                        let _ = crate::init::enable_controllers(parent);
                    }
                    let _ = crate::init::enable_controllers(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create cgroup", dir)(e)),
            }
        }
        let path = sandbox_dir.join(container);
        fs::create_dir(&path).map_err(io("create cgroup", &path))?;
        Ok(Self { path })
    }

    /// Writes the resource files. A controller file that does not exist (controller not enabled)
    /// is an error only when a value was requested for it.
    pub fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        self.write_resources(r, false)
    }

    /// [`Cgroup::apply`] for a cgroup just created: "max" is what a new cgroup has already, so
    /// those files are not written (every cgroupfs write is a system call the guest kernel
    /// may have to emulate).
    pub fn apply_new(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        self.write_resources(r, true)
    }

    fn write_resources(&self, r: &LinuxResources, fresh: bool) -> Result<(), CgroupError> {
        for (file, value) in resource_files(r)? {
            if fresh && value == "max" {
                continue;
            }
            let p = self.path.join(file);
            match write_existing(&p, &value) {
                Ok(()) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && (value == "max" || file == "memory.swap.max") => {}
                Err(e) => return Err(io("write", &p)(e)),
            }
        }
        Ok(())
    }

    /// O_PATH|O_DIRECTORY descriptor for clone3(CLONE_INTO_CGROUP).
    pub fn open_dir(&self) -> Result<OwnedFd, CgroupError> {
        nix::fcntl::open(
            &self.path,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io("open", &self.path)(e.into()))
    }

    /// The `oom_kill` counter of memory.events (0 when the file is missing).
    pub fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.path.join("memory.events"))
            .ok()
            .and_then(|s| flat_keyed(&s, "oom_kill"))
            .unwrap_or(0)
    }

    /// Pids in cgroup.procs.
    pub fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let s = fs::read_to_string(&p).map_err(io("read", &p))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// SIGKILLs every process in the cgroup (cgroup.kill, or one kill(2) per pid before 5.14).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let p = self.path.join("cgroup.kill");
        match write_existing(&p, "1") {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for pid in self.procs()? {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Ok(())
            }
            Err(e) => Err(io("write", &p)(e)),
        }
    }

    /// Removes the (empty) cgroup directory; a missing one is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove cgroup", &self.path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_control_files() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 100);
        assert_eq!(cpu_max(50_000, 100_000), "50000 100000");
        assert_eq!(cpu_max(0, 0), "max 100000");
        assert_eq!(cpu_max(-1, 20_000), "max 20000");
        assert_eq!(limit(0), "max");
        assert_eq!(limit(-1), "max");
        assert_eq!(limit(64 << 20), "67108864");

        let files = resource_files(&LinuxResources {
            cpu_shares: 512,
            cpu_quota: 20_000,
            cpu_period: 100_000,
            cpuset_cpus: "0-1,3".into(),
            memory_limit_bytes: 128 << 20,
            pids_limit: 100,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            files,
            vec![
                ("cpu.weight", "20".to_owned()),
                ("cpu.max", "20000 100000".to_owned()),
                ("cpuset.cpus", "0-1,3".to_owned()),
                ("memory.max", "134217728".to_owned()),
                ("memory.swap.max", "0".to_owned()),
                ("pids.max", "100".to_owned()),
            ]
        );
        for bad in [
            LinuxResources {
                cpuset_cpus: "0-a".into(),
                ..Default::default()
            },
            LinuxResources {
                cpuset_mems: "1\n".into(),
                ..Default::default()
            },
            LinuxResources {
                cpu_period: 10,
                ..Default::default()
            },
            LinuxResources {
                cpu_quota: 5,
                ..Default::default()
            },
        ] {
            assert!(resource_files(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_flat_keyed_files() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(flat_keyed(events, "oom_kill"), Some(2));
        assert_eq!(flat_keyed(events, "oom"), Some(1));
        assert_eq!(flat_keyed(events, "nope"), None);
    }

    #[test]
    fn creates_and_writes_a_plain_directory_tree() {
        // A plain directory stands in for cgroupfs: the layout and file contents are what count.
        let dir = tempfile::tempdir().expect("tempdir");
        let cg = Cgroup::create(&dir.path().join("podvisor"), "sb", "c1").expect("create");
        assert!(cg.path.ends_with("podvisor/sb/c1"));
        fs::write(cg.path.join("memory.max"), "").expect("seed");
        fs::write(cg.path.join("memory.events"), "oom 1\noom_kill 1\n").expect("seed");
        // memory.swap.max and pids.max are missing: fine, nothing was asked of them.
        cg.apply(&LinuxResources {
            memory_limit_bytes: 1 << 20,
            ..Default::default()
        })
        .expect("apply");
        assert_eq!(
            fs::read_to_string(cg.path.join("memory.max")).expect("read"),
            "1048576"
        );
        // A requested value for a missing controller file is an error.
        let e = cg
            .apply(&LinuxResources {
                pids_limit: 5,
                ..Default::default()
            })
            .expect_err("pids.max missing");
        assert!(matches!(e, CgroupError::Io { .. }));
        assert_eq!(cg.oom_kills(), 1);
        assert!(Cgroup::create(&dir.path().join("podvisor"), "sb", "c1").is_err());
    }

    #[test]
    fn a_new_cgroup_gets_only_its_limits_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cg = Cgroup::create(&dir.path().join("podvisor"), "sb", "c1").expect("create");
        // Empty files stand in for the control files (cgroupfs needs no truncation).
        for f in ["memory.max", "pids.max", "memory.swap.max"] {
            fs::write(cg.path.join(f), "").expect("seed");
        }
        let pids_only = LinuxResources {
            pids_limit: 64,
            ..Default::default()
        };
        cg.apply_new(&pids_only).expect("apply_new");
        let read = |f: &str| fs::read_to_string(cg.path.join(f)).expect("read");
        // "max" is a new cgroup's value already: not written.
        assert_eq!(read("memory.max"), "");
        assert_eq!(read("pids.max"), "64");
        // An update must reset a limit that is gone.
        cg.apply(&pids_only).expect("apply");
        assert_eq!(read("memory.max"), "max");
    }
}
