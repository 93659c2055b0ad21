//! Path handling that cannot escape a root: lexical checks for request paths plus kernel-enforced
//! resolution with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, falling back to a
//! component-wise `O_NOFOLLOW` walk on kernels without openat2.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, mkdirat};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path {0:?} is empty")]
    Empty(String),
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} contains a '..' component")]
    DotDot(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {path:?} is not beneath {root:?}")]
    NotBeneath { path: String, root: String },
    #[error("{path:?} escapes its root or crosses a symlink")]
    Escape { path: String },
    #[error("{op} {path:?}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: Errno,
    },
}

impl PathError {
    /// True for errors caused by the request rather than by the system.
    pub fn is_invalid_argument(&self) -> bool {
        !matches!(self, PathError::Io { .. })
    }
}

/// Checks that `p` is absolute and has no `..` and returns its normal components joined as a
/// relative path (`/a/./b/` → `a/b`).
pub fn relative_components(p: &str) -> Result<PathBuf, PathError> {
    if p.is_empty() {
        return Err(PathError::Empty(p.to_owned()));
    }
    if p.contains('\0') {
        return Err(PathError::Nul(p.to_owned()));
    }
    if !p.starts_with('/') {
        return Err(PathError::NotAbsolute(p.to_owned()));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(PathError::DotDot(p.to_owned())),
            Component::Normal(n) => rel.push(n),
            Component::Prefix(_) => return Err(PathError::NotAbsolute(p.to_owned())),
        }
    }
    Ok(rel)
}

/// Splits an absolute path into (root, relative path beneath it) for the first root it lies
/// beneath.
pub fn split_beneath<'a>(roots: &'a [PathBuf], p: &str) -> Result<(&'a Path, PathBuf), PathError> {
    let rel_from_slash = relative_components(p)?;
    let abs = Path::new("/").join(&rel_from_slash);
    for root in roots {
        if let Ok(rest) = abs.strip_prefix(root)
            && !rest.as_os_str().is_empty()
        {
            return Ok((root.as_path(), rest.to_path_buf()));
        }
    }
    Err(PathError::NotBeneath {
        path: p.to_owned(),
        root: roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> PathError + 'a {
    move |source| match source {
        Errno::EXDEV | Errno::ELOOP => PathError::Escape {
            path: path.display().to_string(),
        },
        _ => PathError::Io {
            op,
            path: path.display().to_string(),
            source,
        },
    }
}

/// Opens `rel` beneath `root` without following any symlink and without leaving `root`.
/// `flags` are the open flags (O_CLOEXEC is always added).
pub fn open_beneath<Fd: AsFd>(
    root: Fd,
    rel: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, PathError> {
    let rel_for_err = rel;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match openat2(root.as_fd(), rel, how) {
        Err(Errno::ENOSYS) => walk_nofollow(root, rel, flags, mode),
        r => r.map_err(io("open", rel_for_err)),
    }
}

/// Fallback for kernels without openat2: open each directory component with O_NOFOLLOW.
fn walk_nofollow<Fd: AsFd>(
    root: Fd,
    rel: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, PathError> {
    let comps: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::CurDir => None,
            _ => Some(Err(())),
        })
        .collect::<Result<_, ()>>()
        .map_err(|()| PathError::Escape {
            path: rel.display().to_string(),
        })?;
    let dirflags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut cur = openat(root.as_fd(), ".", dirflags, Mode::empty()).map_err(io("open", rel))?;
    let Some((last, dirs)) = comps.split_last() else {
        return openat(root.as_fd(), ".", flags | OFlag::O_CLOEXEC, mode).map_err(io("open", rel));
    };
    for d in dirs {
        cur = openat(&cur, *d, dirflags, Mode::empty()).map_err(io("open", rel))?;
    }
    openat(
        &cur,
        *last,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )
    .map_err(io("open", rel))
}

/// Creates every missing directory of `rel` beneath `root` (mode `mode`, chowned to `owner` when
/// given) and returns an O_PATH descriptor of the last one. Never follows symlinks.
pub fn mkdir_all_beneath<Fd: AsFd>(
    root: Fd,
    rel: &Path,
    mode: Mode,
    owner: Option<(u32, u32)>,
) -> Result<OwnedFd, PathError> {
    let dirflags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let mut cur = open_beneath(root.as_fd(), Path::new("."), dirflags, Mode::empty())?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            if c == Component::CurDir {
                continue;
            }
            return Err(PathError::Escape {
                path: rel.display().to_string(),
            });
        };
        match mkdirat(&cur, name, mode) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    nix::unistd::fchownat(
                        &cur,
                        name,
                        Some(uid.into()),
                        Some(gid.into()),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(io("chown", rel))?;
                }
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(io("mkdir", rel)(e)),
        }
        cur = open_beneath(&cur, Path::new(name), dirflags, Mode::empty())?;
    }
    Ok(cur)
}

