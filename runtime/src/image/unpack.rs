//! Applying layer tarballs, bottom first, to one staging tree, the way overlayfs would
//! show them merged.
//!
//! Layers come from registries and are not trusted:
//! - entry names are taken relative to the staging root (a leading `/` is dropped) and
//!   any `..` component refuses the layer;
//! - no symbolic link is ever followed: an entry whose parent is a symlink refuses the
//!   layer, an existing symlink at an entry's own path is replaced, not written through;
//! - hard links must name a file already in the tree (by the same rules);
//! - whiteouts (`.wh.name`) delete `name`, opaque markers (`.wh..wh..opq`) empty their
//!   directory of everything lower layers put there; both apply to lower layers only.
//!
//! Ownership, modes (set after ownership, so setuid bits stay), extended attributes and
//! modification times are kept, for `mkfs.ext4 -d` to copy. The uncompressed stream is
//! checked against the config's `diff_ids`.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use tar::EntryType;
use tracing::{debug, warn};

use super::error::{ImageError, io_err};

/// Whiteout prefix: `.wh.name` deletes `name`.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque marker: the directory holding it hides everything below it in lower layers.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// xattrs in PAX headers.
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of OCI and Docker v2 layer media types; `None` for anything that
    /// is not a layer tarball.
    pub fn for_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// Applies layers to a staging tree, bottom first; [`Unpacker::finish`] once all are in.
pub struct Unpacker {
    root: PathBuf,
    /// Directory modification times, set last: adding entries changes them.
    dir_times: HashMap<PathBuf, TimeSpec>,
    /// Device nodes and FIFOs by path: never made on the host (see [`DeviceNode`]).
    devices: HashMap<PathBuf, Placeholder>,
}

/// What kind of node a [`DeviceNode`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// A device node or FIFO of the image. The host never gets one (an image's device node in
/// a host directory is a way into the host's devices): the staging tree holds an empty
/// placeholder file at its path, mode 0 until the entry's own mode, owner and times are
/// applied to it as to any entry, and the ext4 step replaces the placeholder by the node
/// inside the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Relative to the root.
    pub path: PathBuf,
    /// Its kind.
    pub kind: DeviceKind,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The placeholder of a device node: its inode tells a later layer's replacement apart.
#[derive(Debug, Clone, Copy)]
struct Placeholder {
    kind: DeviceKind,
    major: u32,
    minor: u32,
    ino: u64,
}

/// What one entry's header says about its metadata.
struct EntryMeta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Unpacker {
    /// Unpacks into `root`, an existing directory.
    pub fn new(root: &Path) -> Self {
        Unpacker {
            root: root.to_path_buf(),
            dir_times: HashMap::new(),
            devices: HashMap::new(),
        }
    }

