//! The VMM's jail ([`JailConfig`]), in two steps as Firecracker's jailer and the VMM's own
//! privilege drop do it:
//!
//! - [`enter`], first thing, while still root: a mount namespace of its own whose root is an
//!   empty tmpfs mounted on the pod directory. It holds the pod directory itself at
//!   [`JAIL_POD_DIR`] (read-write, `nosuid,nodev,noexec`), each bind of the configuration
//!   (read-only unless asked otherwise, also `nosuid,nodev,noexec`) and `/dev/kvm` and
//!   `/dev/net/tun`, owned by the jail's user. Everything else of the host is unmounted; the
//!   root is then made read-only. Every host path is opened `O_PATH|O_NOFOLLOW` before
//!   anything is mounted, and bound from that descriptor, so no symlink is followed.
//! - [`drop_user`], once the VM is built (KVM, the TAP and every file open) and before any
//!   guest code runs: the bounding set emptied, no supplementary group, the jail's gid and
//!   uid for real, effective and saved ids, and not dumpable (no other process of that user
//!   may ptrace it or read its memory through /proc).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chown};
use podvisor_vmm_api::config::{JAIL_POD_DIR, JailBind, JailConfig};

/// The jail's own files: its mount points and device nodes. Small and fixed: nothing in
/// the jail is written but through a bind.
const JAIL_TMPFS_OPTIONS: &str = "mode=0755,size=64k,nr_inodes=128";
/// The device nodes the VMM opens while it builds the VM.
const DEVICES: [&str; 2] = ["/dev/kvm", "/dev/net/tun"];

/// Why the jail could not be set up. The VMM ends: it never runs unjailed when asked to be.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed.
    #[error("jail: {what} {}", path.display())]
    Step {
        /// The step.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The system's answer.
        #[source]
        source: io::Error,
    },
    /// A jail path that is not absolute, has `..` or `.`, or is the root, `/dev` or the pod
    /// directory's place.
    #[error("jail path {} must be absolute, plain, and not /, /dev or {JAIL_POD_DIR}", .0.display())]
    BadPath(PathBuf),
    /// A changed id did not hold.
    #[error("jail: still uid {uid} gid {gid} after the drop to {want_uid}:{want_gid}")]
    NotDropped {
        /// The uid after the drop.
        uid: u32,
        /// The gid after the drop.
        gid: u32,
        /// The jail's uid.
        want_uid: u32,
        /// The jail's gid.
        want_gid: u32,
    },
}

fn step<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Step {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_step<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> JailError + 'a {
    move |e| step(what, path)(io::Error::from(e))
}

/// A host file or directory opened `O_PATH|O_NOFOLLOW`, to be bound at `jail`.
struct Source {
    file: File,
    host: PathBuf,
    jail: PathBuf,
    is_dir: bool,
    writable: bool,
}

