//! A virtio-vsock device in the device table: built from a [`VsockDeviceConfig`], recorded
//! in a snapshot as its kind alone ([`VsockState`]): host connections do not survive a
//! snapshot, and [`super::Vsock`] tells the guest so when it is restored. Queue and ring
//! state are the transport's.

use podvisor_vmm_api::config::VsockDeviceConfig;
use serde::{Deserialize, Serialize};

use super::{Vsock, VsockConfig, VsockError};

/// What a snapshot records of a vsock device: that there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {}

impl std::fmt::Display for VsockState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("vsock")
    }
}

/// The vsock device `v` describes, and what a snapshot records of it. The device creates
/// its Unix socket at `v.uds`; the caller removes it when the VMM ends.
pub fn build(v: &VsockDeviceConfig) -> Result<(Vsock, VsockState), VsockError> {
    let vsock = Vsock::new(VsockConfig {
        guest_cid: v.cid,
        uds_path: v.uds.clone(),
    })?;
    Ok((vsock, VsockState {}))
}