    /// Applies the layer `digest`, read (compressed) from `blob`. `diff_id` is the digest
    /// of the uncompressed tarball from the image config, when it has one. Returns the
    /// number of entries.
    pub fn apply(
        &mut self,
        blob: impl Read,
        compression: Compression,
        digest: &str,
        diff_id: Option<&str>,
    ) -> Result<u64, ImageError> {
        let bad = |message: String| ImageError::BadLayer {
            digest: digest.to_string(),
            message,
        };
        let tarball: Box<dyn Read> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(blob))),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(blob).map_err(|e| bad(format!("zstd: {e}")))?,
            ),
        };
        let mut hashed = HashingReader {
            inner: tarball,
            hasher: Sha256::new(),
        };
        let mut layer = Layer {
            root: &self.root,
            digest,
            written: HashSet::new(),
            dir_times: &mut self.dir_times,
            devices: &mut self.devices,
        };
        let mut count = 0;
        {
            let data_end = Cell::new(0);
            let mut archive = tar::Archive::new(CompleteTail {
                inner: &mut hashed,
                read: 0,
                data_end: &data_end,
                zeros_left: None,
            });
            let entries = archive.entries().map_err(|e| bad(format!("read: {e}")))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| bad(format!("read: {e}")))?;
                data_end.set(entry.raw_file_position().saturating_add(entry.size()));
                layer.apply_entry(&mut entry)?;
                count += 1;
            }
        }
        // The digest covers the whole stream, including the padding after the last entry.
        io::copy(&mut hashed, &mut io::sink()).map_err(|e| bad(format!("read: {e}")))?;
        let actual = format!("sha256:{}", hex::encode(hashed.hasher.finalize()));
        if let Some(expected) = diff_id
            && expected != actual
        {
            return Err(ImageError::DigestMismatch {
                what: format!("uncompressed layer {digest}"),
                expected: expected.to_string(),
                actual,
            });
        }
        Ok(count)
    }

    /// Sets the directories' modification times, once every layer is in, and returns the
    /// image's device nodes: those whose placeholder no later layer replaced or removed.
    pub fn finish(self) -> Result<Vec<DeviceNode>, ImageError> {
        let mut nodes = Vec::new();
        for (rel, p) in &self.devices {
            let Ok(Some(_)) = walk_parents(&self.root, rel, false) else {
                continue;
            };
            match fs::symlink_metadata(self.root.join(rel)) {
                Ok(m) if m.is_file() && m.ino() == p.ino && m.len() == 0 => {
                    nodes.push(DeviceNode {
                        path: rel.clone(),
                        kind: p.kind,
                        major: p.major,
                        minor: p.minor,
                        mode: m.mode() & 0o7777,
                        uid: m.uid(),
                        gid: m.gid(),
                    });
                }
                _ => continue,
            }
        }
        nodes.sort_by(|a, b| a.path.cmp(&b.path));
        for (rel, mtime) in &self.dir_times {
            // A later layer may have replaced a parent by a symlink: check again.
            let Ok(Some(_)) = walk_parents(&self.root, rel, false) else {
                continue;
            };
            let full = self.root.join(rel);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => set_mtime(&full, mtime)?,
                _ => continue,
            }
        }
        Ok(nodes)
    }
}

/// One layer being applied.
struct Layer<'a> {
    root: &'a Path,
    digest: &'a str,
    /// Paths this layer wrote: whiteouts do not apply to them.
    written: HashSet<PathBuf>,
    dir_times: &'a mut HashMap<PathBuf, TimeSpec>,
    devices: &'a mut HashMap<PathBuf, Placeholder>,
}