/// `/proc/self/fd/<n>`: a path naming exactly the file behind `fd` (for mount(2) targets).
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn lexical_checks() {
        assert_eq!(
            relative_components("/a/./b//c/").expect("ok"),
            Path::new("a/b/c")
        );
        assert!(matches!(
            relative_components("/a/../b"),
            Err(PathError::DotDot(_))
        ));
        assert!(matches!(
            relative_components("a/b"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(relative_components(""), Err(PathError::Empty(_))));
        assert!(matches!(
            relative_components("/a\0b"),
            Err(PathError::Nul(_))
        ));
    }

    #[test]
    fn split_beneath_picks_the_root() {
        let roots = [
            PathBuf::from("/run/x/sandbox"),
            PathBuf::from("/run/x/volumes"),
        ];
        let (root, rel) = split_beneath(&roots, "/run/x/volumes/v1/f").expect("ok");
        assert_eq!(root, Path::new("/run/x/volumes"));
        assert_eq!(rel, Path::new("v1/f"));
        assert!(split_beneath(&roots, "/run/x/volumes").is_err());
        assert!(split_beneath(&roots, "/run/x/volumesX/f").is_err());
        assert!(split_beneath(&roots, "/run/x/volumes/../sandbox2/f").is_err());
        assert!(split_beneath(&roots, "/etc/passwd").is_err());
    }

    #[test]
    fn symlinks_and_escapes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::write(root.join("a/b/f"), b"x").expect("write");
        std::os::unix::fs::symlink("/etc", root.join("evil")).expect("symlink");
        std::os::unix::fs::symlink("b", root.join("a/rel")).expect("symlink");
        let rootfd = openat(
            nix::fcntl::AT_FDCWD,
            &root,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .expect("open root");

        assert!(open_beneath(&rootfd, Path::new("a/b/f"), OFlag::O_RDONLY, Mode::empty()).is_ok());
        for bad in ["evil/passwd", "a/rel/f", "../root/a/b/f", "/etc/passwd"] {
            let e = open_beneath(&rootfd, Path::new(bad), OFlag::O_RDONLY, Mode::empty())
                .expect_err(bad);
            assert!(matches!(e, PathError::Escape { .. }), "{bad}: {e:?}");
        }
        // The fallback walk refuses the same paths.
        assert!(walk_nofollow(&rootfd, Path::new("a/b/f"), OFlag::O_RDONLY, Mode::empty()).is_ok());
        for bad in ["evil/passwd", "a/rel/f", "../root/a/b/f"] {
            assert!(
                walk_nofollow(&rootfd, Path::new(bad), OFlag::O_RDONLY, Mode::empty()).is_err(),
                "{bad}"
            );
        }
        // mkdir -p does not follow the symlink either.
        assert!(
            mkdir_all_beneath(
                &rootfd,
                Path::new("evil/x"),
                Mode::from_bits_truncate(0o755),
                None
            )
            .is_err()
        );
        assert!(!Path::new("/etc/x").exists());
        mkdir_all_beneath(
            &rootfd,
            Path::new("n/m"),
            Mode::from_bits_truncate(0o755),
            None,
        )
        .expect("mkdir -p");
        assert!(root.join("n/m").is_dir());
    }
}
