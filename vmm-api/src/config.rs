//! What a VM is made of: parsed from the command line or a JSON file, checked against the
//! VMM's limits before anything touches KVM.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM has (the MP table and the APIC ids below the IOAPIC's allow no more).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest the VMM boots.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest the VMM boots (a bound on a caller's typo, not on KVM).
pub const MAX_MEM_MIB: u64 = 256 * 1024;
/// Most virtio devices a VM has: one IOAPIC pin each, pins 5..=23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// A virtio-blk drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// Raw image file on the host.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Drive id, also its virtio serial (GET_ID); at most 20 bytes.
    pub id: String,
}

/// A virtio-net interface on a TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceConfig {
    /// TAP device name.
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// The longest virtio-fs tag (virtio 1.2, 5.11.4: `u8 tag[36]`).
pub const FS_TAG_MAX: usize = 36;

/// A virtio-fs device: one host directory shared with the guest, mounted there by its tag
/// (`mount -t virtiofs <tag> <dir>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsDeviceConfig {
    /// The tag the guest mounts, 1 to [`FS_TAG_MAX`] bytes.
    pub tag: String,
    /// The directory served, as the VMM opens it (before it enters its jail, so this is
    /// a host path). None: the device is there for the guest's driver (a template VM)
    /// but serves nothing; a VM restored from it attaches its own directory.
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
}

/// A virtio-vsock device with its host side on Unix sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockDeviceConfig {
    /// Guest context id (3 or more).
    pub cid: u64,
    /// Host Unix socket; guest connections to port P go to `<uds>_<P>`.
    pub uds: PathBuf,
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// What the VMM's seccomp filters do with a system call they do not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SeccompLevel {
    /// Kill the VMM (the default): an unexpected system call is an attack or a bug.
    #[default]
    Kill,
    /// Allow it and log it to the kernel's audit log: for finding what a new code path needs.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for SeccompLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(Self::Kill),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            other => Err(format!("seccomp level {other:?}: kill, log or off")),
        }
    }
}

/// A snapshot to continue from instead of booting a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// The state file.
    pub state: PathBuf,
    /// The memory file (mapped private copy-on-write, never written).
    pub mem: PathBuf,
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel: ELF vmlinux with a PVH note, or bzImage (unused when restoring).
    #[serde(default)]
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The caller's kernel command line (the VMM adds what it must).
    #[serde(default)]
    pub cmdline: String,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Drives, in order: the first is /dev/vda.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interface.
    #[serde(default)]
    pub net: Option<NetDeviceConfig>,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<VsockDeviceConfig>,
    /// virtio-fs device.
    #[serde(default)]
    pub fs: Option<FsDeviceConfig>,
    /// Control API socket.
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// Serial console output.
    #[serde(default)]
    pub serial: SerialOutput,
    /// The most bytes a serial console file holds (the newest kept); None: the VMM's
    /// default (8 MiB).
    #[serde(default)]
    pub serial_max_bytes: Option<u64>,
    /// Restore this snapshot instead of booting: vCPUs and memory come from it, the devices
    /// from this configuration (same kinds, same order; new files, TAP and sockets).
    #[serde(default)]
    pub restore: Option<RestoreConfig>,
    /// The VMM's own seccomp filters.
    #[serde(default)]
    pub seccomp: SeccompLevel,
    /// Enter this jail before anything else: every other path here is then a path inside
    /// it. None: run where started (a VMM run by hand).
    #[serde(default)]
    pub jail: Option<JailConfig>,
}

