//! `podvisord --config FILE`: where podvisord keeps things, how it reaches registries and CNI,
//! and what each RuntimeClass handler's microVM looks like.
//!
//! ```toml
//! socket = "/run/podvisor/podvisord.sock"
//! root_dir = "/var/lib/podvisor"
//! state_dir = "/run/podvisor"
//! vmm_binary = "/usr/bin/podvisor-vmm"
//! vmm_user = "podvisor"         # or "UID:GID"; VMMs run jailed as it ("": unjailed, as root)
//! cgroup_driver = "cgroupfs"    # or "systemd": kubelet's --cgroup-driver (RuntimeConfig
//!                               # reports it); how pods' cgroup_parent is read
//!
//! [registry]
//! insecure = ["127.0.0.1:5000"]
//! [registry.mirrors]
//! "registry.k8s.io" = ["http://127.0.0.1:5000"]
//!
//! [images]                   # caps on one image (the defaults; 0 or less is refused)
//! max_manifest_bytes = 4_194_304          # 4 MiB: each manifest or index, as read
//! max_config_bytes = 4_194_304            # 4 MiB: the image config
//! max_layers = 128
//! max_download_bytes = 17_179_869_184     # 16 GiB: config and layers, as declared
//! max_unpacked_bytes = 17_179_869_184     # 16 GiB: layers decompressed, sparse files
//!                                         # counted by apparent size
//! max_inodes = 1_000_000                  # tar entries over all layers
//!
//! [cni]
//! conf_dir = "/etc/cni/net.d"
//! # conf_template = "/etc/podvisor/cni.template"  # rendered with kubelet's pod CIDR
//! #   ({{.PodCIDR}}) into conf_dir/10-podvisor-net.conflist on UpdateRuntimeConfig
//! bin_dirs = ["/usr/lib/cni", "/opt/cni/bin"]
//!
//! [streaming]                  # exec, attach, port-forward URLs (the defaults)
//! address = "127.0.0.1"
//! port = 0                     # any free port
//! # tls_cert = "/etc/podvisor/stream.crt"   # both or neither: serve HTTPS
//! # tls_key = "/etc/podvisor/stream.key"
//! idle_timeout = "4h"          # a session passing no data this long is closed
//!
//! [handlers.podvisor]          # also the handler for "" (no RuntimeClass)
//! vcpus = 1                    # a pod's VM: its limits and overhead, at least these
//! memory_mib = 256             # (memory rounded up to a power of two), at most:
//! max_vcpus = 8
//! max_memory_mib = 16384
//! kernel = "/usr/share/podvisor/vmlinux"
//! image = "/usr/share/podvisor/rootfs.ext4"
//! kernel_cmdline_extra = ""
//! template = true              # pods restore a snapshot of a booted VM (false: cold boot)
//! console_max_bytes = 8388608  # console.log keeps at most this much, the newest
//!
//! [handlers.big]               # keys left out are the default handler's
//! vcpus = 4
//! memory_mib = 2048
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::image::{ImageLimits, Limit};
use crate::stream::config::{RawStreaming, StreamingSettings};
pub use crate::vmm::CgroupDriver;

/// Where podvisord looks without `--config`; only this file may be absent.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/podvisor/config.toml";

/// The handler used for an empty RuntimeClass handler name, and its own name.
pub const DEFAULT_HANDLER: &str = "podvisor";

/// The VMM's executable name, looked up next to our own executable and then on `PATH`.
pub const VMM_BINARY_NAME: &str = "podvisor-vmm";

/// The smallest guest memory a handler may ask for: below this the guest kernel, the agent
/// and one container do not fit.
pub const MIN_MEMORY_MIB: u64 = 64;

const DEFAULT_SOCKET: &str = "/run/podvisor/podvisord.sock";
const DEFAULT_ROOT_DIR: &str = "/var/lib/podvisor";
const DEFAULT_STATE_DIR: &str = "/run/podvisor";
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
const DEFAULT_CNI_BIN_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];
const DEFAULT_VCPUS: u8 = 1;
const DEFAULT_MEMORY_MIB: u64 = 256;
const DEFAULT_MAX_VCPUS: u8 = 8;
const DEFAULT_MAX_MEMORY_MIB: u64 = 16384;
const DEFAULT_KERNEL: &str = "/usr/share/podvisor/vmlinux";
const DEFAULT_IMAGE: &str = "/usr/share/podvisor/rootfs.ext4";
/// A pod's `console.log` at most, by default.
const DEFAULT_CONSOLE_BYTES: u64 = 8 << 20;
/// The smallest console cap: room for a kernel panic's report.
const MIN_CONSOLE_BYTES: u64 = 64 << 10;
/// The VMMs' user (`make setup` creates it).
const DEFAULT_VMM_USER: &str = "podvisor";

