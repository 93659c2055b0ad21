//! virtio-blk (virtio 1.2, 5.2): one request queue in front of a raw file.
//!
//! Reads and writes go straight between the backing file and guest memory
//! with positioned I/O; nothing sized by the guest is allocated. The backing
//! file can be swapped while the guest runs ([`Block::swap_backing`]): the
//! runtime boots pods with "stub drives" and attaches container images to
//! them later, telling the guest through a config-change interrupt.

mod device;
mod handler;
mod io;
pub mod persist;

#[cfg(test)]
mod tests;

use virtio_bindings::virtio_blk;

pub use device::{Block, BlockConfig, BlockError};

use super::EventToken;

/// The one request queue's notify eventfd reports this token to
/// [`super::VirtioDevice::handle_event`].
pub const REQUEST_QUEUE_TOKEN: EventToken = 0;

/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// virtio-blk addresses the disk in 512-byte sectors whatever the file's
/// real block size.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;

/// Data segments per request advertised to the driver (config `seg_max`).
/// Two descriptors more (header and status) must still fit in the queue, since
/// we do not offer indirect descriptors.
pub const SEG_MAX: u32 = 128;

/// Largest single data segment advertised to the driver (config `size_max`).
/// `SEG_MAX * SIZE_MAX` equals [`super::MAX_CHAIN_BYTES`], so a driver that
/// honours both limits never builds a request the device must refuse.
pub const SIZE_MAX: u32 = super::MAX_CHAIN_BYTES / SEG_MAX;

/// Length of the drive serial returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Size of the request header: `type: le32, reserved: le32, sector: le64`.
const REQUEST_HEADER_LEN: u32 = 16;

/// Longest descriptor chain the device walks. A driver honouring `SEG_MAX`
/// needs `SEG_MAX + 2`; anything longer is dropped before any I/O.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

// Feature bits (virtio 1.2, 5.2.3).
const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << virtio_blk::VIRTIO_BLK_F_SIZE_MAX;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << virtio_blk::VIRTIO_BLK_F_SEG_MAX;
const VIRTIO_BLK_F_RO: u64 = 1 << virtio_blk::VIRTIO_BLK_F_RO;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << virtio_blk::VIRTIO_BLK_F_FLUSH;

// Request types and status values (virtio 1.2, 5.2.6).
const VIRTIO_BLK_T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
const VIRTIO_BLK_T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
const VIRTIO_BLK_T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
const VIRTIO_BLK_T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
