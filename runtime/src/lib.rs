//! podvisor runtime: `podvisord` serves CRI v1 and runs every pod in its own microVM.
//!
//! One module, one job:
//! - [`config`]: `podvisord --config FILE` (TOML).
//! - [`state`]: persisted sandbox and container records (write, fsync, rename).
//! - [`logs`]: container logs in the CRI format.
//! - [`image`]: pulling, the blob store and one ext4 image per image id.
//! - [`vmm`]: one detached `podvisor-vmm` process per pod, found again after a restart.
//! - [`network`]: a pod's network: its namespace, CNI plugins, the TAP for its VM.
//! - [`seccomp`]: containers' seccomp profiles, compiled for the guest agent.
//! - [`pods`]: the sandbox and container manager (VMs, agent calls, logs, records).
//! - [`cri`]: the gRPC services.
//! - [`stream`]: the CRI streaming server (exec, attach, port-forward).

pub mod config;
pub mod cri;
pub mod image;
pub mod logs;
pub mod network;
pub mod pods;
pub mod seccomp;
pub mod state;
pub mod stream;
pub mod vmm;
