//! Named network namespaces, compatible with `ip netns`: a namespace `NAME` is kept alive by
//! a bind mount of its nsfs file on `/run/netns/NAME`, so `ip netns exec NAME ...`, CNI
//! plugins (`CNI_NETNS`) and the VMM (`--netns`) can all find it by path.
//!
//! Namespaces are per thread: creating one and running code inside one
//! ([`NetNs::enter`]) both happen on a dedicated, short-lived thread, so no thread of the
//! caller (nor a tokio worker) ever changes namespace.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use podvisor_common::IoError;

/// Where `ip netns` keeps its namespace files.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Serialises the "make the run dir a shared mount point" step within this process, so two
/// concurrent creations do not stack two bind mounts on it.
static RUN_DIR_SETUP: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid network namespace name {0:?}")]
    InvalidName(String),
    #[error("network namespace {0} already exists")]
    Exists(PathBuf),
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is not a network namespace file (symlink or not a regular file)")]
    NotAFile(PathBuf),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("thread for network namespace {0}")]
    Thread(PathBuf, #[source] io::Error),
}

/// [`IoError::at`] for the nix calls, which fail with an `Errno`.
fn errno_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> NetnsError + 'a {
    move |e| IoError::new(what, path, io::Error::from(e)).into()
}

/// A named network namespace (`/run/netns/NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates the namespace `name` like `ip netns add NAME`. Fails with
    /// [`NetnsError::Exists`] when the file already exists.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let ns = Self::named(name)?;
        let dir = Path::new(NETNS_RUN_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(IoError::at("create directory", dir))?;
        make_shared_mount_point(dir)?;

        // The mount point: an empty file, created exclusively so two creators of one name
        // cannot both succeed.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .custom_flags(libc::O_CLOEXEC)
            .open(&ns.path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(NetnsError::Exists(ns.path));
            }
            Err(e) => return Err(IoError::new("create", &ns.path, e).into()),
        }

        if let Err(e) = bind_new_netns(&ns.path) {
            // Leave nothing behind: the file is not a namespace yet.
            if let Err(rm) = fs::remove_file(&ns.path) {
                tracing::warn!(path = %ns.path.display(), "remove after failed create: {rm}");
            }
            return Err(e);
        }
        tracing::debug!(netns = %ns.path.display(), "network namespace created");
        Ok(ns)
    }

    /// The existing namespace `name`.
    pub fn open(name: &str) -> Result<Self, NetnsError> {
        let ns = Self::named(name)?;
        match fs::symlink_metadata(&ns.path) {
            Ok(m) if m.file_type().is_file() => Ok(ns),
            Ok(_) => Err(NetnsError::NotAFile(ns.path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(NetnsError::NotFound(ns.path)),
            Err(e) => Err(IoError::new("stat", &ns.path, e).into()),
        }
    }

    fn named(name: &str) -> Result<Self, NetnsError> {
        validate_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            path: Path::new(NETNS_RUN_DIR).join(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`: what `CNI_NETNS` and the VMM's `--netns` get.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread that has joined this namespace and returns its result. A
    /// panic in `f` is resumed on the calling thread. Blocking: call it from
    /// `spawn_blocking` in async code. `f` may build its own (current-thread) tokio runtime,
    /// e.g. for netlink, whose sockets belong to the namespace they are opened in.
    pub fn enter<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = open_ns_file(&self.path)?;
        let path = &self.path;
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(errno_err("join (setns)", path))?;
                    drop(file);
                    Ok(f())
                })
                .map_err(|e| NetnsError::Thread(path.clone(), e))?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Deletes this namespace; see [`delete`].
    pub fn delete(self) -> Result<(), NetnsError> {
        delete(&self.name)
    }
}

/// Deletes the namespace `name` like `ip netns delete NAME`: detaches the bind mount and
/// removes the file. Idempotent (a missing namespace is fine); never follows a symlink. The
/// namespace itself lives on while a process (a VMM) or an open file still holds it.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    validate_name(name)?;
    let path = Path::new(NETNS_RUN_DIR).join(name);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return Err(NetnsError::NotAFile(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IoError::new("stat", &path, e).into()),
    }
    match nix::mount::umount2(&path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        // EINVAL: not a mount point (a half-created namespace); ENOENT: deleted concurrently.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(errno_err("unmount", &path)(e)),
    }
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(IoError::new("remove", &path, e).into()),
    }
    tracing::debug!(netns = %path.display(), "network namespace deleted");
    Ok(())
}

/// A name is one path component, as `ip netns` accepts it.
fn validate_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == 0);
    if ok {
        Ok(())
    } else {
        Err(NetnsError::InvalidName(name.to_owned()))
    }
}

/// Makes `dir` a shared mount point, as iproute2 does: an unmount of a namespace file then
/// propagates to the mount namespaces that copied it (e.g. a container runtime's), so the
/// namespace is freed promptly. `dir` becomes a mount point (a bind mount on itself) when it
/// is not one yet.
fn make_shared_mount_point(dir: &Path) -> Result<(), NetnsError> {
    let _guard = RUN_DIR_SETUP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let make_shared = || {
        nix::mount::mount(
            Some(""),
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => return Ok(()),
        // EINVAL: not a mount point yet.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(errno_err("make shared", dir)(e)),
    }
    nix::mount::mount(
        Some(dir),
        dir,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(errno_err("bind mount on itself", dir))?;
    make_shared().map_err(errno_err("make shared", dir))
}

/// Creates a network namespace on a helper thread (`unshare(CLONE_NEWNET)` changes only the
/// calling thread's namespace) and bind-mounts it on `target`. The thread then ends; the
/// mount keeps the namespace alive. Mount namespaces are shared by all threads, so the mount
/// is the process's (and, through propagation, everyone's).
fn bind_new_netns(target: &Path) -> Result<(), NetnsError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netns-create".to_owned())
            .spawn_scoped(scope, || {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(errno_err("new namespace (unshare) for", target))?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    target,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(errno_err("bind mount namespace on", target))
            })
            .map_err(|e| NetnsError::Thread(target.to_owned(), e))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn open_ns_file(path: &Path) -> Result<File, NetnsError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                NetnsError::NotFound(path.to_owned())
            } else {
                IoError::new("open", path, e).into()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn unique(tag: &str) -> String {
        format!("pvt-{tag}-{}", std::process::id())
    }

    /// The inode of the network namespace the current thread is in.
    fn current_netns_inode() -> u64 {
        fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn create_enter_delete() {
        let name = unique("ced");
        let host = current_netns_inode();
        let ns = NetNs::create(&name).unwrap();
        assert_eq!(ns.path(), Path::new("/run/netns").join(&name));

        // Inside: another namespace, the one the file names, with only `lo`.
        let inside = ns.enter(current_netns_inode).unwrap();
        assert_ne!(inside, host);
        assert_eq!(inside, fs::metadata(ns.path()).unwrap().ino());
        // `ip netns` finds it by name, with only `lo` in it.
        let out = std::process::Command::new("ip")
            .args(["-n", &name, "-o", "link", "show"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), 1, "only lo in a new netns: {text}");
        assert!(text.contains(": lo:"), "{text}");

        // The caller's thread never moved.
        assert_eq!(current_netns_inode(), host);
        // /run/netns is a shared mount point, as iproute2 leaves it.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            mountinfo
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/run/netns") && l.contains("shared:")),
            "{mountinfo}"
        );

        assert!(matches!(NetNs::create(&name), Err(NetnsError::Exists(_))));
        NetNs::open(&name).unwrap().delete().unwrap();
        assert!(!ns.path().exists());
        assert!(!mountinfo_has(ns.path()));
        // Idempotent.
        delete(&name).unwrap();
        assert!(matches!(NetNs::open(&name), Err(NetnsError::NotFound(_))));
        assert!(matches!(ns.enter(|| ()), Err(NetnsError::NotFound(_))));
    }

    fn mountinfo_has(path: &Path) -> bool {
        let p = path.to_str().unwrap();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(p))
    }

    #[test]
    fn panics_in_enter_reach_the_caller() {
        let name = unique("panic");
        let ns = NetNs::create(&name).unwrap();
        let r = std::panic::catch_unwind(|| ns.enter(|| panic!("inside")));
        assert!(r.is_err());
        ns.delete().unwrap();
    }

    #[test]
    fn bad_names_and_symlinks_are_refused() {
        for bad in ["", ".", "..", "a/b", "../etc", "x\0y"] {
            assert!(
                matches!(NetNs::create(bad), Err(NetnsError::InvalidName(_))),
                "{bad:?}"
            );
            assert!(matches!(delete(bad), Err(NetnsError::InvalidName(_))));
        }
        // A symlink in /run/netns is neither followed nor removed.
        let name = unique("link");
        let target = tempfile::NamedTempFile::new().unwrap();
        fs::create_dir_all(NETNS_RUN_DIR).unwrap();
        let link = Path::new(NETNS_RUN_DIR).join(&name);
        std::os::unix::fs::symlink(target.path(), &link).unwrap();
        assert!(matches!(delete(&name), Err(NetnsError::NotAFile(_))));
        assert!(matches!(NetNs::open(&name), Err(NetnsError::NotAFile(_))));
        assert!(target.path().exists());
        fs::remove_file(&link).unwrap();
    }
}
