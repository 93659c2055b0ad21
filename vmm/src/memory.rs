//! Guest RAM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub use podvisor_vmm_api::config::{MAX_MEM_MIB, MIN_MEM_MIB};

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size out of range.
    #[error("guest memory {0} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB})")]
    Size(u64),
    /// mmap failed.
    #[error("map {mib} MiB of guest memory")]
    Map {
        /// Size asked for.
        mib: u64,
        /// The mmap error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM regions for `mem_mib` MiB: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
        return Err(MemoryError::Size(mem_mib));
    }
    let bytes = mem_mib << 20;
    let low = bytes.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if bytes > low {
        regions.push((GuestAddress(MMIO_GAP_END), (bytes - low) as usize));
    }
    Ok(regions)
}

/// Maps anonymous guest memory of `mem_mib` MiB.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_regions(mem_mib)?;
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Map {
        mib: mem_mib,
        source,
    })
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_mib: u64) -> u64 {
    (mem_mib << 20).min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let r = ram_regions(128).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_regions(4096).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[1].1 as u64, (4096u64 << 20) - MMIO_GAP_START);
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(matches!(ram_regions(0), Err(MemoryError::Size(0))));
        assert!(matches!(ram_regions(1 << 40), Err(MemoryError::Size(_))));
    }
}