/// A configuration podvisord refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key or a value of the wrong type (the source names the key).
    #[error("parse config{}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// What is wrong, with its line and key.
        #[source]
        source: toml::de::Error,
    },
    /// A key has a value podvisord cannot use.
    #[error("config key {key}: {why}")]
    Invalid {
        /// The key, dotted (`handlers.big.memory_mib`).
        key: String,
        /// What is wrong with its value.
        why: String,
    },
    /// A RuntimeClass handler the configuration does not define.
    #[error("unknown runtime handler {0:?}")]
    UnknownHandler(String),
}

/// Registry access: plain-HTTP (or self-signed) registries and pull-through mirrors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    /// `host:port` of registries reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Registry host (`registry.k8s.io`, `docker.io`) → mirror URLs, tried in order before it.
    pub mirrors: HashMap<String, Vec<String>>,
}

/// Where CNI network configurations and plugins live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    /// Directory of `*.conflist` / `*.conf` files.
    pub conf_dir: PathBuf,
    /// Directories searched for plugin binaries, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// A CNI config template rendered with kubelet's pod CIDR (UpdateRuntimeConfig) into
    /// `conf_dir`, as containerd's `conf_template`; None: the network add-on writes one.
    pub conf_template: Option<PathBuf>,
}

/// The microVM of one RuntimeClass handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// The handler name (`podvisor` for the default handler).
    pub name: String,
    /// vCPUs of the pod's VM.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The most vCPUs a pod's VM gets (from its CPU limits and overhead).
    pub max_vcpus: u8,
    /// The most guest memory in MiB a pod's VM gets (from its memory limits and overhead).
    pub max_memory_mib: u64,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// The guest root image (the agent is its init).
    pub image: PathBuf,
    /// Appended to the kernel command line podvisord builds.
    pub kernel_cmdline_extra: String,
    /// Start pods by restoring a snapshot of a booted VM of this handler (a template, built
    /// when podvisord starts and again whenever an input changes) instead of booting a
    /// kernel.
    pub template: bool,
    /// The most bytes of the guest console a pod's `console.log` holds (the newest kept).
    pub console_max_bytes: u64,
}

/// podvisord's whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The CRI socket.
    pub socket: PathBuf,
    /// Persistent data: image blobs, image filesystems.
    pub root_dir: PathBuf,
    /// Runtime state, gone at reboot like the pods: records, per-pod directories.
    pub state_dir: PathBuf,
    /// The `podvisor-vmm` executable. Without the key: next to the current executable, else
    /// the first on `PATH`, else the bare name (spawning it then fails naming it).
    pub vmm_binary: PathBuf,
    /// The user each VMM runs as, in its jail, once its VM is built: a name or `UID:GID`,
    /// never root. Empty: no jail (the VMM runs as root in the host's mount namespace; for
    /// debugging only).
    pub vmm_user: String,
    /// How kubelet names the pods' cgroups (their `cgroup_parent`), reported to kubelet by
    /// the RuntimeConfig call.
    pub cgroup_driver: CgroupDriver,
    /// Registry access.
    pub registry: RegistrySettings,
    /// Caps on what one image may take from the host (see [`crate::image::limits`]).
    pub images: ImageLimits,
    /// CNI.
    pub cni: CniSettings,
    /// The CRI streaming server (exec, attach, port-forward).
    pub streaming: StreamingSettings,
    default_handler: Handler,
    handlers: HashMap<String, Handler>,
}

