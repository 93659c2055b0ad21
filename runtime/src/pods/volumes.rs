//! Host paths mounted into a container: a VM shares no file system with the host, so the
//! contents of each host path are copied into the guest (agent CopyFile) beneath
//! `/run/podvisor/volumes/<container>/<n>` and bind-mounted from there.
//!
//! Copies are made once, at CreateContainer; later changes on the host are not seen by the
//! container (no refresh). Symlinks are never followed on the host: a host path that is a
//! symlink is refused, symlinks inside a directory are skipped (with a warning), as are
//! empty subdirectories (CopyFile creates only the parents of files). An empty or absent
//! directory is not copied at all: the container gets an empty tmpfs there.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the guest agent lets CopyFile write volume contents.
pub const VOLUMES_ROOT: &str = "/run/podvisor/volumes";
/// The most bytes copied into the guest for all mounts of one container.
pub const MAX_VOLUME_BYTES: u64 = 16 * 1024 * 1024;
/// The most files copied for all mounts of one container.
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
    /// The host path itself is a symlink.
    #[error("host path {0} is a symlink: podvisor does not follow symlinks on the host")]
    Symlink(PathBuf),
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
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        what,
        path: path.to_path_buf(),
        source,
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

/// Reads a regular file without following a symlink and without blocking on a FIFO
/// swapped in after it was listed.
fn read_file(
    path: &Path,
    budget: &mut Budget,
) -> Result<(std::fs::Metadata, Vec<u8>), VolumeError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => VolumeError::Symlink(path.to_path_buf()),
            _ => io_err("open", path)(e),
        })?;
    let meta = f.metadata().map_err(io_err("inspect", path))?;
    if !meta.is_file() {
        return Err(VolumeError::Unsupported {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    budget.take(meta.len(), path)?;
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_VOLUME_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(io_err("read", path))?;
    // The file grew after fstat: count what was read.
    if data.len() as u64 > meta.len() {
        budget.take(data.len() as u64 - meta.len(), path)?;
        budget.files -= 1;
    }
    Ok((meta, data))
}

fn volume_file(guest_path: String, meta: &std::fs::Metadata, contents: Vec<u8>) -> VolumeFile {
    VolumeFile {
        guest_path,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        contents,
    }
}

/// Collects the host path of mount `index` of `container_id` for the guest.
pub fn collect(
    container_id: &str,
    index: usize,
    host_path: &Path,
    budget: &mut Budget,
) -> Result<VolumeSource, VolumeError> {
    if !host_path.is_absolute() {
        return Err(VolumeError::NotAbsolute(host_path.to_path_buf()));
    }
    let base = format!("{VOLUMES_ROOT}/{container_id}/{index}");
    let meta = match host_path.symlink_metadata() {
        Ok(m) => m,
        // containerd would create the directory on the host; here it is simply empty.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(VolumeSource::Empty),
        Err(e) => return Err(io_err("inspect", host_path)(e)),
    };
    let t = meta.file_type();
    if t.is_symlink() {
        return Err(VolumeError::Symlink(host_path.to_path_buf()));
    }
    if t.is_file() {
        let (meta, data) = read_file(host_path, budget)?;
        return Ok(VolumeSource::Copied {
            source: base.clone(),
            files: vec![volume_file(base, &meta, data)],
        });
    }
    if !t.is_dir() {
        return Err(VolumeError::Unsupported {
            path: host_path.to_path_buf(),
            kind: kind_of(t),
        });
    }
    let mut files = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(host_path.to_path_buf(), base.clone())];
    while let Some((dir, guest_dir)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io_err("list", &dir))?;
        let mut entries: Vec<_> = entries
            .collect::<Result<_, _>>()
            .map_err(io_err("list", &dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!("skipping {}: not a UTF-8 name", path.display());
                continue;
            };
            let guest = format!("{guest_dir}/{name}");
            let t = entry.file_type().map_err(io_err("inspect", &path))?;
            if t.is_symlink() {
                tracing::warn!(
                    "skipping symlink {} in a mounted host directory: not followed",
                    path.display()
                );
            } else if t.is_dir() {
                stack.push((path, guest));
            } else if t.is_file() {
                let (meta, data) = read_file(&path, budget)?;
                files.push(volume_file(guest, &meta, data));
            } else {
                tracing::warn!(
                    "skipping {} ({}) in a mounted host directory",
                    path.display(),
                    kind_of(t)
                );
            }
        }
    }
    if files.is_empty() {
        return Ok(VolumeSource::Empty);
    }
    Ok(VolumeSource::Copied {
        source: base,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_directories_are_copied_without_symlinks() {
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
            }
            other => panic!("{other:?}"),
        }

        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(vol.join("empty")).unwrap();
        std::fs::write(vol.join("a"), "A").unwrap();
        std::fs::write(vol.join("sub/deeper/b"), "B").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", vol.join("evil")).unwrap();
        std::os::unix::fs::symlink("a", vol.join("inner")).unwrap();
        nix::unistd::mkfifo(&vol.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut budget = Budget::default();
        match collect("c1", 2, &vol, &mut budget).unwrap() {
            VolumeSource::Copied { source, files } => {
                assert_eq!(source, "/run/podvisor/volumes/c1/2");
                let mut paths: Vec<&str> = files.iter().map(|f| f.guest_path.as_str()).collect();
                paths.sort();
                assert_eq!(
                    paths,
                    [
                        "/run/podvisor/volumes/c1/2/a",
                        "/run/podvisor/volumes/c1/2/sub/deeper/b"
                    ]
                );
            }
            other => panic!("{other:?}"),
        }

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&vol, &link).unwrap();
        assert!(matches!(
            collect("c1", 3, &link, &mut Budget::default()),
            Err(VolumeError::Symlink(_))
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
