//! virtio-vsock (virtio 1.2, 5.10) with a hybrid Unix-socket host side, the
//! scheme Firecracker and Cloud Hypervisor use:
//!
//! - Host-initiated: a host process connects to the device's Unix socket
//!   (`uds_path`), writes `CONNECT <port>\n`, and once the guest accepts
//!   reads back `OK <host_port>\n`; from then on the stream is the
//!   connection.
//! - Guest-initiated: a guest connection to CID 2 (the host), port `P`, is
//!   forwarded to the Unix socket `<uds_path>_<P>`.
//!
//! Only stream sockets are supported (no SEQPACKET). Flow control is the
//! virtio-vsock credit scheme in both directions.
//!
//! Modules: [`connect`] parses the CONNECT line, `connection` holds one
//! forwarded stream and its credit accounting, `muxer` owns the connection
//! table and host sockets, `handler` moves packets between the queues and
//! the muxer, `timer` fires at the earliest connection deadline, `device` is
//! the [`VirtioDevice`](super::VirtioDevice) surface.

pub mod connect;
mod connection;
mod device;
mod handler;
mod muxer;
pub mod persist;
#[cfg(test)]
mod tests;
mod timer;

use std::time::Duration;

pub use connect::{CONNECT_LINE_MAX, ConnectError, ConnectParser, ConnectStatus};
pub use device::{Vsock, VsockConfig, VsockError};

/// The host's CID (virtio 1.2, 5.10.4: CID 2 is always the host).
pub const HOST_CID: u64 = 2;
/// Receive queue: device → driver packets.
pub const RX_QUEUE: usize = 0;
/// Transmit queue: driver → device packets.
pub const TX_QUEUE: usize = 1;
/// Event queue: transport events (reset after snapshot restore).
pub const EVENT_QUEUE: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Packet type: stream socket (the only one offered).
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// The sender will not receive and/or send any more (see `SHUTDOWN_F_*`).
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_F_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_F_SEND: u32 = 2;

/// Event id of a transport reset (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Receive buffer space each connection advertises to the guest
/// (`buf_alloc`); guest bytes the host stream cannot take yet are buffered
/// up to this much.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one packet in either direction (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Connections (forwarded plus awaiting their CONNECT line) per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// First host-side port handed to host-initiated connections; counting up
/// from here keeps them clear of well-known ports a guest listens on.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// How long a host client may take to send its CONNECT line, and the guest
/// to answer a connection request or let a closing connection drain.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
