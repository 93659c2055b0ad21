//! The byte streams under the tar reader of a layer, bottom up: the decompressed stream
//! metered against the image's unpacking caps ([`Metered`]), hashed for the `diff_id`
//! ([`HashingReader`]), and completed with the end blocks Go's tar reader does without
//! ([`CompleteTail`]). Also the copy of a file's content that leaves holes where the tar
//! reader made zeros up (the gaps of GNU sparse entries), [`copy_with_holes`].

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use super::limits::{ImageLimits, Limit, MAX_ENTRY_METADATA_BYTES};

/// What the layers of one image have unpacked so far, against the caps (see
/// [`limits`](super::limits) for what counts). Shared by the readers of a layer through
/// `Cell`s: everything runs on one thread.
#[derive(Debug)]
pub(super) struct Meter {
    max_bytes: u64,
    max_inodes: u64,
    /// Bytes unpacked: decompressed stream bytes and sparse holes, all layers so far.
    bytes: Cell<u64>,
    /// Tar entries, all layers so far.
    inodes: Cell<u64>,
    /// Position in the current layer's decompressed stream.
    pos: Cell<u64>,
    /// While the tar reader looks for the next entry: the position it may not pass.
    window_end: Cell<Option<u64>>,
    /// The cap a read stopped at: the failed read's error is this one.
    tripped: Cell<Option<Limit>>,
}

impl Meter {
    pub(super) fn new(limits: &ImageLimits) -> Self {
        Meter {
            max_bytes: limits.max_unpacked_bytes,
            max_inodes: limits.max_inodes,
            bytes: Cell::new(0),
            inodes: Cell::new(0),
            pos: Cell::new(0),
            window_end: Cell::new(None),
            tripped: Cell::new(None),
        }
    }

    /// Bytes and inodes unpacked so far.
    pub(super) fn used(&self) -> (u64, u64) {
        (self.bytes.get(), self.inodes.get())
    }

    /// Bytes that may still be unpacked.
    pub(super) fn bytes_left(&self) -> u64 {
        self.max_bytes.saturating_sub(self.bytes.get())
    }

    /// The value of `limit` here.
    pub(super) fn max(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Inodes => self.max_inodes,
            Limit::EntryMetadataBytes => MAX_ENTRY_METADATA_BYTES,
            _ => self.max_bytes,
        }
    }

    /// A new layer's stream starts.
    pub(super) fn start_layer(&self) {
        self.pos.set(0);
        self.window_end.set(None);
        self.tripped.set(None);
    }

    /// The position in the current layer's decompressed stream.
    pub(super) fn pos(&self) -> u64 {
        self.pos.get()
    }

    /// Bounds (or, with `false`, unbounds) what the tar reader may read from here on to
    /// [`MAX_ENTRY_METADATA_BYTES`]: it reads an entry's headers into memory.
    pub(super) fn headers_only(&self, on: bool) {
        self.window_end
            .set(on.then(|| self.pos.get().saturating_add(MAX_ENTRY_METADATA_BYTES)));
    }

    /// Counts one more entry; `Err` with the cap when there is no room for it.
    pub(super) fn count_inode(&self) -> Result<(), Limit> {
        let n = self.inodes.get() + 1;
        if n > self.max_inodes {
            return Err(Limit::Inodes);
        }
        self.inodes.set(n);
        Ok(())
    }

    /// The cap a read stopped at, once.
    pub(super) fn take_tripped(&self) -> Option<Limit> {
        self.tripped.take()
    }

    fn trip(&self, limit: Limit) -> io::Error {
        self.tripped.set(Some(limit));
        io::Error::other(format!("over the cap {limit}"))
    }

    /// Counts `n` bytes of holes.
    fn count_hole(&self, n: u64) -> io::Result<()> {
        if n > self.bytes_left() {
            return Err(self.trip(Limit::UnpackedBytes));
        }
        self.bytes.set(self.bytes.get() + n);
        Ok(())
    }
}

/// The decompressed stream of a layer, counted into a [`Meter`]: a read past a cap fails
/// (and the meter says which), so nothing past it is ever decompressed.
pub(super) struct Metered<'a, R> {
    pub(super) inner: R,
    pub(super) meter: &'a Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let m = self.meter;
        let (mut room, mut limit) = (m.bytes_left(), Limit::UnpackedBytes);
        if let Some(end) = m.window_end.get() {
            let left = end.saturating_sub(m.pos.get());
            if left < room {
                (room, limit) = (left, Limit::EntryMetadataBytes);
            }
        }
        if room == 0 {
            // At the cap: only a stream that has more is over it.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(m.trip(limit)),
            };
        }
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        m.pos.set(m.pos.get() + n as u64);
        m.bytes.set(m.bytes.get() + n as u64);
        Ok(n)
    }
}

/// Copies the content of a tar entry read through a [`Metered`] stream into `file`
/// (new, empty): bytes the read took from the stream are written, bytes it did not take
/// (the zeros the tar reader makes up for the gaps of a GNU sparse entry, and the tail
/// [`CompleteTail`] makes up) become holes, counted into the meter by their size. The tar
/// reader serves each read from one part of an entry, data or gap, so a read either moved
/// the stream or is all made-up zeros. Returns the bytes of holes.
pub(super) fn copy_with_holes(
    entry: &mut impl Read,
    file: &mut File,
    meter: &Meter,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut len = 0u64;
    let mut holes = 0u64;
    loop {
        let before = meter.pos();
        let n = entry.read(buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        if meter.pos() == before {
            meter.count_hole(n as u64)?;
            file.seek(SeekFrom::Current(n as i64))?;
            holes += n as u64;
        } else {
            file.write_all(&buf[..n])?;
        }
    }
    // A hole at the end: the size the seeks skipped to.
    file.set_len(len)?;
    Ok(holes)
}

/// Hashes what passes through.
pub(super) struct HashingReader<R> {
    pub(super) inner: R,
    pub(super) hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The size of a tar block.
const TAR_BLOCK: u64 = 512;
/// The end-of-archive marker: two zero blocks.
const TAR_END_BYTES: u64 = 2 * TAR_BLOCK;

/// A layer stream as Go's `archive/tar` (and so containerd) reads it: a layer may end right
/// after its last entry's data, without the padding to a block or the end-of-archive blocks
/// (umoci writes such layers), which the tar crate insists on. Once the stream ends and
/// everything it has held includes all of the last entry's data, this reader supplies the
/// missing padding and end blocks as zeros; a stream that ends inside an entry's data ends
/// there, and the entry or the next header is refused as truncated. Written by hand: the
/// tar crate has no lenient mode.
pub(super) struct CompleteTail<'a, R> {
    pub(super) inner: R,
    /// Bytes the stream has given.
    pub(super) read: u64,
    /// Where the current entry's data ends in the stream.
    pub(super) data_end: &'a Cell<u64>,
    /// Zeros still to give once the stream has ended after complete data.
    pub(super) zeros_left: Option<u64>,
}

impl<R: Read> Read for CompleteTail<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.zeros_left.is_none() {
            let n = self.inner.read(buf)?;
            if n > 0 || self.read < self.data_end.get() {
                self.read += n as u64;
                return Ok(n);
            }
            let pad = (TAR_BLOCK - self.read % TAR_BLOCK) % TAR_BLOCK;
            self.zeros_left = Some(pad + TAR_END_BYTES);
        }
        let left = self.zeros_left.unwrap_or(0);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.zeros_left = Some(left - n as u64);
        Ok(n)
    }
}
