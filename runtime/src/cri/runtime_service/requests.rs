//! CRI requests into the pod manager's specs: `RunPodSandbox` into a [`SandboxSpec`],
//! `CreateContainer` into a [`ContainerSpec`], resources into [`Resources`]; what a VM cannot
//! do (host namespaces, host devices) is refused as InvalidArgument; privileged mode is
//! privileged inside the VM.

use std::path::PathBuf;

use k8s_cri::v1 as cri;
use podvisor_common::names;
use tonic::Status;

use crate::cri::invalid;
use crate::pods::process::UserSpec;
use crate::pods::{ContainerSpec, MountSpec, NamespaceMode, Resources, SandboxSpec};
use crate::seccomp::SeccompChoice;
use crate::state::{DnsConfig, PortMapping, Protocol};

/// Refuses a namespace shared with the host: a VM cannot share the host's.
fn refuse_node_namespaces(ns: &cri::NamespaceOption) -> Result<(), Status> {
    let node = cri::NamespaceMode::Node as i32;
    for (mode, what) in [(ns.network, "network"), (ns.pid, "PID"), (ns.ipc, "IPC")] {
        if mode == node {
            return Err(invalid(format!(
                "a VM cannot share the host's {what} namespace (host{} pods are not supported by \
                 podvisor)",
                match what {
                    "network" => "Network",
                    "PID" => "PID",
                    _ => "IPC",
                }
            )));
        }
    }
    if ns.userns_options.as_ref().is_some_and(|u| u.mode == node) {
        // User namespaces: NODE is the default and the only mode podvisor runs.
    }
    Ok(())
}

/// A `SandboxSpec` from a `RunPodSandbox` request; refuses what a VM cannot do.
pub(super) fn sandbox_spec(req: cri::RunPodSandboxRequest) -> Result<SandboxSpec, Status> {
    let config = req
        .config
        .ok_or_else(|| invalid("RunPodSandbox: config is missing"))?;
    validate_pod_config(&config)?;
    let meta = config
        .metadata
        .ok_or_else(|| invalid("RunPodSandbox: metadata is missing"))?;
    for (value, what) in [
        (&meta.name, "name"),
        (&meta.namespace, "namespace"),
        (&meta.uid, "uid"),
    ] {
        if value.is_empty() {
            return Err(invalid(format!("RunPodSandbox: metadata.{what} is empty")));
        }
    }
    let linux = config.linux.unwrap_or_default();
    if let Some(ns) = linux
        .security_context
        .as_ref()
        .and_then(|sc| sc.namespace_options.as_ref())
    {
        refuse_node_namespaces(ns)?;
    }
    let privileged = linux
        .security_context
        .as_ref()
        .is_some_and(|sc| sc.privileged);
    let port_mappings = config
        .port_mappings
        .iter()
        .map(|p| {
            let protocol = match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Tcp) => Protocol::Tcp,
                Ok(cri::Protocol::Udp) => Protocol::Udp,
                Ok(cri::Protocol::Sctp) => Protocol::Sctp,
                Err(_) => return Err(invalid(format!("unknown port protocol {}", p.protocol))),
            };
            Ok(PortMapping {
                protocol,
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip.clone(),
            })
        })
        .collect::<Result<_, Status>>()?;
    let dns = config.dns_config.unwrap_or_default();
    Ok(SandboxSpec {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        attempt: meta.attempt,
        labels: config.labels,
        annotations: config.annotations,
        runtime_handler: req.runtime_handler,
        hostname: config.hostname,
        log_directory: PathBuf::from(config.log_directory),
        dns: DnsConfig {
            servers: dns.servers,
            searches: dns.searches,
            options: dns.options,
        },
        port_mappings,
        sysctls: linux.sysctls,
        privileged,
        cgroup_parent: linux.cgroup_parent,
        resources: sandbox_resources(linux.resources.as_ref(), "resources")?,
        overhead: sandbox_resources(linux.overhead.as_ref(), "overhead")?,
    })
}

