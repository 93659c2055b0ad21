//! The pod's shared directory: `<pod dir>/share`, served to the guest by the VMM's virtio-fs
//! device (tag [`SHARE_TAG`]) and mounted by the agent at [`GUEST_SHARE_ROOT`].
//!
//! Every CRI mount of every container is bound (with what is mounted beneath it) at
//! `share/<container id>/<n>` on the host, read-only on the host too where asked, always
//! `nosuid,nodev`. The share itself is a shared mount, and the VMM's jail holds it as a
//! slave, so a container created after the VM started finds its volumes in the guest.
//! Propagation: a `Private` mount is made private once bound; `HostToContainer` a slave, so
//! what the host mounts beneath the host path later appears in the container too.
//!
//! Host paths come from kubelet, which podvisor trusts as containerd does: a symlink is
//! resolved once, and a missing path is created as a directory (containerd does the same).
//! The guest never names a host path: it sees only what is bound.
//!
//! Teardown unmounts everything beneath the share (deepest first, never following a
//! symlink) and removes only the mount points podvisord made, one level at a time: a mount
//! point that is still busy is an error, never a reason to delete what it shows.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::error::{VmmError, file_err};
use super::idmap::{BindAttrs, IdMap, bind_tree};

/// The share's directory name in the pod directory.
pub const SHARE_DIR: &str = "share";
/// The tag the guest mounts the share by.
pub const SHARE_TAG: &str = "podvisor";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE_ROOT: &str = "/run/podvisor/share";

/// How a volume's later host mounts reach the container (CRI `MountPropagation`, without
/// `Bidirectional`: nothing the guest mounts can reach the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// What the host mounts beneath the path later does not appear.
    #[default]
    Private,
    /// What the host mounts beneath the path later appears in the container too.
    HostToContainer,
}

/// One host path to give a container.
#[derive(Debug, Clone)]
pub struct Volume {
    /// The host path (from kubelet).
    pub host_path: PathBuf,
    /// Read-only, on the host side too.
    pub readonly: bool,
    /// Propagation of later host mounts.
    pub propagation: Propagation,
}

/// A volume as bound into the share: where the guest finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVolume {
    /// The guest path to bind into the container (`GUEST_SHARE_ROOT/<id>/<n>`).
    pub guest_path: String,
}

/// The share of the pod directory `dir`.
pub fn share_dir(dir: &Path) -> PathBuf {
    dir.join(SHARE_DIR)
}

