//! The result of a CNI ADD (spec 1.0.0; 0.3.x and 0.4.0 results have the same shape plus a
//! `version` per IP, kept when present). Fields this type does not know (newer spec
//! versions, plugin extensions) are kept in `extra`, so a result fed back to plugins as
//! `prevResult` is what the previous plugin wrote. The whole thing is serializable, so the
//! caller can persist it and hand it to DEL after a restart.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The netns path for interfaces inside the sandbox, empty for host-side ones.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR: "10.88.0.5/16".
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// "4" or "6": only in 0.3.x / 0.4.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// CIDR: "0.0.0.0/0".
    pub dst: String,
    /// Absent: the default gateway the plugin chose (for the pod, the gateway of the IP of
    /// the same family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}")]
pub struct InvalidCidr(pub String);

/// Parses "10.88.0.5/16" into the address and prefix length.
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), InvalidCidr> {
    let bad = || InvalidCidr(cidr.to_owned());
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((addr, len))
}

impl IpConfig {
    /// The address and prefix length of [`IpConfig::address`].
    pub fn cidr(&self) -> Result<(IpAddr, u8), InvalidCidr> {
        parse_cidr(&self.address)
    }
}

impl CniResult {
    /// The index and entry of the interface named `ifname` inside the sandbox (e.g. "eth0").
    pub fn sandbox_interface(&self, ifname: &str) -> Option<(usize, &Interface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == ifname && !i.sandbox.is_empty())
    }

    /// The IPs assigned to interface `index` (see [`CniResult::sandbox_interface`]).
    pub fn ips_of(&self, index: usize) -> impl Iterator<Item = &IpConfig> {
        self.ips
            .iter()
            .filter(move |ip| ip.interface == Some(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_1_0_0_result_and_round_trips_it() {
        let text = r#"{
          "cniVersion": "1.0.0",
          "interfaces": [
            {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
            {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
            {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/x", "mtu": 1400}
          ],
          "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
                  {"address": "fd00::5/64", "interface": 2}],
          "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "10.9.0.0/16"}],
          "dns": {"nameservers": ["10.1.0.10"], "search": ["svc.local"]}
        }"#;
        let r: CniResult = serde_json::from_str(text).unwrap();
        let (idx, eth0) = r.sandbox_interface("eth0").unwrap();
        assert_eq!((idx, eth0.mac.as_str()), (2, "aa:aa:aa:aa:aa:03"));
        assert_eq!(eth0.extra["mtu"], 1400);
        let ips: Vec<_> = r.ips_of(2).map(|i| i.cidr().unwrap()).collect();
        assert_eq!(
            ips,
            vec![
                ("10.1.0.5".parse().unwrap(), 24),
                ("fd00::5".parse().unwrap(), 64)
            ]
        );
        assert_eq!(r.ips[0].gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(r.routes[1].gw, None);
        assert_eq!(r.dns.nameservers, vec!["10.1.0.10"]);
        assert!(r.sandbox_interface("cni0").is_none(), "host side");

        let again: CniResult = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn parses_a_0_4_0_result_keeping_ip_versions() {
        let text = r#"{"cniVersion": "0.4.0",
          "ips": [{"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1"}],
          "dns": {}}"#;
        let r: CniResult = serde_json::from_str(text).unwrap();
        assert_eq!(r.ips[0].version.as_deref(), Some("4"));
        assert_eq!(r.ips[0].interface, None);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(v.get("dns").is_none());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.1/32").unwrap(),
            ("10.0.0.1".parse().unwrap(), 32)
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::/129",
            "x/8",
            "10.0.0.1/-1",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
