//! podvisor end-to-end test support: builds what a guest needs, boots
//! podvisor-vmm microVMs and watches their consoles.
//!
//! Everything here is written for a kvm_pvm host (see the shared notes):
//! the guest kernel is emulated and slow, so waits are on readiness markers
//! with generous deadlines, never on fixed sleeps, and nothing asserts on
//! timings.
//!
//! - [`agent`]: a client of the guest agent (requests, output by stream, waits).
//! - [`capture`]: raw frames on a host interface (AF_PACKET), searched for markers.
//! - [`configmap`]: a configMap volume laid out as kubelet does, and its `..data` swap
//!   timed from inside a container.
//! - [`containerd`]: Debian's containerd + runc in a temporary directory, a reference CRI
//!   runtime (and its streaming server) for interoperability tests.
//! - [`cri`]: a real `podvisord` in a temporary directory, and the VMMs it leaves.
//! - [`host`]: commands on the host.
//! - [`paths`]: the workspace, the guest kernel, the target directory.
//! - [`artifacts`]: podvisor-vmm, the static `guest-probe` and the agent's guest root
//!   image, built on demand.
//! - [`image`]: the ext4 test disk (busybox, guest-probe, `/init`, `/tests/*.sh`) and
//!   busybox container images for the agent.
//! - [`vm`]: a running microVM with its console, API and clean-up.
//! - [`netns`]: a throw-away network namespace holding a TAP.
//! - [`registry`]: Debian's docker-registry on 127.0.0.1 and a busybox image pushed to it.
//! - [`python`]: a cached Python venv with PyPI's `kubernetes` client (its stream clients).
//! - [`procfs`]: resident memory of a VMM, guest RAM excluded.

pub mod agent;
pub mod artifacts;
pub mod capture;
pub mod configmap;
pub mod containerd;
pub mod cri;
pub mod host;
pub mod image;
pub mod netns;
pub mod paths;
pub mod procfs;
pub mod python;
pub mod registry;
pub mod vm;

pub use vm::{DriveSpec, GuestRoot, Pattern, Vm, VmSpec};

/// The SHA-256 of `data`, lowercase hex (as `sha256sum` prints it).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
