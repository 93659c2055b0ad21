//! Intel MultiProcessor table (spec 1.4): how a guest without ACPI learns
//! its CPUs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_ADDR, IOAPIC_ADDR, IOAPIC_PINS, MPTABLE_START};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Family 6 in the CPU signature; the kernel only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
/// Most vCPUs the table (and our APIC ids below the IOAPIC's) allows.
pub use podvisor_vmm_api::config::MAX_VCPUS;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many or zero vCPUs.
    #[error("{0} vCPUs do not fit an MP table (1..={MAX_VCPUS})")]
    Vcpus(u8),
    /// The table does not fit below 640 KiB.
    #[error("MP table of {0} bytes does not fit base memory")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("write MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `num_cpus` vCPUs, placed at `MPTABLE_START`.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::Vcpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[ENTRY_CPU, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS as u8 {
        // Conforming polarity and trigger: edge, active high on ISA.
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const MPF_LEN: usize = 16;
    const MPC_HEADER_LEN: usize = 44;
    let table_addr = MPTABLE_START as u32 + MPF_LEN as u32;
    let table_len = MPC_HEADER_LEN + entries.len();

    let mut mpc = Vec::with_capacity(table_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&(table_len as u16).to_le_bytes());
    mpc.push(SPEC_REV);
    mpc.push(0); // checksum, below
    mpc.extend_from_slice(b"PODVISOR");
    mpc.extend_from_slice(b"MICROVM     ");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&APIC_ADDR.to_le_bytes());
    mpc.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_LEN);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: no default configuration
    mpf[10] = checksum(&mpf);

    let mut all = mpf;
    all.extend_from_slice(&mpc);
    // The table must stay in the top KiB of base memory the kernel scans.
    if all.len() > 0x400 {
        return Err(MptableError::TooLarge(all.len()));
    }
    Ok(all)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let table = build(num_cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 8, MAX_VCPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(sum(&t[16..16 + len]), 0, "table checksum");
            let entries = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
            assert_eq!(entries as u32, cpus as u32 + 2 + IOAPIC_PINS + 2);
            // The first CPU is the BSP, the others are only enabled.
            assert_eq!(t[16 + 44 + 3], CPU_ENABLED | CPU_BSP);
            if cpus > 1 {
                assert_eq!(t[16 + 44 + 20 + 3], CPU_ENABLED);
            }
        }
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(build(0), Err(MptableError::Vcpus(0))));
        assert!(matches!(build(33), Err(MptableError::Vcpus(33))));
    }

    #[test]
    fn fits_top_of_base_memory_for_many_cpus() {
        assert!(build(32).is_ok());
    }
}
