//! The host's half of the VMM's jail: the user it runs as ([`JailUser`]), and the
//! configuration's paths rewritten into the jail with the binds they need ([`confine`]).
//! The VMM's half (mount namespace, pivot, the drop) is `podvisor_vmm::jail`.
//!
//! Inside, the VMM sees:
//!
//! | jail path          | host                                        | bound      |
//! |--------------------|---------------------------------------------|------------|
//! | `/pod`             | the pod directory (sockets, console, vmm.json) | read-write |
//! | `/boot/kernel`     | the guest kernel                            | read-only  |
//! | `/drives/<id>`     | each drive's file at launch                 | as the drive |
//! | `/restore/state`, `/restore/mem` | the template's snapshot       | read-only  |
//! | `/dev/kvm`, `/dev/net/tun` | device nodes of its own             |            |
//!
//! Images swapped in later reach it as descriptors, not paths (`VmmHandle::swap_drive`).

use std::path::{Path, PathBuf};

use podvisor_vmm_api::config::{
    DEFAULT_ID_MAP_BASE, JAIL_SHARE_DIR, JailBind, JailConfig, SerialOutput, VmConfig,
};

use super::error::{VmmError, file_err};

/// The user and group a jailed VMM runs as once its VM is built. Never root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailUser {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

impl JailUser {
    /// Resolves `spec`: a user name (its primary group), or `UID:GID`. An empty `spec` is
    /// no jail (None).
    pub fn resolve(spec: &str) -> Result<Option<Self>, VmmError> {
        let bad = |why: String| VmmError::JailUser {
            user: spec.to_string(),
            why,
        };
        if spec.is_empty() {
            return Ok(None);
        }
        let user = if let Some((u, g)) = spec.split_once(':') {
            let num = |s: &str| {
                s.parse::<u32>()
                    .map_err(|_| bad(format!("{s:?} is not a number")))
            };
            Self {
                uid: num(u)?,
                gid: num(g)?,
            }
        } else {
            let found = nix::unistd::User::from_name(spec)
                .map_err(|e| bad(format!("look it up: {e}")))?
                .ok_or_else(|| {
                    bad(
                        "no such user; create it (useradd --system --no-create-home \
                         --shell /usr/sbin/nologin podvisor) or set vmm_user"
                            .into(),
                    )
                })?;
            Self {
                uid: found.uid.as_raw(),
                gid: found.gid.as_raw(),
            }
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(bad("the VMM's user and group must not be root's".into()));
        }
        Ok(Some(user))
    }
}

/// Rewrites `config` (host paths, already validated) to run jailed as `user` with its root
/// on the pod directory `dir`: every path becomes a jail path and each file outside the pod
/// directory gets its bind.
pub(super) fn confine(config: &mut VmConfig, dir: &Path, user: JailUser) -> Result<(), VmmError> {
    let mut jail = JailConfig {
        root: dir.to_path_buf(),
        uid: user.uid,
        gid: user.gid,
        binds: Vec::new(),
        share: None,
        id_map_base: DEFAULT_ID_MAP_BASE,
    };
    let mut add = |host: &Path, at: &str, writable: bool| {
        jail.binds.push(JailBind {
            host: resolve_link(host),
            jail: PathBuf::from(at),
            writable,
        });
        PathBuf::from(at)
    };
    match &mut config.restore {
        Some(r) => {
            r.state = add(&r.state, "/restore/state", false);
            r.mem = add(&r.mem, "/restore/mem", false);
            config.kernel = PathBuf::new();
        }
        None => config.kernel = add(&config.kernel, "/boot/kernel", false),
    }
    if let Some(initrd) = &config.initrd {
        config.initrd = Some(add(initrd, "/boot/initrd", false));
    }
    for d in &mut config.drives {
        // Drive ids are [A-Za-z0-9_.-]{1,20} (checked with the rest of the configuration);
        // "." and ".." are no file names.
        if d.id == "." || d.id == ".." || d.id.contains('/') {
            return Err(VmmError::DriveId(d.id.clone()));
        }
        d.path = add(&d.path, &format!("/drives/{}", d.id), !d.read_only);
    }
    let in_pod = |p: &Path| {
        jail.jail_path(p)
            .filter(|j| j.starts_with(podvisor_vmm_api::config::JAIL_POD_DIR))
            .ok_or_else(|| VmmError::OutsideJail(p.to_path_buf()))
    };
    if let Some(v) = &mut config.vsock {
        v.uds = in_pod(&v.uds)?;
    }
    if let Some(a) = &config.api_sock {
        config.api_sock = Some(in_pod(a)?);
    }
    if let SerialOutput::File(f) = &config.serial {
        config.serial = SerialOutput::File(in_pod(f)?);
    }
    // The share is bound by the VMM itself, with what is mounted beneath it.
    if let Some(fs) = &mut config.fs
        && let Some(dir) = fs.shared_dir.take()
    {
        jail.share = Some(dir);
        fs.shared_dir = Some(PathBuf::from(JAIL_SHARE_DIR));
    }
    config.jail = Some(jail);
    Ok(())
}

