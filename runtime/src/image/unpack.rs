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
use super::limits::{ImageLimits, Limit};
use super::tarstream::{CompleteTail, HashingReader, Meter, Metered, copy_with_holes};

/// Whiteout prefix: `.wh.name` deletes `name`.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque marker: the directory holding it hides everything below it in lower layers.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// xattrs in PAX headers.
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// The buffer file contents are copied through.
const COPY_BUFFER: usize = 256 << 10;

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
/// What the layers unpack to, over all of them, is held to the unpacking caps of
/// [`ImageLimits`].
pub struct Unpacker {
    root: PathBuf,
    meter: Meter,
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
    /// Unpacks into `root`, an existing directory, within the default caps.
    pub fn new(root: &Path) -> Self {
        Self::with_limits(root, &ImageLimits::default())
    }

    /// Unpacks into `root`, an existing directory, within `limits`' unpacking caps
    /// (`max_unpacked_bytes`, `max_inodes`).
    pub fn with_limits(root: &Path, limits: &ImageLimits) -> Self {
        Unpacker {
            root: root.to_path_buf(),
            meter: Meter::new(limits),
            dir_times: HashMap::new(),
            devices: HashMap::new(),
        }
    }

    /// Bytes and inodes unpacked so far, as counted against the caps.
    pub fn used(&self) -> (u64, u64) {
        self.meter.used()
    }

    /// Applies the layer `digest`, read (compressed) from `blob`. `diff_id` is the digest
    /// of the uncompressed tarball from the image config, when it has one. Returns the
    /// number of entries. A cap reached ends it with [`ImageError::LimitExceeded`], having
    /// decompressed no further.
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
        let meter = &self.meter;
        meter.start_layer();
        let mut hashed = HashingReader {
            inner: Metered {
                inner: tarball,
                meter,
            },
            hasher: Sha256::new(),
        };
        let mut layer = Layer {
            root: &self.root,
            digest,
            written: HashSet::new(),
            dir_times: &mut self.dir_times,
            devices: &mut self.devices,
            meter,
            buf: vec![0; COPY_BUFFER],
        };
        let count = {
            let data_end = Cell::new(0);
            let mut archive = tar::Archive::new(CompleteTail {
                inner: &mut hashed,
                read: 0,
                data_end: &data_end,
                zeros_left: None,
            });
            let mut entries = archive
                .entries()
                .map_err(|e| layer.read_error(Path::new("?"), e))?;
            layer.apply_entries(&mut entries, &data_end)?
        };
        // The digest covers the whole stream, including the padding after the last entry.
        io::copy(&mut hashed, &mut io::sink()).map_err(|e| layer.read_error(Path::new("?"), e))?;
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
    meter: &'a Meter,
    /// For copying file contents.
    buf: Vec<u8>,
}

impl Layer<'_> {
    fn bad(&self, path: &Path, message: impl std::fmt::Display) -> ImageError {
        ImageError::BadLayer {
            digest: self.digest.to_string(),
            message: format!("entry {:?}: {message}", path),
        }
    }

    /// The error of a failed read of the layer at `path`: the cap the read stopped at,
    /// or a bad layer.
    fn read_error(&self, path: &Path, e: io::Error) -> ImageError {
        self.failure(path, "read", e)
    }

    /// The error of a failed `op` at `path`: the cap a read stopped at, or a bad layer.
    fn failure(&self, path: &Path, op: &str, e: io::Error) -> ImageError {
        match self.meter.take_tripped() {
            Some(limit) => self.over(limit),
            None => self.bad(path, format!("{op}: {e}")),
        }
    }

    /// The cap `limit` reached while applying this layer.
    fn over(&self, limit: Limit) -> ImageError {
        let max = self.meter.max(limit);
        let what = match limit {
            Limit::Inodes => format!("layer {}: more than {max} entries", self.digest),
            Limit::EntryMetadataBytes => format!(
                "layer {}: the tar headers of one entry take more than {max} bytes",
                self.digest
            ),
            _ => format!(
                "layer {}: the image unpacks to more than {max} bytes",
                self.digest
            ),
        };
        ImageError::LimitExceeded { what, limit, max }
    }

    /// Applies every entry of the layer; returns their number. While the tar reader looks
    /// for the next entry it may read no more than the headers of one; each entry's data
    /// is read whole before the next (what is not written is read and dropped), so those
    /// reads hold nothing but headers.
    fn apply_entries<R: Read>(
        &mut self,
        entries: &mut tar::Entries<'_, R>,
        data_end: &Cell<u64>,
    ) -> Result<u64, ImageError> {
        let mut count = 0;
        loop {
            self.meter.headers_only(true);
            let next = entries.next();
            self.meter.headers_only(false);
            let Some(entry) = next else {
                return Ok(count);
            };
            let mut entry = entry.map_err(|e| self.read_error(Path::new("?"), e))?;
            data_end.set(self.meter.pos().saturating_add(archived_size(&mut entry)));
            self.meter.count_inode().map_err(|limit| self.over(limit))?;
            self.apply_entry(&mut entry)?;
            io::copy(&mut entry, &mut io::sink()).map_err(|e| {
                let path = entry.path().map(|p| p.into_owned()).unwrap_or_default();
                self.read_error(&path, e)
            })?;
            count += 1;
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
                self.write_file(entry, &rel, &full, existing.is_some())?;
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

    /// Writes a regular (or sparse) file's content at `full`, replacing what is there.
    /// Refused before anything is written if its size alone is over what the image may
    /// still unpack to.
    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        full: &Path,
        existing: bool,
    ) -> Result<(), ImageError> {
        let size = entry.size();
        if size > self.meter.bytes_left() {
            let (used, _) = self.meter.used();
            return Err(ImageError::LimitExceeded {
                what: format!(
                    "layer {}: entry {rel:?} of {size} bytes, after {used} bytes unpacked",
                    self.digest
                ),
                limit: Limit::UnpackedBytes,
                max: self.meter.max(Limit::UnpackedBytes),
            });
        }
        if existing {
            remove_any(full)?;
        }
        let mut file = create_new(full, 0o600)?;
        copy_with_holes(entry, &mut file, self.meter, &mut self.buf)
            .map_err(|e| self.failure(rel, "write", e))?;
        Ok(())
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

/// How many bytes of the stream the entry's data takes: its size, except for a GNU sparse
/// entry, whose size is the file's apparent size and whose data is the header's size
/// (or the PAX `size` record's).
fn archived_size<R: Read>(entry: &mut tar::Entry<'_, R>) -> u64 {
    if !entry.header().entry_type().is_gnu_sparse() {
        return entry.size();
    }
    let pax_size = entry.pax_extensions().ok().flatten().and_then(|records| {
        records
            .filter_map(Result::ok)
            .find(|r| r.key() == Ok("size"))
            .and_then(|r| r.value().ok()?.parse().ok())
    });
    pax_size.unwrap_or_else(|| entry.header().entry_size().unwrap_or(0))
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

#[cfg(test)]
mod tests;
