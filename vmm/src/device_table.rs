//! The virtio device table: every kind of virtio device registered once, with how the VM
//! configuration asks for it, its constructor and the state a snapshot records of it.
//!
//! Adding a device kind: a folder under `virtio/` like the others (its `persist` module
//! defines the device's snapshot state and its constructor from the configuration), one
//! [`DeviceKind`] in [`DEVICE_KINDS`] and the matching [`DeviceState`] variant. The builder
//! attaches the devices in table order, which is their MMIO order; a snapshot records their
//! [`DeviceState`]s and a restore must attach equal ones in the same order. Each device's
//! counters are its [`VirtioDevice::counters`], which the handle reports.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use podvisor_vmm_api::config::VmConfig;
use serde::{Deserialize, Serialize};

use crate::virtio::VirtioDevice;
use crate::virtio::block::Block;
use crate::virtio::block::persist::{self as block, BlockState};
use crate::virtio::fs::persist::{self as fs, FsState};
use crate::virtio::net::persist::{self as net, NetState};
use crate::virtio::vsock::persist::{self as vsock, VsockState};

/// What a snapshot records of one virtio device besides its transport: its kind, and for
/// a drive its id. A restore must attach the same states in the same order, since the
/// guest's drivers are bound to their MMIO windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceState {
    /// A virtio-blk drive.
    Block(BlockState),
    /// A virtio-net interface.
    Net(NetState),
    /// A virtio-vsock device.
    Vsock(VsockState),
    /// A virtio-fs device.
    Fs(FsState),
}

/// `block:<id>`, `net` or `vsock`: how errors and logs name a device's kind.
impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Block(s) => s.fmt(f),
            Self::Net(s) => s.fmt(f),
            Self::Vsock(s) => s.fmt(f),
            Self::Fs(s) => s.fmt(f),
        }
    }
}

/// A device the configuration asked for, built and not yet on the bus.
pub struct Attached {
    /// The device.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// What a snapshot records of it.
    pub state: DeviceState,
}

/// The devices of a VM in MMIO order, plus what the VM keeps of some kinds.
#[derive(Default)]
pub struct Attachments {
    /// Every device, in MMIO order.
    pub devices: Vec<Attached>,
    /// The drives by id, with their index in `devices`, for backing swaps.
    pub drives: Vec<(String, Arc<Mutex<Block>>, usize)>,
    /// Host files the devices created, removed when the VMM ends.
    pub remove_on_exit: Vec<PathBuf>,
}

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let states: Vec<&DeviceState> = self.devices.iter().map(|d| &d.state).collect();
        f.debug_struct("Attachments")
            .field("devices", &states)
            .finish_non_exhaustive()
    }
}

impl Attachments {
    fn push(&mut self, device: Arc<Mutex<dyn VirtioDevice>>, state: DeviceState) {
        self.devices.push(Attached { device, state });
    }
}

/// A device the configuration asks for could not be created.
#[derive(Debug, thiserror::Error)]
#[error("device {name}")]
pub struct DeviceError {
    /// The device ("drive root", "net tap0", "vsock /run/x.sock").
    pub name: String,
    /// Why: the device's own error type.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl DeviceError {
    fn new(name: String, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            name,
            source: Box::new(source),
        }
    }
}

/// One kind of virtio device.
#[derive(Debug)]
pub struct DeviceKind {
    /// The kind's name.
    pub name: &'static str,
    /// Builds the devices of this kind `config` asks for and adds them to the attachments.
    pub attach: fn(&VmConfig, &mut Attachments) -> Result<(), DeviceError>,
}

/// Every kind of virtio device, in MMIO order.
pub const DEVICE_KINDS: &[DeviceKind] = &[
    DeviceKind {
        name: "block",
        attach: attach_drives,
    },
    DeviceKind {
        name: "net",
        attach: attach_net,
    },
    DeviceKind {
        name: "vsock",
        attach: attach_vsock,
    },
    DeviceKind {
        name: "fs",
        attach: attach_fs,
    },
];

/// Builds every virtio device `config` asks for, in MMIO order.
pub fn attach_all(config: &VmConfig) -> Result<Attachments, DeviceError> {
    let mut out = Attachments::default();
    for kind in DEVICE_KINDS {
        (kind.attach)(config, &mut out)?;
    }
    Ok(out)
}

fn attach_drives(config: &VmConfig, out: &mut Attachments) -> Result<(), DeviceError> {
    for d in &config.drives {
        let (device, state) =
            block::build(d).map_err(|e| DeviceError::new(format!("drive {}", d.id), e))?;
        let device = Arc::new(Mutex::new(device));
        out.drives
            .push((d.id.clone(), device.clone(), out.devices.len()));
        out.push(device, DeviceState::Block(state));
    }
    Ok(())
}

fn attach_net(config: &VmConfig, out: &mut Attachments) -> Result<(), DeviceError> {
    if let Some(n) = &config.net {
        let (device, state) =
            net::build(n).map_err(|e| DeviceError::new(format!("net {}", n.tap), e))?;
        out.push(Arc::new(Mutex::new(device)), DeviceState::Net(state));
    }
    Ok(())
}

fn attach_vsock(config: &VmConfig, out: &mut Attachments) -> Result<(), DeviceError> {
    if let Some(v) = &config.vsock {
        let (device, state) = vsock::build(v)
            .map_err(|e| DeviceError::new(format!("vsock {}", v.uds.display()), e))?;
        out.remove_on_exit.push(v.uds.clone());
        out.push(Arc::new(Mutex::new(device)), DeviceState::Vsock(state));
    }
    Ok(())
}

fn attach_fs(config: &VmConfig, out: &mut Attachments) -> Result<(), DeviceError> {
    if let Some(c) = &config.fs {
        let (device, state) =
            fs::build(c).map_err(|e| DeviceError::new(format!("fs {}", c.tag), e))?;
        out.push(Arc::new(Mutex::new(device)), DeviceState::Fs(state));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_name_drives_by_id() {
        let root = DeviceState::Block(BlockState {
            drive_id: "root".into(),
        });
        assert_eq!(root.to_string(), "block:root");
        assert_eq!(DeviceState::Net(NetState {}).to_string(), "net");
        assert_eq!(DeviceState::Vsock(VsockState {}).to_string(), "vsock");
        let fs = DeviceState::Fs(FsState { tag: "pod".into() });
        assert_eq!(fs.to_string(), "fs:pod");
    }

    #[test]
    fn states_round_trip_with_their_kind() {
        let root = DeviceState::Block(BlockState {
            drive_id: "root".into(),
        });
        let text = serde_json::to_string(&root).unwrap();
        assert_eq!(text, r#"{"kind":"block","drive_id":"root"}"#);
        assert_eq!(serde_json::from_str::<DeviceState>(&text).unwrap(), root);
        let net: DeviceState = serde_json::from_str(r#"{"kind":"net"}"#).unwrap();
        assert_eq!(net, DeviceState::Net(NetState {}));
    }
}
