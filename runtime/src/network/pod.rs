//! A pod's network: a named network namespace per sandbox, the CNI plugins of the first
//! valid config in `cni.conf_dir` run in it (ADD at RunPodSandbox, DEL at StopPodSandbox),
//! a TAP redirected to and from the CNI interface with tc (see [`crate::network::tap`]) for the
//! VMM, and the guest's interface configuration (addresses, routes, MTU) for the agent's
//! ConfigureNetwork.
//!
//! What DEL needs after a podvisord restart is kept in `network.json` in the pod directory:
//! the network config as used (the config directory may have changed since), the
//! attachment and the ADD result. The file is written before ADD (so a crash during ADD
//! still leads to a DEL) and removed once DEL succeeded (so a second StopPodSandbox does
//! not run the plugins again).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use podvisor_common::IoError;
use podvisor_proto::v1 as agent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::CniSettings;
use crate::network::cni::result::InvalidCidr;
use crate::network::cni::{
    self, Attachment, CapabilityArgs, Cni, CniError, CniResult, NetworkConfigList, PodRef,
};
use crate::network::netns::{self, NetNs, NetnsError};
use crate::network::tap::{self, TapError, TapLink};
use crate::state::{PortMapping, Protocol};

/// The interface the CNI plugins create in the pod's namespace.
pub const CNI_IFNAME: &str = "eth0";
/// The file in the pod directory that keeps what DEL needs.
pub const NETWORK_FILE: &str = "network.json";
/// Prefix of the pods' network namespace names (`/run/netns/podvisor-<sandbox id>`).
pub const NETNS_PREFIX: &str = "podvisor-";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No usable CNI network (config missing or invalid, a plugin missing).
    #[error("the pod network is not ready")]
    NotReady(#[source] CniError),
    /// A plugin failed or answered nonsense.
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The ADD result gives the pod no address.
    #[error("CNI network {network} gave interface {ifname} no IP address")]
    NoAddress { network: String, ifname: String },
    #[error("CNI result: {0}")]
    BadResult(#[from] InvalidCidr),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("network task: {0}")]
    Task(String),
}

impl NetworkError {
    /// Whether the cause is the host's network configuration rather than this pod.
    pub fn is_not_ready(&self) -> bool {
        matches!(self, NetworkError::NotReady(_))
    }
}

/// The name of the sandbox's network namespace.
pub fn netns_name(sandbox_id: &str) -> String {
    format!("{NETNS_PREFIX}{sandbox_id}")
}

/// The network the next pod would get: the first valid config of `conf_dir` whose
/// plugins are all installed. Its error says why pods cannot get a network (the CRI
/// `NetworkReady` condition).
pub fn load(settings: &CniSettings) -> Result<Cni, NetworkError> {
    let cni =
        Cni::load(&settings.conf_dir, settings.bin_dirs.clone()).map_err(NetworkError::NotReady)?;
    for plugin in &cni.network().plugins {
        cni::exec::find_plugin(&settings.bin_dirs, &plugin.plugin_type)
            .map_err(NetworkError::NotReady)?;
    }
    Ok(cni)
}

/// What `network.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    /// The network config as used, in conflist form.
    network: Value,
    netns: PathBuf,
    ifname: String,
    pod_namespace: String,
    pod_name: String,
    pod_uid: String,
    #[serde(default)]
    port_mappings: Vec<cni::PortMapping>,
    /// None while ADD has not returned.
    #[serde(default)]
    result: Option<CniResult>,
}

impl Persisted {
    fn attachment(&self, sandbox_id: &str) -> Attachment {
        Attachment {
            container_id: sandbox_id.to_owned(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            pod: Some(PodRef {
                namespace: self.pod_namespace.clone(),
                name: self.pod_name.clone(),
                uid: self.pod_uid.clone(),
            }),
            capabilities: CapabilityArgs {
                port_mappings: self.port_mappings.clone(),
            },
        }
    }

    fn cni(&self, settings: &CniSettings, file: &Path) -> Result<Cni, NetworkError> {
        let bytes = serde_json::to_vec(&self.network).map_err(|source| NetworkError::Parse {
            path: file.to_owned(),
            source,
        })?;
        let list = NetworkConfigList::from_conflist(&bytes, Some(file))?;
        Ok(Cni::new(list, settings.bin_dirs.clone()))
    }

    fn read(file: &Path) -> Result<Option<Self>, NetworkError> {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IoError::new("read", file, source).into()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| NetworkError::Parse {
                path: file.to_owned(),
                source,
            })
    }

