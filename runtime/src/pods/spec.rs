//! What a sandbox or container is to be, validated ([`SandboxSpec`], [`ContainerSpec`] and
//! their parts), and their translation into the guest agent's requests: resources,
//! namespaces, mounts, `resolv.conf` and the CreateContainer request itself.
//!
//! `cri::runtime_service` builds these from CRI requests; nothing here knows CRI types.

use std::collections::HashMap;
use std::path::PathBuf;

use podvisor_proto::v1 as agent;

use super::error::PodError;
use super::process::{self, ExecDefaults, UserSpec};
use crate::image::ImageConfig;
use crate::seccomp::{self, SeccompChoice};
use crate::state::{DnsConfig, PortMapping};

/// A namespace's sharing within the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NamespaceMode {
    /// Shared by the pod's containers.
    #[default]
    Pod,
    /// The container's own.
    Container,
}

impl NamespaceMode {
    pub(super) fn agent(self) -> i32 {
        match self {
            NamespaceMode::Pod => agent::NamespaceMode::Pod as i32,
            NamespaceMode::Container => agent::NamespaceMode::Container as i32,
        }
    }
}

/// A new pod sandbox, validated.
#[derive(Debug, Clone, Default)]
pub struct SandboxSpec {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// Attempt.
    pub attempt: u32,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Annotations.
    pub annotations: HashMap<String, String>,
    /// RuntimeClass handler ("" for the default).
    pub runtime_handler: String,
    /// Hostname ("" for the node's, as containerd gives).
    pub hostname: String,
    /// Where container logs go ("" for nowhere).
    pub log_directory: PathBuf,
    /// DNS.
    pub dns: DnsConfig,
    /// Published ports (recorded; no networking yet).
    pub port_mappings: Vec<PortMapping>,
    /// Pod-level sysctls.
    pub sysctls: HashMap<String, String>,
    /// Privileged inside its VM (its containers may be privileged).
    pub privileged: bool,
    /// Kubelet's cgroup for the pod ("" for none), in the form of podvisord's cgroup driver.
    pub cgroup_parent: String,
    /// The containers' limits together (kubelet's `linux.resources`).
    pub resources: Resources,
    /// The RuntimeClass overhead (`linux.overhead`).
    pub overhead: Resources,
}

/// Container resources (cgroup v2 in the guest); zero means unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// cgroup v1 shares.
    pub cpu_shares: u64,
    /// CFS quota in microseconds.
    pub cpu_quota: i64,
    /// CFS period in microseconds.
    pub cpu_period: u64,
    /// cpuset.cpus.
    pub cpuset_cpus: String,
    /// cpuset.mems.
    pub cpuset_mems: String,
    /// memory.max in bytes.
    pub memory_limit_bytes: i64,
    /// pids.max.
    pub pids_limit: i64,
}

impl Resources {
    pub(super) fn agent(&self) -> agent::LinuxResources {
        agent::LinuxResources {
            cpu_shares: self.cpu_shares,
            cpu_quota: self.cpu_quota,
            cpu_period: self.cpu_period,
            cpuset_cpus: self.cpuset_cpus.clone(),
            cpuset_mems: self.cpuset_mems.clone(),
            memory_limit_bytes: self.memory_limit_bytes,
            pids_limit: self.pids_limit,
        }
    }
}

/// A host path to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute path in the container.
    pub container_path: String,
    /// Absolute path on the host.
    pub host_path: PathBuf,
    /// Read-only.
    pub readonly: bool,
    /// How later host mounts beneath the host path reach the container.
    pub propagation: crate::vmm::Propagation,
}

/// A new container, validated.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Attempt.
    pub attempt: u32,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Annotations.
    pub annotations: HashMap<String, String>,
    /// The image as named in the request.
    pub image: String,
    /// Replaces the image's Entrypoint (and drops its Cmd).
    pub command: Vec<String>,
    /// Replaces the image's Cmd.
    pub args: Vec<String>,
    /// Working directory ("" for the image's).
    pub working_dir: String,
    /// Environment over the image's.
    pub envs: Vec<(String, String)>,
    /// Host paths.
    pub mounts: Vec<MountSpec>,
    /// Log file relative to the sandbox's log directory ("" for none).
    pub log_path: String,
    /// Allocate a terminal.
    pub tty: bool,
    /// Keep stdin open for attach sessions (otherwise the process reads /dev/null).
    pub stdin: bool,
    /// Close stdin when the first attach session that had stdin ends.
    pub stdin_once: bool,
    /// User.
    pub user: UserSpec,
    /// Capabilities added.
    pub cap_add: Vec<String>,
    /// Capabilities dropped.
    pub cap_drop: Vec<String>,
    /// no_new_privs.
    pub no_new_privs: bool,
    /// Read-only root file system.
    pub readonly_rootfs: bool,
    /// Paths masked.
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
    /// Privileged inside the VM: every capability, the VM's devices, /sys and /proc
    /// writable (no masked or read-only paths); never a host device.
    pub privileged: bool,
    /// Seccomp (none for privileged containers, whatever is asked).
    pub seccomp: SeccompChoice,
    /// PID namespace.
    pub pid_namespace: NamespaceMode,
    /// IPC namespace.
    pub ipc_namespace: NamespaceMode,
    /// Resources.
    pub resources: Resources,
}

