//! A virtio-net device in the device table: built from a [`NetDeviceConfig`] on its TAP,
//! recorded in a snapshot as its kind alone ([`NetState`]): the TAP is reopened by name and
//! the MAC comes from the configuration. Queue and ring state are the transport's.

use podvisor_vmm_api::config::NetDeviceConfig;
use podvisor_vmm_api::tap::TapError;
use serde::{Deserialize, Serialize};

use super::{Net, NetConfig};

/// What a snapshot records of a network device: that there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {}

impl std::fmt::Display for NetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("net")
    }
}

/// The network device `n` describes, and what a snapshot records of it.
pub fn build(n: &NetDeviceConfig) -> Result<(Net, NetState), TapError> {
    let net = Net::new(NetConfig {
        tap_name: n.tap.clone(),
        mac: n.mac,
    })?;
    Ok((net, NetState {}))
}
