//! Bodies of the control API (JSON).

use serde::{Deserialize, Serialize};

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmRunState {
    /// Running.
    Running,
    /// Paused through the API.
    Paused,
}

/// Boot timing, milliseconds since the VMM started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootInfo {
    /// First KVM_RUN of the boot vCPU.
    pub first_vcpu_entry_ms: Option<f64>,
    /// The guest's init wrote the boot marker.
    pub init_ms: Option<f64>,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// "block rootfs", "net tap0", ...
    pub name: String,
    /// Transport state.
    pub state: String,
    /// Device counters.
    pub counters: DeviceCountersBody,
    /// Refused register writes.
    pub transport: TransportCountersBody,
}

/// A device's counters on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceCountersBody {
    /// Malformed chains dropped.
    pub malformed_chains: u64,
    /// Requests completed.
    pub completed: u64,
    /// Bytes from the guest.
    pub tx_bytes: u64,
    /// Bytes to the guest.
    pub rx_bytes: u64,
    /// Backend errors.
    pub io_errors: u64,
}

/// A transport's counters on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransportCountersBody {
    /// Register writes refused in the state they came in.
    pub refused_writes: u64,
    /// Out-of-order status writes.
    pub bad_status_writes: u64,
}

/// `GET /vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Running or paused.
    pub state: VmRunState,
    /// VMM process id.
    pub pid: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub mem_mib: u64,
    /// Boot timing.
    pub boot: BootInfo,
    /// Devices in MMIO order.
    pub devices: Vec<DeviceInfo>,
}

/// `PUT /drives/{id}`: a new backing file for a running drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSwap {
    /// Host path of the raw image.
    pub path: std::path::PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// `PUT /vm/snapshot`: where to write a snapshot of the paused VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreate {
    /// The state file (written atomically).
    pub state_path: std::path::PathBuf,
    /// The memory file (sparse, written atomically).
    pub mem_path: std::path::PathBuf,
}

/// The answer to `PUT /vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCreated {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Length of the memory file.
    pub mem_file_bytes: u64,
    /// Bytes of it holding data (the rest are holes).
    pub mem_data_bytes: u64,
    /// Wall time of the snapshot.
    pub elapsed_ms: f64,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}