impl Source {
    /// Opens `bind.host` (its jail path was checked with the others before anything else).
    fn open(bind: &JailBind) -> Result<Self, JailError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&bind.host)
            .map_err(step("open", &bind.host))?;
        let meta = file.metadata().map_err(step("inspect", &bind.host))?;
        if !(meta.is_dir() || meta.is_file()) {
            return Err(step("bind (not a file or directory)", &bind.host)(
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        Ok(Self {
            file,
            host: bind.host.clone(),
            jail: bind.jail.clone(),
            is_dir: meta.is_dir(),
            writable: bind.writable,
        })
    }

    /// `/proc/self/fd/N`: mounting it binds what the descriptor holds, not a path.
    fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

fn check_jail_path(p: &Path) -> Result<(), JailError> {
    let mut parts = p.components();
    let plain = parts.next() == Some(Component::RootDir)
        && p.components().count() > 1
        && parts.all(|c| matches!(c, Component::Normal(_)));
    let reserved = p == Path::new("/dev") || p.starts_with("/dev/") || p == Path::new(JAIL_POD_DIR);
    if plain && !reserved {
        Ok(())
    } else {
        Err(JailError::BadPath(p.to_path_buf()))
    }
}

/// Enters the jail (see the module docs). On return the process's root is the jail's.
pub fn enter(jail: &JailConfig) -> Result<(), JailError> {
    // What the VMM learns of the host from /sys, read while /sys is still there.
    crate::boot::cmdline::host_is_pvm();
    for b in &jail.binds {
        check_jail_path(&b.jail)?;
    }
    let devices = DEVICES
        .iter()
        .map(|d| {
            let meta = std::fs::metadata(d).map_err(step("inspect", Path::new(d)))?;
            Ok((*d, meta))
        })
        .collect::<Result<Vec<_>, JailError>>()?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(nix_step("unshare the mount namespace", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(nix_step("make mounts private", Path::new("/")))?;
    // Opened in the new namespace (a mount of another namespace cannot be bound), before
    // the tmpfs covers the pod directory.
    let pod = Source::open(&JailBind {
        host: jail.root.clone(),
        jail: PathBuf::from(JAIL_POD_DIR),
        writable: true,
    })?;
    if !pod.is_dir {
        return Err(step("jail root (not a directory)", &jail.root)(
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    let sources = jail
        .binds
        .iter()
        .map(Source::open)
        .collect::<Result<Vec<_>, _>>()?;

    let root = &jail.root;
    mount(
        Some("podvisor-jail"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(JAIL_TMPFS_OPTIONS),
    )
    .map_err(nix_step("mount the jail's tmpfs on", root))?;
    for source in std::iter::once(&pod).chain(&sources) {
        bind(root, source)?;
    }
    for (dev, meta) in devices {
        make_device(root, dev, &meta, jail)?;
    }
    pivot(root)
}

/// `root` joined with the absolute jail path `p`.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Creates the directories above `target` in the jail's tmpfs.
fn create_parent(target: &Path) -> Result<(), JailError> {
    match target.parent() {
        Some(parent) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(step("create", parent)),
        None => Ok(()),
    }
}

/// Creates the mount point of `source` in the jail's tmpfs and binds it there.
fn bind(root: &Path, source: &Source) -> Result<(), JailError> {
    let target = inside(root, &source.jail);
    create_parent(&target)?;
    if source.is_dir {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&target)
            .map_err(step("create mount point", &target))?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&target)
            .map_err(step("create mount point", &target))?;
    }
    mount(
        Some(&source.proc_path()),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(nix_step("bind", &source.host))?;
    let mut flags = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if !source.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(nix_step("restrict the bind of", &source.host))
}

/// A device node in the jail with the host node's numbers, owned by the jail's user, 0600.
fn make_device(
    root: &Path,
    dev: &str,
    meta: &std::fs::Metadata,
    jail: &JailConfig,
) -> Result<(), JailError> {
    let host = Path::new(dev);
    if !meta.file_type().is_char_device() {
        return Err(step("device (not a character device)", host)(
            io::Error::from_raw_os_error(libc::ENODEV),
        ));
    }
    let target = inside(root, host);
    create_parent(&target)?;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    mknod(
        &target,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major.into(), minor.into()),
    )
    .map_err(nix_step("create device", &target))?;
    chown(
        &target,
        Some(Uid::from_raw(jail.uid)),
        Some(Gid::from_raw(jail.gid)),
    )
    .map_err(nix_step("hand over device", &target))
}

/// Makes `root` the process's root, unmounts everything of the host and makes the jail's
/// own tmpfs read-only.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(step("enter", root))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one, and the lazy
    // unmount of "." then detaches it (runc does the same).
    nix::unistd::pivot_root(".", ".").map_err(nix_step("pivot_root into", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(nix_step("detach the host's root", root))?;
    std::env::set_current_dir("/").map_err(step("enter", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(nix_step("make the jail's root read-only", Path::new("/")))
}

/// Runs the process as the jail's user from now on (see the module docs). Call it while
/// the process has one thread: set*id changes all threads through a signal otherwise.
pub fn drop_user(jail: &JailConfig) -> Result<(), JailError> {
    let id = Path::new("ids");
    podvisor_common::caps::drop_bounding(0, 63)
        .map_err(|e| step("drop the bounding set", id)(io::Error::from_raw_os_error(e)))?;
    nix::unistd::setgroups(&[]).map_err(nix_step("clear supplementary groups", id))?;
    let (uid, gid) = (Uid::from_raw(jail.uid), Gid::from_raw(jail.gid));
    nix::unistd::setresgid(gid, gid, gid).map_err(nix_step("set gid", id))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(nix_step("set uid", id))?;
    let now = (nix::unistd::getuid(), nix::unistd::getgid());
    if now != (uid, gid) || nix::unistd::geteuid() != uid || nix::unistd::getegid() != gid {
        return Err(JailError::NotDropped {
            uid: now.0.as_raw(),
            gid: now.1.as_raw(),
            want_uid: jail.uid,
            want_gid: jail.gid,
        });
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(step("make undumpable", id)(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_paths_must_be_plain() {
        for good in ["/boot/kernel", "/restore/mem", "/drives/img0"] {
            assert!(check_jail_path(Path::new(good)).is_ok(), "{good}");
        }
        for bad in ["boot/kernel", "/", "/dev", "/dev/kvm", "/pod", "/a/../etc"] {
            assert!(
                matches!(check_jail_path(Path::new(bad)), Err(JailError::BadPath(_))),
                "{bad}"
            );
        }
    }
}