/// The file a symlink the operator configured points to (`build/guest/vmlinux` is one):
/// the VMM binds the file itself and refuses a symlink (`O_NOFOLLOW`). Only the
/// configuration's and podvisord's own paths come here, never an image's: images reach a
/// running VMM as descriptors. Anything else, a missing path included, is kept as it is
/// for the VMM to report.
fn resolve_link(host: &Path) -> PathBuf {
    match host.symlink_metadata() {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(host).unwrap_or_else(|_| host.to_path_buf())
        }
        _ => host.to_path_buf(),
    }
}

/// The pod directory's mode once the jail's group may write it: sticky, so that the VMM
/// can make (and remove) its own entries (the control socket, a template's snapshot) but
/// can neither remove nor replace podvisord's (`network.json`, `vmm.json`, `vmm.log`).
const POD_DIR_MODE: u32 = 0o1770;

/// Opens the pod directory to the jail's group (see [`POD_DIR_MODE`]); it stays root's.
/// The VMM binds its control socket there after the drop and removes it when it ends.
pub(super) fn hand_over_dir(dir: &Path, user: JailUser) -> Result<(), VmmError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR | libc::ELOOP) => VmmError::NotADirectory(dir.to_path_buf()),
            _ => file_err("open pod directory", dir)(e),
        })?;
    std::os::unix::fs::fchown(&d, Some(0), Some(user.gid))
        .and_then(|()| d.set_permissions(std::fs::Permissions::from_mode(POD_DIR_MODE)))
        .map_err(file_err("hand over pod directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_vmm_api::config::{DriveConfig, FsDeviceConfig, RestoreConfig, VsockDeviceConfig};
    use std::os::unix::fs::MetadataExt;

    fn config(dir: &Path) -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_mib: 128,
            drives: vec![
                DriveConfig {
                    path: "/k/rootfs.ext4".into(),
                    read_only: true,
                    id: "root".into(),
                },
                DriveConfig {
                    path: "/var/lib/p/placeholder.img".into(),
                    read_only: true,
                    id: "img0".into(),
                },
            ],
            net: None,
            vsock: Some(VsockDeviceConfig {
                cid: 3,
                uds: dir.join("vsock.sock"),
            }),
            fs: Some(FsDeviceConfig {
                tag: "podvisor".into(),
                shared_dir: Some(dir.join("share")),
            }),
            api_sock: Some(dir.join("api.sock")),
            serial: SerialOutput::File(dir.join("console.log")),
            restore: None,
            seccomp: Default::default(),
            jail: None,
            serial_max_bytes: None,
        }
    }

    #[test]
    fn paths_move_into_the_jail() {
        let dir = Path::new("/run/p/pods/abc");
        let user = JailUser { uid: 7, gid: 8 };
        let mut c = config(dir);
        confine(&mut c, dir, user).unwrap();
        assert_eq!(c.kernel, Path::new("/boot/kernel"));
        let drives: Vec<_> = c.drives.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            drives,
            [PathBuf::from("/drives/root"), PathBuf::from("/drives/img0")]
        );
        assert_eq!(c.api_sock.as_deref(), Some(Path::new("/pod/api.sock")));
        assert_eq!(c.vsock.unwrap().uds, Path::new("/pod/vsock.sock"));
        assert_eq!(
            c.serial,
            SerialOutput::File(PathBuf::from("/pod/console.log"))
        );
        // The share is bound by the VMM at /share, with what is mounted beneath it.
        assert_eq!(
            c.fs.as_ref().and_then(|f| f.shared_dir.as_deref()),
            Some(Path::new("/share"))
        );
        let jail = c.jail.unwrap();
        assert_eq!((jail.root.as_path(), jail.uid, jail.gid), (dir, 7, 8));
        assert_eq!(jail.share.as_deref(), Some(dir.join("share").as_path()));
        let binds: Vec<_> = jail
            .binds
            .iter()
            .map(|b| {
                (
                    b.host.to_str().unwrap(),
                    b.jail.to_str().unwrap(),
                    b.writable,
                )
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("/k/vmlinux", "/boot/kernel", false),
                ("/k/rootfs.ext4", "/drives/root", false),
                ("/var/lib/p/placeholder.img", "/drives/img0", false)
            ]
        );

        let mut c = config(dir);
        c.restore = Some(RestoreConfig {
            state: "/t/state".into(),
            mem: "/t/mem".into(),
        });
        c.drives[1].read_only = false;
        confine(&mut c, dir, user).unwrap();
        let r = c.restore.unwrap();
        assert_eq!(
            (r.state.to_str(), r.mem.to_str()),
            (Some("/restore/state"), Some("/restore/mem"))
        );
        assert_eq!(c.kernel, PathBuf::new(), "a restore boots no kernel");
        assert!(
            c.jail
                .unwrap()
                .binds
                .iter()
                .any(|b| b.jail == Path::new("/drives/img0") && b.writable)
        );

        // A socket outside the pod directory cannot be reached from the jail.
        let mut c = config(dir);
        c.api_sock = Some("/elsewhere/api.sock".into());
        assert!(matches!(
            confine(&mut c, dir, user),
            Err(VmmError::OutsideJail(_))
        ));
        let mut c = config(dir);
        c.drives[1].id = "..".into();
        assert!(matches!(
            confine(&mut c, dir, user),
            Err(VmmError::DriveId(_))
        ));
    }

    #[test]
    fn a_configured_symlink_is_bound_as_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("cache").join("vmlinux");
        std::fs::create_dir_all(real.parent().unwrap()).unwrap();
        std::fs::write(&real, "kernel").unwrap();
        let link = tmp.path().join("vmlinux");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let dir = tmp.path().join("pod");
        let mut c = config(&dir);
        c.kernel = link;
        confine(&mut c, &dir, JailUser { uid: 7, gid: 8 }).unwrap();
        let jail = c.jail.unwrap();
        assert_eq!(jail.binds[0].host, real.canonicalize().unwrap());
        assert_eq!(jail.binds[0].jail, Path::new("/boot/kernel"));
    }

    #[test]
    fn the_jails_user_makes_its_entries_but_cannot_touch_podvisords() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let dir = tmp.path().join("pod");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("network.json"), "{}").unwrap();
        let user = JailUser {
            uid: 65534,
            gid: 65534,
        };
        hand_over_dir(&dir, user).unwrap();
        let meta = dir.symlink_metadata().unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 65534, 0o1770)
        );
        // As the jail's user: its own socket-like entry comes and goes; root's file stays.
        let script = "touch api.sock && rm api.sock && echo own-ok; \
                      rm -f network.json 2>/dev/null || echo root-kept; \
                      mv network.json x 2>/dev/null || echo not-renamed";
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "own-ok\nroot-kept\nnot-renamed\n",
            "{out:?}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("network.json")).unwrap(),
            "{}"
        );

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            hand_over_dir(&link, user),
            Err(VmmError::NotADirectory(_))
        ));
    }

    #[test]
    fn users_resolve_by_name_or_number_never_root() {
        assert_eq!(JailUser::resolve("").unwrap(), None);
        assert_eq!(
            JailUser::resolve("1234:5678").unwrap(),
            Some(JailUser {
                uid: 1234,
                gid: 5678
            })
        );
        let nobody = JailUser::resolve("nobody").unwrap().unwrap();
        assert_eq!(nobody.uid, 65534);
        for bad in ["root", "0:0", "5:0", "x:1", "no-such-user-podvisor"] {
            let e = JailUser::resolve(bad).unwrap_err();
            assert!(matches!(e, VmmError::JailUser { .. }), "{bad}: {e}");
        }
    }
}
