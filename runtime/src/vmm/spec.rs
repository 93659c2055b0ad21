//! What to launch for one pod ([`VmmSpec`]), the fixed names of the pod directory, and the
//! VM configuration (`vmm.json`) a spec becomes.

use std::path::PathBuf;

use podvisor_vmm_api::config::{
    DriveConfig, FsDeviceConfig, SeccompLevel, SerialOutput, VmConfig, VsockDeviceConfig,
};
use serde::{Deserialize, Serialize};

use super::error::VmmError;
use super::handle::VmmHandle;

/// The VM configuration file in the pod directory.
pub const CONFIG_FILE: &str = "vmm.json";
/// The VMM's stdout and stderr.
pub const VMM_LOG: &str = "vmm.log";
/// The guest's serial console.
pub const CONSOLE_LOG: &str = "console.log";
/// The control API socket.
pub const API_SOCK: &str = "api.sock";
/// The vsock device's Unix socket.
pub const VSOCK_UDS: &str = "vsock.sock";

/// The root image's drive id (the guest's `/dev/vda`).
pub const ROOT_DRIVE_ID: &str = "root";
/// The guest's vsock CID. Hybrid vsock keeps every VM's connections on its own Unix socket,
/// so all VMs can share one CID.
pub const GUEST_CID: u64 = 3;
/// The kernel command line every pod VM boots with; [`VmmSpec::cmdline_extra`] follows it.
pub const BASE_CMDLINE: &str = "quiet root=/dev/vda ro rootfstype=ext4 init=/sbin/podvisor-agent";

/// An extra drive of the VM (the root image is always the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    /// Drive id, also the guest's virtio serial; 1 to 20 bytes.
    pub id: String,
    /// The raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// What to launch for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmSpec {
    /// The pod sandbox id (for logs).
    pub sandbox_id: String,
    /// The pod's directory, e.g. `<state_dir>/pods/<id>`; created if missing.
    pub dir: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest root image, attached read-only as `/dev/vda`.
    pub rootfs: PathBuf,
    /// Appended to [`BASE_CMDLINE`].
    pub cmdline_extra: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Drives after the root drive.
    pub drives: Vec<DriveSpec>,
    /// A TAP device for virtio-net (it must exist in `netns`).
    pub tap: Option<String>,
    /// The guest NIC's MAC, "aa:bb:cc:dd:ee:ff" (None: derived from the TAP's name).
    pub mac: Option<String>,
    /// A network namespace file (`/var/run/netns/NAME`) the VMM runs in.
    pub netns: Option<PathBuf>,
    /// Continue this snapshot (a VM template) instead of booting `kernel`: the devices above
    /// must be the template's kinds in its order.
    pub restore: Option<podvisor_vmm_api::config::RestoreConfig>,
    /// Run the VMM jailed as this user (None: unjailed, as root; for debugging).
    pub jail: Option<super::JailUser>,
    /// The VMM's cgroup, the same path in each hierarchy (None: podvisord's).
    pub cgroup: Option<super::CgroupPath>,
    /// The most bytes `console.log` holds.
    pub console_max_bytes: u64,
    /// Serve the pod's share (`<dir>/share`, created at launch) through the virtio-fs
    /// device. Every VM has the device; a template's serves nothing.
    pub share: bool,
}

/// The VM configuration `spec` asks for.
pub(super) fn vm_config(spec: &VmmSpec, handle: &VmmHandle) -> Result<VmConfig, VmmError> {
    let config_err = |source| VmmError::Config {
        sandbox_id: spec.sandbox_id.clone(),
        source,
    };
    let mut drives = vec![DriveConfig {
        path: spec.rootfs.clone(),
        read_only: true,
        id: ROOT_DRIVE_ID.to_string(),
    }];
    drives.extend(spec.drives.iter().map(|d| DriveConfig {
        path: d.path.clone(),
        read_only: d.read_only,
        id: d.id.clone(),
    }));
    let net = spec
        .tap
        .as_deref()
        .map(|tap| {
            let value = match &spec.mac {
                Some(mac) => format!("tap={tap},mac={mac}"),
                None => format!("tap={tap}"),
            };
            podvisor_vmm_api::config::parse_net(&value)
        })
        .transpose()
        .map_err(config_err)?;
    let cmdline = match spec.cmdline_extra.trim() {
        "" => BASE_CMDLINE.to_string(),
        extra => format!("{BASE_CMDLINE} {extra}"),
    };
    let mut config = VmConfig {
        kernel: spec.kernel.clone(),
        initrd: None,
        cmdline,
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        drives,
        net,
        vsock: Some(VsockDeviceConfig {
            cid: GUEST_CID,
            uds: handle.vsock_uds.clone(),
        }),
        fs: Some(FsDeviceConfig {
            tag: super::share::SHARE_TAG.to_string(),
            shared_dir: spec.share.then(|| super::share::share_dir(&spec.dir)),
        }),
        api_sock: Some(handle.api_sock.clone()),
        serial: SerialOutput::File(handle.console_log.clone()),
        restore: spec.restore.clone(),
        seccomp: SeccompLevel::default(),
        jail: None,
        serial_max_bytes: Some(spec.console_max_bytes),
    };
    config.validate().map_err(config_err)?;
    if let Some(user) = spec.jail {
        super::jail::confine(&mut config, &spec.dir, user)?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_nic_gets_the_mac_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, "").unwrap();
        let h = VmmHandle {
            pid: 0,
            start_time: 0,
            dir: dir.path().into(),
            api_sock: dir.path().join("api.sock"),
            vsock_uds: dir.path().join("vsock.sock"),
            console_log: dir.path().join("console.log"),
            vmm_log: dir.path().join("vmm.log"),
            cgroup: None,
        };
        let spec = VmmSpec {
            sandbox_id: "sb".into(),
            dir: dir.path().into(),
            kernel: kernel.clone(),
            rootfs: kernel,
            cmdline_extra: String::new(),
            vcpus: 1,
            mem_mib: 128,
            drives: vec![],
            tap: Some("tap0_pv".into()),
            mac: Some("0a:3d:f2:9b:98:6c".into()),
            netns: None,
            restore: None,
            jail: None,
            cgroup: None,
            console_max_bytes: 1 << 20,
            share: false,
        };
        let net = vm_config(&spec, &h).unwrap().net.unwrap();
        assert_eq!(
            (net.tap.as_str(), net.mac),
            ("tap0_pv", [0x0a, 0x3d, 0xf2, 0x9b, 0x98, 0x6c])
        );
        let bad = VmmSpec {
            mac: Some("0a:3d".into()),
            ..spec
        };
        assert!(vm_config(&bad, &h).is_err());
    }
}
