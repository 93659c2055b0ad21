//! Id-mapped binds for the pod's share.
//!
//! A jailed VMM serves the share as root of its own user namespace, which is the jail's
//! user on the host (ids 1..65536 above `id_map_base`). Bound plainly, a host file of root
//! would be "someone else's" to it, and a file the guest's root creates would belong to
//! the jail's user on the host. So podvisord binds every volume through an id-mapped mount
//! ([`IdMap`]: a user namespace with the VMM's own map): the VMM sees root's files as its
//! own root's, and what the guest's root writes is root's on the host, as with runc. The
//! VMM's capabilities still reach nothing but what is bound into its share.
//!
//! The binds are made with the new mount API (open_tree, mount_setattr, move_mount; nix
//! wraps none of them): a detached copy of the host path (with what is mounted beneath it),
//! its attributes (id map, read-only, nosuid, nodev, propagation) set on the whole copy at
//! once, then attached at its place in the share. A file system that cannot be id-mapped
//! is bound without the map, with a warning.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use podvisor_vmm_api::config::id_map;

// linux/mount.h
const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// `struct mount_attr` as of Linux 5.12 (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A user namespace whose id map is the jailed VMM's: 0 is the jail's user and group,
/// 1..65536 lie above `base`. Held by a descriptor; no process lives in it.
#[derive(Debug)]
pub struct IdMap {
    userns: OwnedFd,
}

impl IdMap {
    /// Makes the namespace: a short-lived `sleep` unshares it, podvisord writes its maps
    /// and keeps a descriptor of it, and the process is killed.
    pub fn new(uid: u32, gid: u32, base: u32) -> io::Result<Self> {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: unshare is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let made = (|| {
            std::fs::write(format!("/proc/{pid}/uid_map"), id_map(uid, base))?;
            std::fs::write(format!("/proc/{pid}/gid_map"), id_map(gid, base))?;
            File::open(format!("/proc/{pid}/ns/user"))
        })();
        let _ = child.kill();
        let _ = child.wait();
        Ok(Self {
            userns: made?.into(),
        })
    }
}

/// How a volume is bound.
#[derive(Debug, Clone, Copy)]
pub(super) struct BindAttrs {
    pub(super) readonly: bool,
    /// `MS_PRIVATE` or `MS_SLAVE`.
    pub(super) propagation: u64,
}

/// Binds what `source` (an `O_PATH` descriptor) names, with everything mounted beneath it,
/// at `target`: through `idmap` where given and the file system allows, read-only (all of
/// it) when asked, always nosuid and nodev. Returns whether the bind is id-mapped.
pub(super) fn bind_tree(
    source: &File,
    target: &Path,
    attrs: BindAttrs,
    idmap: Option<&IdMap>,
) -> io::Result<bool> {
    let tree = open_tree(source)?;
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if attrs.readonly {
        set |= MOUNT_ATTR_RDONLY;
    }
    let mapped = match idmap {
        Some(m) => match set_attrs(&tree, set | MOUNT_ATTR_IDMAP, attrs.propagation, Some(m)) {
            Ok(()) => true,
            // A file system that cannot be id-mapped (EINVAL) is bound without the map.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                set_attrs(&tree, set, attrs.propagation, None)?;
                false
            }
            Err(e) => return Err(e),
        },
        None => {
            set_attrs(&tree, set, attrs.propagation, None)?;
            false
        }
    };
    move_mount(&tree, target)?;
    Ok(mapped)
}

/// A detached copy of the mount tree at `source`.
fn open_tree(source: &File) -> io::Result<OwnedFd> {
    let empty = c"";
    // SAFETY: open_tree reads a NUL-terminated path; the descriptor it returns is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE
                | OPEN_TREE_CLOEXEC
                | libc::AT_RECURSIVE as u32
                | libc::AT_EMPTY_PATH as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn set_attrs(tree: &OwnedFd, set: u64, propagation: u64, idmap: Option<&IdMap>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation,
        userns_fd: idmap.map_or(0, |m| m.userns.as_raw_fd() as u64),
    };
    let empty = c"";
    // SAFETY: mount_setattr reads a NUL-terminated path and `size` bytes of `attr`, both
    // alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn move_mount(tree: &OwnedFd, target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let empty = c"";
    // SAFETY: move_mount reads two NUL-terminated paths alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_is_the_vmms() {
        assert_eq!(id_map(999, 1 << 30), "0 999 1\n1 1073741825 65535\n");
    }
}
