//! Host paths mounted into a container: a VM shares no file system with the host, so the
//! contents of each host path are copied into the guest (agent CopyFile) beneath
//! `/run/podvisor/volumes/<container>/<n>` and bind-mounted from there.
//!
//! Symlinks inside a mounted directory are followed on the host only while their target
//! stays inside the mount's root (kubelet's configMap, secret and projected volumes are
//! `key -> ..data/key`, `..data -> ..<timestamp>`): the guest gets regular files and
//! directories with the target's content, never a symlink. A link that leads out of the
//! root, dangles or loops is skipped with a warning. Every opened file is checked once
//! more through `/proc/self/fd` so a link swapped in between the check and the open cannot
//! lead outside. A host path that is itself a symlink is resolved once (kubelet is trusted,
//! as containerd's EvalSymlinks trusts it); one leading nowhere is refused; empty subdirectories
//! are not copied (CopyFile creates only the parents of files). An empty or absent
//! directory is not copied at all: the container gets an empty tmpfs there.
//!
//! [`VolumeWatch`] keeps what was copied ((device, inode, size, mtime, ctime) of each
//! file) so a poll can copy again what changed on the host and what is new. Files removed
//! on the host stay in the guest: the agent has no call to delete them.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use podvisor_common::IoError;

/// Where the guest agent lets CopyFile write volume contents.
pub const VOLUMES_ROOT: &str = "/run/podvisor/volumes";
/// The most bytes copied into the guest for all mounts of one container.
pub const MAX_VOLUME_BYTES: u64 = 16 * 1024 * 1024;
/// The most files copied for all mounts of one container (also the most directories one
/// mount's walk enters: links to directories could otherwise multiply them).
pub const MAX_VOLUME_FILES: usize = 4096;

/// Why a host path cannot be given to a container.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A relative host or container path.
    #[error("mount path {0:?} is not absolute")]
    NotAbsolute(PathBuf),
    /// Something else than a regular file or a directory.
    #[error("host path {path} is a {kind}: a VM can only be given copies of files and directories")]
    Unsupported {
        /// The host path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A file beneath the mount became a symlink after it was found.
    #[error("host path {0} is a symlink: podvisor does not follow symlinks on the host")]
    Symlink(PathBuf),
    /// The host path is a symlink that leads nowhere.
    #[error("host path {0} is a symlink to nothing")]
    Dangling(PathBuf),
    /// An opened file turned out to lie outside the mount's root (a link swapped in).
    #[error("host path {path} leads to {target}, outside the mounted {root}")]
    Escapes {
        /// The path opened.
        path: PathBuf,
        /// Where it led.
        target: PathBuf,
        /// The mount's root.
        root: PathBuf,
    },
    /// Over [`MAX_VOLUME_BYTES`] or [`MAX_VOLUME_FILES`].
    #[error(
        "host path {path}: the container's mounts exceed {MAX_VOLUME_BYTES} bytes or \
         {MAX_VOLUME_FILES} files, the most podvisor copies into a VM"
    )]
    TooLarge {
        /// The mount that went over.
        path: PathBuf,
    },
    /// Reading the host failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// What identifies one version of a host file: any change means copying it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

/// One file to write into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    /// Absolute guest path beneath [`VOLUMES_ROOT`].
    pub guest_path: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Contents.
    pub contents: Vec<u8>,
    /// The mount is this one file: the container binds the file itself, so it must be
    /// rewritten in place (a rename would leave the container the old file).
    pub in_place: bool,
    /// The host file as it was read.
    pub fingerprint: Fingerprint,
}

/// What a host path becomes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// Copied files; bind-mount `source` (a file or directory in the guest).
    Copied {
        /// The guest path to bind.
        source: String,
        /// The files to write first.
        files: Vec<VolumeFile>,
    },
    /// An empty directory: a tmpfs.
    Empty,
}

/// Counts what has been copied for one container.
#[derive(Debug, Default)]
pub struct Budget {
    bytes: u64,
    files: usize,
}