/// The VMM's jail, as Firecracker's jailer builds one: a mount namespace of its own whose
/// root is an empty, read-only tmpfs holding only `binds` and the two device nodes
/// (`/dev/kvm`, `/dev/net/tun`); once the VM is built, the VMM runs as `uid`:`gid` with no
/// supplementary group, before any guest code runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailConfig {
    /// A host directory the jail's root is mounted on (in the VMM's own mount namespace;
    /// the host sees nothing of it). The pod directory: it is also bound at [`JAIL_POD_DIR`].
    pub root: PathBuf,
    /// The unprivileged user the VMM runs as once the VM is built.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// What the jail holds besides its devices.
    #[serde(default)]
    pub binds: Vec<JailBind>,
    /// The pod's shared directory (a shared mount on the host), bound with everything
    /// mounted beneath it at [`JAIL_SHARE_DIR`] as a slave: what the host mounts there
    /// later appears in the jail too. With a share the VMM also gets its own `/proc` (only
    /// its own process shows) and runs in a user namespace (see [`JailConfig::id_map_base`]).
    #[serde(default)]
    pub share: Option<PathBuf>,
    /// With a share: the VMM runs as root of a user namespace whose ids 0 map to `uid` and
    /// `gid`, and 1..65536 to `id_map_base + 1..`, keeping only the capabilities a file
    /// server needs, in that namespace (it acts for the guest's users within the share).
    #[serde(default = "default_id_map_base")]
    pub id_map_base: u32,
}

/// The first host id of the VMM's user namespace: far from the ids of host users and from
/// the usual subordinate id ranges (100000 and up).
pub const DEFAULT_ID_MAP_BASE: u32 = 1 << 30;

fn default_id_map_base() -> u32 {
    DEFAULT_ID_MAP_BASE
}

/// How many ids the VMM's user namespace maps (0 to the jail's user, the rest above
/// [`JailConfig::id_map_base`]).
pub const ID_MAP_LEN: u32 = 65536;

/// The `uid_map` / `gid_map` text of the VMM's user namespace for the jail's `id`: 0 is
/// `id`, 1..[`ID_MAP_LEN`] are `base + 1..`. podvisord id-maps the share's binds the same.
pub fn id_map(id: u32, base: u32) -> String {
    format!("0 {id} 1\n1 {} {}\n", u64::from(base) + 1, ID_MAP_LEN - 1)
}

impl JailConfig {
    /// The jail path the host path `p` maps to: under the longest bind (the pod directory
    /// included) that holds it; None for a path outside all of them.
    pub fn jail_path(&self, p: &Path) -> Option<PathBuf> {
        let pod = JailBind {
            host: self.root.clone(),
            jail: PathBuf::from(JAIL_POD_DIR),
            writable: true,
        };
        std::iter::once(&pod)
            .chain(&self.binds)
            .filter_map(|b| Some((b, p.strip_prefix(&b.host).ok()?)))
            .max_by_key(|(b, _)| b.host.as_os_str().len())
            .map(|(b, rest)| {
                if rest.as_os_str().is_empty() {
                    b.jail.clone()
                } else {
                    b.jail.join(rest)
                }
            })
    }
}

/// Where the jail root's host directory is bound inside the jail (read-write: sockets, the
/// console file, snapshots).
pub const JAIL_POD_DIR: &str = "/pod";

/// Where the pod's shared directory is bound inside the jail.
pub const JAIL_SHARE_DIR: &str = "/share";

/// One host file or directory bound into the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailBind {
    /// The host path (opened before anything is mounted; a symlink is not followed).
    pub host: PathBuf,
    /// Where it appears in the jail: absolute, no `..`.
    pub jail: PathBuf,
    /// Bound read-write (else read-only).
    #[serde(default)]
    pub writable: bool,
}

fn default_vcpus() -> u8 {
    1
}

fn default_mem_mib() -> u64 {
    128
}

/// A configuration the VMM refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Malformed `--drive`, `--net` or `--vsock` value.
    #[error("{option} {value:?}: {why}")]
    Option {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// vCPU count out of range.
    #[error("vcpus {0} is out of range (1..={MAX_VCPUS})")]
    Vcpus(u8),
    /// Memory size out of range.
    #[error("mem-mib {0} is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB})")]
    Memory(u64),
    /// The kernel file is missing.
    #[error("kernel {0} does not exist")]
    MissingKernel(PathBuf),
    /// A snapshot file is missing.
    #[error("snapshot file {0} does not exist")]
    MissingSnapshotFile(PathBuf),
    /// The initrd file is missing.
    #[error("initrd {0} does not exist")]
    MissingInitrd(PathBuf),
    /// Two drives with one id.
    #[error("drive id {0:?} is used twice")]
    DuplicateDrive(String),
    /// Drive id empty or too long.
    #[error("drive id {0:?} must be 1 to 20 bytes")]
    DriveId(String),
    /// More devices than IRQs.
    #[error("{0} virtio devices is more than the {MAX_VIRTIO_DEVICES} a microVM has IRQs for")]
    TooManyDevices(usize),
    /// Reserved vsock CID.
    #[error("vsock cid {0} is reserved (use 3 or more)")]
    Cid(u64),
    /// virtio-fs tag empty, too long or holding a NUL.
    #[error("virtio-fs tag {0:?} must be 1 to {FS_TAG_MAX} bytes without NUL")]
    FsTag(String),
}