/// Creates the pod's share (mode 0755, root's) and makes it a shared mount of its own.
/// Idempotent: an existing share is kept.
pub fn create_share(dir: &Path) -> Result<PathBuf, VmmError> {
    let share = share_dir(dir);
    match std::fs::DirBuilder::new().mode(0o755).create(&share) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(file_err("create share", &share)(e)),
    }
    let meta = share
        .symlink_metadata()
        .map_err(file_err("inspect share", &share))?;
    if !meta.is_dir() {
        return Err(VmmError::NotADirectory(share));
    }
    if !is_mount_point(&share)? {
        mount(
            Some(&share),
            &share,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(mount_err("bind the share onto itself", &share))?;
    }
    mount(
        None::<&str>,
        &share,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(mount_err("make the share a shared mount", &share))?;
    Ok(share)
}

/// Binds the volumes of container `id` into the share of pod directory `dir`; returns
/// where the guest finds each, in order. On error nothing of this container is left bound.
pub fn bind_volumes(
    dir: &Path,
    id: &str,
    volumes: &[Volume],
    idmap: Option<&IdMap>,
) -> Result<Vec<SharedVolume>, VmmError> {
    check_id(id)?;
    let base = share_dir(dir).join(id);
    match std::fs::DirBuilder::new().mode(0o755).create(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(file_err("create", &base)(e)),
    }
    let mut out = Vec::with_capacity(volumes.len());
    for (n, v) in volumes.iter().enumerate() {
        match bind_one(&base.join(n.to_string()), v, idmap) {
            Ok(()) => out.push(SharedVolume {
                guest_path: format!("{GUEST_SHARE_ROOT}/{id}/{n}"),
            }),
            Err(e) => {
                if let Err(undo) = unbind_volumes(dir, id) {
                    tracing::warn!(container = id, "undoing its volume binds: {undo}");
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Unbinds the volumes of container `id` and removes their mount points. Nothing bound is
/// not an error.
pub fn unbind_volumes(dir: &Path, id: &str) -> Result<(), VmmError> {
    check_id(id)?;
    let base = share_dir(dir).join(id);
    unmount_beneath(&base)?;
    remove_mount_points(&base)
}

/// Unmounts everything of the share of pod directory `dir`, the share itself included,
/// and removes the mount points. Call it before the pod directory is removed: afterwards
/// no host path is reachable through it.
pub fn remove_share(dir: &Path) -> Result<(), VmmError> {
    let share = share_dir(dir);
    match share.symlink_metadata() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err("inspect share", &share)(e)),
    }
    unmount_beneath(&share)?;
    if let Ok(entries) = std::fs::read_dir(&share) {
        for e in entries.flatten() {
            remove_mount_points(&e.path())?;
        }
    }
    match std::fs::remove_dir(&share) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("remove share", &share)(e)),
    }
}

/// Container ids name directories of the share: plain names only.
fn check_id(id: &str) -> Result<(), VmmError> {
    let plain = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(VmmError::ShareId(id.to_string()))
    }
}

fn mount_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::errno::Errno) -> VmmError + 'a {
    move |e| file_err(what, path)(io::Error::from(e))
}

/// Binds the host path of `v` at `target` (created: a directory or an empty file, as the
/// host path is), through `idmap` (see [`super::idmap`]).
fn bind_one(target: &Path, v: &Volume, idmap: Option<&IdMap>) -> Result<(), VmmError> {
    let source = open_host_path(&v.host_path)?;
    let meta = source
        .metadata()
        .map_err(file_err("inspect", &v.host_path))?;
    if meta.is_dir() {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(target)
            .map_err(file_err("create mount point", target))?;
    } else if meta.is_file() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map_err(file_err("create mount point", target))?;
    } else {
        return Err(VmmError::VolumeKind(v.host_path.clone()));
    }
    let propagation = match v.propagation {
        Propagation::Private => MsFlags::MS_PRIVATE,
        Propagation::HostToContainer => MsFlags::MS_SLAVE,
    };
    let attrs = BindAttrs {
        readonly: v.readonly,
        propagation: propagation.bits(),
    };
    let mapped =
        bind_tree(&source, target, attrs, idmap).map_err(file_err("bind", &v.host_path))?;
    if idmap.is_some() && !mapped {
        tracing::warn!(
            host_path = %v.host_path.display(),
            "the volume's file system cannot be id-mapped: the guest acts on it as the VMM's \
             user"
        );
    }
    Ok(())
}

/// Opens a host path from kubelet: a symlink is resolved once (kubelet is trusted, as
/// containerd trusts it), a missing path is created as a directory (0755), as containerd
/// does.
fn open_host_path(host: &Path) -> Result<File, VmmError> {
    if !host.is_absolute() {
        return Err(VmmError::NotAbsolute(host.to_path_buf()));
    }
    let resolved = match host.symlink_metadata() {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(host).map_err(file_err("resolve symlink", host))?
        }
        Ok(_) => host.to_path_buf(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(host)
                .map_err(file_err("create host path", host))?;
            host.to_path_buf()
        }
        Err(e) => return Err(file_err("inspect", host)(e)),
    };
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&resolved)
        .map_err(file_err("open", &resolved))
}

/// Whether `path` is a mount point of this mount namespace.
fn is_mount_point(path: &Path) -> Result<bool, VmmError> {
    Ok(mounts_beneath(path)?.iter().any(|m| m == path))
}