/// The pod-level resources of a RunPodSandbox (none: all unset).
fn sandbox_resources(
    r: Option<&cri::LinuxContainerResources>,
    what: &str,
) -> Result<Resources, Status> {
    r.map_or_else(
        || Ok(Resources::default()),
        |r| {
            resources(r).map_err(|s| {
                invalid(format!(
                    "RunPodSandbox: config.linux.{what}: {}",
                    s.message()
                ))
            })
        },
    )
}

/// Checks what the pod's VM is set up with before any work starts: a bad field is refused
/// as InvalidArgument naming it, not found out by the agent after a VM was made for it.
fn validate_pod_config(config: &cri::PodSandboxConfig) -> Result<(), Status> {
    let field = |name: &str, why: &dyn std::fmt::Display| {
        invalid(format!("RunPodSandbox: config.{name}: {why}"))
    };
    if let Some(meta) = &config.metadata {
        // Passed to CNI plugins in CNI_ARGS ("K=V;K=V"): a ';' would add arguments.
        for (name, value) in [
            ("name", &meta.name),
            ("namespace", &meta.namespace),
            ("uid", &meta.uid),
        ] {
            if value.len() > 253 || value.bytes().any(|b| b == b';' || b.is_ascii_control()) {
                return Err(field(
                    &format!("metadata.{name}"),
                    &format_args!("{value:?} has ';' or a control character, or is over 253 bytes"),
                ));
            }
        }
    }
    check_metadata_size("RunPodSandbox", &config.labels, &config.annotations)?;
    if !config.hostname.is_empty() {
        names::validate_hostname(&config.hostname).map_err(|e| field("hostname", &e))?;
    }
    if !config.log_directory.is_empty() && !config.log_directory.starts_with('/') {
        return Err(field(
            "log_directory",
            &format_args!("{:?} is not an absolute path", config.log_directory),
        ));
    }
    if let Some(dns) = &config.dns_config {
        for (list, name) in [
            (&dns.servers, "servers"),
            (&dns.searches, "searches"),
            (&dns.options, "options"),
        ] {
            // Each is one word of a resolv.conf line.
            if let Some((i, v)) = list.iter().enumerate().find(|(_, v)| {
                v.is_empty()
                    || v.len() > 255
                    || v.bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            }) {
                return Err(field(
                    &format!("dns_config.{name}[{i}]"),
                    &format_args!("{v:?} is not one word of at most 255 bytes"),
                ));
            }
        }
    }
    for (i, p) in config.port_mappings.iter().enumerate() {
        if !(1..=65535).contains(&p.container_port) || !(0..=65535).contains(&p.host_port) {
            return Err(field(
                &format!("port_mappings[{i}]"),
                &format_args!(
                    "container port {} or host port {} is out of range",
                    p.container_port, p.host_port
                ),
            ));
        }
    }
    if let Some(linux) = &config.linux {
        for name in linux.sysctls.keys() {
            names::sysctl_relative_path(name).map_err(|e| field("linux.sysctls", &e))?;
        }
    }
    Ok(())
}

/// Most bytes of labels and annotations together (keys and values), as the Kubernetes API
/// allows annotations: they are kept in every record and answered in every status.
pub(super) const MAX_METADATA_BYTES: usize = 256 * 1024;

/// Refuses labels and annotations over [`MAX_METADATA_BYTES`] together.
pub(super) fn check_metadata_size(
    rpc: &str,
    labels: &std::collections::HashMap<String, String>,
    annotations: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    let size: usize = labels
        .iter()
        .chain(annotations)
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if size > MAX_METADATA_BYTES {
        return Err(invalid(format!(
            "{rpc}: labels and annotations are {size} bytes together; at most {MAX_METADATA_BYTES}"
        )));
    }
    Ok(())
}

/// CRI resources as the agent applies them.
pub(super) fn resources(r: &cri::LinuxContainerResources) -> Result<Resources, Status> {
    let non_negative = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| invalid(format!("resources: {what} {v} is negative")))
    };
    if r.memory_limit_in_bytes < 0 || r.cpu_quota < -1 {
        return Err(invalid("resources: negative memory limit or CPU quota"));
    }
    Ok(Resources {
        cpu_shares: non_negative(r.cpu_shares, "cpu_shares")?,
        // -1 is "no limit" in CRI; the agent's 0.
        cpu_quota: r.cpu_quota.max(0),
        cpu_period: non_negative(r.cpu_period, "cpu_period")?,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        memory_limit_bytes: r.memory_limit_in_bytes,
        pids_limit: 0,
    })
}

