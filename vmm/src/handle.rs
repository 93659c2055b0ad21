//! [`VmHandle`]: what the control API may do to a running VM, as typed operations (info,
//! pause, resume, stop, drive swap, snapshot). The API server calls these and nothing else:
//! locking devices and transports, and the order a snapshot takes things in, stay here.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use podvisor_common::lock;
use podvisor_vmm_api::{BootInfo, DeviceInfo, DriveSwap, VmInfo, VmRunState};
use vm_memory::GuestMemoryMmap;

use crate::bus::{MmioBus, PortIoBus};
use crate::device_table::DeviceState;
use crate::devices::legacy::BootTimes;
use crate::exit::{ExitReason, ExitSignal};
use crate::snapshot::kvm_state::{CpuidEntry, VmState};
use crate::snapshot::{self, DeviceSnapshot, SnapshotError, VmSnapshot, memory_file};
use crate::vcpu::VcpuControl;
use crate::virtio::block::{Block, BlockError};

/// A drive the API can give a new backing file.
pub struct Drive {
    /// Its id.
    pub id: String,
    /// The device.
    pub block: Arc<Mutex<Block>>,
    /// Its index on the MMIO bus (its transport's).
    pub slot: usize,
}

/// What the control API can reach of a running VM.
pub struct VmHandle {
    /// The VM, for its irqchip/PIT/clock state.
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM, for the memory file.
    pub mem: GuestMemoryMmap,
    /// Port I/O devices (the UART's state).
    pub pio: Arc<PortIoBus>,
    /// vCPU 0's CPUID, recorded in snapshots.
    pub cpuid: Vec<CpuidEntry>,
    /// What a snapshot records of each virtio device, in MMIO order.
    pub device_states: Vec<DeviceState>,
    /// Held by the event loop while it runs device handlers, and by a snapshot while it
    /// saves devices and memory: no device touches guest memory while they are copied.
    pub device_gate: Arc<Mutex<()>>,
    /// One snapshot at a time.
    pub snapshot_lock: Mutex<()>,
    /// Pause/resume.
    pub control: Arc<VcpuControl>,
    /// Stop.
    pub exit: Arc<ExitSignal>,
    /// Boot timing.
    pub times: Arc<BootTimes>,
    /// Devices, for counters.
    pub mmio: Arc<MmioBus>,
    /// Drives, for swaps.
    pub drives: Vec<Drive>,
    /// vCPU count.
    pub vcpus: u8,
    /// Memory size.
    pub mem_mib: u64,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vcpus", &self.vcpus)
            .field("mem_mib", &self.mem_mib)
            .finish_non_exhaustive()
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Length of the memory file.
    pub mem_file_bytes: u64,
    /// Bytes of it that hold data (the rest are holes).
    pub mem_data_bytes: u64,
    /// Wall time of the whole snapshot.
    pub elapsed: Duration,
}

/// Why a drive's backing could not be swapped.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// No drive has that id.
    #[error("no drive with id {0:?}")]
    NoDrive(String),
    /// The new backing file cannot be used; the old one stays.
    #[error("swap drive {id}")]
    Backing {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: BlockError,
    },
}

impl VmHandle {
    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Pauses the vCPUs.
    pub fn pause(&self) {
        self.control.pause();
        tracing::info!("paused");
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) {
        self.control.resume();
        tracing::info!("resumed");
    }

    /// Ends the VM: the event loop returns [`ExitReason::Stopped`].
    pub fn stop(&self) {
        self.exit.trigger(ExitReason::Stopped);
    }

    /// State, size, boot timing and every device's counters.
    pub fn info(&self) -> VmInfo {
        let ms = |us: Option<u64>| us.map(|u| u as f64 / 1000.0);
        VmInfo {
            state: if self.is_paused() {
                VmRunState::Paused
            } else {
                VmRunState::Running
            },
            pid: std::process::id(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            boot: BootInfo {
                first_vcpu_entry_ms: ms(self.times.first_vcpu_entry_us()),
                init_ms: ms(self.times.init_us()),
            },
            devices: self
                .mmio
                .transports()
                .map(|t| {
                    let t = lock(t);
                    let dev = lock(t.device());
                    DeviceInfo {
                        name: dev.name(),
                        state: format!("{:?}", t.state()),
                        counters: dev.counters().into(),
                        transport: t.counters().into(),
                    }
                })
                .collect(),
        }
    }

    /// Gives the drive `id` a new backing file.
    pub fn swap_drive(
        &self,
        id: &str,
        swap: &DriveSwap,
        file: Option<std::fs::File>,
    ) -> Result<(), SwapError> {
        let Some(drive) = self.drives.iter().find(|d| d.id == id) else {
            return Err(SwapError::NoDrive(id.to_owned()));
        };
        lock(&drive.block)
            .swap_backing(&swap.path, file, swap.read_only)
            .map_err(|source| SwapError::Backing {
                id: id.to_owned(),
                source,
            })?;
        // Bump the transport's config generation too, so the guest's multi-word capacity
        // read cannot mix old and new halves.
        if let Some(t) = self.mmio.transports().nth(drive.slot) {
            lock(t).config_changed();
        }
        tracing::info!(drive = id, path = %swap.path.display(), "drive backing swapped");
        Ok(())
    }

    /// Writes a snapshot of the paused VM: the state file at `state_path`, guest RAM at
    /// `mem_path`. The VM stays paused.
    pub fn snapshot(
        &self,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotStats, SnapshotError> {
        let _one = lock(&self.snapshot_lock);
        let started = Instant::now();
        if !self.control.is_paused() {
            return Err(SnapshotError::NotReady(
                "pause the VM before a snapshot".into(),
            ));
        }
        let vcpu_states = self.control.save_vcpus()?;
        let vm = VmState::save(&self.vm_fd)?;
        let _gate = lock(&self.device_gate);
        let devices = self
            .mmio
            .transports()
            .zip(&self.device_states)
            .map(|(t, state)| DeviceSnapshot {
                state: state.clone(),
                transport: lock(t).snapshot(),
            })
            .collect();
        let serial = lock(&self.pio.serial).snapshot();
        let mem_stats = memory_file::write_memory_file(&self.mem, mem_path)?;
        let state = VmSnapshot {
            vmm_version: snapshot::VMM_VERSION.into(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            cpuid: self.cpuid.clone(),
            vm,
            vcpu_states,
            serial,
            devices,
        };
        let state_bytes = snapshot::file::write_state_file(state_path, &state)?;
        let stats = SnapshotStats {
            state_bytes,
            mem_file_bytes: mem_stats.file_len,
            mem_data_bytes: mem_stats.data_bytes,
            elapsed: started.elapsed(),
        };
        tracing::info!(
            state = %state_path.display(),
            mem = %mem_path.display(),
            state_bytes,
            mem_data_bytes = stats.mem_data_bytes,
            "snapshot written in {:.1} ms",
            stats.elapsed.as_secs_f64() * 1000.0
        );
        Ok(stats)
    }
}