/// The mount points at or beneath `path` (from /proc/self/mountinfo), deepest first.
fn mounts_beneath(path: &Path) -> Result<Vec<PathBuf>, VmmError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(file_err("read", Path::new("/proc/self/mountinfo")))?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(path))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or beneath `path`, deepest first, and checks none is left.
fn unmount_beneath(path: &Path) -> Result<(), VmmError> {
    for m in mounts_beneath(path)? {
        match umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(mount_err("unmount", &m)(e)),
        }
    }
    if let Some(left) = mounts_beneath(path)?.into_iter().next() {
        return Err(VmmError::StillMounted(left));
    }
    Ok(())
}

/// Removes the mount points podvisord made in `base` (`base/<n>`, empty directories or
/// files) and `base` itself, one level only: something else there is left and reported.
fn remove_mount_points(base: &Path) -> Result<(), VmmError> {
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return std::fs::remove_file(base).map_err(file_err("remove", base));
        }
        Err(e) => return Err(file_err("read", base)(e)),
    };
    for e in entries.flatten() {
        let p = e.path();
        let removed = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir(&p),
            _ => std::fs::remove_file(&p),
        };
        removed.map_err(file_err("remove mount point", &p))?;
    }
    match std::fs::remove_dir(base) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("remove", base)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn container_ids_must_be_plain() {
        assert!(check_id("abc-123_x").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    /// Binds a directory and a file, read-only and read-write, then tears everything down:
    /// the host files are still there, nothing is left mounted.
    #[test]
    fn volumes_are_bound_and_torn_down_without_touching_the_host() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let host = tempfile::tempdir().expect("tempdir");
        let data = host.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join("keep"), b"host file").expect("write");
        let file = host.path().join("termination-log");
        std::fs::write(&file, b"").expect("write");
        let pod = tempfile::tempdir().expect("pod dir");
        let share = create_share(pod.path()).expect("share");
        assert!(is_mount_point(&share).expect("mountinfo"));
        let volumes = [
            Volume {
                host_path: data.clone(),
                readonly: true,
                propagation: Propagation::Private,
            },
            Volume {
                host_path: file.clone(),
                readonly: false,
                propagation: Propagation::HostToContainer,
            },
            Volume {
                host_path: host.path().join("created/by/us"),
                readonly: false,
                propagation: Propagation::Private,
            },
        ];
        let idmap = IdMap::new(999, 995, 1 << 30).expect("user namespace");
        let shared = bind_volumes(pod.path(), "c1", &volumes, Some(&idmap)).expect("bind");
        assert_eq!(shared[1].guest_path, format!("{GUEST_SHARE_ROOT}/c1/1"));
        assert_eq!(
            std::fs::read(share.join("c1/0/keep")).expect("read through the bind"),
            b"host file"
        );
        // Through the id map, root's file is the VMM user's.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(share.join("c1/0/keep")).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (999, 995));
        let ro = std::fs::write(share.join("c1/0/new"), b"x").expect_err("read-only bind");
        assert_eq!(ro.raw_os_error(), Some(libc::EROFS));
        std::fs::write(share.join("c1/1"), b"done\n").expect("write the file bind");
        assert_eq!(std::fs::read(&file).expect("host file"), b"done\n");
        assert!(host.path().join("created/by/us").is_dir());
        // A bad volume undoes the container's binds.
        let bad = [
            volumes[0].clone(),
            Volume {
                host_path: "relative".into(),
                readonly: false,
                propagation: Propagation::Private,
            },
        ];
        assert!(bind_volumes(pod.path(), "c2", &bad, None).is_err());
        assert!(!share.join("c2").exists());
        unbind_volumes(pod.path(), "c1").expect("unbind");
        assert!(!share.join("c1").exists());
        remove_share(pod.path()).expect("remove share");
        assert!(!share.exists());
        assert!(mounts_beneath(pod.path()).expect("mountinfo").is_empty());
        assert_eq!(
            std::fs::read(data.join("keep")).expect("host file"),
            b"host file"
        );
    }
}