impl Budget {
    fn take(&mut self, bytes: u64, path: &Path) -> Result<(), VolumeError> {
        self.bytes += bytes;
        self.files += 1;
        if self.bytes > MAX_VOLUME_BYTES || self.files > MAX_VOLUME_FILES {
            return Err(VolumeError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// A regular file found in a mount, not read yet.
#[derive(Debug, Clone)]
struct Found {
    guest_path: String,
    /// Its host path with every symlink resolved.
    path: PathBuf,
    fingerprint: Fingerprint,
}

/// The regular files of one mount, found by [`scan`].
#[derive(Debug)]
struct Tree {
    /// The mount's host path, canonical.
    root: PathBuf,
    /// The guest path to bind.
    source: String,
    /// The mount is a single file.
    single_file: bool,
    files: Vec<Found>,
}

impl Tree {
    /// Reads `f` without following a symlink and without blocking on a FIFO swapped in
    /// after it was found; the opened file must still lie beneath the root.
    fn read(&self, f: &Found, budget: &mut Budget) -> Result<VolumeFile, VolumeError> {
        let path = &f.path;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => VolumeError::Symlink(path.to_path_buf()),
                _ => IoError::new("open", path, e).into(),
            })?;
        let fd_link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let target = std::fs::read_link(&fd_link).map_err(IoError::at("resolve", path))?;
        if !target.starts_with(&self.root) {
            return Err(VolumeError::Escapes {
                path: path.to_path_buf(),
                target,
                root: self.root.clone(),
            });
        }
        let meta = file.metadata().map_err(IoError::at("inspect", path))?;
        if !meta.is_file() {
            return Err(VolumeError::Unsupported {
                path: path.to_path_buf(),
                kind: kind_of(meta.file_type()),
            });
        }
        budget.take(meta.len(), path)?;
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_VOLUME_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(IoError::at("read", path))?;
        // The file grew after fstat: count what was read.
        if data.len() as u64 > meta.len() {
            budget.take(data.len() as u64 - meta.len(), path)?;
            budget.files -= 1;
        }
        Ok(VolumeFile {
            guest_path: f.guest_path.clone(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            contents: data,
            in_place: self.single_file,
            fingerprint: Fingerprint::of(&meta),
        })
    }
}

/// The guest directory of mount `index` of `container_id`.
fn guest_base(container_id: &str, index: usize) -> String {
    format!("{VOLUMES_ROOT}/{container_id}/{index}")
}

/// Where a symlink inside the mount leads, if it may be followed: its canonical target,
/// beneath `root`, and not a directory the walk is inside of (which would loop).
fn follow(link: &Path, root: &Path, ancestors: &[PathBuf]) -> Option<(PathBuf, std::fs::Metadata)> {
    let target = match std::fs::canonicalize(link) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(
                "skipping symlink {} in a mounted host directory: {e}",
                link.display()
            );
            return None;
        }
    };
    if !target.starts_with(root) {
        tracing::warn!(
            "skipping symlink {} in a mounted host directory: it leads to {}, outside {}",
            link.display(),
            target.display(),
            root.display()
        );
        return None;
    }
    // Entering a directory that holds one the walk is in would reach it again.
    if ancestors.iter().any(|a| a.starts_with(&target)) {
        tracing::warn!(
            "skipping symlink {} in a mounted host directory: it loops back to {}",
            link.display(),
            target.display()
        );
        return None;
    }
    match std::fs::metadata(&target) {
        Ok(m) => Some((target, m)),
        Err(e) => {
            tracing::warn!("skipping symlink {}: {e}", link.display());
            None
        }
    }
}

/// Finds the regular files of mount `index` at `host_path` (stat only), charging their
/// sizes to `budget`. None for an empty or absent directory.
fn scan(
    container_id: &str,
    index: usize,
    host_path: &Path,
    budget: &mut Budget,
) -> Result<Option<Tree>, VolumeError> {
    if !host_path.is_absolute() {
        return Err(VolumeError::NotAbsolute(host_path.to_path_buf()));
    }
    let base = guest_base(container_id, index);
    // kubelet's host path is trusted: resolved once here, as containerd's EvalSymlinks
    // does (hostPath volumes and subPaths may be links); what lies beneath it is walked
    // without leaving it.
    let root = match std::fs::canonicalize(host_path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if host_path.symlink_metadata().is_ok() {
                return Err(VolumeError::Dangling(host_path.to_path_buf()));
            }
            // containerd would create the directory on the host; here it is simply empty.
            return Ok(None);
        }
        Err(e) => return Err(IoError::new("resolve", host_path, e).into()),
    };
    let meta = root
        .symlink_metadata()
        .map_err(IoError::at("inspect", &root))?;
    let t = meta.file_type();
    if !t.is_file() && !t.is_dir() {
        return Err(VolumeError::Unsupported {
            path: host_path.to_path_buf(),
            kind: kind_of(t),
        });
    }
    if t.is_file() {
        budget.take(meta.len(), host_path)?;
        return Ok(Some(Tree {
            files: vec![Found {
                guest_path: base.clone(),
                path: root.clone(),
                fingerprint: Fingerprint::of(&meta),
            }],
            root,
            source: base,
            single_file: true,
        }));
    }
    let files = walk(&root, &root, &base, budget)?;
    if files.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tree {
        root,
        source: base,
        single_file: false,
        files,
    }))
}

