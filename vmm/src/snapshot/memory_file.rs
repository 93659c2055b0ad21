//! Guest RAM to a file and back.
//!
//! The memory file is the regions' bytes back to back, in region order, with every all-zero
//! page left as a hole: a guest that touched little of its RAM makes a small file. A restore
//! maps the file private (copy-on-write), so pages the restored guest never writes stay shared
//! through the page cache between every VM restored from the same file.

use podvisor_common::IoError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionCollectionError, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

use super::file::{commit_tmp, create_tmp, remove_tmp, tmp_path};

/// The unit of holes, and the alignment every region must keep (the file offsets of
/// `map_memory_file` must be page-aligned).
const PAGE_SIZE: usize = 4096;
/// Guest RAM is copied out through a buffer of this size.
const COPY_CHUNK: usize = 1 << 20;

/// What `write_memory_file` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFileStats {
    /// The file's length: all of guest RAM.
    pub file_len: u64,
    /// Bytes of it that hold data (pages not all zero); the rest are holes.
    pub data_bytes: u64,
}

/// Why guest memory could not be written to or mapped from a file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file could not be created, written, synced, renamed or opened.
    #[error("memory file {}", .0.path.display())]
    Io(#[source] IoError),
    /// Guest RAM could not be read.
    #[error("read guest memory at {addr:#x}")]
    ReadGuest {
        /// Guest physical address.
        addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The file is not exactly the size of the guest RAM it is mapped as.
    #[error("memory file {} is {len} bytes, the guest's RAM is {expected}", path.display())]
    Length {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The regions' total.
        expected: u64,
    },
    /// A region is empty or not a whole number of pages.
    #[error(
        "guest memory region at {addr:#x} has size {size:#x}, not a non-zero multiple of {PAGE_SIZE:#x}"
    )]
    RegionSize {
        /// Its guest address.
        addr: u64,
        /// Its size.
        size: usize,
    },
    /// mmap of a region failed.
    #[error("map memory file {} at offset {offset:#x} ({size:#x} bytes)", path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// Offset in the file.
        offset: u64,
        /// Bytes.
        size: usize,
        /// The error.
        #[source]
        source: MmapRegionError,
    },
    /// A region's end overflows the guest address space.
    #[error("guest memory region at {addr:#x} wraps the address space")]
    RegionEnd {
        /// Its guest address.
        addr: u64,
    },
    /// The regions overlap, are out of order or are none.
    #[error("guest memory regions")]
    Regions(#[source] GuestRegionCollectionError),
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> MemoryFileError {
    move |source| MemoryFileError::Io(IoError::new(what, path, source))
}

/// Regions back to back in order (region i at the sum of the earlier regions' sizes); every 4 KiB
/// page that is all zeros is left as a hole (the file is sparse). Written to `<path>.tmp`, fsync, rename.
///
/// Guest RAM must not change meanwhile: the vCPUs are paused and devices stopped.
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<MemoryFileStats, MemoryFileError> {
    let tmp = tmp_path(path);
    // A partial file of guest RAM is only wasted disk.
    write_to(mem, &tmp, path).inspect_err(|_| remove_tmp(&tmp))
}

fn write_to(
    mem: &GuestMemoryMmap,
    tmp: &Path,
    path: &Path,
) -> Result<MemoryFileStats, MemoryFileError> {
    let f = create_tmp(tmp).map_err(io_err(tmp, "create"))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut file_off = 0u64;
    let mut data_bytes = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            region
                .read_slice(chunk, MemoryRegionAddress(done))
                .map_err(|source| MemoryFileError::ReadGuest {
                    addr: region.start_addr().raw_value() + done,
                    source,
                })?;
            data_bytes +=
                write_data_pages(&f, chunk, file_off + done).map_err(io_err(tmp, "write"))?;
            done += n as u64;
        }
        file_off += len;
    }
    // Zero pages at the end are a hole the length alone creates.
    f.set_len(file_off).map_err(io_err(tmp, "set length"))?;
    commit_tmp(&f, tmp, path).map_err(io_err(path, "commit"))?;
    Ok(MemoryFileStats {
        file_len: file_off,
        data_bytes,
    })
}

