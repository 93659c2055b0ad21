//! Container root file systems, prepared in the agent's mount namespace before the container's
//! process is cloned (the clone inherits a copy): the image block device mounted read-only once
//! and shared, an overlay per container with its upper layer on a tmpfs, /dev, /sys, the
//! sandbox's /etc files and the request's mounts. What needs the container's own namespaces
//! (/proc, masked and read-only paths, pivot_root) is done by the child, see `spawn`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, OFlag, openat};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknodat};
use podvisor_proto::v1::Mount;

use crate::safepath::{self, PathError};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("no block device with virtio serial {0:?}")]
    NoDevice(String),
    #[error("{device} shows {have} bytes, not the {want} of the image swapped in")]
    SizeMismatch {
        device: String,
        want: u64,
        have: u64,
    },
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl RootfsError {
    pub fn is_invalid_argument(&self) -> bool {
        match self {
            RootfsError::Invalid { .. } => true,
            RootfsError::Path(p) => p.is_invalid_argument(),
            _ => false,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn mnt(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootfsError> {
    mount(source, target, fstype, flags, data).map_err(|e| RootfsError::Mount {
        what: fstype
            .map(str::to_owned)
            .or_else(|| source.map(|s| s.display().to_string()))
            .unwrap_or_else(|| "remount".to_owned()),
        target: target.display().to_string(),
        source: e,
    })
}

/// Finds `/dev/vdX` whose `/sys/block/vdX/serial` is `serial`.
pub fn find_block_device(sys_block: &Path, serial: &str) -> Result<PathBuf, RootfsError> {
    if serial.is_empty()
        || serial.len() > 20
        || !serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(RootfsError::Invalid {
            what: "block device serial",
            value: serial.to_owned(),
        });
    }
    let entries = fs::read_dir(sys_block).map_err(io_err("read", sys_block))?;
    for e in entries.flatten() {
        let Ok(s) = fs::read_to_string(e.path().join("serial")) else {
            continue;
        };
        if s.trim_end_matches(['\n', '\0']) == serial {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(RootfsError::NoDevice(serial.to_owned()))
}

/// How long a hot-swapped drive may take to show its new size: the guest handles the VMM's
/// config-change interrupt in a workqueue, which is slow when guest kernel code is emulated.
const SWAP_SIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
const SWAP_SIZE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits (bounded) until `/dev/vdX` shows `want` bytes in `/sys/block/vdX/size`.
fn wait_for_size(dev: &Path, want: u64) -> Result<(), RootfsError> {
    let name = dev.file_name().unwrap_or_default();
    let size_file = Path::new("/sys/block").join(name).join("size");
    let deadline = std::time::Instant::now() + SWAP_SIZE_WAIT;
    loop {
        let sectors = fs::read_to_string(&size_file).map_err(io_err("read", &size_file))?;
        let have = sectors
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            .saturating_mul(512);
        if have == want {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(RootfsError::SizeMismatch {
                device: dev.display().to_string(),
                want,
                have,
            });
        }
        std::thread::sleep(SWAP_SIZE_POLL);
    }
}

nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Drops the device's cached blocks: after a hot swap they belong to the previous backing file
/// (the kernel read the partition table of whatever was attached at boot).
fn drop_cached_blocks(dev: &Path) -> Result<(), RootfsError> {
    let f = fs::File::open(dev).map_err(io_err("open", dev))?;
    // SAFETY: BLKFLSBUF takes no argument and acts on the open block device only.
    unsafe { blkflsbuf(f.as_raw_fd()) }.map_err(|e| RootfsError::Io {
        op: "flush buffers of",
        path: dev.display().to_string(),
        source: e.into(),
    })?;
    Ok(())
}

/// Read-only image mounts shared by the containers using them.
#[derive(Debug, Default)]
pub struct ImageMounts {
    mounts: HashMap<String, (PathBuf, usize)>,
}

impl ImageMounts {
    /// Mounts the ext4 image with virtio serial `serial` read-only under `images_dir` (once) and
    /// returns its mount point. `size_bytes` (non-zero when the host has just swapped the
    /// drive's backing file) is waited for before mounting.
    pub fn acquire(
        &mut self,
        images_dir: &Path,
        serial: &str,
        size_bytes: u64,
    ) -> Result<PathBuf, RootfsError> {
        if let Some((p, n)) = self.mounts.get_mut(serial) {
            *n += 1;
            return Ok(p.clone());
        }
        let dev = find_block_device(Path::new("/sys/block"), serial)?;
        if size_bytes > 0 {
            wait_for_size(&dev, size_bytes)?;
        }
        drop_cached_blocks(&dev)?;
        let target = images_dir.join(serial);
        fs::create_dir_all(&target).map_err(io_err("mkdir", &target))?;
        mnt(
            Some(&dev),
            &target,
            Some("ext4"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            Some("noload"),
        )?;
        self.mounts.insert(serial.to_owned(), (target.clone(), 1));
        Ok(target)
    }

    /// Drops one user; the last one unmounts.
    pub fn release(&mut self, serial: &str) {
        let Some((p, n)) = self.mounts.get_mut(serial) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            if let Err(e) = umount2(p.as_path(), MntFlags::MNT_DETACH) {
                tracing::warn!("unmount image {}: {e}", p.display());
            }
            self.mounts.remove(serial);
        }
    }
}

/// Refuses characters overlayfs would take as option separators.
fn overlay_path(p: &Path) -> Result<String, RootfsError> {
    let s = p.to_str().ok_or_else(|| RootfsError::Invalid {
        what: "overlay path",
        value: p.display().to_string(),
    })?;
    if s.contains([',', ':', '\\', '\n']) {
        return Err(RootfsError::Invalid {
            what: "overlay path",
            value: s.to_owned(),
        });
    }
    Ok(s.to_owned())
}

/// The overlayfs mount data for one container.
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String, RootfsError> {
    Ok(format!(
        "lowerdir={},upperdir={},workdir={}",
        overlay_path(lower)?,
        overlay_path(upper)?,
        overlay_path(work)?
    ))
}

/// mount(8)-style options split into flags and file-system data.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub bind: bool,
    pub recursive: bool,
    pub data: String,
}

pub fn parse_mount_options(opts: &[String], readonly: bool) -> MountOptions {
    let mut m = MountOptions {
        flags: MsFlags::empty(),
        bind: false,
        recursive: false,
        data: String::new(),
    };
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => m.flags |= MsFlags::MS_RDONLY,
            "rw" => m.flags &= !MsFlags::MS_RDONLY,
            "nosuid" => m.flags |= MsFlags::MS_NOSUID,
            "nodev" => m.flags |= MsFlags::MS_NODEV,
            "noexec" => m.flags |= MsFlags::MS_NOEXEC,
            "noatime" => m.flags |= MsFlags::MS_NOATIME,
            "nodiratime" => m.flags |= MsFlags::MS_NODIRATIME,
            "relatime" => m.flags |= MsFlags::MS_RELATIME,
            "strictatime" => m.flags |= MsFlags::MS_STRICTATIME,
            "suid" | "dev" | "exec" | "atime" | "defaults" => {}
            "bind" => m.bind = true,
            "rbind" => {
                m.bind = true;
                m.recursive = true;
            }
            // Propagation is always private inside the VM.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => {}
            other => data.push(other),
        }
    }
    if readonly {
        m.flags |= MsFlags::MS_RDONLY;
    }
    m.data = data.join(",");
    m
}

/// Everything a container's rootfs preparation needs to know.
#[derive(Debug)]
pub struct RootfsSpec<'a> {
    /// Lower (image) directory.
    pub lower: PathBuf,
    /// Container bundle directory (created here).
    pub bundle: PathBuf,
    pub mounts: &'a [Mount],
    pub readonly: bool,
    /// (file in the sandbox dir, destination) pairs to bind read-only when present.
    pub etc_files: Vec<(PathBuf, &'static str)>,
    /// Sandbox /dev/shm directory when IPC is pod-shared; None for a private tmpfs.
    pub shared_shm: Option<PathBuf>,
    /// Privileged inside the VM: the VM's devices in /dev, /sys writable.
    pub privileged: bool,
}

/// A prepared rootfs: the mount point and an O_PATH descriptor of it.
#[derive(Debug)]
pub struct PreparedRootfs {
    pub rootfs: PathBuf,
    pub fd: OwnedFd,
}

pub fn rootfs_dir(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// The container's writable layer: a tmpfs of its own holding the overlay's upper and work
/// directories.
pub fn upper_dir(bundle: &Path) -> PathBuf {
    bundle.join("upper")
}

const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The container's /dev: a tmpfs with the standard nodes (and, when privileged, the VM's
/// devices), the usual links, its own devpts and /dev/shm (the pod's or its own).
fn mount_dev(spec: &RootfsSpec<'_>, fd: &OwnedFd, rootfs: &Path) -> Result<(), RootfsError> {
    let d755 = Mode::from_bits_truncate(0o755);
    let dev = rootfs.join("dev");
    mnt(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=65536k"),
    )?;
    let devfd = safepath::open_beneath(
        fd,
        Path::new("dev"),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    for (name, major, minor) in DEVICES {
        mknodat(
            &devfd,
            name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| io_err("mknod", &dev.join(name))(e.into()))?;
    }
    if spec.privileged {
        vm_devices(Path::new("/dev"), &devfd, &dev)?;
    }
    for (target, link) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        nix::unistd::symlinkat(target, &devfd, link)
            .map_err(|e| io_err("symlink", &dev.join(link))(e.into()))?;
    }
    for d in ["pts", "shm"] {
        safepath::mkdir_all_beneath(&devfd, Path::new(d), d755, None)?;
    }
    mnt(
        Some(Path::new("devpts")),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    match &spec.shared_shm {
        Some(shm) => mnt(Some(shm), &dev.join("shm"), None, MsFlags::MS_BIND, None)?,
        None => mnt(
            Some(Path::new("shm")),
            &dev.join("shm"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        )?,
    }
    Ok(())
}

/// One mount of the request: a bind of a guest path, or a file system of its type.
fn mount_one(fd: &OwnedFd, rootfs: &Path, m: &Mount) -> Result<(), RootfsError> {
    let d755 = Mode::from_bits_truncate(0o755);
    let o = parse_mount_options(&m.options, m.readonly);
    if o.bind || m.r#type == "bind" || m.r#type.is_empty() {
        bind(
            fd,
            rootfs,
            Path::new(&m.source),
            &m.destination,
            m.readonly,
            o.flags,
            o.recursive,
        )?;
    } else {
        let rel = safepath::relative_components(&m.destination)?;
        let target = safepath::mkdir_all_beneath(fd, &rel, d755, None)?;
        let src = if m.source.is_empty() {
            m.r#type.as_str()
        } else {
            m.source.as_str()
        };
        mnt(
            Some(Path::new(src)),
            &safepath::fd_path(&target),
            Some(&m.r#type),
            o.flags,
            (!o.data.is_empty()).then_some(o.data.as_str()),
        )?;
    }
    Ok(())
}

/// Names in the VM's /dev a privileged container does not get from it: its own terminal
/// devices, /dev/shm and the links are made for it.
const NOT_COPIED: [&str; 6] = ["pts", "shm", "ptmx", "console", "fd", "core"];

/// A privileged container's view of the VM's devices: a node for every character and block
/// device in `vm_dev` (the VM's devtmpfs) and its subdirectories (`net/tun`, ...), made in
/// the container's /dev tmpfs `devfd` (at `dev`) beside the standard ones. Nodes, not a
/// mount of devtmpfs: that is one instance for the whole VM, and the container's links and
/// nodes must not appear in the agent's /dev.
fn vm_devices(vm_dev: &Path, devfd: &OwnedFd, dev: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let entries = fs::read_dir(vm_dev).map_err(io_err("read", vm_dev))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if NOT_COPIED.contains(&name) || DEVICES.iter().any(|(d, _, _)| *d == name) {
            continue;
        }
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        let t = meta.file_type();
        let kind = if t.is_char_device() {
            SFlag::S_IFCHR
        } else if t.is_block_device() {
            SFlag::S_IFBLK
        } else if t.is_dir() && vm_dev == Path::new("/dev") {
            let d755 = Mode::from_bits_truncate(0o755);
            safepath::mkdir_all_beneath(devfd, Path::new(name), d755, None)?;
            let sub = safepath::open_beneath(
                devfd,
                Path::new(name),
                OFlag::O_PATH | OFlag::O_DIRECTORY,
                Mode::empty(),
            )?;
            vm_devices(&e.path(), &sub, &dev.join(name))?;
            continue;
        } else {
            continue;
        };
        mknodat(
            devfd,
            name,
            kind,
            Mode::from_bits_truncate(meta.mode() & 0o777),
            meta.rdev(),
        )
        .map_err(|err| io_err("mknod", &dev.join(name))(err.into()))?;
    }
    Ok(())
}

/// The virtio-fs tag podvisord's VMM serves the pod's share under.
pub const SHARE_TAG: &str = "podvisor";

/// Mounts the pod's virtio-fs share at `at` (created): no device nodes or set-id programs
/// through it; each container's bind of a volume adds its own flags.
pub fn mount_share(at: &Path) -> Result<(), RootfsError> {
    fs::create_dir_all(at).map_err(io_err("create", at))?;
    mnt(
        Some(Path::new(SHARE_TAG)),
        at,
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    set_share_readahead(at);
    Ok(())
}

/// Readahead of the share, KiB: the largest request the device takes (`max_pages`, 1 MiB).
/// FUSE leaves its mounts at the kernel's default 128 KiB, so a sequential read costs a
/// round trip to the VMM per 128 KiB.
const SHARE_READAHEAD_KIB: u32 = 1024;

/// Raises the readahead of the share mounted at `at` (its backing device info is named by
/// the mount's device number). Only a tuning: a failure is logged.
fn set_share_readahead(at: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match fs::metadata(at) {
        Ok(m) => m.dev(),
        Err(e) => return tracing::warn!("share readahead: stat {}: {e}", at.display()),
    };
    let file = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ));
    if let Err(e) = fs::write(&file, SHARE_READAHEAD_KIB.to_string()) {
        tracing::warn!("share readahead: write {}: {e}", file.display());
    }
}

/// Validates the request's mounts without touching anything.
pub fn validate_mounts(mounts: &[Mount]) -> Result<(), RootfsError> {
    for m in mounts {
        safepath::relative_components(&m.destination)?;
        let o = parse_mount_options(&m.options, m.readonly);
        if o.bind || m.r#type == "bind" || m.r#type.is_empty() {
            safepath::relative_components(&m.source)?;
        } else if !m
            .r#type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(RootfsError::Invalid {
                what: "mount type",
                value: m.r#type.clone(),
            });
        }
    }
    Ok(())
}

