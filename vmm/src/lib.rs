//! podvisor-vmm: a KVM microVM monitor on rust-vmm crates, one process per pod.
//!
//! One thread per vCPU, one event-loop thread for device I/O, one thread for
//! the control API. The guest is hostile: every value it hands over is
//! checked before use, and nothing it sizes is allocated without a cap.

pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;

/// `e` and its sources joined by ": ": a message that says why, not only what.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
