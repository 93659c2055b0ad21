//! `POD.json` and `CONTAINER.json`: the subsets of the CRI `PodSandboxConfig` and
//! `ContainerConfig` podvisorctl reads, unknown fields refused.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use k8s_cri::v1 as cri;
use serde::Deserialize;

/// The subset of `PodSandboxConfig` read from `POD.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodConfigFile {
    metadata: PodMetadataFile,
    hostname: String,
    #[serde(alias = "logDirectory")]
    log_directory: String,
    #[serde(alias = "dnsConfig")]
    dns_config: Option<DnsConfigFile>,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    linux: Option<PodLinuxFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodMetadataFile {
    name: String,
    namespace: String,
    uid: String,
    attempt: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DnsConfigFile {
    servers: Vec<String>,
    searches: Vec<String>,
    options: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodLinuxFile {
    #[serde(alias = "cgroupParent")]
    cgroup_parent: String,
    sysctls: HashMap<String, String>,
    resources: Option<ResourcesFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ResourcesFile {
    #[serde(alias = "cpuPeriod")]
    cpu_period: i64,
    #[serde(alias = "cpuQuota")]
    cpu_quota: i64,
    #[serde(alias = "cpuShares")]
    cpu_shares: i64,
    #[serde(alias = "memoryLimitInBytes")]
    memory_limit_in_bytes: i64,
}

/// The subset of `ContainerConfig` read from `CONTAINER.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerConfigFile {
    metadata: ContainerMetadataFile,
    image: ImageFile,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(alias = "workingDir")]
    working_dir: String,
    envs: Vec<KeyValueFile>,
    #[serde(alias = "logPath")]
    log_path: String,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    linux: Option<ContainerLinuxFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerMetadataFile {
    name: String,
    attempt: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ImageFile {
    image: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyValueFile {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerLinuxFile {
    resources: Option<ResourcesFile>,
}

impl From<ResourcesFile> for cri::LinuxContainerResources {
    fn from(r: ResourcesFile) -> Self {
        cri::LinuxContainerResources {
            cpu_period: r.cpu_period,
            cpu_quota: r.cpu_quota,
            cpu_shares: r.cpu_shares,
            memory_limit_in_bytes: r.memory_limit_in_bytes,
            ..Default::default()
        }
    }
}

pub(crate) fn read_pod_config(path: &Path) -> anyhow::Result<cri::PodSandboxConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_pod_config(&text).with_context(|| format!("pod config {}", path.display()))
}

pub(crate) fn read_container_config(path: &Path) -> anyhow::Result<cri::ContainerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_container_config(&text).with_context(|| format!("container config {}", path.display()))
}

/// A `PodSandboxConfig` from the JSON of `POD.json`.
fn parse_pod_config(json: &str) -> anyhow::Result<cri::PodSandboxConfig> {
    let file: PodConfigFile = serde_json::from_str(json)?;
    if file.metadata.name.is_empty() {
        bail!("metadata.name is required");
    }
    Ok(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: file.metadata.name,
            uid: file.metadata.uid,
            namespace: file.metadata.namespace,
            attempt: file.metadata.attempt,
        }),
        hostname: file.hostname,
        log_directory: file.log_directory,
        dns_config: file.dns_config.map(|d| cri::DnsConfig {
            servers: d.servers,
            searches: d.searches,
            options: d.options,
        }),
        labels: file.labels,
        annotations: file.annotations,
        linux: file.linux.map(|l| cri::LinuxPodSandboxConfig {
            cgroup_parent: l.cgroup_parent,
            sysctls: l.sysctls,
            resources: l.resources.map(Into::into),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A `ContainerConfig` from the JSON of `CONTAINER.json`.
fn parse_container_config(json: &str) -> anyhow::Result<cri::ContainerConfig> {
    let file: ContainerConfigFile = serde_json::from_str(json)?;
    if file.metadata.name.is_empty() {
        bail!("metadata.name is required");
    }
    if file.image.image.is_empty() {
        bail!("image.image is required");
    }
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: file.metadata.name,
            attempt: file.metadata.attempt,
        }),
        image: Some(image_spec(&file.image.image)),
        command: file.command,
        args: file.args,
        working_dir: file.working_dir,
        envs: file
            .envs
            .into_iter()
            .map(|kv| cri::KeyValue {
                key: kv.key,
                value: kv.value,
            })
            .collect(),
        labels: file.labels,
        annotations: file.annotations,
        log_path: file.log_path,
        linux: file.linux.map(|l| cri::LinuxContainerConfig {
            resources: l.resources.map(Into::into),
            security_context: None,
        }),
        ..Default::default()
    })
}

pub(crate) fn pod_name(config: &cri::PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

pub(crate) fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_config_subset() {
        let config = parse_pod_config(
            r#"{"metadata": {"name": "web", "namespace": "default", "uid": "u1", "attempt": 2},
                "hostname": "web-host", "logDirectory": "/var/log/pods/web",
                "dns_config": {"servers": ["1.1.1.1"], "searches": ["svc"], "options": ["ndots:5"]},
                "labels": {"app": "web"}, "annotations": {"a": "b"},
                "linux": {"cgroup_parent": "/kubepods", "sysctls": {"net.ipv4.ip_forward": "1"},
                          "resources": {"memory_limit_in_bytes": 268435456, "cpuQuota": 50000}}}"#,
        )
        .expect("parse");
        let meta = config.metadata.expect("metadata");
        assert_eq!(
            (
                meta.name.as_str(),
                meta.namespace.as_str(),
                meta.uid.as_str()
            ),
            ("web", "default", "u1")
        );
        assert_eq!(meta.attempt, 2);
        assert_eq!(config.hostname, "web-host");
        assert_eq!(config.log_directory, "/var/log/pods/web");
        let dns = config.dns_config.expect("dns");
        assert_eq!(dns.servers, ["1.1.1.1"]);
        assert_eq!(dns.options, ["ndots:5"]);
        assert_eq!(config.labels["app"], "web");
        assert_eq!(config.annotations["a"], "b");
        let linux = config.linux.expect("linux");
        assert_eq!(linux.cgroup_parent, "/kubepods");
        assert_eq!(linux.sysctls["net.ipv4.ip_forward"], "1");
        let resources = linux.resources.expect("resources");
        assert_eq!(resources.memory_limit_in_bytes, 268_435_456);
        assert_eq!(resources.cpu_quota, 50_000);

        // The smallest config crictl users write.
        let minimal = parse_pod_config(r#"{"metadata": {"name": "p"}}"#).expect("minimal");
        assert!(minimal.linux.is_none() && minimal.dns_config.is_none());

        let err = parse_pod_config(r#"{"metadata": {"namespace": "x"}}"#).expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = parse_pod_config(r#"{"metadata": {"name": "p"}, "port_mappings": []}"#)
            .expect_err("unsupported field");
        assert!(err.to_string().contains("port_mappings"), "{err}");
        parse_pod_config("{").expect_err("not JSON");
    }

    #[test]
    fn container_config_subset() {
        let config = parse_container_config(
            r#"{"metadata": {"name": "nginx", "attempt": 1}, "image": {"image": "nginx:1.27"},
                "command": ["/bin/sh", "-c"], "args": ["echo hi"], "working_dir": "/srv",
                "envs": [{"key": "A", "value": "1"}, {"key": "EMPTY"}],
                "log_path": "nginx/1.log", "labels": {"l": "v"}, "annotations": {"k": "v"},
                "linux": {"resources": {"memoryLimitInBytes": 134217728}}}"#,
        )
        .expect("parse");
        let meta = config.metadata.expect("metadata");
        assert_eq!((meta.name.as_str(), meta.attempt), ("nginx", 1));
        assert_eq!(config.image.expect("image").image, "nginx:1.27");
        assert_eq!(config.command, ["/bin/sh", "-c"]);
        assert_eq!(config.args, ["echo hi"]);
        assert_eq!(config.working_dir, "/srv");
        let envs: Vec<(&str, &str)> = config
            .envs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(envs, [("A", "1"), ("EMPTY", "")]);
        assert_eq!(config.log_path, "nginx/1.log");
        assert_eq!(config.labels["l"], "v");
        assert_eq!(config.annotations["k"], "v");
        let resources = config
            .linux
            .and_then(|l| l.resources)
            .expect("linux resources");
        assert_eq!(resources.memory_limit_in_bytes, 134_217_728);

        let err = parse_container_config(r#"{"metadata": {"name": "c"}}"#).expect_err("no image");
        assert!(err.to_string().contains("image.image"), "{err}");
        let err =
            parse_container_config(r#"{"image": {"image": "busybox"}}"#).expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = parse_container_config(
            r#"{"metadata": {"name": "c"}, "image": {"image": "busybox"}, "mounts": []}"#,
        )
        .expect_err("unsupported field");
        assert!(err.to_string().contains("mounts"), "{err}");
    }
}
