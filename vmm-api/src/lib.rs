//! podvisor-vmm-api: what a caller of podvisor-vmm needs without linking KVM code.
//!
//! - [`config`]: the VM configuration ([`config::VmConfig`]) and the parsers of the VMM's
//!   command-line options;
//! - the control API: its bodies ([`VmInfo`], [`DriveSwap`], ...), the HTTP codec
//!   ([`http`], used by the VMM's server) and the blocking client ([`client`]);
//! - [`tap`]: opening a TAP interface the way the VMM's virtio-net expects it.
//!
//! The control API is JSON over HTTP/1.1 on a Unix socket, one request per connection:
//!
//! | method | path            | body                          | answer                |
//! |--------|-----------------|-------------------------------|-----------------------|
//! | GET    | /vm             |                               | [`VmInfo`]            |
//! | PUT    | /vm/pause       |                               | 204                   |
//! | PUT    | /vm/resume      |                               | 204                   |
//! | PUT    | /vm/stop        |                               | 204, then the VMM ends |
//! | PUT    | /drives/{id}    | [`DriveSwap`]                 | 204                   |
//! | PUT    | /vm/snapshot    | [`SnapshotCreate`] (paused VM) | [`SnapshotCreated`]; 409 when running |
//!
//! Errors answer 4xx/5xx with `{"error": "..."}` ([`ErrorBody`]).

pub mod client;
pub mod config;
pub mod http;
pub mod tap;
mod types;

pub use types::{
    BootInfo, DeviceCountersBody, DeviceInfo, DriveSwap, ErrorBody, SnapshotCreate,
    SnapshotCreated, TransportCountersBody, VmInfo, VmRunState,
};
