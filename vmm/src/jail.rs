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
//!
//! A jail with the pod's shared directory (virtio-fs) differs in three ways:
//!
//! - the share is bound at [`JAIL_SHARE_DIR`] with everything mounted beneath it, and the
//!   jail's mounts are slaves of the host's (not private), so the volumes podvisord mounts
//!   into the share later appear there too; nothing the VMM mounts reaches the host;
//! - a `/proc` of its own, `hidepid=invisible,subset=pid`: the passthrough file system
//!   reopens its descriptors through `/proc/self/fd`, and no other process shows there;
//! - instead of becoming the jail's user, the VMM enters a user namespace of its own whose
//!   root is that user on the host (ids 1..65536 map above `id_map_base`, so the guest's
//!   other users stay apart from every host user), keeping only the capabilities a file
//!   server needs ([`FS_CAPS`]) in that namespace. The host sees the jail's uid; the
//!   capabilities reach no file owned by an unmapped host id beyond what its mode allows.
//!   A helper forked while the VMM is still root writes the id maps, since a process
//!   cannot map ids other than its own into its own namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chown};
use podvisor_vmm_api::config::{JAIL_POD_DIR, JAIL_SHARE_DIR, JailBind, JailConfig};

/// The jail's own files: its mount points and device nodes. Small and fixed: nothing in
/// the jail is written but through a bind.
const JAIL_TMPFS_OPTIONS: &str = "mode=0755,size=64k,nr_inodes=128";
/// The device nodes the VMM opens while it builds the VM.
const DEVICES: [&str; 2] = ["/dev/kvm", "/dev/net/tun"];
/// The jail's own `/proc` (with a share): only the VMM's own process shows.
const JAIL_PROC: &str = "/proc";
const JAIL_PROC_OPTIONS: &str = "hidepid=invisible,subset=pid";

/// The capabilities a VMM serving a share keeps in its user namespace, as virtiofsd's
/// sandbox does: act as the guest's users (setresuid/setresgid per request), and what root
/// may do to files (owner, mode, set-id bits) — only on files of ids the namespace maps.
pub const FS_CAPS: u64 = (1 << CAP_CHOWN)
    | (1 << CAP_DAC_OVERRIDE)
    | (1 << CAP_FOWNER)
    | (1 << CAP_FSETID)
    | (1 << CAP_SETGID)
    | (1 << CAP_SETUID);
