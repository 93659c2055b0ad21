//! Snapshots of a paused VM and their restore into a new VMM process.
//!
//! A snapshot is two files: the state file ([`file`](mod@file), versioned and checksummed JSON of
//! [`VmSnapshot`]) and the memory file ([`memory_file`], guest RAM, sparse). A restore maps the
//! memory file private copy-on-write, so VMs restored from one snapshot share every page none
//! of them wrote. The state file is untrusted input: it is checked against this VMM's version,
//! this host's CPU features and the restore's device configuration before anything is used.

pub mod file;
pub mod kvm_state;
pub mod memory_file;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::device_table::DeviceState;
use crate::devices::serial::SerialSnapshot;
use crate::virtio::mmio::{MmioRestoreError, TransportSnapshot};
use kvm_state::{CpuidEntry, VcpuState, VmState};

/// The VMM version that wrote a snapshot; a restore accepts only its own.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything but guest RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`VMM_VERSION`] of the writer.
    pub vmm_version: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in MiB (the memory file's size follows from it).
    pub mem_mib: u64,
    /// The CPUID vCPU 0 ran with: the guest kernel chose its code paths from it.
    pub cpuid: Vec<CpuidEntry>,
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpu_states: Vec<VcpuState>,
    /// The UART.
    pub serial: SerialSnapshot,
    /// The virtio devices in MMIO order.
    pub devices: Vec<DeviceSnapshot>,
}

/// One virtio device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// What the device is, with its own state ([`DeviceState`]): a restore must attach equal
    /// ones in the same order, since the guest's drivers are bound to their MMIO windows.
    pub state: DeviceState,
    /// Transport and queue state.
    pub transport: TransportSnapshot,
}

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file.
    #[error(transparent)]
    File(#[from] file::StateFileError),
    /// The memory file.
    #[error(transparent)]
    Memory(#[from] memory_file::MemoryFileError),
    /// KVM state.
    #[error(transparent)]
    Kvm(#[from] kvm_state::KvmStateError),
    /// Written by another VMM version.
    #[error("state file {path} is from podvisor-vmm {found}, this is {VMM_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its writer's version.
        found: String,
    },
    /// This host's CPU differs from the one the snapshot ran on.
    #[error("state file {path} was taken on another CPU feature set ({detail})")]
    Cpu {
        /// The file.
        path: String,
        /// The first difference.
        detail: String,
    },
    /// The state does not match itself or the restore's configuration.
    #[error("state file {path}: {detail}")]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        detail: String,
    },
    /// The UART refused its saved state.
    #[error("state file {path}")]
    Serial {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: crate::devices::serial::SerialRestoreError,
    },
    /// A device's transport refused its saved state.
    #[error("state file {path}: device {device}")]
    Device {
        /// The file.
        path: String,
        /// The device's kind ([`DeviceState`]'s display).
        device: String,
        /// Why.
        #[source]
        source: MmioRestoreError,
    },
    /// The VM is not in a state that can be saved.
    #[error("{0}")]
    NotReady(String),
    /// The vCPUs could not save their state (the VM is not parked, or a vCPU failed).
    #[error(transparent)]
    Vcpus(#[from] crate::vcpu::SaveError),
}

impl VmSnapshot {
    /// Reads `path` and checks it was written by this VMM for a CPU like this one
    /// (`cpuid_here(vcpus)`: the CPUID vCPU 0 of that many would run with here).
    pub fn load(
        path: &Path,
        cpuid_here: impl FnOnce(u8) -> Vec<CpuidEntry>,
    ) -> Result<Self, SnapshotError> {
        let snap: Self = file::read_state_file(path)?;
        let p = || path.display().to_string();
        if snap.vmm_version != VMM_VERSION {
            return Err(SnapshotError::Version {
                path: p(),
                found: snap.vmm_version,
            });
        }
        if snap.vcpus == 0 || snap.vcpus > crate::boot::mptable::MAX_VCPUS {
            return Err(SnapshotError::Mismatch {
                path: p(),
                detail: format!("{} vCPUs", snap.vcpus),
            });
        }
        if let Some(detail) = cpuid_difference(&snap.cpuid, &cpuid_here(snap.vcpus)) {
            return Err(SnapshotError::Cpu { path: p(), detail });
        }
        if snap.vcpu_states.len() != usize::from(snap.vcpus) {
            return Err(SnapshotError::Mismatch {
                path: p(),
                detail: format!(
                    "{} vCPU states for {} vCPUs",
                    snap.vcpu_states.len(),
                    snap.vcpus
                ),
            });
        }
        Ok(snap)
    }

    /// Checks that the restore attaches the same device kinds (and drive ids) in the same
    /// order.
    pub fn check_devices(&self, path: &Path, states: &[DeviceState]) -> Result<(), SnapshotError> {
        if !self.devices.iter().map(|d| &d.state).eq(states) {
            let list = |states: &mut dyn Iterator<Item = &DeviceState>| {
                states.map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
            };
            return Err(SnapshotError::Mismatch {
                path: path.display().to_string(),
                detail: format!(
                    "it has devices [{}], the configuration gives [{}]",
                    list(&mut self.devices.iter().map(|d| &d.state)),
                    list(&mut states.iter())
                ),
            });
        }
        Ok(())
    }
}

/// The first difference between two CPUID tables, if any.
fn cpuid_difference(saved: &[CpuidEntry], here: &[CpuidEntry]) -> Option<String> {
    for s in saved {
        match here
            .iter()
            .find(|h| h.function == s.function && h.index == s.index)
        {
            None => {
                return Some(format!(
                    "leaf {:#x}.{} is missing here",
                    s.function, s.index
                ));
            }
            Some(h) if h != s => {
                return Some(format!(
                    "leaf {:#x}.{}: saved {:08x} {:08x} {:08x} {:08x}, here {:08x} {:08x} {:08x} {:08x}",
                    s.function, s.index, s.eax, s.ebx, s.ecx, s.edx, h.eax, h.ebx, h.ecx, h.edx
                ));
            }
            Some(_) => {}
        }
    }
    if here.len() != saved.len() {
        return Some(format!(
            "{} CPUID leaves saved, {} here",
            saved.len(),
            here.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    }

    #[test]
    fn cpuid_tables_compare_leaf_by_leaf() {
        let a = vec![leaf(0, 0xd), leaf(1, 0x806f1)];
        assert_eq!(cpuid_difference(&a, &a.clone()), None);
        let other_model = vec![leaf(0, 0xd), leaf(1, 0x906ea)];
        let d = cpuid_difference(&a, &other_model).unwrap();
        assert!(d.contains("leaf 0x1.0"), "{d}");
        let fewer = vec![leaf(0, 0xd)];
        assert!(cpuid_difference(&a, &fewer).unwrap().contains("missing"));
        assert!(
            cpuid_difference(&fewer, &a)
                .unwrap()
                .contains("1 CPUID leaves saved")
        );
    }
}