impl Layer<'_> {
    fn bad(&self, path: &Path, message: impl std::fmt::Display) -> ImageError {
        ImageError::BadLayer {
            digest: self.digest.to_string(),
            message: format!("entry {:?}: {message}", path),
        }
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry
            .path()
            .map_err(|e| self.bad(Path::new("?"), e))?
            .into_owned();
        let rel = clean(&raw).map_err(|why| self.bad(&raw, why))?;
        let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
            // The root itself: its owner and mode are the image builder's business.
            return Ok(());
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let kind = entry.header().entry_type();

        if let Some(target) = name.to_str().and_then(|n| n.strip_prefix(WHITEOUT_PREFIX)) {
            return self.whiteout(&rel, &parent, target);
        }
        let meta = self.entry_meta(entry, &rel)?;
        walk_parents(self.root, &rel, true).map_err(|why| self.bad(&rel, why))?;
        let full = self.root.join(&rel);
        let existing = match fs::symlink_metadata(&full) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(ImageError::io("stat", &full, e)),
        };

        match kind {
            EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    if existing.is_some() {
                        remove_any(&full)?;
                    }
                    fs::create_dir(&full).map_err(io_err("create directory", &full))?;
                }
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                if existing.is_some() {
                    remove_any(&full)?;
                }
                let mut file = create_new(&full, 0o600)?;
                io::copy(entry, &mut file).map_err(|e| self.bad(&rel, format!("write: {e}")))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.bad(&rel, e))?
                    .ok_or_else(|| self.bad(&rel, "symlink without a target"))?
                    .into_owned();
                if existing.is_some() {
                    remove_any(&full)?;
                }
                std::os::unix::fs::symlink(&target, &full).map_err(io_err("symlink", &full))?;
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name()
                    .map_err(|e| self.bad(&rel, e))?
                    .ok_or_else(|| self.bad(&rel, "hard link without a target"))?
                    .into_owned();
                return self.hard_link(&rel, &raw_target, existing);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if existing.is_some() {
                    remove_any(&full)?;
                }
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let kind = match kind {
                    EntryType::Char => DeviceKind::Char,
                    EntryType::Block => DeviceKind::Block,
                    _ => DeviceKind::Fifo,
                };
                // Not mknod: a placeholder the ext4 step turns into the node.
                let file = create_new(&full, 0o000)?;
                let ino = file.metadata().map_err(io_err("stat", &full))?.ino();
                self.devices.insert(
                    rel.clone(),
                    Placeholder {
                        kind,
                        major,
                        minor,
                        ino,
                    },
                );
            }
            other => {
                debug!(layer = self.digest, path = ?rel, kind = ?other, "skipping tar entry");
                return Ok(());
            }
        }
        self.written.insert(rel.clone());
        self.set_metadata(&rel, &full, kind, &meta)
    }

    /// `.wh.<target>` in `parent`, or the opaque marker.
    fn whiteout(&mut self, rel: &Path, parent: &Path, target: &str) -> Result<(), ImageError> {
        if rel.file_name() == Some(OsStr::new(OPAQUE_MARKER)) {
            walk_parents(self.root, rel, true).map_err(|why| self.bad(rel, why))?;
            return self.make_opaque(parent);
        }
        if target.starts_with(WHITEOUT_PREFIX) {
            // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to apply.
            return Ok(());
        }
        if target.is_empty() || target == "." || target == ".." || target.contains('/') {
            return Err(self.bad(rel, "whiteout of an invalid name"));
        }
        let victim = parent.join(target);
        if self.written.contains(&victim) {
            return Ok(());
        }
        match walk_parents(self.root, &victim, false).map_err(|why| self.bad(rel, why))? {
            Some(()) => remove_if_present(&self.root.join(&victim)),
            None => Ok(()),
        }
    }

    /// Empties `dir` of everything this layer did not write, recursively: a directory
    /// this layer wrote on top of a lower one keeps only this layer's entries.
    fn make_opaque(&mut self, dir: &Path) -> Result<(), ImageError> {
        let full = self.root.join(dir);
        let entries = fs::read_dir(&full).map_err(io_err("read", &full))?;
        for entry in entries {
            let entry = entry.map_err(io_err("read", &full))?;
            let child = dir.join(entry.file_name());
            let is_dir = entry
                .file_type()
                .map_err(io_err("stat", &entry.path()))?
                .is_dir();
            if !self.written.contains(&child) {
                remove_if_present(&self.root.join(&child))?;
            } else if is_dir {
                self.make_opaque(&child)?;
            }
        }
        Ok(())
    }

    fn hard_link(
        &mut self,
        rel: &Path,
        raw_target: &Path,
        existing: Option<fs::Metadata>,
    ) -> Result<(), ImageError> {
        let target = clean(raw_target).map_err(|why| self.bad(rel, format!("link: {why}")))?;
        if target.as_os_str().is_empty() {
            return Err(self.bad(rel, "hard link to the root"));
        }
        let found = walk_parents(self.root, &target, false)
            .map_err(|why| self.bad(rel, format!("link target {target:?}: {why}")))?;
        let target_full = self.root.join(&target);
        let target_meta = match (found, fs::symlink_metadata(&target_full)) {
            (Some(()), Ok(m)) => m,
            _ => return Err(self.bad(rel, format!("link target {target:?} is not in the tree"))),
        };
        if target_meta.is_dir() {
            return Err(self.bad(rel, format!("link target {target:?} is a directory")));
        }
        if target == rel {
            return Ok(());
        }
        let full = self.root.join(rel);
        if existing.is_some() {
            remove_any(&full)?;
        }
        // linkat(2) without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(&target_full, &full).map_err(io_err("hard link", &full))?;
        // A link to a device node's placeholder is that device node too.
        if let Some(p) = self.devices.get(&target).copied()
            && p.ino == target_meta.ino()
        {
            self.devices.insert(rel.to_path_buf(), p);
        }
        self.written.insert(rel.to_path_buf());
        Ok(())
    }

    fn entry_meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
    ) -> Result<EntryMeta, ImageError> {
        let header = entry.header();
        let id = |v: io::Result<u64>, what: &str| -> Result<u32, ImageError> {
            v.ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| self.bad(rel, format!("bad {what}")))
        };
        let mut uid = id(header.uid(), "uid")?;
        let mut gid = id(header.gid(), "gid")?;
        let mode = header
            .mode()
            .map_err(|e| self.bad(rel, format!("mode: {e}")))?
            & 0o7777;
        let mut mtime = TimeSpec::new(header.mtime().unwrap_or(0).try_into().unwrap_or(0), 0);
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(|e| self.bad(rel, e))? {
            for ext in extensions {
                let ext = ext.map_err(|e| self.bad(rel, e))?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value().ok();
                match key {
                    // PAX values override the header's when they do not fit in it.
                    "uid" => uid = value.and_then(|v| v.parse().ok()).unwrap_or(uid),
                    "gid" => gid = value.and_then(|v| v.parse().ok()).unwrap_or(gid),
                    "mtime" => {
                        if let Some(secs) = value
                            .and_then(|v| v.split('.').next())
                            .and_then(|s| s.parse::<i64>().ok())
                        {
                            mtime = TimeSpec::new(secs, 0);
                        }
                    }
                    _ => {
                        if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                            xattrs.push((name.as_bytes().to_vec(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        Ok(EntryMeta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }

    fn set_metadata(
        &mut self,
        rel: &Path,
        full: &Path,
        kind: EntryType,
        meta: &EntryMeta,
    ) -> Result<(), ImageError> {
        std::os::unix::fs::lchown(full, Some(meta.uid), Some(meta.gid))
            .map_err(io_err("chown", full))?;
        if kind != EntryType::Symlink {
            // After chown, which clears setuid and setgid. `full` is not a symlink: this
            // layer just made it, and its parents were checked.
            fs::set_permissions(full, fs::Permissions::from_mode(meta.mode))
                .map_err(io_err("chmod", full))?;
        }
        for (name, value) in &meta.xattrs {
            set_xattr(full, name, value);
        }
        if kind == EntryType::Directory {
            self.dir_times.insert(rel.to_path_buf(), meta.mtime);
        } else {
            set_mtime(full, &meta.mtime)?;
        }
        Ok(())
    }
}

/// The entry name relative to the root: `/` and `.` dropped, `..` refused.
fn clean(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("`..` in the path"),
            Component::Prefix(_) => return Err("path prefix"),
        }
    }
    Ok(out)
}

/// Checks the parents of `rel` (not `rel` itself) under `root`: each must be a real
/// directory, never a symlink. Missing parents are created (mode 0755, root) when
/// `create`, else the answer is `Ok(None)`.
fn walk_parents(root: &Path, rel: &Path, create: bool) -> Result<Option<()>, String> {
    let Some(parent) = rel.parent() else {
        return Ok(Some(()));
    };
    let mut cur = root.to_path_buf();
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "parent {:?} is a symbolic link",
                    cur.strip_prefix(root).unwrap_or(&cur)
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "parent {:?} is not a directory",
                    cur.strip_prefix(root).unwrap_or(&cur)
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::create_dir(&cur)
                    .and_then(|()| fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)))
                    .map_err(|e| format!("create {}: {e}", cur.display()))?;
            }
            Err(e) => return Err(format!("stat {}: {e}", cur.display())),
        }
    }
    Ok(Some(()))
}

