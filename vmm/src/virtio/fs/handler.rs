//! Queue processing: check each chain, hand it to the FUSE server, return it used.

use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory as _};

use super::backend::{Backend, error_reply};
use super::device::Fs;
use super::{CHAINS_PER_EVENT, HIPRIO_QUEUE_TOKEN, MAX_DESCRIPTORS, MAX_REQUEST_BYTES};
use crate::virtio::serve::ServedQueue;
use crate::virtio::{DeviceCounters, EventToken, GuestMemory};

/// Why a chain was dropped before the FUSE server saw it.
#[derive(Debug, thiserror::Error)]
pub(super) enum Malformed {
    #[error("empty chain")]
    Empty,
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("chain cut short (descriptor loop or index out of the table)")]
    Truncated,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} ({len} bytes) outside guest memory")]
    Outside { addr: u64, len: u32 },
    #[error("request or reply space over {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("no request header")]
    NoRequest,
}

impl Fs {
    /// A queue's eventfd fired: serve it.
    pub(super) fn handle_queue_event(&mut self, token: EventToken, events: u32) {
        let index = if token == HIPRIO_QUEUE_TOKEN { 0 } else { 1 };
        let Some(active) = self.active.as_mut() else {
            tracing::debug!("virtio-fs: queue event before activation");
            return;
        };
        let Some(q) = active.queues.get_mut(index) else {
            return;
        };
        if events & libc::EPOLLIN as u32 != 0
            && let Err(e) = q.evt.read()
        {
            tracing::debug!("virtio-fs: drain queue eventfd: {e}");
        }
        self.process_queue(index);
    }

    /// Serves the available requests of queue `index` (up to a budget), then interrupts
    /// the driver if it asked to be told.
    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.get_mut(index) else {
            return;
        };
        let (backend, counters, mem) = (&self.backend, &mut self.counters, &active.mem);
        ServedQueue {
            name: "virtio-fs",
            mem,
            queue: &mut q.queue,
            evt: &q.evt,
            interrupt: &active.interrupt,
            event_idx: active.event_idx,
        }
        .serve(CHAINS_PER_EVENT, |chain| {
            serve(backend, counters, mem, chain)
        });
    }
}

/// Serves one chain; returns the bytes written into guest memory.
fn serve(
    backend: &Backend,
    counters: &mut DeviceCounters,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> u32 {
    let (readable, writable) = match check(mem, chain.clone()) {
        Ok(lens) => lens,
        Err(why) => {
            counters.malformed_chains += 1;
            crate::warn_limited!("virtio-fs: dropped malformed chain: {why}");
            return 0;
        }
    };
    counters.tx_bytes += u64::from(readable);
    let unique = request_unique(mem, &chain);
    let result = Reader::from_descriptor_chain(mem, chain.clone())
        .and_then(|r| VirtioFsWriter::new(mem, chain.clone()).map(|w| (r, w)));
    let (reader, writer) = match result {
        Ok(rw) => rw,
        Err(e) => {
            counters.malformed_chains += 1;
            crate::warn_limited!("virtio-fs: chain unusable: {e}");
            return 0;
        }
    };
    let written = match backend.answer(reader, Writer::VirtioFs(writer)) {
        Ok(n) => n,
        Err(e) => {
            counters.io_errors += 1;
            crate::warn_limited!("virtio-fs: request not answered: {e}");
            // End the guest's request with EIO where the chain has room for a reply.
            match (unique, VirtioFsWriter::new(mem, chain)) {
                (Some(unique), Ok(w)) if writable >= 16 => {
                    error_reply(&mut Writer::VirtioFs(w), unique, libc::EIO).unwrap_or(0)
                }
                _ => 0,
            }
        }
    };
    counters.completed += 1;
    let written = u32::try_from(written).unwrap_or(writable).min(writable);
    counters.rx_bytes += u64::from(written);
    written
}

/// Walks the chain once: descriptor count, order (readable before writable), every
/// buffer inside guest memory, both directions within [`MAX_REQUEST_BYTES`]. Returns the
/// readable and writable byte counts.
fn check(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Result<(u32, u32), Malformed> {
    let mut count = 0usize;
    let (mut readable, mut writable) = (0u64, 0u64);
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(Malformed::TooManyDescriptors);
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len > 0 && mem.get_slice(addr, len as usize).is_err() {
            return Err(Malformed::Outside { addr: addr.0, len });
        }
        if desc.is_write_only() {
            writable += u64::from(len);
        } else if writable > 0 {
            return Err(Malformed::ReadableAfterWritable);
        } else {
            readable += u64::from(len);
        }
        if readable > u64::from(MAX_REQUEST_BYTES) || writable > u64::from(MAX_REQUEST_BYTES) {
            return Err(Malformed::TooLong);
        }
        last_has_next = desc.has_next();
    }
    if count == 0 {
        return Err(Malformed::Empty);
    }
    if last_has_next {
        return Err(Malformed::Truncated);
    }
    // The FUSE in-header is 40 bytes.
    if readable < 40 {
        return Err(Malformed::NoRequest);
    }
    // Both fit in u32: each is at most MAX_REQUEST_BYTES.
    Ok((readable as u32, writable as u32))
}

/// The request's `unique` (bytes 8..16 of the FUSE in-header), for an error reply; None
/// when the header is split across descriptors or unreadable.
fn request_unique(mem: &GuestMemory, chain: &DescriptorChain<&GuestMemory>) -> Option<u64> {
    let first = chain.clone().next()?;
    if first.is_write_only() || first.len() < 16 {
        return None;
    }
    mem.read_obj::<u64>(vm_memory::Address::checked_add(&first.addr(), 8)?)
        .ok()
}
