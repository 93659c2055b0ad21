//! A pod's network, from its namespace to the guest's interface.
//!
//! The lifecycle ([`pod`]): RunPodSandbox creates a named network namespace per sandbox
//! ([`netns`]), runs the CNI plugins of the first valid config in it ([`cni`], ADD), puts a
//! TAP next to the CNI interface with a tc redirect each way ([`tap`]) for the VMM (the
//! guest's way out only for frames with the pod's own MAC and IPs: [`antispoof`]), and
//! hands the guest agent the interface configuration (addresses, routes, MTU) for
//! ConfigureNetwork. StopPodSandbox removes the TAP and runs CNI DEL with what the pod
//! directory's `network.json` recorded; RemovePodSandbox deletes the namespace.
//!
//! One module, one job:
//! - [`netns`]: named network namespaces, compatible with `ip netns`.
//! - [`tap`]: the TAP and its tc redirects in a pod namespace.
//! - [`antispoof`]: what the guest may send as (the pod's MAC and IPs), as a tc filter.
//! - [`cni`]: the CNI protocol: configs, running plugins, their results.
//! - [`pod`]: a pod's network from ADD until it is released, and `network.json`.

pub mod antispoof;
pub mod cni;
pub mod netns;
pub mod pod;
pub mod tap;

pub use pod::{
    CNI_IFNAME, NETNS_PREFIX, NETWORK_FILE, NetworkError, PodNetwork, delete_netns, load,
    netns_name, recorded_sandbox_id, release_recorded,
};
