//! The unpacking caps: decompression bombs, sparse files, inodes, tar headers.

use std::cell::Cell;
use std::io::{self, Read, Seek, SeekFrom};
use std::rc::Rc;

use tar::{EntryType, GnuExtSparseHeader};

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Bytes allocated to the files under `dir` (`st_blocks`), without following symlinks.
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read dir") {
            let entry = entry.expect("entry");
            let m = fs::symlink_metadata(entry.path()).expect("stat");
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// A GNU header for `name`, a regular file of `size` bytes.
fn file_header(name: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_path(name).expect("path");
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h.set_cksum();
    h
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// A gzip layer of `files` files of `size` zero bytes each, made as it is read: nothing
/// of it is ever held whole. The counter says how much of the tar was made (and so
/// asked for by the unpacker, give or take the compressor's buffers).
fn zero_bomb(files: u64, size: u64) -> (impl Read, Rc<Cell<u64>>) {
    let mut tar: Box<dyn Read> = Box::new(io::empty());
    let pad = (512 - size % 512) % 512;
    for i in 0..files {
        let header = file_header(&format!("zeros/{i:05}"), size);
        tar = Box::new(
            tar.chain(io::Cursor::new(header.as_bytes().to_vec()))
                .chain(io::repeat(0).take(size + pad)),
        );
    }
    let tar = tar.chain(io::repeat(0).take(1024));
    let count = Rc::new(Cell::new(0));
    let counted = Counting {
        inner: tar,
        count: Rc::clone(&count),
    };
    (
        flate2::read::GzEncoder::new(counted, flate2::Compression::fast()),
        count,
    )
}

fn limits(bytes: u64, inodes: u64) -> ImageLimits {
    ImageLimits {
        max_unpacked_bytes: bytes,
        max_inodes: inodes,
        ..ImageLimits::default()
    }
}

fn assert_over(result: Result<u64, ImageError>, limit: Limit, needle: &str) -> String {
    match result {
        Err(e @ ImageError::LimitExceeded { limit: l, .. }) if l == limit => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            assert!(msg.contains(&limit.to_string()), "{msg:?} names no cap");
            msg
        }
        other => panic!("expected {limit} to be reached, got {other:?}"),
    }
}

/// 1 GiB of zeros in 1 MiB files, against a 4 MiB cap: the unpack stops at the cap
/// (at the first file that does not fit), having decompressed and written no more than
/// that, and asked for a sliver of the bomb.
#[test]
fn a_decompression_bomb_stops_at_the_cap() {
    let mut s = Scratch::with_limits(&limits(4 * MIB, 1_000_000));
    let (bomb, made) = zero_bomb(1024, MIB);
    let msg = assert_over(
        s.unpacker
            .apply(bomb, Compression::Gzip, "sha256:bomb", None),
        Limit::UnpackedBytes,
        "layer sha256:bomb: entry \"zeros/00003\" of 1048576 bytes",
    );
    println!("{msg}");
    let (bytes, _) = s.unpacker.used();
    assert!(bytes <= 4 * MIB, "{bytes} bytes counted");
    let on_disk = allocated(&s.root);
    assert!(on_disk <= 4 * MIB + 64 * 1024, "{on_disk} bytes on disk");
    assert!(
        made.get() < 64 * MIB,
        "{} bytes of the bomb made: decompression went on past the cap",
        made.get()
    );
}

/// One file bigger than the cap is refused from its header: nothing of it is written.
#[test]
fn a_file_over_the_cap_is_refused_before_it_is_written() {
    let mut s = Scratch::with_limits(&limits(64 * MIB, 1_000_000));
    let (bomb, made) = zero_bomb(1, GIB);
    assert_over(
        s.unpacker
            .apply(bomb, Compression::Gzip, "sha256:bomb", None),
        Limit::UnpackedBytes,
        "zeros/00000",
    );
    assert!(!s.exists("zeros/00000"));
    // The compressor reads ahead (8 MiB of zeros make one 8 KiB read of the decoder).
    assert!(
        made.get() < 64 * MIB,
        "{} bytes of the bomb made",
        made.get()
    );
}

/// Exactly at the cap is fine; one byte more is not. What the stream holds after the tar
/// end counts too (it is decompressed and hashed).
#[test]
fn the_cap_counts_every_decompressed_byte() {
    let layer = LayerTar::default().file("a", "0123456789").bytes();
    let exact = layer.len() as u64;
    let mut s = Scratch::with_limits(&limits(exact, 1_000_000));
    s.unpacker
        .apply(&layer[..], Compression::None, "sha256:l", None)
        .expect("exactly at the cap");
    assert_eq!(s.unpacker.used(), (exact, 1));

    let mut s = Scratch::with_limits(&limits(exact - 1, 1_000_000));
    assert_over(
        s.unpacker
            .apply(&layer[..], Compression::None, "sha256:l", None),
        Limit::UnpackedBytes,
        "sha256:l",
    );
    let mut trailing = layer.clone();
    trailing.extend_from_slice(&[7; 100]);
    let mut s = Scratch::with_limits(&limits(exact + 99, 1_000_000));
    assert_over(
        s.unpacker
            .apply(&trailing[..], Compression::None, "sha256:l", None),
        Limit::UnpackedBytes,
        "sha256:l",
    );
}

