//! The guest kernel command line: the caller's part plus what the VMM must add.

use std::ffi::CString;

use crate::devices::legacy::EXIT_PORT;
use crate::layout::{CMDLINE_MAX_SIZE, VIRTIO_MMIO_SIZE};

/// Flags a kvm_pvm host needs (see shared notes on pvm): instructions its
/// ring-0 emulator lacks are kept out of the guest kernel, and `rodata=off`
/// avoids seconds of emulated page-table work at boot.
pub const PVM_FLAGS: &str = "clearcpuid=cx16,popcnt,smap,smep,fsgsbase,rdpid,pcid,invpcid,umip,avx,avx2,avx512f,erms,fsrm,movbe,bmi1,bmi2,rdrand,rdseed noxsave rodata=off";

/// Whether `/dev/kvm` is the software kvm_pvm module. Read once: a jailed VMM has no
/// /sys, so the jail asks before it is entered.
pub fn host_is_pvm() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// A virtio-mmio device as the command line declares it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeclaration {
    /// Window base address.
    pub base: u64,
    /// Its IRQ.
    pub irq: u32,
}

/// Builds the full command line.
///
/// The VMM always adds: the serial console, reboot through the keyboard
/// controller, the exit port our guest kernel reports power-off and panics
/// on, and the virtio-mmio devices; on a kvm_pvm host also [`PVM_FLAGS`].
pub fn build(user: &str, devices: &[MmioDeclaration], pvm: bool) -> Result<CString, String> {
    let mut parts: Vec<String> = vec![
        "console=ttyS0".into(),
        "8250.nr_uarts=1".into(),
        "reboot=k".into(),
        format!("podvisor.exit_port={EXIT_PORT:#x}"),
    ];
    if pvm {
        parts.push(PVM_FLAGS.into());
    }
    for d in devices {
        parts.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE >> 10,
            d.base,
            d.irq
        ));
    }
    // The caller's words go last: anything after "--" belongs to init.
    let user = user.trim();
    if !user.is_empty() {
        parts.push(user.into());
    }
    let line = parts.join(" ");
    if line.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(format!(
            "{} bytes is longer than the kernel accepts ({CMDLINE_MAX_SIZE})",
            line.len() + 1
        ));
    }
    CString::new(line).map_err(|_| "contains a NUL byte".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_devices_console_and_pvm_flags() {
        let d = [MmioDeclaration {
            base: 0xd000_0000,
            irq: 5,
        }];
        let c = build("quiet", &d, true).unwrap();
        let s = c.to_str().unwrap();
        assert!(s.contains("console=ttyS0"));
        assert!(s.contains("virtio_mmio.device=4K@0xd0000000:5"));
        assert!(s.contains("noxsave"));
        assert!(s.ends_with("quiet"));
        let c = build("", &d, false).unwrap();
        assert!(!c.to_str().unwrap().contains("clearcpuid"));
    }

    #[test]
    fn init_arguments_stay_last() {
        let c = build("rdinit=/x -- a b", &[], false).unwrap();
        assert!(c.to_str().unwrap().ends_with("-- a b"));
    }

    #[test]
    fn too_long_or_nul_is_refused() {
        assert!(build(&"x".repeat(4000), &[], false).is_err());
        assert!(build("a\0b", &[], false).is_err());
    }
}
