//! Guest physical memory map of a podvisor microVM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (boot)            0x0000_9000  PML4 / PDPTE / PDE (64-bit boot)
//! 0x0000_6000  PVH start info        0x0002_0000  kernel command line
//! 0x0000_7000  PVH memmap / zero page 0x0009_fc00 MP table (top of base memory)
//! 0x0010_0000  kernel (HIMEM)        ...          initrd at the top of low RAM
//! 0xc000_0000 - 0xffff_ffff          MMIO gap: virtio-mmio devices at 0xd000_0000,
//!                                    IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000                      RAM above 3 GiB continues here
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol zero page (bzImage boot).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack for the 64-bit boot path.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit boot path.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages, first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and table: the kernel scans the top KiB of base memory.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base memory usable as RAM (the MP table sits above).
pub const BASE_RAM_END: u64 = 0x9fc00;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;
/// The serial port's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio devices; they take one each, up to pin 23.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Largest number of virtio devices (IRQs 5..=23).
pub use podvisor_vmm_api::config::MAX_VIRTIO_DEVICES;
const _: () = assert!(MAX_VIRTIO_DEVICES == (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize);
/// Where KVM puts its TSS on Intel (three pages below the identity map).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