// capability(7) numbers (linux/capability.h; the libc crate has none).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

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
    /// Bind what is mounted beneath it too.
    recursive: bool,
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
            recursive: false,
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
    let reserved = p == Path::new("/dev")
        || p.starts_with("/dev/")
        || p == Path::new(JAIL_POD_DIR)
        || p.starts_with(JAIL_SHARE_DIR)
        || p.starts_with(JAIL_PROC);
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
    // Slaves, not private: the share's volumes mounted on the host later must reach the
    // jail (Firecracker's jailer makes its mounts slaves too).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(nix_step("make mounts slaves", Path::new("/")))?;
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
    let mut sources = jail
        .binds
        .iter()
        .map(Source::open)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(share) = &jail.share {
        let mut source = Source::open(&JailBind {
            host: share.clone(),
            jail: PathBuf::from(JAIL_SHARE_DIR),
            writable: true,
        })?;
        if !source.is_dir {
            return Err(step("share (not a directory)", share)(
                io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        source.recursive = true;
        sources.push(source);
    }

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
    if jail.share.is_some() {
        mount_proc(root)?;
    }
    pivot(root)
}

/// The jail's own `/proc`, showing no other process.
fn mount_proc(root: &Path) -> Result<(), JailError> {
    let target = inside(root, Path::new(JAIL_PROC));
    std::fs::DirBuilder::new()
        .mode(0o555)
        .create(&target)
        .map_err(step("create mount point", &target))?;
    mount(
        Some("proc"),
        &target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(JAIL_PROC_OPTIONS),
    )
    .map_err(nix_step("mount proc on", &target))
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
    let rec = if source.recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mount(
        Some(&source.proc_path()),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | rec,
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
/// the process has one thread: set*id changes all threads through a signal otherwise, and
/// a multithreaded process cannot enter a user namespace.
pub fn drop_user(jail: &JailConfig) -> Result<(), JailError> {
    if jail.share.is_some() {
        enter_user_namespace(jail)?;
    } else {
        become_user(jail)?;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(step("make undumpable", Path::new("ids"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The capabilities the VMM keeps once its VM is built: [`FS_CAPS`] when it serves a share
/// (in its user namespace when jailed; an unjailed VMM is root on the host), else none.
pub fn kept_caps(jail: Option<&JailConfig>, serves_share: bool) -> u64 {
    match jail {
        _ if !serves_share => 0,
        Some(j) if j.share.is_none() => 0,
        _ => FS_CAPS,
    }
}

/// The jail's uid and gid for real, effective and saved ids, no supplementary group.
fn become_user(jail: &JailConfig) -> Result<(), JailError> {
    let id = Path::new("ids");
    podvisor_common::caps::drop_bounding(0, 63)
        .map_err(|e| step("drop the bounding set", id)(io::Error::from_raw_os_error(e)))?;
    nix::unistd::setgroups(&[]).map_err(nix_step("clear supplementary groups", id))?;
    set_ids(Uid::from_raw(jail.uid), Gid::from_raw(jail.gid))
}

fn set_ids(uid: Uid, gid: Gid) -> Result<(), JailError> {
    let id = Path::new("ids");
    nix::unistd::setresgid(gid, gid, gid).map_err(nix_step("set gid", id))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(nix_step("set uid", id))?;
    let now = (nix::unistd::getuid(), nix::unistd::getgid());
    if now != (uid, gid) || nix::unistd::geteuid() != uid || nix::unistd::getegid() != gid {
        return Err(JailError::NotDropped {
            uid: now.0.as_raw(),
            gid: now.1.as_raw(),
            want_uid: uid.as_raw(),
            want_gid: gid.as_raw(),
        });
    }
    Ok(())
}

/// Root of a new user namespace mapped to the jail's user (see the module docs).
fn enter_user_namespace(jail: &JailConfig) -> Result<(), JailError> {
    let id = Path::new("user namespace");
    let (child_rx, parent_tx) = nix::unistd::pipe().map_err(nix_step("pipe", id))?;
    let (parent_rx, child_tx) = nix::unistd::pipe().map_err(nix_step("pipe", id))?;
    let uid_map = podvisor_vmm_api::config::id_map(jail.uid, jail.id_map_base);
    let gid_map = podvisor_vmm_api::config::id_map(jail.gid, jail.id_map_base);
    let parent = std::process::id();
    // SAFETY: the process has one thread (see drop_user), so the child may run any code;
    // it only reads a pipe, writes two proc files and leaves with _exit.
    match unsafe { nix::unistd::fork() }.map_err(nix_step("fork the id mapper", id))? {
        nix::unistd::ForkResult::Child => {
            drop((parent_tx, parent_rx));
            let code = map_ids(child_rx, child_tx, parent, &uid_map, &gid_map);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop((child_rx, child_tx));
            let unshared = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
                .map_err(nix_step("unshare the user namespace", id));
            let mut parent_tx = File::from(parent_tx);
            let mut parent_rx = File::from(parent_rx);
            // The child maps only once told; on error it reads end of file and leaves.
            let told = unshared.and_then(|()| {
                io::Write::write_all(&mut parent_tx, b"m").map_err(step("tell the id mapper", id))
            });
            drop(parent_tx);
            let mut answer = [0u8; 1];
            let answered = io::Read::read_exact(&mut parent_rx, &mut answer);
            let _ = nix::sys::wait::waitpid(child, None);
            told?;
            answered.map_err(step("hear from the id mapper", id))?;
            if answer != [0] {
                return Err(step("write the id maps of", id)(
                    io::Error::from_raw_os_error(i32::from(answer[0])),
                ));
            }
        }
    }
    nix::unistd::setgroups(&[]).map_err(nix_step("clear supplementary groups", id))?;
    set_ids(Uid::from_raw(0), Gid::from_raw(0))
}

/// The id mapper's work (in the forked child, still root on the host): waits for the
/// parent to have unshared its user namespace, writes its maps, answers 0 or the errno.
fn map_ids(
    rx: std::os::fd::OwnedFd,
    tx: std::os::fd::OwnedFd,
    parent: u32,
    uid_map: &str,
    gid_map: &str,
) -> i32 {
    let mut rx = File::from(rx);
    let mut tx = File::from(tx);
    let mut go = [0u8; 1];
    if io::Read::read_exact(&mut rx, &mut go).is_err() {
        return 1;
    }
    let write = |name: &str, map: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{JAIL_PROC}/{parent}/{name}"))
            .and_then(|mut f| io::Write::write_all(&mut f, map.as_bytes()))
    };
    let result = write("uid_map", uid_map).and_then(|()| write("gid_map", gid_map));
    let answer = match result {
        Ok(()) => 0u8,
        Err(e) => u8::try_from(e.raw_os_error().unwrap_or(libc::EIO)).unwrap_or(libc::EIO as u8),
    };
    match io::Write::write_all(&mut tx, &[answer]) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_paths_must_be_plain() {
        for good in ["/boot/kernel", "/restore/mem", "/drives/img0"] {
            assert!(check_jail_path(Path::new(good)).is_ok(), "{good}");
        }
        for bad in [
            "boot/kernel",
            "/",
            "/dev",
            "/dev/kvm",
            "/pod",
            "/a/../etc",
            "/share",
            "/share/x",
            "/proc/self",
        ] {
            assert!(
                matches!(check_jail_path(Path::new(bad)), Err(JailError::BadPath(_))),
                "{bad}"
            );
        }
    }
}
