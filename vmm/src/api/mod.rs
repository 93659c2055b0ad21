//! The control API: JSON over HTTP/1.1 on a Unix socket, one request per
//! connection.
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
//! Errors answer 4xx/5xx with `{"error": "..."}`.

pub mod client;
pub mod http;
pub mod server;
mod types;

pub use types::{
    BootInfo, DeviceInfo, DriveSwap, ErrorBody, SnapshotCreate, SnapshotCreated, VmInfo, VmRunState,
};
