//! Where things are in the workspace.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// This crate's directory.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Guest shell scripts copied to `/tests/` in the test image.
pub fn guest_scripts_dir() -> PathBuf {
    crate_dir().join("guest")
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The guest kernel: `$PODVISOR_KERNEL` or `build/guest/vmlinux`
/// (built by `make guest`, images/build-kernel.sh).
pub fn guest_kernel() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("PODVISOR_KERNEL") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("build/guest/vmlinux"),
    };
    if !path.is_file() {
        bail!(
            "guest kernel {} is missing: build it with `make guest` (images/build-kernel.sh) \
             or point PODVISOR_KERNEL at a vmlinux",
            path.display()
        );
    }
    // The symlink may be replaced while tests run (kernel rebuilds): pin the target.
    path.canonicalize()
        .with_context(|| format!("resolve guest kernel {}", path.display()))
}

/// The guest root image with the agent as init (`make rootfs`, images/build-rootfs.sh).
pub fn agent_rootfs_path() -> PathBuf {
    workspace_root().join("build/guest/rootfs.ext4")
}

/// Fails clearly when this host cannot run microVMs at all.
pub fn require_kvm() -> anyhow::Result<()> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        bail!("/dev/kvm does not exist: these tests boot real microVMs and need KVM");
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .context("open /dev/kvm read-write (the tests need root or the kvm group)")?;
    Ok(())
}
