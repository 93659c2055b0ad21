//! PID-1 duties: the guest's pseudo file systems, the console, cgroup v2 controllers and
//! power-off.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;

/// Controllers enabled for children of the cgroup root (and of the podvisor subtree).
pub const CGROUP_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "cpuset"];

/// Root of the cgroup v2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("create directory {path}")]
    Mkdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("enable cgroup controllers in {path}")]
    Controllers {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("open /dev/console")]
    Console(#[source] std::io::Error),
}

struct PseudoFs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

fn pseudo_filesystems() -> [PseudoFs; 7] {
    [
        PseudoFs {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        PseudoFs {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        PseudoFs {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        PseudoFs {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        },
        PseudoFs {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: Some("mode=1777"),
        },
        PseudoFs {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=0755"),
        },
        PseudoFs {
            source: "cgroup2",
            target: CGROUP_ROOT,
            fstype: "cgroup2",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
    ]
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and /sys/fs/cgroup. A file system that is
/// already mounted (EBUSY) is left as it is.
pub fn mount_pseudo_filesystems() -> Result<(), InitError> {
    for fs in pseudo_filesystems() {
        // The root may be read-only: the mount point usually exists already.
        if !Path::new(fs.target).exists() {
            fs::create_dir_all(fs.target).map_err(|source| InitError::Mkdir {
                path: fs.target.to_owned(),
                source,
            })?;
        }
        match mount(
            Some(fs.source),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            fs.data,
        ) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: fs.fstype,
                    target: fs.target,
                    source,
                });
            }
        }
    }
    // /dev/ptmx must be the ptmx of the new devpts instance.
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    Ok(())
}

/// Enables [`CGROUP_CONTROLLERS`] for the children of `dir` (a cgroup v2 directory).
pub fn enable_controllers(dir: &Path) -> Result<(), InitError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = CGROUP_CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.subtree_control"), wanted.join(" ")).map_err(|source| {
        InitError::Controllers {
            path: dir.display().to_string(),
            source,
        }
    })
}

/// Creates `dir`, the cgroup under which the sandbox's cgroups go, with [`CGROUP_CONTROLLERS`]
/// enabled for its children. Done as the agent starts, so it is part of a VM template
/// rather than work for every pod's first container.
pub fn create_cgroup_parent(dir: &Path) -> Result<(), InitError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(InitError::Mkdir {
                path: dir.display().to_string(),
                source,
            });
        }
    }
    enable_controllers(dir)
}

/// Makes /dev/console the agent's stdout and stderr and /dev/null its stdin.
pub fn attach_console() -> Result<(), InitError> {
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(InitError::Console)?;
    let null = fs::OpenOptions::new()
        .read(true)
        .open("/dev/null")
        .map_err(InitError::Console)?;
    for (src, dst) in [
        (null.as_raw_fd(), 0),
        (console.as_raw_fd(), 1),
        (console.as_raw_fd(), 2),
    ] {
        // SAFETY: dup2 on descriptors we own (src) onto the standard descriptors; no Rust object
        // owns 0..=2 exclusively.
        if unsafe { libc::dup2(src, dst) } < 0 {
            return Err(InitError::Console(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Sets the agent's umask to 022.
pub fn set_umask() {
    let _ = nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
}

/// Writes one line to stdout (the console when PID 1) in a single write.
pub fn console_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// Syncs all file systems and powers the VM off. Only returns if reboot(2) failed.
pub fn power_off() -> nix::Error {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}