// The file as written. Every table refuses keys it does not know, so a typo is an error
// rather than a silently ignored setting.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    root_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    vmm_binary: Option<PathBuf>,
    vmm_user: Option<String>,
    #[serde(default)]
    cgroup_driver: CgroupDriver,
    #[serde(default)]
    registry: RawRegistry,
    #[serde(default)]
    images: RawImages,
    #[serde(default)]
    cni: RawCni,
    #[serde(default)]
    streaming: RawStreaming,
    #[serde(default)]
    handlers: HashMap<String, RawHandler>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    insecure: Vec<String>,
    #[serde(default)]
    mirrors: HashMap<String, Vec<String>>,
}

/// Signed, so that a negative cap is refused naming its key rather than as a type error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImages {
    max_manifest_bytes: Option<i64>,
    max_config_bytes: Option<i64>,
    max_layers: Option<i64>,
    max_download_bytes: Option<i64>,
    max_unpacked_bytes: Option<i64>,
    max_inodes: Option<i64>,
}

impl RawImages {
    /// The caps, the missing ones at their defaults; each must be at least 1.
    fn resolve(self) -> Result<ImageLimits, ConfigError> {
        let defaults = ImageLimits::default();
        let cap = |limit: Limit, value: Option<i64>| match value {
            None => Ok(defaults.get(limit)),
            Some(v) => u64::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
                invalid(
                    format!("images.{}", limit.key()),
                    format!("{v} is not a cap: it must be at least 1"),
                )
            }),
        };
        Ok(ImageLimits {
            max_manifest_bytes: cap(Limit::ManifestBytes, self.max_manifest_bytes)?,
            max_config_bytes: cap(Limit::ConfigBytes, self.max_config_bytes)?,
            max_layers: cap(Limit::Layers, self.max_layers)?,
            max_download_bytes: cap(Limit::DownloadBytes, self.max_download_bytes)?,
            max_unpacked_bytes: cap(Limit::UnpackedBytes, self.max_unpacked_bytes)?,
            max_inodes: cap(Limit::Inodes, self.max_inodes)?,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCni {
    conf_dir: Option<PathBuf>,
    bin_dirs: Option<Vec<PathBuf>>,
    conf_template: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    vcpus: Option<u8>,
    memory_mib: Option<u64>,
    max_vcpus: Option<u8>,
    max_memory_mib: Option<u64>,
    kernel: Option<PathBuf>,
    image: Option<PathBuf>,
    kernel_cmdline_extra: Option<String>,
    template: Option<bool>,
    console_max_bytes: Option<u64>,
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

fn absolute(key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(invalid(
            key,
            format!("{} is not an absolute path", path.display()),
        ))
    }
}

/// `host` or `host:port`, as registries are named in image references.
fn valid_registry_host(s: &str) -> bool {
    !s.is_empty()
        && !s.contains("://")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

impl RawHandler {
    /// The handler `name`, its missing keys taken from `base`.
    fn resolve(self, name: &str, base: &Handler) -> Result<Handler, ConfigError> {
        let key = |k: &str| format!("handlers.{name}.{k}");
        let vcpus = self.vcpus.unwrap_or(base.vcpus);
        if vcpus == 0 {
            return Err(invalid(key("vcpus"), "must be at least 1"));
        }
        let memory_mib = self.memory_mib.unwrap_or(base.memory_mib);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                key("memory_mib"),
                format!("{memory_mib} is below the minimum of {MIN_MEMORY_MIB} MiB"),
            ));
        }
        let max_vcpus = self.max_vcpus.unwrap_or(base.max_vcpus.max(vcpus));
        if max_vcpus < vcpus {
            return Err(invalid(
                key("max_vcpus"),
                format!("{max_vcpus} is below vcpus ({vcpus})"),
            ));
        }
        let max_memory_mib = self
            .max_memory_mib
            .unwrap_or(base.max_memory_mib.max(memory_mib));
        if max_memory_mib < memory_mib {
            return Err(invalid(
                key("max_memory_mib"),
                format!("{max_memory_mib} is below memory_mib ({memory_mib})"),
            ));
        }
        let console_max_bytes = self.console_max_bytes.unwrap_or(base.console_max_bytes);
        if console_max_bytes < MIN_CONSOLE_BYTES {
            return Err(invalid(
                key("console_max_bytes"),
                format!("{console_max_bytes} is below the minimum of {MIN_CONSOLE_BYTES}"),
            ));
        }
        let path = |k: &str, p: Option<PathBuf>, base: &Path| {
            absolute(&key(k), p.unwrap_or_else(|| base.to_path_buf()))
        };
        Ok(Handler {
            name: name.to_string(),
            vcpus,
            memory_mib,
            max_vcpus,
            max_memory_mib,
            kernel: path("kernel", self.kernel, &base.kernel)?,
            image: path("image", self.image, &base.image)?,
            kernel_cmdline_extra: self
                .kernel_cmdline_extra
                .unwrap_or_else(|| base.kernel_cmdline_extra.clone()),
            template: self.template.unwrap_or(base.template),
            console_max_bytes,
        })
    }
}

