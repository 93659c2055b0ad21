//! The pod directory on disk: created private, its stale sockets cleared before a launch,
//! its files opened without following symlinks, and removed once the VMM has ended.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::error::{VmmError, file_err};

/// Creates the pod directory (mode 0700) unless it exists; refuses anything but a directory.
pub(super) fn create_pod_dir(dir: &Path) -> Result<(), VmmError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(file_err("create directory", parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = dir
                .symlink_metadata()
                .map_err(file_err("inspect pod directory", dir))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(VmmError::NotADirectory(dir.to_path_buf()))
            }
        }
        Err(e) => Err(file_err("create pod directory", dir)(e)),
    }
}

/// Removes a socket left by an earlier VMM of this pod; the VMM refuses to bind over one.
/// A socket someone still serves is an error: two VMMs must never share a pod directory.
pub(super) fn clear_stale_socket(path: &Path) -> Result<(), VmmError> {
    let meta = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err("inspect", path)(e)),
    };
    if meta.file_type().is_socket() && UnixStream::connect(path).is_ok() {
        return Err(VmmError::SocketInUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("remove stale socket", path)(e)),
    }
}

/// Opens a file of the pod directory for writing without following a symlink.
pub(super) fn open_for_write(path: &Path, append: bool, mode: u32) -> Result<File, VmmError> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).mode(mode);
    if append {
        o.append(true);
    } else {
        o.truncate(true);
    }
    o.custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(file_err("open", path))
}

/// Removes a pod directory and everything in it without following a symlink: a symlink in it
/// is removed, not what it points to, and a symlink in place of the directory is removed
/// itself. Nothing there is not an error. Only for a directory no VMM runs in any more.
pub fn remove_pod_dir(dir: &Path) -> Result<(), VmmError> {
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err("inspect pod directory", dir)(e)),
    };
    let removed = if meta.is_dir() {
        // The share first: remove_dir_all would otherwise walk into the volumes bound there
        // and delete host files. Nothing is removed while anything is still mounted.
        super::share::remove_share(dir)?;
        // std's remove_dir_all opens every level with O_NOFOLLOW and unlinks relative to it.
        std::fs::remove_dir_all(dir)
    } else {
        tracing::warn!(
            "pod directory {} is not a directory; removing it",
            dir.display()
        );
        std::fs::remove_file(dir)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("remove pod directory", dir)(e)),
    }
}
