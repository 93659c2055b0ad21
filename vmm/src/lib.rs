//! podvisor-vmm: a KVM microVM monitor on rust-vmm crates, one process per pod.
//!
//! One thread per vCPU, one event-loop thread for device I/O, one thread for
//! the control API. The guest is hostile: every value it hands over is
//! checked before use, and nothing it sizes is allocated without a cap.
//!
//! [`builder`] makes a [`vm::Vm`] from a [`podvisor_vmm_api::config::VmConfig`], with the
//! virtio devices of the [`device_table`]; `main` starts the control API ([`api::server`])
//! on the VM's [`handle::VmHandle`], then runs the VM. The configuration, the API's bodies,
//! codec and client live in the `podvisor-vmm-api` crate, which callers use without linking
//! KVM code. Each thread runs under its own seccomp filter ([`seccomp`]) once the VM is
//! built.

pub mod api;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod device_table;
pub mod devices;
pub mod exit;
pub mod handle;
pub mod jail;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