fn id_u32(v: i64, what: &str) -> Result<u32, Status> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} {v} is not a valid id")))
}

/// A `ContainerSpec` from a `CreateContainer` config; refuses what a VM cannot do.
pub(super) fn container_spec(config: cri::ContainerConfig) -> Result<ContainerSpec, Status> {
    let meta = config
        .metadata
        .ok_or_else(|| invalid("CreateContainer: metadata is missing"))?;
    if meta.name.is_empty() {
        return Err(invalid("CreateContainer: metadata.name is empty"));
    }
    let image = config
        .image
        .map(|i| i.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| invalid("CreateContainer: image is missing"))?;
    check_metadata_size("CreateContainer", &config.labels, &config.annotations)?;
    if !config.devices.is_empty() || !config.cdi_devices.is_empty() {
        return Err(invalid(
            "devices are not supported: a VM runtime does not hand out the host's devices",
        ));
    }
    let mounts = mount_specs(config.mounts)?;
    let linux = config.linux.unwrap_or_default();
    let sc = linux.security_context.unwrap_or_default();
    let ns = sc.namespace_options.clone().unwrap_or_default();
    refuse_node_namespaces(&ns)?;
    let caps = sc.capabilities.clone().unwrap_or_default();
    let user = user_spec(&sc)?;
    let seccomp = seccomp_choice(&sc)?;
    check_lsm(&sc)?;
    Ok(ContainerSpec {
        name: meta.name,
        attempt: meta.attempt,
        labels: config.labels,
        annotations: config.annotations,
        image,
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        envs: config
            .envs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect(),
        mounts,
        log_path: config.log_path,
        tty: config.tty,
        stdin: config.stdin,
        stdin_once: config.stdin_once,
        user,
        cap_add: caps.add_capabilities,
        cap_drop: caps.drop_capabilities,
        no_new_privs: sc.no_new_privs,
        readonly_rootfs: sc.readonly_rootfs,
        masked_paths: sc.masked_paths,
        readonly_paths: sc.readonly_paths,
        privileged: sc.privileged,
        seccomp,
        pid_namespace: namespace_mode(ns.pid, "PID")?,
        ipc_namespace: namespace_mode(ns.ipc, "IPC")?,
        resources: linux
            .resources
            .as_ref()
            .map(resources)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// The container's mounts; refuses image volumes, bidirectional propagation and relative
/// container paths.
fn mount_specs(mounts: Vec<cri::Mount>) -> Result<Vec<MountSpec>, Status> {
    let mut specs = Vec::new();
    for m in mounts {
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(invalid(format!(
                "mount {}: image volumes are not supported",
                m.container_path
            )));
        }
        if m.propagation == cri::MountPropagation::PropagationBidirectional as i32 {
            return Err(invalid(format!(
                "mount {}: bidirectional propagation cannot cross a VM boundary",
                m.container_path
            )));
        }
        if !m.container_path.starts_with('/') {
            return Err(invalid(format!(
                "mount container path {:?} is not absolute",
                m.container_path
            )));
        }
        specs.push(MountSpec {
            container_path: m.container_path,
            host_path: PathBuf::from(m.host_path),
            readonly: m.readonly,
            propagation: if m.propagation
                == cri::MountPropagation::PropagationHostToContainer as i32
            {
                crate::vmm::Propagation::HostToContainer
            } else {
                crate::vmm::Propagation::Private
            },
        });
    }
    Ok(specs)
}

/// A container's PID or IPC namespace: the pod's or its own.
fn namespace_mode(v: i32, what: &str) -> Result<NamespaceMode, Status> {
    match cri::NamespaceMode::try_from(v) {
        Ok(cri::NamespaceMode::Pod) => Ok(NamespaceMode::Pod),
        Ok(cri::NamespaceMode::Container) => Ok(NamespaceMode::Container),
        Ok(cri::NamespaceMode::Target) => Err(invalid(format!(
            "targeting another container's {what} namespace is not supported"
        ))),
        _ => Err(invalid(format!("unknown {what} namespace mode {v}"))),
    }
}

/// The container's seccomp: the `seccomp` profile, else the deprecated
/// `seccomp_profile_path` (`runtime/default`, `docker/default`, `unconfined`,
/// `localhost/<path>`), else unconfined (as containerd and kubelet without
/// `--seccomp-default`).
// Older kubelets send only the deprecated fields.
#[allow(deprecated)]
fn seccomp_choice(sc: &cri::LinuxContainerSecurityContext) -> Result<SeccompChoice, Status> {
    use cri::security_profile::ProfileType;
    let localhost = |path: &str| {
        if path.starts_with('/') {
            Ok(SeccompChoice::Localhost(PathBuf::from(path)))
        } else {
            Err(invalid(format!(
                "linux.security_context.seccomp: localhost profile {path:?} is not an absolute path"
            )))
        }
    };
    if let Some(p) = &sc.seccomp {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(SeccompChoice::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(SeccompChoice::Unconfined),
            Ok(ProfileType::Localhost) => localhost(&p.localhost_ref),
            Err(_) => Err(invalid(format!(
                "linux.security_context.seccomp: unknown profile type {}",
                p.profile_type
            ))),
        };
    }
    match sc.seccomp_profile_path.as_str() {
        "" | "unconfined" => Ok(SeccompChoice::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompChoice::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(path) => localhost(path),
            None => Err(invalid(format!(
                "linux.security_context.seccomp_profile_path: unknown profile {other:?}"
            ))),
        },
    }
}

/// AppArmor and SELinux do not exist in the guest (the VM is the confinement): the runtime
/// default and unconfined are accepted as they are, a named profile or SELinux label is
/// refused rather than silently not applied.
#[allow(deprecated)]
fn check_lsm(sc: &cri::LinuxContainerSecurityContext) -> Result<(), Status> {
    use cri::security_profile::ProfileType;
    let apparmor_named = match &sc.apparmor {
        Some(p) => p.profile_type == ProfileType::Localhost as i32,
        None => !matches!(
            sc.apparmor_profile.as_str(),
            "" | "runtime/default" | "unconfined"
        ),
    };
    if apparmor_named {
        return Err(invalid(
            "linux.security_context.apparmor: AppArmor profiles are not supported: the guest \
             kernel has no AppArmor (the pod's VM is its confinement); use RuntimeDefault or \
             Unconfined",
        ));
    }
    if let Some(se) = &sc.selinux_options
        && !(se.user.is_empty()
            && se.role.is_empty()
            && se.r#type.is_empty()
            && se.level.is_empty())
    {
        return Err(invalid(
            "linux.security_context.selinux_options: SELinux labels are not supported: the \
             guest kernel has no SELinux (the pod's VM is its confinement)",
        ));
    }
    Ok(())
}

/// The user the container runs as. A group alone is refused, as kubelet and containerd
/// do: it would pair with whatever user the image names.
fn user_spec(sc: &cri::LinuxContainerSecurityContext) -> Result<UserSpec, Status> {
    if sc.run_as_group.is_some() && sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
        return Err(invalid(
            "CreateContainer: linux.security_context.run_as_group needs run_as_user or \
             run_as_username",
        ));
    }
    Ok(UserSpec {
        uid: sc
            .run_as_user
            .as_ref()
            .map(|v| id_u32(v.value, "run_as_user"))
            .transpose()?,
        gid: sc
            .run_as_group
            .as_ref()
            .map(|v| id_u32(v.value, "run_as_group"))
            .transpose()?,
        username: sc.run_as_username.clone(),
        supplemental_groups: sc
            .supplemental_groups
            .iter()
            .map(|g| id_u32(*g, "supplemental group"))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ns: &str, uid: &str) -> cri::RunPodSandboxRequest {
        cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    namespace: ns.into(),
                    uid: uid.into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        }
    }

    #[test]
    fn sandbox_metadata_is_required() {
        assert!(sandbox_spec(pod("a", "b", "c")).is_ok());
        for (req, what) in [
            (pod("", "b", "c"), "name"),
            (pod("a", "", "c"), "namespace"),
            (pod("a", "b", ""), "uid"),
        ] {
            let e = sandbox_spec(req).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(what), "{}", e.message());
        }
        let e = sandbox_spec(cri::RunPodSandboxRequest::default()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn host_namespaces_are_refused() {
        for (ns, what) in [
            (
                cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                },
                "network",
            ),
            (
                cri::NamespaceOption {
                    pid: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                },
                "PID",
            ),
            (
                cri::NamespaceOption {
                    ipc: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                },
                "IPC",
            ),
        ] {
            let mut req = pod("a", "b", "c");
            if let Some(c) = req.config.as_mut() {
                c.linux = Some(cri::LinuxPodSandboxConfig {
                    security_context: Some(cri::LinuxSandboxSecurityContext {
                        namespace_options: Some(ns),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            let e = sandbox_spec(req).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message()
                    .contains(&format!("a VM cannot share the host's {what} namespace")),
                "{}",
                e.message()
            );
        }
    }

    #[test]
    fn pod_fields_are_checked_before_any_work() {
        let with = |f: &dyn Fn(&mut cri::PodSandboxConfig)| {
            let mut req = pod("a", "b", "c");
            if let Some(c) = req.config.as_mut() {
                f(c);
            }
            sandbox_spec(req)
        };
        // No hostname is fine (the node's is used); a good one too.
        assert_eq!(with(&|_| {}).unwrap().hostname, "");
        assert_eq!(
            with(&|c| c.hostname = "web-0".into()).unwrap().hostname,
            "web-0"
        );
        type Edit<'a> = &'a dyn Fn(&mut cri::PodSandboxConfig);
        let bad: [(Edit, &str); 6] = [
            (&|c| c.hostname = "a".repeat(65), "config.hostname"),
            (&|c| c.hostname = "under_score".into(), "config.hostname"),
            (
                &|c| c.log_directory = "relative/logs".into(),
                "config.log_directory",
            ),
            (
                &|c| {
                    c.dns_config = Some(cri::DnsConfig {
                        searches: vec!["a.svc\nnameserver 6.6.6.6".into()],
                        ..Default::default()
                    })
                },
                "config.dns_config.searches[0]",
            ),
            (
                &|c| {
                    c.port_mappings = vec![cri::PortMapping {
                        container_port: 70000,
                        ..Default::default()
                    }]
                },
                "config.port_mappings[0]",
            ),
            (
                &|c| {
                    c.linux = Some(cri::LinuxPodSandboxConfig {
                        sysctls: [("net/../../etc".to_string(), "1".to_string())].into(),
                        ..Default::default()
                    })
                },
                "config.linux.sysctls",
            ),
        ];
        for (f, what) in bad {
            let e = with(f).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}");
            assert!(e.message().contains(what), "{what}: {}", e.message());
        }
    }

    #[test]
    fn run_as_group_needs_a_user() {
        let sc = |user: Option<i64>, name: &str| cri::LinuxContainerSecurityContext {
            run_as_user: user.map(|value| cri::Int64Value { value }),
            run_as_username: name.into(),
            run_as_group: Some(cri::Int64Value { value: 100 }),
            ..Default::default()
        };
        let e = user_spec(&sc(None, "")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("run_as_group"), "{}", e.message());
        assert_eq!(user_spec(&sc(Some(1000), "")).unwrap().gid, Some(100));
        assert_eq!(user_spec(&sc(None, "nobody")).unwrap().gid, Some(100));
    }

    fn container(name: &str) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn container_requests_are_validated() {
        let spec = container_spec(container("c")).unwrap();
        assert_eq!(spec.pid_namespace, NamespaceMode::Pod);
        assert_eq!(spec.image, "busybox");
        assert!(container_spec(container("")).is_err());

        let mut c = container("c");
        c.devices.push(cri::Device {
            container_path: "/dev/x".into(),
            host_path: "/dev/x".into(),
            permissions: "rwm".into(),
        });
        assert_eq!(
            container_spec(c).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        // Privileged inside the VM: taken (the pod must be privileged too).
        let mut c = container("c");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(container_spec(c).unwrap().privileged);

        let mut c = container("c");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                ..Default::default()
            }),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_quota: -1,
                ..Default::default()
            }),
        });
        let spec = container_spec(c).unwrap();
        assert_eq!(spec.pid_namespace, NamespaceMode::Container);
        assert_eq!(spec.user.uid, Some(1000));
        assert_eq!(spec.resources.memory_limit_bytes, 64 << 20);
        assert_eq!(spec.resources.cpu_quota, 0);
    }
    #[test]
    #[allow(deprecated)]
    fn seccomp_and_lsm_choices() {
        use cri::security_profile::ProfileType;
        let sc =
            |profile: Option<(ProfileType, &str)>, path: &str| cri::LinuxContainerSecurityContext {
                seccomp: profile.map(|(t, r)| cri::SecurityProfile {
                    profile_type: t as i32,
                    localhost_ref: r.into(),
                }),
                seccomp_profile_path: path.into(),
                ..Default::default()
            };
        let cases = [
            (sc(None, ""), SeccompChoice::Unconfined),
            (sc(None, "runtime/default"), SeccompChoice::RuntimeDefault),
            (sc(None, "docker/default"), SeccompChoice::RuntimeDefault),
            (
                sc(None, "localhost//p.json"),
                SeccompChoice::Localhost("/p.json".into()),
            ),
            (
                sc(Some((ProfileType::RuntimeDefault, "")), "unconfined"),
                SeccompChoice::RuntimeDefault,
            ),
            (
                sc(Some((ProfileType::Unconfined, "")), ""),
                SeccompChoice::Unconfined,
            ),
            (
                sc(Some((ProfileType::Localhost, "/x.json")), ""),
                SeccompChoice::Localhost("/x.json".into()),
            ),
        ];
        for (ctx, want) in cases {
            assert_eq!(seccomp_choice(&ctx).expect("choice"), want, "{ctx:?}");
        }
        for bad in [
            sc(None, "localhost/relative.json"),
            sc(None, "something"),
            sc(Some((ProfileType::Localhost, "x.json")), ""),
        ] {
            assert_eq!(
                seccomp_choice(&bad).expect_err("refused").code(),
                tonic::Code::InvalidArgument
            );
        }
        let apparmor = |t: ProfileType, old: &str| cri::LinuxContainerSecurityContext {
            apparmor: (old.is_empty()).then(|| cri::SecurityProfile {
                profile_type: t as i32,
                localhost_ref: "p".into(),
            }),
            apparmor_profile: old.into(),
            ..Default::default()
        };
        assert!(check_lsm(&apparmor(ProfileType::RuntimeDefault, "")).is_ok());
        assert!(check_lsm(&apparmor(ProfileType::Unconfined, "")).is_ok());
        assert!(check_lsm(&apparmor(ProfileType::Localhost, "")).is_err());
        assert!(check_lsm(&apparmor(ProfileType::Localhost, "runtime/default")).is_ok());
        assert!(check_lsm(&apparmor(ProfileType::Localhost, "localhost/p")).is_err());
        let selinux = cri::LinuxContainerSecurityContext {
            selinux_options: Some(cri::SeLinuxOption {
                level: "s0:c1,c2".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_lsm(&selinux).is_err());
    }
    #[test]
    fn cni_args_and_metadata_size_are_checked() {
        let with_name = |name: &str| {
            let mut r = pod(name, "default", "uid-1");
            validate_pod_config(r.config.as_mut().expect("config"))
        };
        assert!(with_name("web-0").is_ok());
        for bad in ["a;K8S_POD_NAMESPACE=kube-system", "a\nb", &"n".repeat(254)] {
            let e = with_name(bad).expect_err(bad);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("metadata.name"), "{}", e.message());
        }
        let mut big = pod("big", "default", "uid-1");
        big.config
            .as_mut()
            .expect("config")
            .annotations
            .insert("a".into(), "x".repeat(MAX_METADATA_BYTES));
        let e = validate_pod_config(big.config.as_ref().expect("config")).expect_err("big");
        assert!(
            e.message().contains("labels and annotations"),
            "{}",
            e.message()
        );
    }
}