fn opt_err(option: &'static str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Option {
        option,
        value: value.to_string(),
        why: why.into(),
    }
}

/// Parses `PATH[,ro][,id=ID]`; `index` names drives without an id.
pub fn parse_drive(value: &str, index: usize) -> Result<DriveConfig, ConfigError> {
    let mut parts = value.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let Some(path) = path else {
        return Err(opt_err("--drive", value, "missing path"));
    };
    let mut drive = DriveConfig {
        path: PathBuf::from(path),
        read_only: false,
        id: format!("drive{index}"),
    };
    for p in parts {
        match p.split_once('=') {
            None if p == "ro" => drive.read_only = true,
            None if p == "rw" => drive.read_only = false,
            Some(("id", id)) => drive.id = id.to_string(),
            _ => return Err(opt_err("--drive", value, format!("unknown part {p:?}"))),
        }
    }
    Ok(drive)
}

/// Parses a MAC written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses `tap=NAME[,mac=MAC]`. Without a MAC, one is derived from the TAP
/// name (locally administered, unicast) so it is stable across restarts.
pub fn parse_net(value: &str) -> Result<NetDeviceConfig, ConfigError> {
    let mut tap = None;
    let mut mac = None;
    for p in value.split(',') {
        match p.split_once('=') {
            Some(("tap", t)) if !t.is_empty() && t.len() < 16 => tap = Some(t.to_string()),
            Some(("tap", _)) => {
                return Err(opt_err("--net", value, "TAP name must be 1 to 15 bytes"));
            }
            Some(("mac", m)) => {
                mac = Some(parse_mac(m).ok_or_else(|| opt_err("--net", value, "bad MAC"))?)
            }
            _ => return Err(opt_err("--net", value, format!("unknown part {p:?}"))),
        }
    }
    let tap = tap.ok_or_else(|| opt_err("--net", value, "missing tap=NAME"))?;
    let mac = mac.unwrap_or_else(|| derived_mac(&tap));
    Ok(NetDeviceConfig { tap, mac })
}

