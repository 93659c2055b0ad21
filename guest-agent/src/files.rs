//! CopyFile: writing files beneath an allowed root without following symlinks.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod};
use nix::unistd::{UnlinkatFlags, fchown, unlinkat};
use podvisor_proto::v1::CopyFileRequest;

use crate::safepath::{self, PathError};

#[derive(Debug, thiserror::Error)]
pub enum CopyFileError {
    #[error("invalid mode {0:#o}")]
    Mode(u32),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("parent directory of {0:?} does not exist (set create_parents)")]
    NoParent(String),
    #[error("{op} {path:?}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<CopyFileError> for tonic::Status {
    fn from(e: CopyFileError) -> Self {
        let msg = format!("copy file: {}", podvisor_common::error_chain(&e));
        match &e {
            CopyFileError::Mode(_) => tonic::Status::invalid_argument(msg),
            CopyFileError::Path(p) if p.is_invalid_argument() => {
                tonic::Status::invalid_argument(msg)
            }
            CopyFileError::NoParent(_) => tonic::Status::failed_precondition(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// Writes `req.contents` to `req.path`, which must lie beneath one of `roots`.
pub fn copy_file(roots: &[PathBuf], req: &CopyFileRequest) -> Result<(), CopyFileError> {
    if req.mode & !0o7777 != 0 {
        return Err(CopyFileError::Mode(req.mode));
    }
    let (root, rel) = safepath::split_beneath(roots, &req.path)?;
    let rootfd = openat(
        AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| CopyFileError::Io {
        op: "open root",
        path: root.display().to_string(),
        source: e.into(),
    })?;
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let Some(name) = rel.file_name() else {
        return Err(PathError::Escape {
            path: req.path.clone(),
        }
        .into());
    };
    let owner = Some((req.uid, req.gid));
    let parent = if req.create_parents {
        let dir_mode = if req.dir_mode == 0 {
            0o755
        } else {
            req.dir_mode & 0o7777
        };
        safepath::mkdir_all_beneath(
            &rootfd,
            parent_rel,
            Mode::from_bits_truncate(dir_mode),
            owner,
        )?
    } else {
        match safepath::open_beneath(
            &rootfd,
            parent_rel,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        ) {
            Err(PathError::Io {
                source: nix::errno::Errno::ENOENT,
                ..
            }) => {
                return Err(CopyFileError::NoParent(req.path.clone()));
            }
            r => r?,
        }
    };
    let io = |op: &'static str| {
        let path = req.path.clone();
        move |source: nix::Error| CopyFileError::Io {
            op,
            path,
            source: source.into(),
        }
    };
    let mode = Mode::from_bits_truncate(req.mode);
    let tmp_name;
    let target_name: &std::ffi::OsStr = if req.atomic {
        tmp_name = format!(".{}.podvisor-tmp", name.to_string_lossy());
        std::ffi::OsStr::new(&tmp_name)
    } else {
        name
    };
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT;
    if req.atomic {
        // A stale temporary file from an earlier failed attempt is replaced.
        let _ = unlinkat(&parent, target_name, UnlinkatFlags::NoRemoveDir);
        flags |= OFlag::O_EXCL;
    } else {
        flags |= OFlag::O_TRUNC;
    }
    let fd = safepath::open_beneath(&parent, Path::new(target_name), flags, mode)?;
    fchmod(fd.as_fd(), mode).map_err(io("chmod"))?;
    fchown(fd.as_fd(), Some(req.uid.into()), Some(req.gid.into())).map_err(io("chown"))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&req.contents)
        .and_then(|()| file.sync_data())
        .map_err(|source| CopyFileError::Io {
            op: "write",
            path: req.path.clone(),
            source,
        })?;
    if req.atomic {
        renameat(&parent, target_name, &parent, name).map_err(io("rename"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str) -> CopyFileRequest {
        CopyFileRequest {
            path: path.into(),
            mode: 0o640,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            contents: b"hello".to_vec(),
            atomic: true,
            create_parents: true,
            dir_mode: 0o750,
        }
    }

    #[test]
    fn copies_beneath_root_and_refuses_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("volumes");
        std::fs::create_dir_all(&vol).expect("mkdir");
        std::os::unix::fs::symlink(dir.path(), vol.join("link")).expect("symlink");
        let roots = vec![vol.clone()];
        let p = |s: &str| format!("{}/{s}", vol.display());

        copy_file(&roots, &req(&p("v1/sub/config.yaml"))).expect("copy");
        assert_eq!(
            std::fs::read(vol.join("v1/sub/config.yaml")).expect("read"),
            b"hello"
        );
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(vol.join("v1/sub/config.yaml")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        // Replace atomically and non-atomically.
        let mut r = req(&p("v1/sub/config.yaml"));
        r.contents = b"second".to_vec();
        copy_file(&roots, &r).expect("replace");
        r.atomic = false;
        r.contents = b"3".to_vec();
        copy_file(&roots, &r).expect("overwrite");
        assert_eq!(
            std::fs::read(vol.join("v1/sub/config.yaml")).expect("read"),
            b"3"
        );

        for bad in [
            p("../escape"),
            p("link/escape"),
            "/etc/podvisor-test".to_owned(),
            "relative".to_owned(),
        ] {
            let e = copy_file(&roots, &req(&bad)).expect_err(&bad);
            let status = tonic::Status::from(e);
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{bad}: {status:?}"
            );
        }
        assert!(!dir.path().join("escape").exists());

        let mut r = req(&p("nodir/f"));
        r.create_parents = false;
        let status = tonic::Status::from(copy_file(&roots, &r).expect_err("no parent"));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let mut r = req(&p("f"));
        r.mode = 0o100644;
        let status = tonic::Status::from(copy_file(&roots, &r).expect_err("mode"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