/// The `resolv.conf` of a pod.
pub(super) fn resolv_conf(dns: &DnsConfig) -> String {
    let mut s = String::new();
    for server in &dns.servers {
        s.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

/// The container's process from `spec` over the image's `config`: argv, environment (with
/// `HOSTNAME` unless set), user, working directory and capabilities. Also returns the exec
/// defaults (user, environment, working directory, capabilities, no_new_privs) later execs
/// in it get.
pub(super) fn container_process(
    spec: &ContainerSpec,
    config: &ImageConfig,
    hostname: &str,
) -> Result<(agent::Process, ExecDefaults), PodError> {
    let argv = process::compose_args(&spec.image, config, &spec.command, &spec.args)?;
    let mut env = process::compose_env(&config.env, &spec.envs)?;
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={hostname}"));
    }
    let mut defaults = process::compose_user(&config.user, &spec.user);
    defaults.env = env;
    defaults.cwd = if spec.working_dir.is_empty() {
        config.working_dir.clone()
    } else {
        spec.working_dir.clone()
    };
    defaults.capabilities = if spec.privileged {
        Some(process::all_capabilities())
    } else {
        process::compose_capabilities(&spec.cap_add, &spec.cap_drop)?
    };
    defaults.no_new_privs = spec.no_new_privs;
    let seccomp_filter = if spec.privileged {
        None
    } else {
        let bounding = defaults.capabilities.clone().unwrap_or_else(|| {
            process::DEFAULT_CAPS
                .iter()
                .map(|c| c.to_string())
                .collect()
        });
        seccomp::program(&spec.seccomp, &bounding)?
    };
    defaults.seccomp_filter = seccomp_filter.as_deref().map(hex::encode);
    let process = agent::Process {
        args: argv,
        env: defaults.env.clone(),
        cwd: defaults.cwd.clone(),
        user: Some(defaults.user()),
        capabilities: defaults
            .capabilities
            .as_deref()
            .map(process::capability_sets),
        no_new_privs: defaults.no_new_privs,
        rlimits: Vec::new(),
        terminal: spec.tty,
        console_width: 0,
        console_height: 0,
        stdin: spec.stdin,
        seccomp_filter: seccomp_filter.unwrap_or_default(),
    };
    Ok((process, defaults))
}

/// A host path bound into the pod's share, bind-mounted from where the guest sees it.
pub(super) fn bind_mount(source: String, m: &MountSpec) -> agent::Mount {
    agent::Mount {
        source,
        destination: m.container_path.clone(),
        r#type: "bind".into(),
        options: vec!["rbind".into()],
        readonly: m.readonly,
    }
}

/// The agent's CreateContainer request for `spec`: its composed `process`, its `image` drive
/// and its `mounts`. UTS is always the pod's.
pub(super) fn create_request(
    id: &str,
    spec: &ContainerSpec,
    process: agent::Process,
    image: agent::Image,
    mounts: Vec<agent::Mount>,
) -> agent::CreateContainerRequest {
    agent::CreateContainerRequest {
        container_id: id.to_string(),
        process: Some(process),
        image: Some(image),
        mounts,
        namespaces: Some(agent::NamespaceOptions {
            pid: spec.pid_namespace.agent(),
            ipc: spec.ipc_namespace.agent(),
            uts: NamespaceMode::Pod.agent(),
        }),
        resources: Some(spec.resources.agent()),
        readonly_rootfs: spec.readonly_rootfs,
        // A privileged container sees /proc and /sys whole, as containerd gives it.
        masked_paths: if spec.privileged {
            Vec::new()
        } else {
            spec.masked_paths.clone()
        },
        readonly_paths: if spec.privileged {
            Vec::new()
        } else {
            spec.readonly_paths.clone()
        },
        sysctls: HashMap::new(),
        privileged: spec.privileged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers_searches_options() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into(), "1.1.1.1".into()],
            searches: vec!["a.svc".into(), "svc".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "nameserver 10.96.0.10\nnameserver 1.1.1.1\nsearch a.svc svc\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&DnsConfig::default()), "");
    }
}
