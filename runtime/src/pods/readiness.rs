//! Whether podvisord can launch pod VMs now, for the Status call's RuntimeReady: KVM, the
//! VMM executable, and every handler's kernel and root image. Checked at each call (kubelet
//! asks every few seconds; a node being set up gains them over time).

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Why podvisord cannot launch pod VMs.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// `/dev/kvm` cannot be opened read-write.
    #[error("open {path}")]
    Kvm {
        /// The device node.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file a VM needs is missing or unreadable.
    #[error("{what} {path}")]
    File {
        /// What the file is for.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM executable is not executable.
    #[error("the VMM {0} is not an executable file")]
    NotExecutable(PathBuf),
}

const KVM: &str = "/dev/kvm";

/// `Ok` when a pod VM could be launched now.
pub fn check(config: &Config) -> Result<(), NotReady> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM)
        .map_err(|source| NotReady::Kvm {
            path: KVM.into(),
            source,
        })?;
    let vmm = &config.vmm_binary;
    let meta = std::fs::metadata(vmm).map_err(|source| NotReady::File {
        what: "the VMM".into(),
        path: vmm.clone(),
        source,
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(NotReady::NotExecutable(vmm.clone()));
    }
    for name in config.handler_names() {
        let Ok(h) = config.handler(name) else {
            continue;
        };
        readable(&format!("handler {name}'s kernel"), &h.kernel)?;
        readable(&format!("handler {name}'s root image"), &h.image)?;
    }
    Ok(())
}

fn readable(what: &str, path: &Path) -> Result<(), NotReady> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| NotReady::File {
            what: what.into(),
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, vmm: &Path) -> Config {
        Config::parse(&format!(
            "vmm_binary = {:?}\n[handlers.podvisor]\nkernel = {:?}\nimage = {:?}\n",
            vmm.display().to_string(),
            dir.join("vmlinux").display().to_string(),
            dir.join("rootfs.ext4").display().to_string(),
        ))
        .unwrap()
    }

    #[test]
    fn each_missing_part_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = dir.path().join("podvisor-vmm");
        let c = config(dir.path(), &vmm);
        let chain = |c: &Config| podvisor_common::error_chain(&check(c).unwrap_err());
        if Path::new(KVM).exists() {
            assert!(chain(&c).contains("podvisor-vmm"), "{}", chain(&c));
            std::fs::write(&vmm, "#!/bin/sh\n").unwrap();
            assert!(matches!(check(&c), Err(NotReady::NotExecutable(_))));
            std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
            assert!(chain(&c).contains("kernel"), "{}", chain(&c));
            std::fs::write(dir.path().join("vmlinux"), "k").unwrap();
            assert!(chain(&c).contains("root image"), "{}", chain(&c));
            std::fs::write(dir.path().join("rootfs.ext4"), "r").unwrap();
            check(&c).unwrap();
        } else {
            assert!(matches!(check(&c), Err(NotReady::Kvm { .. })));
        }
    }
}