/// The regular files beneath the directory `root` (`host_path` resolved), depth first in
/// name order, each with its path under the guest directory `base`; symlinks are followed
/// while they stay beneath `root`.
fn walk(
    host_path: &Path,
    root: &Path,
    base: &str,
    budget: &mut Budget,
) -> Result<Vec<Found>, VolumeError> {
    let mut files = Vec::new();
    let mut dirs = 0usize;
    // (host directory, its guest directory, the host directories walked through to it)
    let mut stack: Vec<(PathBuf, String, Vec<PathBuf>)> = vec![(
        root.to_path_buf(),
        base.to_string(),
        vec![root.to_path_buf()],
    )];
    while let Some((dir, guest_dir, ancestors)) = stack.pop() {
        dirs += 1;
        if dirs > MAX_VOLUME_FILES {
            return Err(VolumeError::TooLarge {
                path: host_path.to_path_buf(),
            });
        }
        let entries = std::fs::read_dir(&dir).map_err(IoError::at("list", &dir))?;
        let mut entries: Vec<_> = entries
            .collect::<Result<_, _>>()
            .map_err(IoError::at("list", &dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!("skipping {}: not a UTF-8 name", path.display());
                continue;
            };
            let guest = format!("{guest_dir}/{name}");
            let Some((real, meta)) = resolve_entry(&entry, root, &ancestors)? else {
                continue;
            };
            let t = meta.file_type();
            if t.is_dir() {
                let mut inner = ancestors.clone();
                inner.push(real.clone());
                stack.push((real, guest, inner));
            } else if t.is_file() {
                budget.take(meta.len(), &path)?;
                files.push(Found {
                    guest_path: guest,
                    path: real,
                    fingerprint: Fingerprint::of(&meta),
                });
            } else {
                tracing::warn!(
                    "skipping {} ({}) in a mounted host directory",
                    path.display(),
                    kind_of(t)
                );
            }
        }
    }
    Ok(files)
}

/// What a directory entry is: its real path and metadata (a symlink followed when it
/// stays beneath `root`); None to skip it (a symlink leading out, an entry gone since it
/// was listed).
fn resolve_entry(
    entry: &std::fs::DirEntry,
    root: &Path,
    ancestors: &[PathBuf],
) -> Result<Option<(PathBuf, std::fs::Metadata)>, VolumeError> {
    let path = entry.path();
    if entry
        .file_type()
        .map_err(IoError::at("inspect", &path))?
        .is_symlink()
    {
        return Ok(follow(&path, root, ancestors));
    }
    match path.symlink_metadata() {
        Ok(m) => Ok(Some((path, m))),
        // Gone since it was listed.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::new("inspect", &path, e).into()),
    }
}

/// Collects the host path of mount `index` of `container_id` for the guest.
pub fn collect(
    container_id: &str,
    index: usize,
    host_path: &Path,
    budget: &mut Budget,
) -> Result<VolumeSource, VolumeError> {
    // The scan charges sizes as listed, the reads as read: count only the reads.
    let Some(tree) = scan(container_id, index, host_path, &mut Budget::default())? else {
        return Ok(VolumeSource::Empty);
    };
    let files = tree
        .files
        .iter()
        .map(|f| tree.read(f, budget))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VolumeSource::Copied {
        source: tree.source,
        files,
    })
}