/// A GNU sparse entry: `segments` (offset, data) of a file of `real_size` bytes, those past
/// the header's four in extension headers. Every segment but the last holds whole blocks.
fn sparse_entry(name: &str, real_size: u64, segments: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let data: u64 = segments.iter().map(|(_, d)| d.len() as u64).sum();
    let mut h = file_header(name, data);
    h.set_entry_type(EntryType::GNUSparse);
    let gnu = h.as_gnu_mut().expect("gnu");
    gnu.set_real_size(real_size);
    for (slot, (offset, d)) in gnu.sparse.iter_mut().zip(segments) {
        slot.set_offset(*offset);
        slot.set_length(d.len() as u64);
    }
    let rest: Vec<_> = segments.iter().skip(4).collect();
    gnu.set_is_extended(!rest.is_empty());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let chunks: Vec<_> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, (offset, d)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(*offset);
            slot.set_length(d.len() as u64);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        out.extend_from_slice(ext.as_bytes());
    }
    for (_, d) in segments {
        out.extend_from_slice(d);
    }
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).expect("read");
    buf
}

/// A 1 GiB sparse file with 8 KiB of data unpacks as a sparse file: its holes are not
/// written (a few blocks are allocated, not a gigabyte of zeros), its content reads back
/// right, and the entries after it are read from the right place. Sparse files count by
/// their apparent size.
#[test]
fn sparse_entries_are_unpacked_with_holes() {
    let mut layer = sparse_entry(
        "disk.img",
        GIB,
        &[
            (0, vec![b'a'; 4096]),
            (512 * MIB, vec![b'b'; 4096]),
            // GNU tar's end of a file that ends in a hole.
            (GIB, Vec::new()),
        ],
    );
    // Six segments: two in an extension header.
    let segments: Vec<(u64, Vec<u8>)> = (0..6u8)
        .map(|i| (u64::from(i) * 64 * MIB, vec![b'0' + i; 512]))
        .collect();
    let ext_size = 5 * 64 * MIB + 512;
    layer.extend(sparse_entry("ext.img", ext_size, &segments));
    let tail = LayerTar::default()
        .file("after.txt", "still in step")
        .bytes();
    layer.extend_from_slice(&tail);
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&layer)));

    let mut s = Scratch::new();
    let count = s
        .unpacker
        .apply(&layer[..], Compression::None, "sha256:l", Some(&diff_id))
        .expect("apply");
    assert_eq!(count, 3);
    assert_eq!(s.read("after.txt"), "still in step");

    let disk = s.root.join("disk.img");
    let m = fs::metadata(&disk).expect("stat");
    assert_eq!(m.len(), GIB);
    assert!(m.blocks() * 512 <= 256 * 1024, "{} blocks", m.blocks());
    assert_eq!(read_at(&disk, 0, 4096), vec![b'a'; 4096]);
    assert_eq!(read_at(&disk, 4096, 4096), vec![0; 4096]);
    assert_eq!(read_at(&disk, 512 * MIB, 4096), vec![b'b'; 4096]);
    assert_eq!(read_at(&disk, GIB - 4096, 4096), vec![0; 4096]);

    let ext = s.root.join("ext.img");
    let m = fs::metadata(&ext).expect("stat");
    assert_eq!(m.len(), ext_size);
    assert!(m.blocks() * 512 <= 256 * 1024, "{} blocks", m.blocks());
    for (offset, d) in &segments {
        assert_eq!(&read_at(&ext, *offset, 512), d);
    }
    assert!(allocated(&s.root) <= MIB, "{}", allocated(&s.root));

    // Counted by apparent size: the holes, and the stream itself.
    let (bytes, inodes) = s.unpacker.used();
    assert!(bytes >= GIB + ext_size, "{bytes}");
    assert!(bytes <= GIB + ext_size + layer.len() as u64, "{bytes}");
    assert_eq!(inodes, 3);

    // Against a cap below its apparent size: refused before it is written.
    let mut s = Scratch::with_limits(&limits(512 * MIB, 1_000_000));
    assert_over(
        s.unpacker
            .apply(&layer[..], Compression::None, "sha256:l", None),
        Limit::UnpackedBytes,
        "disk.img",
    );
    assert!(!s.exists("disk.img"));
}

/// Entries count over all the image's layers, whiteouts too.
#[test]
fn the_inode_cap_counts_entries_over_all_layers() {
    let mut s = Scratch::with_limits(&limits(GIB, 5));
    s.apply(
        LayerTar::default()
            .dir("d/")
            .file("d/a", "a")
            .file("d/b", "b"),
    )
    .expect("layer 1: 3 entries");
    let err = s.apply(
        LayerTar::default()
            .file("d/.wh.a", "")
            .file("d/c", "c")
            .file("d/e", "e"),
    );
    let msg = assert_over(err, Limit::Inodes, "more than 5 entries");
    println!("{msg}");
    assert_eq!(s.unpacker.used().1, 5);
    assert!(!s.exists("d/e"), "the entry over the cap is not made");
    assert!(!s.exists("d/a") && s.exists("d/c"));
}

/// The tar reader holds an entry's headers in memory: a 2 MiB PAX record is refused
/// while it is read, whatever the bytes cap.
#[test]
fn oversized_tar_headers_are_refused() {
    let mut builder = tar::Builder::new(Vec::new());
    let big = vec![b'x'; 2 * MIB as usize];
    builder
        .append_pax_extensions([("comment", &big[..])])
        .expect("pax");
    builder
        .append(&file_header("f", 1), &b"f"[..])
        .expect("append");
    let layer = builder.into_inner().expect("tar");
    let mut s = Scratch::new();
    assert_over(
        s.unpacker
            .apply(&layer[..], Compression::None, "sha256:l", None),
        Limit::EntryMetadataBytes,
        "tar headers of one entry",
    );
    assert!(!s.exists("f"));
}