/// Writes the pages of `chunk` that are not all zeros at `offset` onwards, one write per run of
/// such pages, and skips the others (they stay holes). Returns the bytes written.
fn write_data_pages(f: &File, chunk: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    for page in chunk.chunks(PAGE_SIZE) {
        match (is_zero(page), run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                f.write_all_at(&chunk[start..pos], offset + start as u64)?;
                written += (pos - start) as u64;
                run_start = None;
            }
            _ => {}
        }
        pos += page.len();
    }
    if let Some(start) = run_start {
        f.write_all_at(&chunk[start..], offset + start as u64)?;
        written += (chunk.len() - start) as u64;
    }
    Ok(written)
}

/// Whether every byte is zero; an OR over the whole page (no early exit) vectorizes.
fn is_zero(page: &[u8]) -> bool {
    page.iter().fold(0u8, |acc, b| acc | b) == 0
}

/// Maps the file MAP_PRIVATE (copy-on-write: writes stay in this process, pages not yet written
/// are shared through the page cache between every VM restored from it) at `regions`
/// ((guest address, size) as `crate::memory::ram_regions` returns). Refuses a file whose length is
/// not exactly the regions' total.
pub fn map_memory_file(
    path: &Path,
    regions: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    // Read-only: a private mapping needs no write access, and the file must never change.
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    let mut expected = 0u64;
    for &(addr, size) in regions {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryFileError::RegionSize {
                addr: addr.raw_value(),
                size,
            });
        }
        expected = expected.saturating_add(size as u64);
    }
    if len != expected {
        return Err(MemoryFileError::Length {
            path: path.to_owned(),
            len,
            expected,
        });
    }
    let file = Arc::new(file);
    let mut mapped = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for &(addr, size) in regions {
        // MAP_NORESERVE: copied-on-write pages are charged as they are made, not all upfront.
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryFileError::Map {
            path: path.to_owned(),
            offset,
            size,
            source,
        })?;
        let region = GuestRegionMmap::new(mapping, addr).ok_or(MemoryFileError::RegionEnd {
            addr: addr.raw_value(),
        })?;
        mapped.push(region);
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(mapped).map_err(MemoryFileError::Regions)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const LOW: usize = 1 << 20;
    const HIGH: usize = 512 << 10;
    const HIGH_BASE: u64 = 1 << 32;

    fn regions() -> Vec<(GuestAddress, usize)> {
        vec![(GuestAddress(0), LOW), (GuestAddress(HIGH_BASE), HIGH)]
    }

    /// (guest address, bytes) written into otherwise zero memory.
    fn patterns() -> Vec<(u64, Vec<u8>)> {
        vec![
            // A whole page.
            (0, vec![0xaa; PAGE_SIZE]),
            // One byte at the end of a page.
            (6 * PAGE_SIZE as u64 - 1, vec![0x01]),
            // The last bytes of the low region, just before the high one in the file.
            (LOW as u64 - 16, (0..16).collect()),
            // Two pages in the high region.
            (HIGH_BASE + 3 * PAGE_SIZE as u64, vec![0x5c; 2 * PAGE_SIZE]),
        ]
    }

    fn patterned_memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&regions()).unwrap();
        for (addr, bytes) in patterns() {
            mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        }
        mem
    }

    fn file_offset(addr: u64) -> u64 {
        if addr >= HIGH_BASE {
            LOW as u64 + (addr - HIGH_BASE)
        } else {
            addr
        }
    }

    #[test]
    fn written_file_is_sparse_and_holds_the_data_at_region_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let stats = write_memory_file(&patterned_memory(), &path).unwrap();
        assert!(!tmp_path(&path).exists());
        let total = (LOW + HIGH) as u64;
        assert_eq!(stats.file_len, total);
        // Pages 0, 5, the low region's last, and two high ones.
        assert_eq!(stats.data_bytes, 5 * PAGE_SIZE as u64);

        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), total);
        assert!(
            meta.blocks() * 512 < total,
            "{} bytes allocated for a {total}-byte file",
            meta.blocks() * 512
        );
        assert_eq!(meta.mode() & 0o777, 0o600);

        let bytes = std::fs::read(&path).unwrap();
        let mut expected = vec![0u8; total as usize];
        for (addr, data) in patterns() {
            let off = file_offset(addr) as usize;
            expected[off..off + data.len()].copy_from_slice(&data);
        }
        assert!(bytes == expected, "file content differs from guest RAM");
    }

    #[test]
    fn mapping_is_private_copy_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        write_memory_file(&patterned_memory(), &path).unwrap();
        let on_disk = std::fs::read(&path).unwrap();

        let mem = map_memory_file(&path, &regions()).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for (addr, data) in patterns() {
            let mut got = vec![0u8; data.len()];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(got, data, "at {addr:#x}");
        }
        let mut zero = [0xffu8; 64];
        mem.read_slice(&mut zero, GuestAddress(HIGH_BASE + 100 * 1024))
            .unwrap();
        assert_eq!(zero, [0u8; 64]);

        // Writes land in this mapping only: not in the file, not in another mapping of it.
        let other = map_memory_file(&path, &regions()).unwrap();
        mem.write_slice(&[0xee; 100], GuestAddress(10)).unwrap();
        mem.write_slice(&[0x77; 8], GuestAddress(HIGH_BASE + 200 * 1024))
            .unwrap();
        let mut got = [0u8; 100];
        mem.read_slice(&mut got, GuestAddress(10)).unwrap();
        assert_eq!(got, [0xee; 100]);
        other.read_slice(&mut got, GuestAddress(10)).unwrap();
        assert_eq!(got, [0xaa; 100]);
        drop(mem);
        drop(other);
        assert!(std::fs::read(&path).unwrap() == on_disk, "the file changed");
    }

    #[test]
    fn mapping_refuses_a_file_of_another_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        write_memory_file(&patterned_memory(), &path).unwrap();
        let e = map_memory_file(&path, &[(GuestAddress(0), LOW)]).unwrap_err();
        assert!(
            matches!(e, MemoryFileError::Length { len, expected, .. } if len == (LOW + HIGH) as u64 && expected == LOW as u64),
            "{e}"
        );
        let e = map_memory_file(&path, &[(GuestAddress(0), LOW + HIGH - 1)]).unwrap_err();
        assert!(matches!(e, MemoryFileError::RegionSize { .. }), "{e}");
        let e = map_memory_file(&dir.path().join("none"), &regions()).unwrap_err();
        assert!(matches!(e, MemoryFileError::Io(_)), "{e}");
    }

    #[test]
    fn mapping_refuses_overlapping_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        write_memory_file(&patterned_memory(), &path).unwrap();
        let overlapping = [
            (GuestAddress(0), LOW),
            (GuestAddress(LOW as u64 - PAGE_SIZE as u64), HIGH),
        ];
        let e = map_memory_file(&path, &overlapping).unwrap_err();
        assert!(matches!(e, MemoryFileError::Regions(_)), "{e}");
    }

    #[test]
    fn failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), b"x").unwrap();
        let e = write_memory_file(&patterned_memory(), &path).unwrap_err();
        assert!(
            matches!(e, MemoryFileError::Io(IoError { what: "commit", .. })),
            "{e}"
        );
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn all_zero_memory_is_one_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = GuestMemoryMmap::from_ranges(&regions()).unwrap();
        let stats = write_memory_file(&mem, &path).unwrap();
        assert_eq!(stats.data_bytes, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().blocks(), 0);
    }
}
