//! A virtio-fs device in the device table: built from an [`FsDeviceConfig`], recorded in a
//! snapshot as its tag ([`FsState`]). The shared directory is not part of the state: a VM
//! restored from a template attaches its own. Queue and ring state are the transport's.

use podvisor_vmm_api::config::FsDeviceConfig;
use serde::{Deserialize, Serialize};

use super::{Backend, Fs, FsError};

/// What a snapshot records of a virtio-fs device: its tag, which the guest's driver knows
/// it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The tag.
    pub tag: String,
}

impl std::fmt::Display for FsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fs:{}", self.tag)
    }
}

/// The device `c` describes (serving its shared directory, if any), and what a snapshot
/// records of it.
pub fn build(c: &FsDeviceConfig) -> Result<(Fs, FsState), FsError> {
    let backend = match &c.shared_dir {
        Some(dir) => Backend::passthrough(dir)?,
        None => Backend::none(),
    };
    let state = FsState { tag: c.tag.clone() };
    Ok((Fs::new(&c.tag, backend), state))
}
