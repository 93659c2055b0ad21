//! Positioned file I/O straight into and out of guest memory.
//!
//! vm-memory implements its volatile I/O traits for `File` with `read(2)` and
//! `write(2)`, which use (and move) the shared file position. The block device
//! wants `pread(2)`/`pwrite(2)` at the sector offset instead, so this adapter
//! implements the same traits on a (file, offset) cursor.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestAddress, GuestMemory, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

/// A cursor on a file that reads with `pread` and writes with `pwrite`,
/// advancing its own offset and leaving the file position alone.
pub(super) struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    pub(super) fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file offset {} out of range", self.offset),
            ))
        })
    }

    /// Turns a `pread`/`pwrite` return value into a byte count, moving the
    /// cursor past the bytes transferred.
    fn advance(&mut self, ret: isize) -> Result<usize, VolatileMemoryError> {
        // Only a negative return (with errno set) fails the conversion.
        let done = usize::try_from(ret)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        // `done` is at most the slice length, so it fits in a u64.
        self.offset = self.offset.saturating_add(done as u64);
        Ok(done)
    }

    /// Fills `len` bytes of guest memory at `addr` from the file, however the
    /// range is split across memory regions. A short file is an error.
    pub(super) fn read_to_guest<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        for slice in mem.get_slices(addr, len) {
            let mut slice = slice.map_err(io::Error::other)?;
            self.read_exact_volatile(&mut slice).map_err(to_io)?;
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to the file.
    pub(super) fn write_from_guest<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            self.write_all_volatile(&slice).map_err(to_io)?;
        }
        Ok(())
    }
}

fn to_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the descriptor is an open file we borrow for the call, and
        // `guard` points at `buf.len()` bytes of mapped guest memory that the
        // `VolatileSlice` guarantees stay valid while the guard lives. The
        // kernel writes at most `buf.len()` bytes there; guest memory may
        // change concurrently, which is why it is only reached through a
        // volatile slice and never as a Rust reference.
        let done = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        let done = self.advance(done).inspect_err(|_| {
            // The kernel may have stored part of the data before failing.
            buf.bitmap().mark_dirty(0, buf.len());
        })?;
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the descriptor is an open file we borrow for the call, and
        // `guard` points at `buf.len()` readable bytes of mapped guest memory
        // kept valid by the `VolatileSlice` while the guard lives. The kernel
        // only reads from it.
        let done = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        self.advance(done)
    }
}
