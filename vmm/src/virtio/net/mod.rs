//! virtio-net (virtio 1.2, 5.1) backed by a Linux TAP device.
//!
//! One RX and one TX queue. Frames cross between the guest and the TAP
//! through two fixed device-owned buffers, so nothing the guest sizes is ever
//! allocated:
//!
//! - TX: each chain (virtio_net_hdr_v1 + frame, readable descriptors only) is
//!   gathered into the TX buffer and written to the TAP in one `write`.
//! - RX: one frame at a time is read from the TAP into the RX buffer and
//!   copied into guest RX chains (several of them with `MRG_RXBUF`). When the
//!   guest has no buffers the frame stays pending, the TAP is taken out of the
//!   event loop and polling resumes when the guest kicks the RX queue.
//!
//! The TAP is opened with `IFF_VNET_HDR` and a 12-byte header, so the
//! guest's virtio_net_hdr_v1 passes through unchanged in both directions and
//! checksum/TSO offloads cost nothing here.

mod device;
mod handler;
pub mod persist;
#[cfg(test)]
mod tests;

pub use device::{Net, NetConfig};

use super::EventToken;

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Event token of the RX queue notify eventfd.
pub const RX_QUEUE_TOKEN: EventToken = 0;
/// Event token of the TX queue notify eventfd.
pub const TX_QUEUE_TOKEN: EventToken = 1;
/// Event token of the TAP file descriptor.
pub const TAP_TOKEN: EventToken = 2;

/// The largest frame either side may hand over: a 64 KiB GSO packet plus
/// Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65562;
/// Size of the device's RX and TX buffers: header plus the largest frame.
pub const FRAME_BUFFER_LEN: usize = podvisor_vmm_api::tap::VNET_HDR_LEN + MAX_FRAME_LEN;