/// Mounts and populates the container's rootfs; on error, what was mounted is undone by
/// [`cleanup`].
pub fn prepare(spec: &RootfsSpec<'_>) -> Result<PreparedRootfs, RootfsError> {
    validate_mounts(spec.mounts)?;
    let upper = upper_dir(&spec.bundle);
    let rootfs = rootfs_dir(&spec.bundle);
    for d in [&upper, &rootfs] {
        fs::create_dir_all(d).map_err(io_err("mkdir", d))?;
    }
    mnt(
        Some(Path::new("tmpfs")),
        &upper,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let (diff, work) = (upper.join("diff"), upper.join("work"));
    for d in [&diff, &work] {
        fs::create_dir_all(d).map_err(io_err("mkdir", d))?;
    }
    let data = overlay_options(&spec.lower, &diff, &work)?;
    mnt(
        Some(Path::new("overlay")),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(&data),
    )?;
    let fd = openat(
        AT_FDCWD,
        &rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", &rootfs)(e.into()))?;
    let d755 = Mode::from_bits_truncate(0o755);
    for d in ["proc", "sys", "dev", "etc"] {
        safepath::mkdir_all_beneath(&fd, Path::new(d), d755, None)?;
    }

    mount_dev(spec, &fd, &rootfs)?;

    // /sys, read-only unless privileged.
    let sys_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt(
        Some(Path::new("sysfs")),
        &rootfs.join("sys"),
        Some("sysfs"),
        if spec.privileged {
            sys_flags
        } else {
            sys_flags | MsFlags::MS_RDONLY
        },
        None,
    )?;

    // Sandbox files, unless the request mounts something there itself.
    for (src, dest) in &spec.etc_files {
        if !src.exists() || spec.mounts.iter().any(|m| m.destination == *dest) {
            continue;
        }
        bind(&fd, &rootfs, src, dest, true, MsFlags::empty(), false)?;
    }

    for m in spec.mounts {
        mount_one(&fd, &rootfs, m)?;
    }

    if spec.readonly {
        mnt(
            None,
            &rootfs,
            None,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(PreparedRootfs { rootfs, fd })
}

/// Bind-mounts `src` (a file or directory in the guest) onto `dest` inside the rootfs, creating
/// the mount point without following symlinks.
fn bind(
    rootfd: &OwnedFd,
    rootfs: &Path,
    src: &Path,
    dest: &str,
    readonly: bool,
    extra: MsFlags,
    recursive: bool,
) -> Result<(), RootfsError> {
    let rel = safepath::relative_components(dest)?;
    let meta = fs::metadata(src).map_err(io_err("stat bind source", src))?;
    let target = if meta.is_dir() {
        safepath::mkdir_all_beneath(rootfd, &rel, Mode::from_bits_truncate(0o755), None)?
    } else {
        let parent = safepath::mkdir_all_beneath(
            rootfd,
            rel.parent().unwrap_or(Path::new("")),
            Mode::from_bits_truncate(0o755),
            None,
        )?;
        let name = rel.file_name().map(Path::new).unwrap_or(Path::new("."));
        safepath::open_beneath(
            parent.as_fd(),
            name,
            OFlag::O_CREAT | OFlag::O_RDONLY,
            Mode::from_bits_truncate(0o644),
        )?
    };
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    let target_path = safepath::fd_path(&target);
    mnt(Some(src), &target_path, None, flags, None)?;
    let ro_flags = extra & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    if readonly || !ro_flags.is_empty() {
        let mut f = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | ro_flags;
        if readonly {
            f |= MsFlags::MS_RDONLY;
        }
        // The descriptor names the covered directory; the path names the new bind mount.
        mnt(None, &rootfs.join(&rel), None, f, None)?;
    }
    Ok(())
}

/// Unmounts everything below the bundle and removes it.
pub fn cleanup(bundle: &Path) {
    for p in [rootfs_dir(bundle), upper_dir(bundle)] {
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => tracing::warn!("unmount {}: {e}", p.display()),
        }
    }
    if let Err(e) = fs::remove_dir_all(bundle)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("remove {}: {e}", bundle.display());
    }
}

/// C string of a path (paths from requests were checked for NUL bytes).
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_option_strings() {
        assert_eq!(
            overlay_options(Path::new("/img/a"), Path::new("/b/u"), Path::new("/b/w")).expect("ok"),
            "lowerdir=/img/a,upperdir=/b/u,workdir=/b/w"
        );
        assert!(overlay_options(Path::new("/img/a,b"), Path::new("/u"), Path::new("/w")).is_err());
        assert!(overlay_options(Path::new("/img:x"), Path::new("/u"), Path::new("/w")).is_err());
    }

    #[test]
    fn mount_options() {
        let o = parse_mount_options(
            &[
                "rbind".into(),
                "nosuid".into(),
                "size=64m".into(),
                "rprivate".into(),
                "mode=755".into(),
            ],
            true,
        );
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_RDONLY);
        assert_eq!(o.data, "size=64m,mode=755");
        let bad = [Mount {
            source: "/run/podvisor/share/c/0".into(),
            destination: "/data/../../etc".into(),
            r#type: "bind".into(),
            ..Default::default()
        }];
        assert!(
            validate_mounts(&bad)
                .expect_err("dotdot")
                .is_invalid_argument()
        );
        let bad_type = [Mount {
            destination: "/x".into(),
            r#type: "tmpfs,evil".into(),
            ..Default::default()
        }];
        assert!(validate_mounts(&bad_type).is_err());
    }

    #[test]
    fn block_device_lookup_by_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (dev, serial) in [("vda", "rootfs"), ("vdb", "img-abc123")] {
            fs::create_dir(dir.path().join(dev)).expect("mkdir");
            fs::write(dir.path().join(dev).join("serial"), format!("{serial}\n")).expect("write");
        }
        fs::create_dir(dir.path().join("loop0")).expect("mkdir");
        assert_eq!(
            find_block_device(dir.path(), "img-abc123").expect("found"),
            Path::new("/dev/vdb")
        );
        assert!(matches!(
            find_block_device(dir.path(), "nope"),
            Err(RootfsError::NoDevice(_))
        ));
        assert!(
            find_block_device(dir.path(), "../x")
                .expect_err("bad")
                .is_invalid_argument()
        );
    }
}
