//! Guest paths used by the agent. In the VM the run directory is `/run/podvisor` (a tmpfs) and
//! the cgroup root is `/sys/fs/cgroup`; host tests point both elsewhere.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Paths {
    /// Agent state root.
    pub run: PathBuf,
    /// Root of the cgroup v2 hierarchy.
    pub cgroup_root: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            run: PathBuf::from("/run/podvisor"),
            cgroup_root: PathBuf::from(crate::init::CGROUP_ROOT),
        }
    }
}

impl Paths {
    /// Sandbox-wide files: hostname, hosts, resolv.conf, shm.
    pub fn sandbox(&self) -> PathBuf {
        self.run.join("sandbox")
    }
    /// Where the pod's virtio-fs share is mounted (every container volume lives beneath).
    pub fn share(&self) -> PathBuf {
        self.run.join("share")
    }
    /// Per-container bundles (rootfs mount point, overlay upper/work).
    pub fn containers(&self) -> PathBuf {
        self.run.join("containers")
    }
    /// Read-only image mounts, one per block device.
    pub fn images(&self) -> PathBuf {
        self.run.join("images")
    }
    /// Roots beneath which CopyFile may write.
    pub fn copy_file_roots(&self) -> [PathBuf; 1] {
        [self.sandbox()]
    }
    /// Parent cgroup of all sandboxes.
    pub fn cgroup_podvisor(&self) -> PathBuf {
        self.cgroup_root.join("podvisor")
    }
    /// Creates the run-time directories.
    pub fn create_dirs(&self) -> std::io::Result<()> {
        for dir in [self.sandbox(), self.containers(), self.images()] {
            std::fs::create_dir_all(&dir)?;
        }
        Ok(())
    }
}