/// Removes whatever is at `path` without following it: a directory tree, a file, a
/// symlink (not its target), a device.
/// Creates the file `path` with `mode`, O_EXCL and O_NOFOLLOW: never writes through
/// anything already there.
fn create_new(path: &Path, mode: u32) -> Result<fs::File, ImageError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("create", path))
}

fn remove_any(path: &Path) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if meta.is_dir() {
        // remove_dir_all does not follow symlinks inside the tree either.
        fs::remove_dir_all(path).map_err(io_err("remove", path))
    } else {
        fs::remove_file(path).map_err(io_err("remove", path))
    }
}

fn remove_if_present(path: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(_) => remove_any(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io("stat", path, e)),
    }
}

fn set_mtime(path: &Path, mtime: &TimeSpec) -> Result<(), ImageError> {
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        mtime,
        mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| ImageError::io("set times of", path, e.into()))
}

/// Best effort: a staging file system without, e.g., `trusted.` xattrs loses them, with a
/// warning; the image still works for nearly everything.
fn set_xattr(path: &Path, name: &[u8], value: &[u8]) {
    let (Ok(cpath), Ok(cname)) = (
        CString::new(path.as_os_str().as_bytes()),
        CString::new(name),
    ) else {
        return;
    };
    // SAFETY: both strings are NUL-terminated and live across the call; `value` is a
    // valid buffer of `value.len()` bytes; lsetxattr does not keep any pointer.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        warn!(
            path = %path.display(),
            xattr = %String::from_utf8_lossy(name),
            error = %io::Error::last_os_error(),
            "cannot set extended attribute from layer"
        );
    }
}

/// Hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
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
struct CompleteTail<'a, R> {
    inner: R,
    /// Bytes the stream has given.
    read: u64,
    /// Where the current entry's data ends in the stream.
    data_end: &'a Cell<u64>,
    /// Zeros still to give once the stream has ended after complete data.
    zeros_left: Option<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// A layer tarball written header by header: names are stored raw, so layers can hold
    /// what `tar::Builder` refuses to write (`..`, absolute names).
    struct LayerTar {
        builder: tar::Builder<Vec<u8>>,
    }

    impl Default for LayerTar {
        fn default() -> Self {
            LayerTar {
                builder: tar::Builder::new(Vec::new()),
            }
        }
    }

    impl LayerTar {
        fn entry(
            mut self,
            kind: EntryType,
            name: &str,
            link: &str,
            data: &[u8],
            mode: u32,
        ) -> Self {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            header.set_size(data.len() as u64);
            let gnu = header.as_gnu_mut().expect("gnu header");
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_cksum();
            self.builder.append(&header, data).expect("append");
            self
        }
        fn dir(self, name: &str) -> Self {
            self.entry(EntryType::Directory, name, "", b"", 0o755)
        }
        fn file(self, name: &str, data: &str) -> Self {
            self.entry(EntryType::Regular, name, "", data.as_bytes(), 0o644)
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.entry(EntryType::Symlink, name, target, b"", 0o777)
        }
        fn hardlink(self, name: &str, target: &str) -> Self {
            self.entry(EntryType::Link, name, target, b"", 0o644)
        }
        fn device(
            mut self,
            name: &str,
            kind: EntryType,
            major: u32,
            minor: u32,
            mode: u32,
        ) -> Self {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(kind);
            header.set_path(name).expect("path");
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(5);
            header.set_mtime(1_700_000_000);
            header.set_size(0);
            header.set_device_major(major).expect("major");
            header.set_device_minor(minor).expect("minor");
            header.set_cksum();
            self.builder.append(&header, &b""[..]).expect("append");
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.builder.into_inner().expect("finish tar")
        }
    }

    /// A staging root inside a scratch directory that also holds an `outside/` tree,
    /// which no layer may touch.
    struct Scratch {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        unpacker: Unpacker,
    }

    impl Scratch {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("root");
            let outside = dir.path().join("outside");
            fs::create_dir_all(&root).expect("mkdir root");
            fs::create_dir_all(&outside).expect("mkdir outside");
            fs::write(outside.join("victim"), "host file").expect("write victim");
            let unpacker = Unpacker::new(&root);
            Scratch {
                _dir: dir,
                root,
                outside,
                unpacker,
            }
        }

        fn apply(&mut self, layer: LayerTar) -> Result<u64, ImageError> {
            self.unpacker
                .apply(&layer.bytes()[..], Compression::None, "sha256:test", None)
        }

        fn exists(&self, rel: &str) -> bool {
            fs::symlink_metadata(self.root.join(rel)).is_ok()
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.root.join(rel)).expect(rel)
        }

        fn outside_untouched(&self) {
            assert_eq!(
                fs::read_to_string(self.outside.join("victim")).expect("victim"),
                "host file"
            );
            let names: Vec<_> = fs::read_dir(&self.outside)
                .expect("outside")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(names, ["victim"], "nothing new outside the root");
        }
    }

    fn assert_bad_layer(result: Result<u64, ImageError>, needle: &str) {
        match result {
            Err(ImageError::BadLayer { message, .. }) => {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}")
            }
            other => panic!("expected a bad layer ({needle}), got {other:?}"),
        }
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let mut s = Scratch::new();
        s.apply(
            LayerTar::default()
                .dir("a/")
                .file("a/x", "x")
                .file("a/y", "y")
                .dir("b/")
                .file("b/old", "old")
                .dir("b/sub/")
                .file("b/sub/deep", "deep")
                .dir("c/")
                .file("c/inside", "c")
                .dir("d/")
                .file("d/old", "old"),
        )
        .expect("layer 1");
        s.apply(
            LayerTar::default()
                .file("a/.wh.x", "")
                .file("a/z", "z")
                // Whiteouts apply to lower layers only: z stays.
                .file("a/.wh.z", "")
                .file(".wh.c", "")
                // Opaque marker after this layer's own entries: they stay.
                .dir("b/")
                .dir("b/sub/")
                .file("b/new", "new")
                .file("b/.wh..wh..opq", "")
                // Opaque marker first.
                .file("d/.wh..wh..opq", "")
                .file("d/fresh", "fresh")
                // Whiteout of something that never existed, in a missing directory.
                .file("nowhere/.wh.ghost", ""),
        )
        .expect("layer 2");
        assert!(!s.exists("a/x"));
        assert_eq!(s.read("a/y"), "y");
        assert_eq!(s.read("a/z"), "z");
        assert!(!s.exists("c"));
        assert_eq!(s.read("b/new"), "new");
        assert!(!s.exists("b/old"));
        assert!(s.exists("b/sub"), "rewritten by this layer");
        assert!(!s.exists("b/sub/deep"), "below an opaque directory");
        assert!(!s.exists("d/old"));
        assert_eq!(s.read("d/fresh"), "fresh");
        assert!(!s.exists("nowhere"), "a whiteout creates nothing");
        assert!(!s.exists("a/.wh.z") && !s.exists("b/.wh..wh..opq"));
    }

    #[test]
    fn path_escapes_are_refused() {
        let mut s = Scratch::new();
        assert_bad_layer(
            s.apply(LayerTar::default().file("../outside/victim", "pwned")),
            "`..`",
        );
        assert_bad_layer(
            s.apply(LayerTar::default().file("a/../../escape", "pwned")),
            "`..`",
        );
        assert_bad_layer(s.apply(LayerTar::default().file("a/.wh...", "")), "invalid");
        // An absolute name is inside the root all the same.
        s.apply(LayerTar::default().file("/abs/file", "in root"))
            .expect("absolute name");
        assert_eq!(s.read("abs/file"), "in root");
        s.outside_untouched();
    }

    #[test]
    fn hard_links_stay_inside_the_tree() {
        let mut s = Scratch::new();
        s.apply(LayerTar::default().file("etc/data", "data"))
            .expect("layer 1");
        let victim = s.outside.join("victim");
        let up = format!("../../{}", victim.display());
        assert_bad_layer(s.apply(LayerTar::default().hardlink("l1", &up)), "`..`");
        // An absolute target is looked up in the root, where this one does not exist.
        assert_bad_layer(
            s.apply(LayerTar::default().hardlink("l2", &victim.display().to_string())),
            "not in the tree",
        );
        assert_bad_layer(
            s.apply(LayerTar::default().hardlink("l3", "etc")),
            "directory",
        );
        s.apply(LayerTar::default().hardlink("etc/same", "/etc/data"))
            .expect("link inside");
        let a = fs::metadata(s.root.join("etc/data")).expect("data");
        let b = fs::metadata(s.root.join("etc/same")).expect("same");
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 2);
        assert!(!s.exists("l1") && !s.exists("l2") && !s.exists("l3"));
        s.outside_untouched();
    }

    #[test]
    fn symlinks_from_layers_are_never_followed() {
        let mut s = Scratch::new();
        let outside = s.outside.display().to_string();
        let victim = s.outside.join("victim").display().to_string();
        s.apply(
            LayerTar::default()
                .symlink("evil", &outside)
                .symlink("relative", "../outside")
                .symlink("file-link", &victim),
        )
        .expect("layer 1");

        // Through a symlinked directory: refused, whatever the target.
        assert_bad_layer(
            s.apply(LayerTar::default().file("evil/pwned", "x")),
            "symbolic link",
        );
        assert_bad_layer(
            s.apply(LayerTar::default().file("relative/pwned", "x")),
            "symbolic link",
        );
        assert_bad_layer(
            s.apply(LayerTar::default().file("evil/.wh.victim", "")),
            "symbolic link",
        );
        assert_bad_layer(
            s.apply(LayerTar::default().hardlink("h", "evil/victim")),
            "symbolic link",
        );
        assert_bad_layer(
            s.apply(LayerTar::default().dir("evil/sub/")),
            "symbolic link",
        );
        // A file over a symlink replaces the link, not what it points to.
        s.apply(LayerTar::default().file("file-link", "replaced"))
            .expect("file over symlink");
        assert!(
            fs::symlink_metadata(s.root.join("file-link"))
                .expect("stat")
                .is_file()
        );
        assert_eq!(s.read("file-link"), "replaced");
        // A whiteout of a symlink removes the link only.
        s.apply(LayerTar::default().file(".wh.evil", ""))
            .expect("whiteout");
        assert!(!s.exists("evil"));
        // A directory over a symlink replaces it too.
        s.apply(LayerTar::default().dir("relative/").file("relative/f", "f"))
            .expect("dir over symlink");
        assert!(
            fs::symlink_metadata(s.root.join("relative"))
                .expect("stat")
                .is_dir()
        );
        s.outside_untouched();
    }

    #[test]
    fn metadata_is_kept() {
        let mut s = Scratch::new();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_path("bin/su").expect("path");
        header.set_mode(0o4755);
        header.set_uid(1000);
        header.set_gid(2000);
        header.set_mtime(1_600_000_000);
        header.set_size(2);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, &b"#!"[..]).expect("append");
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(EntryType::Directory);
        dir.set_path("bin/").expect("path");
        dir.set_mode(0o700);
        dir.set_uid(0);
        dir.set_gid(0);
        dir.set_mtime(1_500_000_000);
        dir.set_size(0);
        dir.set_cksum();
        builder.append(&dir, &b""[..]).expect("append");
        let data = builder.into_inner().expect("tar");
        s.unpacker
            .apply(&data[..], Compression::None, "sha256:test", None)
            .expect("apply");
        let Scratch { root, unpacker, .. } = &mut s;
        std::mem::replace(unpacker, Unpacker::new(root))
            .finish()
            .expect("finish");
        let m = fs::metadata(s.root.join("bin/su")).expect("stat");
        assert_eq!(m.mode() & 0o7777, 0o4755, "setuid survives chown");
        assert_eq!((m.uid(), m.gid()), (1000, 2000));
        assert_eq!(m.mtime(), 1_600_000_000);
        let d = fs::metadata(s.root.join("bin")).expect("stat");
        assert_eq!(d.mode() & 0o7777, 0o700);
        assert_eq!(
            d.mtime(),
            1_500_000_000,
            "set after the directory's entries"
        );
    }

    #[test]
    fn layers_without_the_tar_trailer_are_read_as_go_reads_them() {
        let data = "x".repeat(700);
        let full = LayerTar::default()
            .dir("etc")
            .file("etc/motd", &data)
            .bytes();
        // Header blocks: etc, etc/motd; then 700 bytes of data from offset 1024.
        let data_end = 2 * 512 + 700;
        for (cut, what) in [
            (data_end, "no padding"),
            (data_end + 100, "part of the padding"),
        ] {
            let layer = &full[..cut];
            let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(layer)));
            let mut s = Scratch::new();
            let count = s
                .unpacker
                .apply(layer, Compression::None, "sha256:l", Some(&diff_id))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(count, 2, "{what}");
            assert_eq!(s.read("etc/motd"), data, "{what}");
        }
        // Truncated entry data is still refused, also inside the last block.
        for cut in [data_end - 1, 2 * 512 + 600, 2 * 512 + 10, 512 + 100] {
            let mut s = Scratch::new();
            let e = s
                .unpacker
                .apply(&full[..cut], Compression::None, "sha256:l", None);
            assert!(
                matches!(e, Err(ImageError::BadLayer { .. })),
                "cut at {cut}: {e:?}"
            );
        }
    }

    #[test]
    fn compressed_layers_and_diff_ids() {
        let tar = LayerTar::default().file("etc/hostname", "box\n").bytes();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let zst = zstd::encode_all(&tar[..], 3).expect("zstd");

        for (data, compression) in [
            (&tar, Compression::None),
            (&gz, Compression::Gzip),
            (&zst, Compression::Zstd),
        ] {
            let mut s = Scratch::new();
            s.unpacker
                .apply(&data[..], compression, "sha256:l", Some(&diff_id))
                .expect("apply");
            assert_eq!(s.read("etc/hostname"), "box\n", "{compression:?}");
            let err = s
                .unpacker
                .apply(&data[..], compression, "sha256:l", Some("sha256:00"))
                .expect_err("wrong diff id");
            assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        }
        let mut s = Scratch::new();
        let err = s
            .unpacker
            .apply(&tar[..], Compression::Gzip, "sha256:l", None)
            .expect_err("not gzip");
        assert!(matches!(err, ImageError::BadLayer { .. }), "{err}");
    }

    #[test]
    fn layer_media_types() {
        use Compression::*;
        for (media_type, expected) in [
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some(None)),
            ("application/vnd.wasm.content.layer.v1+wasm", Option::None),
        ] {
            assert_eq!(
                Compression::for_media_type(media_type),
                expected,
                "{media_type}"
            );
        }
    }
    /// An image's device nodes are never made on the host: placeholders in the tree (the
    /// ext4 step makes the nodes, see its tests); one a later layer replaced is a file.
    #[test]
    fn device_nodes_exist_only_inside_the_image() {
        let mut s = Scratch::new();
        s.apply(
            LayerTar::default()
                .dir("dev")
                .device("dev/mynull", EntryType::Char, 1, 3, 0o666)
                .device("dev/disk", EntryType::Block, 8, 0, 0o660)
                .device("dev/gone", EntryType::Char, 1, 5, 0o600)
                .device("fifo", EntryType::Fifo, 0, 0, 0o644)
                .hardlink("dev/null-link", "dev/mynull"),
        )
        .expect("layer 1");
        s.apply(LayerTar::default().file("dev/gone", "a file now"))
            .expect("layer 2");
        for p in ["dev/mynull", "dev/disk", "fifo", "dev/null-link"] {
            let m = fs::symlink_metadata(s.root.join(p)).expect(p);
            assert!(m.is_file() && m.len() == 0, "{p} on the host: {m:?}");
        }
        let devices = s.unpacker.finish().expect("finish");
        let paths: Vec<&str> = devices.iter().filter_map(|d| d.path.to_str()).collect();
        assert_eq!(paths, ["dev/disk", "dev/mynull", "dev/null-link", "fifo"]);
        assert_eq!(
            (
                devices[1].kind,
                devices[1].major,
                devices[1].minor,
                devices[1].mode,
                devices[1].gid
            ),
            (DeviceKind::Char, 1, 3, 0o666, 5)
        );
    }
}