    /// Writes the file: temporary file, fsync, rename.
    fn write(&self, file: &Path) -> Result<(), NetworkError> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| NetworkError::Parse {
            path: file.to_owned(),
            source,
        })?;
        let tmp = file.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(IoError::at("create", &tmp))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(IoError::at("write", &tmp))?;
        std::fs::rename(&tmp, file).map_err(|e| IoError::new("rename", &tmp, e).into())
    }
}

/// The network config in conflist form, for `network.json`.
fn conflist_value(list: &NetworkConfigList) -> Value {
    serde_json::json!({
        "cniVersion": list.cni_version,
        "name": list.name,
        "disableCheck": list.disable_check,
        "plugins": list.plugins.iter().map(|p| Value::Object(p.raw.clone())).collect::<Vec<_>>(),
    })
}

/// The pod's published ports as the `portMappings` capability (ports without a host port
/// publish nothing).
fn port_mappings(ports: &[PortMapping]) -> Vec<cni::PortMapping> {
    ports
        .iter()
        .filter_map(|p| {
            let host_port = u16::try_from(p.host_port).ok().filter(|p| *p > 0)?;
            let container_port = u16::try_from(p.container_port).ok().filter(|p| *p > 0)?;
            let protocol = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            Some(cni::PortMapping {
                host_port,
                container_port,
                protocol: protocol.into(),
                host_ip: p.host_ip.clone(),
            })
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetworkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetworkError::Task(e.to_string()))
}

/// Creates the pod directory (mode 0700, its parents as needed) unless it exists.
fn create_pod_dir(pod_dir: &Path) -> Result<(), IoError> {
    if let Some(parent) = pod_dir.parent() {
        std::fs::create_dir_all(parent).map_err(IoError::at("create directory", parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(pod_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(IoError::new("create pod directory", pod_dir, source)),
    }
}

/// A pod's network from ADD until it is released.
#[derive(Debug)]
pub struct PodNetwork {
    sandbox_id: String,
    netns: NetNs,
    cni: Cni,
    attachment: Attachment,
    result: CniResult,
    link: TapLink,
    file: PathBuf,
}

impl PodNetwork {
    /// Creates the namespace, runs CNI ADD and sets up the TAP. `pod_dir` is created if
    /// missing (`network.json` goes there). On failure nothing is left behind.
    pub async fn setup(
        settings: &CniSettings,
        sandbox_id: &str,
        pod_dir: &Path,
        pod: PodRef,
        ports: &[PortMapping],
    ) -> Result<Self, NetworkError> {
        let cni = load(settings)?;
        let existed = pod_dir.symlink_metadata().is_ok();
        let net = Self::setup_in(cni, sandbox_id, pod_dir, pod, ports).await;
        if net.is_err() && !existed {
            // Only the (then empty) directory is left of a failed setup.
            let _ = std::fs::remove_dir(pod_dir);
        }
        net
    }

    async fn setup_in(
        cni: Cni,
        sandbox_id: &str,
        pod_dir: &Path,
        pod: PodRef,
        ports: &[PortMapping],
    ) -> Result<Self, NetworkError> {
        create_pod_dir(pod_dir)?;
        let name = netns_name(sandbox_id);
        let ns = blocking(move || NetNs::create(&name)).await??;
        let persisted = Persisted {
            network: conflist_value(cni.network()),
            netns: ns.path().to_owned(),
            ifname: CNI_IFNAME.into(),
            pod_namespace: pod.namespace,
            pod_name: pod.name,
            pod_uid: pod.uid,
            port_mappings: port_mappings(ports),
            result: None,
        };
        let file = pod_dir.join(NETWORK_FILE);
        let mut net = Self {
            sandbox_id: sandbox_id.to_owned(),
            attachment: persisted.attachment(sandbox_id),
            netns: ns,
            cni,
            result: CniResult::default(),
            link: TapLink {
                tap: String::new(),
                mac: String::new(),
                mtu: 0,
            },
            file,
        };
        if let Err(e) = persisted.write(&net.file) {
            net.discard(false).await;
            return Err(e);
        }
        // Cni::add rolls a failed ADD back itself.
        net.result = match net.cni.add(&net.attachment).await {
            Ok(r) => r,
            Err(e) => {
                net.discard(false).await;
                return Err(e.into());
            }
        };
        let done = Persisted {
            result: Some(net.result.clone()),
            ..persisted
        };
        let linked = match done.write(&net.file) {
            Ok(()) => net.link_tap().await,
            Err(e) => Err(e),
        };
        net.link = match linked {
            Ok(link) => link,
            Err(e) => {
                net.discard(true).await;
                return Err(e);
            }
        };
        tracing::info!(
            sandbox = %net.sandbox_id,
            network = %net.cni.network().name,
            ips = ?net.ips(),
            mac = %net.link.mac,
            mtu = net.link.mtu,
            "pod network set up"
        );
        Ok(net)
    }

    /// Sets up the TAP for the result's addresses (the only source IPs the guest may use).
    async fn link_tap(&self) -> Result<TapLink, NetworkError> {
        let ips: Vec<IpAddr> = addresses_of(&self.result, CNI_IFNAME)?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        if ips.is_empty() {
            return Err(NetworkError::NoAddress {
                network: self.cni.network().name.clone(),
                ifname: CNI_IFNAME.into(),
            });
        }
        let ns = self.netns.clone();
        Ok(blocking(move || tap::setup(&ns, CNI_IFNAME, tap::DEFAULT_TAP_NAME, &ips)).await??)
    }

    /// Undoes a half-done setup, logging what fails.
    async fn discard(&self, added: bool) {
        if let Err(e) = self.release_inner(added).await {
            tracing::warn!(sandbox = %self.sandbox_id, "release a half set up pod network: {e}");
        }
    }

    async fn release_inner(&self, added: bool) -> Result<(), NetworkError> {
        let mut first: Option<NetworkError> = None;
        let ns = self.netns.clone();
        match blocking(move || tap::teardown(&ns, CNI_IFNAME, tap::DEFAULT_TAP_NAME)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first = Some(e.into()),
            Err(e) => first = Some(e),
        }
        if added && let Err(e) = self.cni.del(&self.attachment, Some(&self.result)).await {
            first.get_or_insert(e.into());
        }
        let ns = self.netns.clone();
        match blocking(move || ns.delete()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first.get_or_insert(e.into());
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = std::fs::remove_file(&self.file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            first.get_or_insert(IoError::new("remove", &self.file, e).into());
        }
        first.map_or(Ok(()), Err)
    }

    /// Releases everything [`PodNetwork::setup`] made, for a sandbox that never became
    /// ready: TAP, CNI attachment, namespace, `network.json`. Best effort; the first error
    /// is returned.
    pub async fn release(self) -> Result<(), NetworkError> {
        self.release_inner(true).await
    }

    /// [`PodNetwork::release`], logging rather than returning a failure: for error paths
    /// that already have an error to return.
    pub async fn abandon(self) {
        let sandbox = self.sandbox_id.clone();
        if let Err(e) = self.release().await {
            tracing::warn!(sandbox = %sandbox, "release the network of a failed sandbox: {e}");
        }
    }

    /// The namespace file the VMM must run in.
    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// The TAP for the VMM and the guest NIC's MAC and MTU.
    pub fn link(&self) -> &TapLink {
        &self.link
    }

    /// The pod's IPs, IPv4 first (the first is the pod's primary IP, as Kubernetes wants).
    pub fn ips(&self) -> Vec<String> {
        pod_ips(&self.result, &self.attachment.ifname)
    }

    /// The agent's ConfigureNetwork request for this network.
    pub fn guest_config(&self) -> Result<agent::ConfigureNetworkRequest, NetworkError> {
        guest_config(&self.result, &self.attachment.ifname, &self.link)
    }
}

/// The result's IPs of interface `ifname` (all of them when the result names no
/// interfaces), with their prefix lengths.
fn addresses_of(result: &CniResult, ifname: &str) -> Result<Vec<(IpAddr, u8)>, InvalidCidr> {
    let index = result.sandbox_interface(ifname).map(|(i, _)| i);
    result
        .ips
        .iter()
        .filter(|ip| index.is_none() || ip.interface.is_none() || ip.interface == index)
        .map(|ip| ip.cidr())
        .collect()
}

fn pod_ips(result: &CniResult, ifname: &str) -> Vec<String> {
    let mut ips: Vec<IpAddr> = addresses_of(result, ifname)
        .unwrap_or_default()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    // Stable: IPv4 before IPv6, each in the plugin's order.
    ips.sort_by_key(|a| a.is_ipv6());
    ips.iter().map(ToString::to_string).collect()
}

/// The guest side of the network: the NIC (found by `link.mac`) named `ifname` with the
/// result's addresses and `link.mtu`, and the result's routes. A route without a gateway
/// goes through the gateway of the pod's IP of the same family (what the CNI spec means by
/// it); when that IP has none either, the route is on-link.
fn guest_config(
    result: &CniResult,
    ifname: &str,
    link: &TapLink,
) -> Result<agent::ConfigureNetworkRequest, NetworkError> {
    let addresses = addresses_of(result, ifname)?;
    let index = result.sandbox_interface(ifname).map(|(i, _)| i);
    let gateway_of = |v4: bool| {
        result
            .ips
            .iter()
            .filter(|ip| index.is_none() || ip.interface.is_none() || ip.interface == index)
            .filter_map(|ip| ip.gateway)
            .find(|gw| gw.is_ipv4() == v4)
    };
    let mut routes = Vec::new();
    for r in &result.routes {
        let (dst, _) = cni::result::parse_cidr(&r.dst)?;
        let gateway = r.gw.or_else(|| gateway_of(dst.is_ipv4()));
        routes.push(agent::Route {
            destination: r.dst.clone(),
            gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
            interface_mac: link.mac.clone(),
            metric: 0,
        });
    }
    Ok(agent::ConfigureNetworkRequest {
        interfaces: vec![agent::Interface {
            mac: link.mac.clone(),
            name: ifname.to_owned(),
            addresses: addresses
                .into_iter()
                .map(|(a, len)| agent::IpAddress {
                    address: a.to_string(),
                    prefix_len: u32::from(len),
                })
                .collect(),
            mtu: link.mtu,
            current_mac: String::new(),
        }],
        routes,
    })
}

/// StopPodSandbox's half: deletes the TAP and runs CNI DEL with what `network.json` in
/// `pod_dir` recorded, then removes the file. Idempotent: without the file there is nothing
/// to release; a namespace that is gone already is fine. The namespace itself stays until
/// [`delete_netns`].
pub async fn release_recorded(
    settings: &CniSettings,
    sandbox_id: &str,
    pod_dir: &Path,
) -> Result<(), NetworkError> {
    let file = pod_dir.join(NETWORK_FILE);
    let Some(p) = Persisted::read(&file)? else {
        return Ok(());
    };
    let name = netns_name(sandbox_id);
    let teardown = blocking(move || match NetNs::open(&name) {
        Ok(ns) => tap::teardown(&ns, CNI_IFNAME, tap::DEFAULT_TAP_NAME),
        Err(NetnsError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    })
    .await?;
    if let Err(e) = teardown {
        // The VM is gone; a TAP left in the namespace goes with the namespace.
        tracing::warn!(sandbox = sandbox_id, "remove the TAP: {e}");
    }
    let cni = p.cni(settings, &file)?;
    cni.del(&p.attachment(sandbox_id), p.result.as_ref())
        .await?;
    std::fs::remove_file(&file).map_err(IoError::at("remove", &file))?;
    tracing::info!(sandbox = sandbox_id, "pod network released (CNI DEL)");
    Ok(())
}

/// The sandbox id `network.json` in `pod_dir` was written for (its namespace's name says
/// it); None without the file. It is written before CNI ADD, so a podvisord that died
/// during RunPodSandbox leaves it for the next one to release.
pub fn recorded_sandbox_id(pod_dir: &Path) -> Result<Option<String>, NetworkError> {
    let file = pod_dir.join(NETWORK_FILE);
    Ok(Persisted::read(&file)?.and_then(|p| {
        let name = p.netns.file_name()?.to_str()?;
        let id = name.strip_prefix(NETNS_PREFIX)?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    }))
}

/// RemovePodSandbox's half: deletes the sandbox's namespace (idempotent).
pub async fn delete_netns(sandbox_id: &str) -> Result<(), NetworkError> {
    let name = netns_name(sandbox_id);
    blocking(move || netns::delete(&name)).await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge_result() -> CniResult {
        serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
              "interfaces":[{"name":"cni0","mac":"aa:aa:aa:aa:aa:01"},
                {"name":"veth1","mac":"aa:aa:aa:aa:aa:02"},
                {"name":"eth0","mac":"aa:aa:aa:aa:aa:03","sandbox":"/run/netns/x"}],
              "ips":[{"address":"fd00::5/64","gateway":"fd00::1","interface":2},
                {"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":2}],
              "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"},{"dst":"10.9.0.0/16","gw":"10.1.0.254"}]}"#,
        )
        .unwrap()
    }

    fn link() -> TapLink {
        TapLink {
            tap: "tap0_pv".into(),
            mac: "aa:aa:aa:aa:aa:03".into(),
            mtu: 1450,
        }
    }

    #[test]
    fn guest_gets_addresses_mtu_and_routes_with_family_gateways() {
        let req = guest_config(&bridge_result(), "eth0", &link()).unwrap();
        let nic = &req.interfaces[0];
        assert_eq!(
            (nic.mac.as_str(), nic.name.as_str(), nic.mtu),
            ("aa:aa:aa:aa:aa:03", "eth0", 1450)
        );
        let addrs: Vec<_> = nic
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix_len))
            .collect();
        assert_eq!(addrs, ["fd00::5/64", "10.1.0.5/24"]);
        let routes: Vec<_> = req
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0", "10.1.0.1"),
                ("::/0", "fd00::1"),
                ("10.9.0.0/16", "10.1.0.254")
            ]
        );
        assert!(
            req.routes
                .iter()
                .all(|r| r.interface_mac == "aa:aa:aa:aa:aa:03")
        );
    }

    #[test]
    fn route_without_any_gateway_is_on_link_and_bad_cidrs_fail() {
        let mut r = bridge_result();
        for ip in &mut r.ips {
            ip.gateway = None;
        }
        let req = guest_config(&r, "eth0", &link()).unwrap();
        assert_eq!(req.routes[0].gateway, "");
        r.routes[0].dst = "default".into();
        assert!(guest_config(&r, "eth0", &link()).is_err());
    }

    #[test]
    fn pod_ips_put_ipv4_first_and_skip_other_interfaces() {
        let mut r = bridge_result();
        r.ips.push(cni::IpConfig {
            address: "192.168.9.9/24".into(),
            interface: Some(0),
            ..Default::default()
        });
        assert_eq!(pod_ips(&r, "eth0"), ["10.1.0.5", "fd00::5"]);
        // A result without interfaces (some plugins): all its IPs are the pod's.
        r.interfaces.clear();
        assert_eq!(pod_ips(&r, "eth0"), ["10.1.0.5", "192.168.9.9", "fd00::5"]);
    }

    #[test]
    fn only_ports_with_a_host_port_are_published() {
        let ports = [
            PortMapping {
                protocol: Protocol::Udp,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            },
            PortMapping {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: 0,
                host_ip: String::new(),
            },
        ];
        assert_eq!(
            port_mappings(&ports),
            [cni::PortMapping {
                host_port: 5353,
                container_port: 53,
                protocol: "udp".into(),
                host_ip: "127.0.0.1".into(),
            }]
        );
    }

    #[test]
    fn persisted_network_restores_the_config_and_the_attachment() {
        let list = NetworkConfigList::from_conf(
            br#"{"cniVersion":"1.0.0","name":"n","type":"bridge","bridge":"b0"}"#,
            None,
        )
        .unwrap();
        let p = Persisted {
            network: conflist_value(&list),
            netns: "/run/netns/podvisor-abc".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            pod_uid: "u1".into(),
            port_mappings: vec![],
            result: Some(bridge_result()),
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(NETWORK_FILE);
        assert!(Persisted::read(&file).unwrap().is_none());
        p.write(&file).unwrap();
        let back = Persisted::read(&file).unwrap().unwrap();
        assert_eq!(back.result, p.result);
        let settings = CniSettings {
            conf_dir: dir.path().into(),
            bin_dirs: vec![],
            conf_template: None,
        };
        let cni = back.cni(&settings, &file).unwrap();
        assert_eq!(cni.network().name, "n");
        assert_eq!(cni.network().plugins[0].plugin_type, "bridge");
        assert_eq!(cni.network().plugins[0].raw["bridge"], "b0");
        let att = back.attachment("sb1");
        assert_eq!(att.netns, Path::new("/run/netns/podvisor-abc"));
        assert_eq!(att.pod.unwrap().name, "web");
    }

    #[test]
    fn load_says_why_the_network_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let settings = CniSettings {
            conf_dir: dir.path().into(),
            bin_dirs: vec![dir.path().join("bin")],
            conf_template: None,
        };
        let e = load(&settings).unwrap_err();
        assert!(e.is_not_ready(), "{e}");
        std::fs::write(
            dir.path().join("10-n.conf"),
            r#"{"cniVersion":"1.0.0","name":"n","type":"no-such-plugin"}"#,
        )
        .unwrap();
        let e = load(&settings).unwrap_err();
        assert!(
            matches!(&e, NetworkError::NotReady(CniError::PluginNotFound { plugin, .. }) if plugin == "no-such-plugin"),
            "{e:?}"
        );
    }

    #[test]
    fn netns_names_derive_from_the_sandbox_id() {
        assert_eq!(netns_name("abc"), "podvisor-abc");
    }
}
