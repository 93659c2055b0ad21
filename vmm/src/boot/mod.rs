//! Loading the guest kernel and describing the machine to it.
//!
//! An ELF `vmlinux` with a PVH note boots through the PVH entry (32-bit
//! protected mode, `hvm_start_info` in RBX); a bzImage boots through the
//! Linux 64-bit boot protocol (long mode, zero page in RSI).

pub mod cmdline;
pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::layout::{
    BASE_RAM_END, CMDLINE_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Why the kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("open kernel {path}")]
    OpenKernel {
        /// The path given.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage, or it does not fit memory.
    #[error("load kernel {path}: not a loadable ELF vmlinux or bzImage ({elf}; {bzimage})")]
    LoadKernel {
        /// The path given.
        path: String,
        /// Why ELF loading failed.
        elf: loader::Error,
        /// Why bzImage loading failed.
        bzimage: loader::Error,
    },
    /// The ELF kernel has no PVH entry point.
    #[error("kernel {0} is an ELF without a PVH entry note (build it with CONFIG_PVH=y)")]
    NoPvhEntry(String),
    /// The initrd could not be read.
    #[error("read initrd {path}")]
    Initrd {
        /// The path given.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit guest memory.
    #[error("initrd of {size} bytes does not fit guest memory")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("write boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
    /// Writing guest memory failed.
    #[error("write guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// How the vCPU must be set up to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `rbx` = start info.
    Pvh {
        /// Entry address from the ELF note.
        entry: GuestAddress,
    },
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64 {
        /// 64-bit entry point (load address + 0x200).
        entry: GuestAddress,
    },
}

/// What [`load_kernel`] placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where to start.
    pub entry: EntryPoint,
    /// bzImage setup header, needed for the zero page.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// First byte after the kernel image.
    pub kernel_end: u64,
}

/// Loads `path` (ELF with PVH note, or bzImage) at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: name.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            return match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                    entry: EntryPoint::Pvh { entry },
                    setup_header: None,
                    kernel_end: r.kernel_end,
                }),
                _ => Err(BootError::NoPvhEntry(name)),
            };
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut file, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: EntryPoint::Linux64 {
                entry: r.kernel_load.unchecked_add(0x200),
            },
            setup_header: r.setup_header,
            kernel_end: r.kernel_end,
        }),
        Err(bz_err) => Err(BootError::LoadKernel {
            path: name,
            elf: elf_err,
            bzimage: bz_err,
        }),
    }
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdConfig {
    /// Guest address.
    pub address: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd page-aligned at the top of low RAM, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_ram_end: u64,
    kernel_end: u64,
) -> Result<InitrdConfig, BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Initrd {
        path: name.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Initrd {
            path: name.clone(),
            source,
        })?
        .len();
    let start = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge { size })?;
    let address = GuestAddress(start);
    mem.read_exact_volatile_from(address, &mut file, size as usize)
        .map_err(BootError::Memory)?;
    Ok(InitrdConfig { address, size })
}

/// The RAM ranges as the guest's memory map lists them.
fn ram_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, BASE_RAM_END)];
    let end = mem.last_addr().raw_value() + 1;
    let low_end = end.min(MMIO_GAP_START);
    map.push((HIMEM_START, low_end - HIMEM_START));
    if end > MMIO_GAP_END {
        map.push((MMIO_GAP_END, end - MMIO_GAP_END));
    }
    map
}

/// Writes the command line, MP table and the boot protocol's structures.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &std::ffi::CStr,
    initrd: Option<InitrdConfig>,
    vcpus: u8,
) -> Result<(), BootError> {
    let cmdline_bytes = cmdline.to_bytes_with_nul();
    mem.write_slice(cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::Memory)?;
    mptable::setup_mptable(mem, vcpus)?;
    match kernel.entry {
        EntryPoint::Pvh { .. } => configure_pvh(mem, initrd),
        EntryPoint::Linux64 { .. } => {
            configure_linux64(mem, kernel, cmdline_bytes.len() as u32, initrd)
        }
    }
}

fn configure_pvh(mem: &GuestMemoryMmap, initrd: Option<InitrdConfig>) -> Result<(), BootError> {
    let mut memmap: Vec<hvm_memmap_table_entry> = ram_map(mem)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    // The MP table and the legacy BIOS hole stay out of RAM.
    memmap.insert(
        1,
        hvm_memmap_table_entry {
            addr: BASE_RAM_END,
            size: HIMEM_START - BASE_RAM_END,
            type_: E820_RESERVED,
            reserved: 0,
        },
    );
    let mut start_info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params;
    if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: initrd.address.raw_value(),
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    } else {
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Configure)
}

fn configure_linux64(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<InitrdConfig>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let mut n = 0usize;
    let mut add = |addr: u64, size: u64, kind: u32| {
        if n < params.e820_table.len() {
            params.e820_table[n] = boot_e820_entry {
                addr,
                size,
                type_: kind,
            };
            n += 1;
        }
    };
    for (i, (addr, size)) in ram_map(mem).into_iter().enumerate() {
        add(addr, size, E820_RAM);
        if i == 0 {
            add(BASE_RAM_END, HIMEM_START - BASE_RAM_END, E820_RESERVED);
        }
    }
    params.e820_entries = n as u8;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootError::Configure)
}