fn builtin_handler() -> Handler {
    Handler {
        name: DEFAULT_HANDLER.to_string(),
        vcpus: DEFAULT_VCPUS,
        memory_mib: DEFAULT_MEMORY_MIB,
        max_vcpus: DEFAULT_MAX_VCPUS,
        max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
        kernel: PathBuf::from(DEFAULT_KERNEL),
        image: PathBuf::from(DEFAULT_IMAGE),
        kernel_cmdline_extra: String::new(),
        template: true,
        console_max_bytes: DEFAULT_CONSOLE_BYTES,
    }
}

/// `podvisor-vmm` next to the running executable, else the first on `PATH`, else the bare
/// name.
fn default_vmm_binary() -> PathBuf {
    find_vmm_binary(
        std::env::current_exe().ok().as_deref(),
        std::env::var_os("PATH").as_deref(),
    )
}

fn find_vmm_binary(exe: Option<&Path>, path_var: Option<&std::ffi::OsStr>) -> PathBuf {
    let beside_exe = exe
        .and_then(|exe| exe.parent().map(|dir| dir.join(VMM_BINARY_NAME)))
        .filter(|p| is_executable(p));
    let on_path = || {
        std::env::split_paths(path_var?)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(VMM_BINARY_NAME))
            .find(|p| is_executable(p))
    };
    beside_exe
        .or_else(on_path)
        .unwrap_or_else(|| PathBuf::from(VMM_BINARY_NAME))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Config {
    /// Reads and validates `path`. A missing file is an error, except for
    /// [`DEFAULT_CONFIG_PATH`], whose absence means "all defaults".
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| match e {
                ConfigError::Parse { path: None, source } => ConfigError::Parse {
                    path: Some(path.to_path_buf()),
                    source,
                },
                e => e,
            }),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                tracing::info!("no {DEFAULT_CONFIG_PATH}: using the default configuration");
                Self::parse("")
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: None, source })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let vmm_binary = match raw.vmm_binary {
            Some(p) => absolute("vmm_binary", p)?,
            None => default_vmm_binary(),
        };

        for host in &raw.registry.insecure {
            if !valid_registry_host(host) {
                return Err(invalid(
                    "registry.insecure",
                    format!("{host:?} is not a host or host:port"),
                ));
            }
        }
        for (host, urls) in &raw.registry.mirrors {
            let key = format!("registry.mirrors.{host:?}");
            if !valid_registry_host(host) {
                return Err(invalid(key, "is not a registry host or host:port"));
            }
            for url in urls {
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                if rest.is_none_or(|r| r.is_empty()) {
                    return Err(invalid(
                        key,
                        format!("{url:?} is not an http:// or https:// URL"),
                    ));
                }
            }
        }

        let images = raw.images.resolve()?;
        let cni = CniSettings {
            conf_dir: absolute(
                "cni.conf_dir",
                raw.cni
                    .conf_dir
                    .unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into()),
            )?,
            bin_dirs: match raw.cni.bin_dirs {
                Some(dirs) => dirs
                    .into_iter()
                    .map(|d| absolute("cni.bin_dirs", d))
                    .collect::<Result<_, _>>()?,
                None => DEFAULT_CNI_BIN_DIRS.iter().map(PathBuf::from).collect(),
            },
            conf_template: raw
                .cni
                .conf_template
                .map(|p| absolute("cni.conf_template", p))
                .transpose()?,
        };

        let streaming = raw
            .streaming
            .resolve()
            .map_err(|(key, why)| invalid(key, why))?;
        let mut raw_handlers = raw.handlers;
        if raw_handlers.contains_key("") {
            return Err(invalid(
                "handlers.\"\"",
                format!("the empty handler is [handlers.{DEFAULT_HANDLER}]"),
            ));
        }
        let default_handler = raw_handlers
            .remove(DEFAULT_HANDLER)
            .unwrap_or_default()
            .resolve(DEFAULT_HANDLER, &builtin_handler())?;
        let handlers = raw_handlers
            .into_iter()
            .map(|(name, h)| Ok((name.clone(), h.resolve(&name, &default_handler)?)))
            .collect::<Result<_, ConfigError>>()?;

        Ok(Self {
            socket: absolute(
                "socket",
                raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
            )?,
            root_dir: absolute(
                "root_dir",
                raw.root_dir.unwrap_or_else(|| DEFAULT_ROOT_DIR.into()),
            )?,
            state_dir: absolute(
                "state_dir",
                raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            )?,
            vmm_binary,
            vmm_user: raw.vmm_user.unwrap_or_else(|| DEFAULT_VMM_USER.into()),
            cgroup_driver: raw.cgroup_driver,
            registry: RegistrySettings {
                insecure: raw.registry.insecure,
                mirrors: raw.registry.mirrors,
            },
            images,
            cni,
            streaming,
            default_handler,
            handlers,
        })
    }

    /// The handler for a RuntimeClass handler name; `""` and `"podvisor"` are the default.
    pub fn handler(&self, name: &str) -> Result<&Handler, ConfigError> {
        if name.is_empty() || name == DEFAULT_HANDLER {
            return Ok(&self.default_handler);
        }
        self.handlers
            .get(name)
            .ok_or_else(|| ConfigError::UnknownHandler(name.to_string()))
    }

    /// Every handler name, the default first, the others sorted (for the CRI `Status`).
    pub fn handler_names(&self) -> Vec<&str> {
        let mut others: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        others.sort_unstable();
        std::iter::once(DEFAULT_HANDLER).chain(others).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_common::error_chain as chain;

    fn invalid_key(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.socket, Path::new("/run/podvisor/podvisord.sock"));
        assert_eq!(c.root_dir, Path::new("/var/lib/podvisor"));
        assert_eq!(c.state_dir, Path::new("/run/podvisor"));
        assert_eq!(c.registry, RegistrySettings::default());
        assert_eq!(c.images, ImageLimits::default());
        assert_eq!(c.cni.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(
            c.cni.bin_dirs,
            [Path::new("/usr/lib/cni"), Path::new("/opt/cni/bin")]
        );
        let h = c.handler("").unwrap();
        assert_eq!(h, &builtin_handler());
        assert_eq!(h.vcpus, 1);
        assert_eq!(h.memory_mib, 256);
        assert_eq!(h.kernel, Path::new("/usr/share/podvisor/vmlinux"));
        assert_eq!(h.image, Path::new("/usr/share/podvisor/rootfs.ext4"));
        assert_eq!(c.handler("podvisor").unwrap(), h);
        assert_eq!(c.handler_names(), ["podvisor"]);
        assert_eq!(c.cgroup_driver, CgroupDriver::Cgroupfs);
    }

    #[test]
    fn the_cgroup_driver_is_one_of_two() {
        let c = Config::parse("cgroup_driver = \"systemd\"").unwrap();
        assert_eq!(c.cgroup_driver, CgroupDriver::Systemd);
        let c = Config::parse("cgroup_driver = \"cgroupfs\"").unwrap();
        assert_eq!(c.cgroup_driver, CgroupDriver::Cgroupfs);
        let e = Config::parse("cgroup_driver = \"cgroupv2\"").unwrap_err();
        assert!(
            podvisor_common::error_chain(&e).contains("cgroupfs"),
            "{}",
            podvisor_common::error_chain(&e)
        );
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            socket = "/tmp/p.sock"
            root_dir = "/srv/podvisor"
            state_dir = "/run/pv"
            vmm_binary = "/opt/podvisor/bin/podvisor-vmm"

            [registry]
            insecure = ["127.0.0.1:5000", "registry.local"]
            [registry.mirrors]
            "registry.k8s.io" = ["http://127.0.0.1:5000", "https://mirror.example"]

            [images]
            max_manifest_bytes = 1_048_576
            max_config_bytes = 2_097_152
            max_layers = 64
            max_download_bytes = 8_589_934_592
            max_unpacked_bytes = 34_359_738_368
            max_inodes = 2_000_000

            [cni]
            conf_dir = "/etc/pv/net.d"
            bin_dirs = ["/opt/pv/cni"]

            [handlers.podvisor]
            memory_mib = 512
            kernel = "/k/vmlinux"
            kernel_cmdline_extra = "debug"

            [handlers.big]
            vcpus = 4
            memory_mib = 2048
            image = "/i/big.ext4"
            "#,
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/tmp/p.sock"));
        assert_eq!(c.root_dir, Path::new("/srv/podvisor"));
        assert_eq!(c.state_dir, Path::new("/run/pv"));
        assert_eq!(c.vmm_binary, Path::new("/opt/podvisor/bin/podvisor-vmm"));
        assert_eq!(c.vmm_user, "podvisor");
        assert_eq!(c.registry.insecure, ["127.0.0.1:5000", "registry.local"]);
        assert_eq!(
            c.registry.mirrors["registry.k8s.io"],
            ["http://127.0.0.1:5000", "https://mirror.example"]
        );
        assert_eq!(
            c.images,
            ImageLimits {
                max_manifest_bytes: 1 << 20,
                max_config_bytes: 2 << 20,
                max_layers: 64,
                max_download_bytes: 8 << 30,
                max_unpacked_bytes: 32 << 30,
                max_inodes: 2_000_000,
            }
        );
        assert_eq!(c.cni.conf_dir, Path::new("/etc/pv/net.d"));
        assert_eq!(c.cni.bin_dirs, [Path::new("/opt/pv/cni")]);

        let d = c.handler("").unwrap();
        assert_eq!(d.name, "podvisor");
        assert_eq!((d.vcpus, d.memory_mib), (1, 512));
        assert_eq!(d.kernel, Path::new("/k/vmlinux"));
        assert_eq!(d.image, Path::new("/usr/share/podvisor/rootfs.ext4"));
        assert_eq!(d.kernel_cmdline_extra, "debug");
        assert_eq!(d.console_max_bytes, 8 << 20, "the default console cap");

        // A handler takes what it leaves out from the default handler.
        let big = c.handler("big").unwrap();
        assert_eq!(big.name, "big");
        assert_eq!((big.vcpus, big.memory_mib), (4, 2048));
        assert_eq!(big.kernel, Path::new("/k/vmlinux"));
        assert_eq!(big.image, Path::new("/i/big.ext4"));
        assert_eq!(big.kernel_cmdline_extra, "debug");
        assert_eq!(c.handler_names(), ["podvisor", "big"]);
    }

    #[test]
    fn unknown_handler_is_named() {
        let c = Config::parse("").unwrap();
        let e = c.handler("kata").unwrap_err();
        assert!(matches!(&e, ConfigError::UnknownHandler(n) if n == "kata"));
        assert!(e.to_string().contains("\"kata\""), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_and_named() {
        for (text, key) in [
            ("sockett = \"/x\"", "sockett"),
            ("[registry]\ninsecur = []", "insecur"),
            ("[cni]\nconf = \"/x\"", "conf"),
            ("[images]\nmax_layer = 3", "max_layer"),
            ("[handlers.big]\ncpus = 2", "cpus"),
            ("[nope]\n", "nope"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{text}: {e:?}");
            assert!(
                chain(&e).contains(&format!("`{key}`")),
                "{text}: {}",
                chain(&e)
            );
        }
    }

    #[test]
    fn wrong_types_are_refused() {
        for text in [
            "socket = 3",
            "[handlers.big]\nvcpus = \"two\"",
            "[handlers.big]\nvcpus = 300",
            "[handlers.big]\nmemory_mib = -1",
            "[registry]\ninsecure = \"a:1\"",
        ] {
            assert!(
                matches!(Config::parse(text), Err(ConfigError::Parse { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn invalid_values_name_their_key() {
        assert_eq!(
            invalid_key("[handlers.big]\nvcpus = 0"),
            "handlers.big.vcpus"
        );
        assert_eq!(
            invalid_key("[handlers.podvisor]\nmemory_mib = 63"),
            "handlers.podvisor.memory_mib"
        );
        assert_eq!(
            invalid_key("[handlers.big]\nkernel = \"vmlinux\""),
            "handlers.big.kernel"
        );
        assert_eq!(
            invalid_key("[handlers.big]\nimage = \"./root.ext4\""),
            "handlers.big.image"
        );
        assert_eq!(
            invalid_key("[handlers.big]\nconsole_max_bytes = 4096"),
            "handlers.big.console_max_bytes"
        );
        assert_eq!(invalid_key("socket = \"p.sock\""), "socket");
        assert_eq!(invalid_key("root_dir = \"var\""), "root_dir");
        assert_eq!(invalid_key("state_dir = \"\""), "state_dir");
        assert_eq!(invalid_key("vmm_binary = \"podvisor-vmm\""), "vmm_binary");
        assert_eq!(invalid_key("[cni]\nconf_dir = \"net.d\""), "cni.conf_dir");
        assert_eq!(
            invalid_key("[cni]\nbin_dirs = [\"/a\", \"b\"]"),
            "cni.bin_dirs"
        );
        assert_eq!(
            invalid_key("[registry]\ninsecure = [\"http://a:5000\"]"),
            "registry.insecure"
        );
        assert_eq!(
            invalid_key("[registry.mirrors]\n\"docker.io\" = [\"ftp://m\"]"),
            "registry.mirrors.\"docker.io\""
        );
        assert_eq!(invalid_key("[handlers.\"\"]\nvcpus = 2"), "handlers.\"\"");
        for key in [
            "max_manifest_bytes",
            "max_config_bytes",
            "max_layers",
            "max_download_bytes",
            "max_unpacked_bytes",
            "max_inodes",
        ] {
            for value in ["0", "-1"] {
                let text = format!("[images]\n{key} = {value}");
                assert_eq!(invalid_key(&text), format!("images.{key}"), "{text}");
            }
        }
        let e = Config::parse("[images]\nmax_layers = -3").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key images.max_layers: -3 is not a cap: it must be at least 1"
        );

        let e = Config::parse("[handlers.big]\nmemory_mib = 32").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("handlers.big.memory_mib") && msg.contains("32"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_default_handler_fails_even_when_unused() {
        assert_eq!(
            invalid_key("[handlers.podvisor]\nvcpus = 0\n[handlers.big]\nvcpus = 2"),
            "handlers.podvisor.vcpus"
        );
    }

    #[test]
    fn missing_file_is_an_error_unless_it_is_the_default_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.toml");
        let e = Config::load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains(&missing.display().to_string()));

        // The default path: read it if this host has one, defaults otherwise.
        let default = Path::new(DEFAULT_CONFIG_PATH);
        if !default.exists() {
            assert_eq!(Config::load(default).unwrap(), Config::parse("").unwrap());
        }
    }

    #[test]
    fn load_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "state_dir = \"/run/other\"\n").unwrap();
        assert_eq!(
            Config::load(&path).unwrap().state_dir,
            Path::new("/run/other")
        );
        std::fs::write(&path, "state_dir = [").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("parse config {}", path.display()));
    }

    #[test]
    fn vmm_binary_is_found_beside_the_executable_then_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let path_a = dir.path().join("a");
        let path_b = dir.path().join("b");
        for d in [&bin, &path_a, &path_b] {
            std::fs::create_dir(d).unwrap();
        }
        let place = |d: &Path, mode: u32| {
            let p = d.join(VMM_BINARY_NAME);
            std::fs::write(&p, "").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let exe = bin.join("podvisord");
        let path_var = std::env::join_paths([&path_a, &path_b]).unwrap();

        assert_eq!(
            find_vmm_binary(Some(&exe), Some(&path_var)),
            Path::new(VMM_BINARY_NAME),
            "nowhere: the bare name"
        );
        place(&path_a, 0o644);
        let on_b = place(&path_b, 0o755);
        assert_eq!(
            find_vmm_binary(Some(&exe), Some(&path_var)),
            on_b,
            "the first executable one on PATH"
        );
        let beside = place(&bin, 0o755);
        assert_eq!(find_vmm_binary(Some(&exe), Some(&path_var)), beside);
        assert_eq!(find_vmm_binary(None, Some(&path_var)), on_b);
    }
}
