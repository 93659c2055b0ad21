//! virtio-fs (virtio 1.2, 5.11): one host directory shared with the guest over FUSE.
//!
//! The FUSE protocol, its virtio transport (reading requests out of and writing replies into
//! descriptor chains) and the passthrough file system are `fuse-backend-rs`'s; this device
//! is the virtio side around them: features, config space (tag, one request queue), the
//! queues, and what a hostile guest may not do:
//!
//! - every chain is checked before the FUSE server sees it: at most [`MAX_DESCRIPTORS`]
//!   descriptors, readable then writable, each inside guest memory, at most
//!   [`MAX_REQUEST_BYTES`] in and out; anything else is dropped and counted;
//! - a request the server cannot decode gets an `EIO` reply where the chain has room for
//!   one, so the guest's request ends; the device serves on;
//! - at most [`CHAINS_PER_EVENT`] requests per event, then the device yields the event
//!   loop to the others and comes back through its own queue eventfd.
//!
//! The passthrough file system opens every name one component at a time with
//! `O_NOFOLLOW` relative to its parent's descriptor (a lookup with `/` is refused, `..` at
//! the root stays at the root), so the host never follows a guest-made symlink and never
//! leaves the shared directory by path. The VMM serves the directory from inside its jail
//! (bound at `/share`), as a user namespace's root mapped to the VMM's unprivileged user
//! (see `jail.rs`): files the guest's root creates belong to that user on the host, and
//! host files of other users are only what their modes allow.
//!
//! Without a shared directory (a template VM) the device is there for the guest's driver
//! but answers every request with `ENODEV`; a VM restored from the template attaches the
//! pod's own directory. The FUSE session itself (inodes, open files) is not part of a
//! snapshot: podvisor takes templates before anything is mounted.

mod backend;
mod device;
mod handler;
pub mod persist;
mod share;

#[cfg(test)]
mod tests;

pub use backend::{Backend, FsError};
pub use device::Fs;

use super::EventToken;

/// The high-priority queue (FORGET, INTERRUPT) reports this token.
pub const HIPRIO_QUEUE_TOKEN: EventToken = 0;
/// The one request queue reports this token.
pub const REQUEST_QUEUE_TOKEN: EventToken = 1;

/// Sizes of the high-priority and the request queue. The request queue holds a whole chain
/// of the largest request (see [`MAX_DESCRIPTORS`]): without indirect descriptors, a guest
/// driver cannot add a chain longer than its queue.
pub const QUEUE_SIZES: [u16; 2] = [128, 512];

/// Longest descriptor chain the device walks: a READ or WRITE of `max_pages` (256, one
/// descriptor per page, one more when the buffer is not page-aligned) plus the FUSE headers
/// and arguments around it.
pub const MAX_DESCRIPTORS: usize = 272;

/// The most bytes of one request or reply: the FUSE server's largest message (1 MiB of
/// data) plus a page for headers.
pub const MAX_REQUEST_BYTES: u32 = (1 << 20) + 4096;

/// Chains served per queue event before the device yields the event loop.
pub const CHAINS_PER_EVENT: u32 = 256;

/// virtio-fs device type.
pub const TYPE_FS: u32 = 26;