/// The copied mounts of one container and what of them is in its guest: [`changes`]
/// finds what to copy again, [`copied`] records a copy.
///
/// [`changes`]: VolumeWatch::changes
/// [`copied`]: VolumeWatch::copied
#[derive(Debug)]
pub struct VolumeWatch {
    container_id: String,
    /// (mount index, host path)
    mounts: Vec<(usize, PathBuf)>,
    /// Guest path -> the host file last copied there.
    copied: HashMap<String, Fingerprint>,
}

impl VolumeWatch {
    /// Watches nothing yet.
    pub fn new(container_id: &str) -> Self {
        Self {
            container_id: container_id.to_string(),
            mounts: Vec::new(),
            copied: HashMap::new(),
        }
    }

    /// Watches mount `index` at `host_path`, whose `files` are in the guest (none: the
    /// first poll copies all).
    pub fn add(&mut self, index: usize, host_path: &Path, files: &[VolumeFile]) {
        self.mounts.push((index, host_path.to_path_buf()));
        for f in files {
            self.copied.insert(f.guest_path.clone(), f.fingerprint);
        }
    }

    /// Whether there is nothing to watch.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    /// Reads the host files that changed or appeared since they were last copied (blocks).
    /// The whole container's mounts must stay within the caps; files gone between the
    /// scan and the read are left for the next poll.
    pub fn changes(&self) -> Result<Vec<VolumeFile>, VolumeError> {
        let mut budget = Budget::default();
        let mut trees = Vec::new();
        for (index, host_path) in &self.mounts {
            if let Some(tree) = scan(&self.container_id, *index, host_path, &mut budget)? {
                trees.push(tree);
            }
        }
        // Growth since the scan is charged again by the reads.
        let mut reads = Budget::default();
        let mut changed = Vec::new();
        for tree in &trees {
            for f in &tree.files {
                if self.copied.get(&f.guest_path) == Some(&f.fingerprint) {
                    continue;
                }
                match tree.read(f, &mut reads) {
                    Ok(file) => changed.push(file),
                    Err(VolumeError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(changed)
    }

    /// Records that the host file `fingerprint` is at `guest_path` in the guest now.
    pub fn copied(&mut self, guest_path: String, fingerprint: Fingerprint) {
        self.copied.insert(guest_path, fingerprint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    fn guest_paths(source: &VolumeSource) -> Vec<String> {
        let VolumeSource::Copied { files, .. } = source else {
            panic!("{source:?}");
        };
        let mut paths: Vec<String> = files.iter().map(|f| f.guest_path.clone()).collect();
        paths.sort();
        paths
    }

    fn contents_of<'a>(files: &'a [VolumeFile], guest_path: &str) -> &'a [u8] {
        &files
            .iter()
            .find(|f| f.guest_path == guest_path)
            .unwrap_or_else(|| panic!("no {guest_path} in {files:?}"))
            .contents
    }

    /// Lays out `dir` as kubelet does a configMap volume with one key, `greeting`.
    fn configmap(dir: &Path, version: &str, greeting: &str) {
        std::fs::create_dir_all(dir.join(version)).unwrap();
        std::fs::write(dir.join(version).join("greeting"), greeting).unwrap();
        // kubelet's swap: a new link renamed over `..data`.
        symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if dir.join("greeting").symlink_metadata().is_err() {
            symlink("..data/greeting", dir.join("greeting")).unwrap();
        }
    }

    #[test]
    fn files_and_directories_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "hello").unwrap();
        let mut budget = Budget::default();
        match collect("c1", 0, &file, &mut budget).unwrap() {
            VolumeSource::Copied { source, files } => {
                assert_eq!(source, "/run/podvisor/volumes/c1/0");
                assert_eq!(files.len(), 1);
                assert_eq!(files[0].guest_path, source);
                assert_eq!(files[0].contents, b"hello");
                assert!(files[0].in_place);
            }
            other => panic!("{other:?}"),
        }

        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(vol.join("empty")).unwrap();
        std::fs::write(vol.join("a"), "A").unwrap();
        std::fs::write(vol.join("sub/deeper/b"), "B").unwrap();
        nix::unistd::mkfifo(&vol.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let source = collect("c1", 2, &vol, &mut Budget::default()).unwrap();
        assert_eq!(
            guest_paths(&source),
            [
                "/run/podvisor/volumes/c1/2/a",
                "/run/podvisor/volumes/c1/2/sub/deeper/b"
            ]
        );
        let VolumeSource::Copied { files, .. } = &source else {
            unreachable!()
        };
        assert!(files.iter().all(|f| !f.in_place));

        // A host path that is a link is resolved once (kubelet is trusted); one to nothing
        // is refused.
        let link = dir.path().join("link");
        symlink(&vol, &link).unwrap();
        let through_link = collect("c1", 2, &link, &mut Budget::default()).unwrap();
        assert_eq!(guest_paths(&through_link), guest_paths(&source));
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nothing"), &dangling).unwrap();
        assert!(matches!(
            collect("c1", 3, &dangling, &mut Budget::default()),
            Err(VolumeError::Dangling(_))
        ));
        assert!(matches!(
            collect("c1", 4, &vol.join("fifo"), &mut Budget::default()),
            Err(VolumeError::Unsupported { kind: "FIFO", .. })
        ));
        assert_eq!(
            collect("c1", 5, &vol.join("empty"), &mut Budget::default()).unwrap(),
            VolumeSource::Empty
        );
        assert_eq!(
            collect("c1", 6, &dir.path().join("missing"), &mut Budget::default()).unwrap(),
            VolumeSource::Empty
        );
        assert!(matches!(
            collect("c1", 7, Path::new("rel"), &mut Budget::default()),
            Err(VolumeError::NotAbsolute(_))
        ));
    }

    #[test]
    fn kubelet_configmap_links_are_followed_into_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("config");
        configmap(&vol, "..2026_11_27_07_00_00.1", "hello\n");
        let VolumeSource::Copied { source, files } =
            collect("c", 0, &vol, &mut Budget::default()).unwrap()
        else {
            panic!("nothing copied");
        };
        let g = |p: &str| format!("{source}/{p}");
        for p in [
            "greeting",
            "..data/greeting",
            "..2026_11_27_07_00_00.1/greeting",
        ] {
            assert_eq!(contents_of(&files, &g(p)), b"hello\n", "{p}");
        }
        assert_eq!(files.len(), 3, "{files:?}");
    }

    #[test]
    fn links_out_of_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "S").unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("a"), "A").unwrap();
        symlink("/etc/shadow", vol.join("shadow")).unwrap();
        symlink("../outside/secret", vol.join("secret")).unwrap();
        symlink("../outside", vol.join("outdir")).unwrap();
        symlink("../../outside/secret", vol.join("sub/deep-secret")).unwrap();
        symlink("missing", vol.join("dangling")).unwrap();
        // Inside the root, relative with a detour or absolute: followed.
        symlink("../vol/a", vol.join("detour")).unwrap();
        symlink(vol.join("a"), vol.join("absolute")).unwrap();
        symlink("../a", vol.join("sub/up")).unwrap();
        let source = collect("c", 0, &vol, &mut Budget::default()).unwrap();
        assert_eq!(
            guest_paths(&source),
            [
                "/run/podvisor/volumes/c/0/a",
                "/run/podvisor/volumes/c/0/absolute",
                "/run/podvisor/volumes/c/0/detour",
                "/run/podvisor/volumes/c/0/sub/up",
            ]
        );
        let VolumeSource::Copied { files, .. } = &source else {
            unreachable!()
        };
        assert!(files.iter().all(|f| f.contents == b"A"), "{files:?}");
    }

    #[test]
    fn looping_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("x/y")).unwrap();
        std::fs::write(vol.join("x/y/f"), "F").unwrap();
        symlink(".", vol.join("self")).unwrap();
        symlink("..", vol.join("x/y/back")).unwrap();
        symlink("../../x", vol.join("x/y/again")).unwrap();
        // Two links into each other's directories.
        std::fs::create_dir_all(vol.join("p")).unwrap();
        std::fs::create_dir_all(vol.join("q")).unwrap();
        symlink("../q", vol.join("p/to-q")).unwrap();
        symlink("../p", vol.join("q/to-p")).unwrap();
        std::fs::write(vol.join("q/g"), "G").unwrap();
        // Links resolving to each other (ELOOP).
        symlink("l2", vol.join("l1")).unwrap();
        symlink("l1", vol.join("l2")).unwrap();
        let source = collect("c", 0, &vol, &mut Budget::default()).unwrap();
        assert_eq!(
            guest_paths(&source),
            [
                "/run/podvisor/volumes/c/0/p/to-q/g",
                "/run/podvisor/volumes/c/0/q/g",
                "/run/podvisor/volumes/c/0/x/y/f",
            ]
        );
    }

    #[test]
    fn an_opened_file_outside_the_root_is_refused() {
        // What a link swapped in between the scan and the open would lead to.
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(dir.path().join("secret"), "S").unwrap();
        let secret = std::fs::canonicalize(dir.path().join("secret")).unwrap();
        let found = Found {
            guest_path: "/run/podvisor/volumes/c/0/x".into(),
            path: secret.clone(),
            fingerprint: Fingerprint::of(&secret.metadata().unwrap()),
        };
        let tree = Tree {
            root: std::fs::canonicalize(&vol).unwrap(),
            source: "/run/podvisor/volumes/c/0".into(),
            single_file: false,
            files: vec![found.clone()],
        };
        let e = tree.read(&found, &mut Budget::default()).unwrap_err();
        assert!(matches!(e, VolumeError::Escapes { .. }), "{e:?}");
    }

    #[test]
    fn changed_and_new_files_are_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("config");
        configmap(&vol, "..2026_x", "one\n");
        let single = dir.path().join("single");
        std::fs::write(&single, "s1").unwrap();
        let mut budget = Budget::default();
        let mut watch = VolumeWatch::new("c");
        for (n, path) in [(0, &vol), (1, &single)] {
            let VolumeSource::Copied { files, .. } = collect("c", n, path, &mut budget).unwrap()
            else {
                panic!("nothing copied");
            };
            watch.add(n, path, &files);
        }
        assert!(watch.changes().unwrap().is_empty());

        // kubelet's update: a new version directory, `..data` swapped, the old one removed.
        configmap(&vol, "..2026_y", "two\n");
        std::fs::remove_dir_all(vol.join("..2026_x")).unwrap();
        let changes = watch.changes().unwrap();
        let mut paths: Vec<&str> = changes.iter().map(|f| f.guest_path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "/run/podvisor/volumes/c/0/..2026_y/greeting",
                "/run/podvisor/volumes/c/0/..data/greeting",
                "/run/podvisor/volumes/c/0/greeting",
            ]
        );
        assert!(
            changes
                .iter()
                .all(|f| f.contents == b"two\n" && !f.in_place)
        );
        for f in &changes {
            watch.copied(f.guest_path.clone(), f.fingerprint);
        }
        assert!(watch.changes().unwrap().is_empty());

        // Rewritten in place with the same size: the mtime tells.
        let before = watch.changes().unwrap();
        assert!(before.is_empty());
        let t = std::fs::metadata(&single).unwrap().modified().unwrap();
        std::fs::write(&single, "s2").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&single)
            .unwrap()
            .set_modified(t + Duration::from_secs(1))
            .unwrap();
        let changes = watch.changes().unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].guest_path, "/run/podvisor/volumes/c/1");
        assert_eq!(changes[0].contents, b"s2");
        assert!(changes[0].in_place);
        watch.copied(changes[0].guest_path.clone(), changes[0].fingerprint);
        assert!(watch.changes().unwrap().is_empty());

        // Over the cap: refused, nothing read.
        std::fs::write(
            vol.join("..2026_y/big"),
            vec![0u8; MAX_VOLUME_BYTES as usize],
        )
        .unwrap();
        assert!(matches!(watch.changes(), Err(VolumeError::TooLarge { .. })));
    }

    #[test]
    fn a_watch_without_copies_copies_everything() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "A").unwrap();
        let mut watch = VolumeWatch::new("c");
        assert!(watch.is_empty());
        watch.add(3, dir.path(), &[]);
        let changes = watch.changes().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].guest_path, "/run/podvisor/volumes/c/3/a");
    }

    #[test]
    fn the_budget_is_per_container() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; (MAX_VOLUME_BYTES / 2 + 1) as usize]).unwrap();
        let mut budget = Budget::default();
        collect("c", 0, &big, &mut budget).unwrap();
        let e = collect("c", 1, &big, &mut budget).unwrap_err();
        assert!(matches!(e, VolumeError::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("16777216"), "{e}");
    }
}