fn derived_mac(name: &str) -> [u8; 6] {
    // FNV-1a of the name, with the locally-administered bit set.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// Parses `state=PATH,mem=PATH`.
pub fn parse_restore(value: &str) -> Result<RestoreConfig, ConfigError> {
    let mut state = None;
    let mut mem = None;
    for p in value.split(',') {
        match p.split_once('=') {
            Some(("state", v)) if !v.is_empty() => state = Some(PathBuf::from(v)),
            Some(("mem", v)) if !v.is_empty() => mem = Some(PathBuf::from(v)),
            _ => return Err(opt_err("--restore", value, format!("unknown part {p:?}"))),
        }
    }
    Ok(RestoreConfig {
        state: state.ok_or_else(|| opt_err("--restore", value, "missing state=PATH"))?,
        mem: mem.ok_or_else(|| opt_err("--restore", value, "missing mem=PATH"))?,
    })
}

/// Parses `cid=N,uds=PATH`.
pub fn parse_vsock(value: &str) -> Result<VsockDeviceConfig, ConfigError> {
    let mut cid = None;
    let mut uds = None;
    for p in value.split(',') {
        match p.split_once('=') {
            Some(("cid", c)) => {
                cid = Some(
                    c.parse::<u64>()
                        .map_err(|_| opt_err("--vsock", value, "cid is not a number"))?,
                )
            }
            Some(("uds", u)) if !u.is_empty() => uds = Some(PathBuf::from(u)),
            _ => return Err(opt_err("--vsock", value, format!("unknown part {p:?}"))),
        }
    }
    Ok(VsockDeviceConfig {
        cid: cid.ok_or_else(|| opt_err("--vsock", value, "missing cid=N"))?,
        uds: uds.ok_or_else(|| opt_err("--vsock", value, "missing uds=PATH"))?,
    })
}

/// Parses `tag=TAG[,dir=PATH]`.
pub fn parse_fs(value: &str) -> Result<FsDeviceConfig, ConfigError> {
    let mut tag = None;
    let mut shared_dir = None;
    for p in value.split(',') {
        match p.split_once('=') {
            Some(("tag", t)) => tag = Some(t.to_string()),
            Some(("dir", d)) if !d.is_empty() => shared_dir = Some(PathBuf::from(d)),
            _ => return Err(opt_err("--fs", value, format!("unknown part {p:?}"))),
        }
    }
    Ok(FsDeviceConfig {
        tag: tag.ok_or_else(|| opt_err("--fs", value, "missing tag=TAG"))?,
        shared_dir,
    })
}

impl VmConfig {
    /// Checks everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        match &self.restore {
            None if !self.kernel.is_file() => {
                return Err(ConfigError::MissingKernel(self.kernel.clone()));
            }
            Some(r) => {
                for f in [&r.state, &r.mem] {
                    if !f.is_file() {
                        return Err(ConfigError::MissingSnapshotFile(f.clone()));
                    }
                }
            }
            None => {}
        }
        if let Some(i) = &self.initrd
            && !i.is_file()
        {
            return Err(ConfigError::MissingInitrd(i.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.drives {
            if d.id.is_empty() || d.id.len() > 20 {
                return Err(ConfigError::DriveId(d.id.clone()));
            }
            if !seen.insert(&d.id) {
                return Err(ConfigError::DuplicateDrive(d.id.clone()));
            }
        }
        let n = self.drives.len()
            + usize::from(self.net.is_some())
            + usize::from(self.vsock.is_some())
            + usize::from(self.fs.is_some());
        if n > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(n));
        }
        if let Some(v) = &self.vsock
            && v.cid < 3
        {
            return Err(ConfigError::Cid(v.cid));
        }
        // The shared directory is opened (and checked) by the device: a launcher may create
        // it after validating the configuration.
        if let Some(fs) = &self.fs
            && (fs.tag.is_empty() || fs.tag.len() > FS_TAG_MAX || fs.tag.contains('\0'))
        {
            return Err(ConfigError::FsTag(fs.tag.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_parse() {
        let d = parse_drive("/a.img,ro,id=rootfs", 0).unwrap();
        assert_eq!(
            d,
            DriveConfig {
                path: "/a.img".into(),
                read_only: true,
                id: "rootfs".into()
            }
        );
        assert_eq!(parse_drive("/b.img", 3).unwrap().id, "drive3");
        assert!(parse_drive(",ro", 0).is_err());
        assert!(parse_drive("/a,rx", 0).is_err());
    }

    #[test]
    fn net_parses_with_and_without_mac() {
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        let n = parse_net("tap=tap0").unwrap();
        assert_eq!(n.mac[0], 0x02, "locally administered unicast");
        assert_eq!(n.mac, parse_net("tap=tap0").unwrap().mac, "stable");
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=t,mac=02:00:00:00:00").is_err());
        assert!(parse_net("tap=t,mac=zz:00:00:00:00:00").is_err());
        assert!(parse_net("tap=abcdefghijklmnopq").is_err());
    }

    #[test]
    fn vsock_parses() {
        let v = parse_vsock("cid=3,uds=/run/v.sock").unwrap();
        assert_eq!(v.cid, 3);
        assert!(parse_vsock("cid=x,uds=/a").is_err());
        assert!(parse_vsock("uds=/a").is_err());
    }

    fn base() -> VmConfig {
        VmConfig {
            kernel: "/proc/self/exe".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_mib: 128,
            drives: vec![],
            net: None,
            vsock: None,
            fs: None,
            api_sock: None,
            serial: SerialOutput::Null,
            restore: None,
            seccomp: SeccompLevel::Kill,
            jail: None,
            serial_max_bytes: None,
        }
    }

    #[test]
    fn restore_needs_no_kernel_but_both_files() {
        let r = parse_restore("state=/proc/self/exe,mem=/proc/self/exe").unwrap();
        let c = VmConfig {
            kernel: "/nonexistent".into(),
            restore: Some(r),
            ..base()
        };
        assert_eq!(c.validate(), Ok(()));
        let c = VmConfig {
            restore: Some(parse_restore("state=/proc/self/exe,mem=/no/mem").unwrap()),
            ..base()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::MissingSnapshotFile("/no/mem".into()))
        );
        assert!(parse_restore("state=/a").is_err());
        assert!(parse_restore("mem=/a,state=/b,x=1").is_err());
    }

    #[test]
    fn fs_parses_and_validates() {
        let f = parse_fs("tag=pod,dir=/tmp").unwrap();
        assert_eq!(
            f,
            FsDeviceConfig {
                tag: "pod".into(),
                shared_dir: Some("/tmp".into()),
            }
        );
        assert_eq!(parse_fs("tag=t").unwrap().shared_dir, None);
        assert!(parse_fs("dir=/tmp").is_err());
        assert!(parse_fs("tag=t,ro").is_err());
        let long = "x".repeat(FS_TAG_MAX + 1);
        for (tag, dir) in [("", None), (long.as_str(), None), ("a\0b", None)] {
            let c = VmConfig {
                fs: Some(FsDeviceConfig {
                    tag: tag.into(),
                    shared_dir: dir,
                }),
                ..base()
            };
            assert_eq!(c.validate(), Err(ConfigError::FsTag(tag.into())));
        }
        let c = VmConfig {
            fs: Some(parse_fs("tag=t,dir=/tmp").unwrap()),
            ..base()
        };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_bad_value() {
        assert_eq!(base().validate(), Ok(()));
        let c = VmConfig { vcpus: 0, ..base() };
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        let c = VmConfig {
            mem_mib: 1,
            ..base()
        };
        assert_eq!(c.validate(), Err(ConfigError::Memory(1)));
        let c = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..base()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/vmlinux")
        );
        let d = parse_drive("/x,id=a", 0).unwrap();
        let c = VmConfig {
            drives: vec![d.clone(), d],
            ..base()
        };
        assert_eq!(c.validate(), Err(ConfigError::DuplicateDrive("a".into())));
        let c = VmConfig {
            vsock: Some(parse_vsock("cid=2,uds=/x").unwrap()),
            ..base()
        };
        assert_eq!(c.validate(), Err(ConfigError::Cid(2)));
    }

    #[test]
    fn json_config_round_trips() {
        let mut c = base();
        c.drives.push(parse_drive("/r.img,ro,id=root", 0).unwrap());
        c.serial = SerialOutput::File("/tmp/console.log".into());
        let s = serde_json::to_string(&c).unwrap();
        let back: VmConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let min: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(min.vcpus, 1);
        assert_eq!(min.mem_mib, 128);
    }

    #[test]
    fn host_paths_map_to_the_longest_bind() {
        let jail = JailConfig {
            root: "/run/p/pods/a".into(),
            uid: 1,
            gid: 1,
            binds: vec![
                JailBind {
                    host: "/var/k/vmlinux".into(),
                    jail: "/boot/kernel".into(),
                    writable: false,
                },
                JailBind {
                    host: "/run/p/pods/a/sub".into(),
                    jail: "/other".into(),
                    writable: false,
                },
            ],
            share: None,
            id_map_base: DEFAULT_ID_MAP_BASE,
        };
        let map = |p: &str| jail.jail_path(Path::new(p));
        assert_eq!(map("/var/k/vmlinux"), Some("/boot/kernel".into()));
        assert_eq!(map("/run/p/pods/a/api.sock"), Some("/pod/api.sock".into()));
        assert_eq!(map("/run/p/pods/a/sub/x"), Some("/other/x".into()));
        assert_eq!(
            map("/run/p/pods/ab"),
            None,
            "a prefix of a name is not a parent"
        );
        assert_eq!(map("/etc/passwd"), None);
    }
}
