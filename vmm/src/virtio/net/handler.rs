//! Queue processing and TAP event handling.
//!
//! Everything the guest wrote (descriptors, rings, headers) is untrusted:
//! guest memory is only touched through vm-memory's checked accessors, every
//! length is checked before it is used, and every loop is bounded by the
//! queue size or a per-event budget.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{Ordering, fence};

use podvisor_vmm_api::tap::{Tap, VNET_HDR_LEN};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{Active, Drops, Net, TapPolling};
use super::{FRAME_BUFFER_LEN, QUEUE_SIZE, RX_QUEUE_TOKEN, TAP_TOKEN, TX_QUEUE_TOKEN};
use crate::virtio::{DeviceCounters, EventToken, GuestMemory};

/// Length of an Ethernet header: anything shorter is not a frame.
const ETH_HLEN: usize = 14;
/// The smallest TX chain worth handing to the TAP.
const MIN_TX_LEN: usize = VNET_HDR_LEN + ETH_HLEN;
/// Offset of `num_buffers` (le16) in virtio_net_hdr_v1.
const NUM_BUFFERS_OFFSET: usize = 10;

/// TX chains handled per event before yielding to the rest of the event
/// loop; the TX eventfd is re-armed so the remainder follows right after.
const TX_BUDGET: usize = 4 * QUEUE_SIZE as usize;
/// Frames moved from the TAP per event; the TAP is level-triggered, so
/// whatever is left is reported again.
const RX_BUDGET: usize = QUEUE_SIZE as usize;

/// Split virtqueue layout (virtio 1.2, 2.7): flags and idx lead both rings.
const RING_HEADER_LEN: u64 = 4;
const AVAIL_ELEM_LEN: u64 = 2;
const USED_ELEM_LEN: u64 = 8;

/// Why a descriptor chain was dropped.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("descriptor at {addr:#x} has the wrong direction")]
    WrongDirection { addr: u64 },
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("chain is longer than {FRAME_BUFFER_LEN} bytes")]
    TooLong,
    #[error("chain holds {len} bytes, fewer than {min}")]
    TooShort { len: usize, min: usize },
}

/// What became of a frame offered to the RX queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Copied into guest buffers and published in the used ring.
    Delivered,
    /// The guest has not posted enough buffers (yet); nothing was consumed.
    NoBuffers,
    /// No buffers the guest can ever post hold the frame; nothing was
    /// consumed and the frame should be dropped.
    TooLarge,
}

impl Net {
    /// Routes an event-loop callback.
    pub(super) fn dispatch_event(&mut self, token: EventToken, events: u32) {
        let Some(active) = self.active.as_ref() else {
            tracing::debug!("{}: event {token} while inactive", self.tap.name());
            return;
        };
        match token {
            RX_QUEUE_TOKEN => {
                drain(&active.rx_event);
                // While the TAP is polled the event loop reports new frames
                // by itself; a kick only matters to a frame waiting for
                // buffers (or to a TAP left paused by a failed epoll_ctl).
                if self.rx_frame.len != 0 || active.tap_polling == TapPolling::Paused {
                    self.process_rx();
                }
            }
            TX_QUEUE_TOKEN => {
                drain(&active.tx_event);
                self.process_tx();
            }
            TAP_TOKEN => {
                if events & libc::EPOLLIN as u32 != 0 {
                    self.process_rx();
                } else if events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    // A detached TAP (interface deleted) reports EPOLLERR for
                    // ever, level-triggered: stop watching it.
                    crate::warn_limited!("{}: TAP reported an error, RX stops", self.tap.name());
                    self.counters.io_errors += 1;
                    if let Some(active) = self.active.as_mut() {
                        stop_tap_polling(active, &self.tap);
                    }
                }
            }
            _ => crate::warn_limited!("{}: unknown event token {token}", self.tap.name()),
        }
    }

    /// Hands `frame` (a virtio_net_hdr_v1 and an Ethernet frame, as the TAP
    /// returns it) to the RX path as if it had just been read from the TAP.
    /// For fuzzing and tests. Returns false, without taking the frame, if the
    /// device is inactive, a frame is already pending, or `frame` is shorter
    /// than the header or longer than [`FRAME_BUFFER_LEN`].
    pub fn inject_rx_frame(&mut self, frame: &[u8]) -> bool {
        if self.active.is_none() || self.rx_frame.len != 0 || frame.len() < VNET_HDR_LEN {
            return false;
        }
        let Some(dst) = self.rx_frame.buf.get_mut(..frame.len()) else {
            return false;
        };
        dst.copy_from_slice(frame);
        self.rx_frame.len = frame.len();
        self.process_rx();
        true
    }

    /// Sends every available TX chain to the TAP, then interrupts once.
    pub(super) fn process_tx(&mut self) {
        let Net {
            tap,
            active,
            tx_buf,
            counters,
            drops,
            ..
        } = self;
        let Some(Active {
            mem,
            tx_queue: queue,
            tx_event,
            interrupt,
            ..
        }) = active.as_mut()
        else {
            return;
        };
        let used_before = queue.next_used();
        let mut handled = 0usize;
        let mut empty_passes = 0;
        'batch: loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                tracing::debug!("{}: TX disable notification: {e}", tap.name());
            }
            let mut handled_in_pass = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                match gather_tx(chain, mem, tx_buf) {
                    Ok(len) => transmit(tap, tx_buf.get(..len).unwrap_or(&[]), counters, drops),
                    Err(e) => {
                        counters.malformed_chains += 1;
                        tracing::debug!("{}: TX chain {head} dropped: {e}", tap.name());
                    }
                }
                add_used(queue, mem, head, 0);
                handled += 1;
                handled_in_pass += 1;
                if handled >= TX_BUDGET {
                    // Let the other devices run; the self-kick brings us
                    // back to the rest.
                    if let Err(e) = tx_event.write(1) {
                        crate::warn_limited!("{}: re-arm TX eventfd: {e}", tap.name());
                    }
                    break 'batch;
                }
            }
            // Re-enabling races with the driver adding chains, which
            // enable_notification reports. A corrupt avail index reports
            // "more" for ever without yielding chains, hence the cap on
            // passes that found nothing.
            match queue.enable_notification(&*mem) {
                Ok(true) if handled_in_pass > 0 || empty_passes == 0 => {
                    if handled_in_pass == 0 {
                        empty_passes += 1;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!("{}: TX enable notification: {e}", tap.name());
                    break;
                }
            }
        }
        if should_interrupt(queue, mem, used_before) {
            interrupt.signal_used_queue();
        }
    }

    /// Moves frames from the TAP into RX chains until the TAP is empty, the
    /// guest runs out of buffers or the budget is spent, then interrupts
    /// once. The TAP is polled exactly when no frame is pending.
    pub(super) fn process_rx(&mut self) {
        let Net {
            tap,
            active,
            rx_frame,
            rx_chains,
            counters,
            drops,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        let used_before = active.rx_queue.next_used();
        let mut notification_armed = false;
        for _ in 0..RX_BUDGET {
            if rx_frame.len == 0 {
                if active.tap_polling == TapPolling::Gone {
                    break;
                }
                match tap.read_frame(&mut rx_frame.buf) {
                    Ok(len) if len >= VNET_HDR_LEN => rx_frame.len = len.min(rx_frame.buf.len()),
                    Ok(len) => {
                        drops.rx += 1;
                        tracing::debug!("{}: dropped a {len}-byte read from the TAP", tap.name());
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        counters.io_errors += 1;
                        crate::warn_limited!("{}: TAP read failed, RX stops: {e}", tap.name());
                        stop_tap_polling(active, tap);
                        break;
                    }
                }
            }
            let Some(frame) = rx_frame.buf.get_mut(..rx_frame.len) else {
                rx_frame.len = 0;
                continue;
            };
            let frame_len = frame.len();
            let delivery = deliver_frame(
                &mut active.rx_queue,
                &active.mem,
                frame,
                active.mergeable_rx,
                rx_chains,
                &mut counters.malformed_chains,
            );
            match delivery {
                Delivery::Delivered => {
                    counters.completed += 1;
                    counters.rx_bytes += (frame_len - VNET_HDR_LEN) as u64;
                    rx_frame.len = 0;
                }
                Delivery::TooLarge => {
                    drops.rx += 1;
                    tracing::debug!(
                        "{}: dropped a {frame_len}-byte RX frame larger than the guest's buffers",
                        tap.name()
                    );
                    rx_frame.len = 0;
                }
                Delivery::NoBuffers => {
                    // Ask the driver to kick when it posts buffers; if some
                    // slipped in meanwhile, try once more right away.
                    if !notification_armed {
                        notification_armed = true;
                        if let Ok(true) = active.rx_queue.enable_notification(&active.mem) {
                            continue;
                        }
                    }
                    break;
                }
            }
        }
        set_tap_polling(active, tap, rx_frame.len == 0);
        if should_interrupt(&active.rx_queue, &active.mem, used_before) {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Clears a queue eventfd. Only called once epoll reported it readable (or
/// on a non-blocking eventfd), so it never blocks.
fn drain(event: &EventFd) {
    if let Err(e) = event.read()
        && e.kind() != io::ErrorKind::WouldBlock
    {
        tracing::debug!("read queue eventfd: {e}");
    }
}

/// Copies a TX chain (virtio_net_hdr_v1 + frame) into `buf`, returning its
/// length.
fn gather_tx(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for desc in chain {
        let addr = desc.addr();
        if desc.is_write_only() {
            return Err(ChainError::WrongDirection {
                addr: addr.raw_value(),
            });
        }
        let end = usize::try_from(desc.len())
            .ok()
            .and_then(|desc_len| len.checked_add(desc_len))
            .ok_or(ChainError::TooLong)?;
        let dst = buf.get_mut(len..end).ok_or(ChainError::TooLong)?;
        mem.read_slice(dst, addr)
            .map_err(|_| ChainError::OutOfMemory {
                addr: addr.raw_value(),
                len: desc.len(),
            })?;
        len = end;
    }
    if len < MIN_TX_LEN {
        return Err(ChainError::TooShort {
            len,
            min: MIN_TX_LEN,
        });
    }
    Ok(len)
}

/// Writes one gathered frame to the TAP. A full TAP drops the frame rather
/// than stall the event loop: the guest's TCP recovers, a blocked VMM does
/// not.
fn transmit(tap: &Tap, frame: &[u8], counters: &mut DeviceCounters, drops: &mut Drops) {
    match tap.write_frame(frame) {
        Ok(written) if written == frame.len() => {
            counters.completed += 1;
            counters.tx_bytes += written.saturating_sub(VNET_HDR_LEN) as u64;
        }
        Ok(written) => {
            counters.io_errors += 1;
            drops.tx += 1;
            tracing::debug!(
                "{}: TAP took {written} of {} bytes",
                tap.name(),
                frame.len()
            );
        }
        Err(e) => {
            counters.io_errors += 1;
            drops.tx += 1;
            tracing::debug!("{}: TX frame dropped: {e}", tap.name());
        }
    }
}

/// Copies `frame` into RX chains: exactly one without MRG_RXBUF, as many as
/// needed (and `num_buffers` set) with it. A frame is published all at once
/// or not at all.
fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemory,
    frame: &mut [u8],
    mergeable: bool,
    chains: &mut [(u16, u32)],
    malformed: &mut u64,
) -> Delivery {
    // num_buffers is 1 unless the frame ends up spanning chains, in which
    // case the guest's copy is patched afterwards.
    if let Some(num_buffers) = frame.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
        num_buffers.copy_from_slice(&1u16.to_le_bytes());
    }
    let frame: &[u8] = frame;
    let (max_chains, min_capacity) = if mergeable {
        // Each mergeable buffer must hold at least a header (virtio 1.2,
        // 5.1.6.3.1).
        (chains.len().min(usize::from(queue.size())), VNET_HDR_LEN)
    } else {
        (1, 1)
    };

    let mut frame_start = queue.next_avail();
    let mut filled = 0usize;
    let mut written = 0usize;
    let mut num_buffers_at = [None; 2];
    while written < frame.len() {
        if filled >= max_chains {
            // Even every buffer the queue can hold is too small (or, without
            // MRG_RXBUF, the one chain is): leave them for the next frame.
            queue.set_next_avail(frame_start);
            return Delivery::TooLarge;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(frame_start);
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let rest = frame.get(written..).unwrap_or(&[]);
        let copied = rx_chain_capacity(&chain, mem, min_capacity)
            .and_then(|_| copy_to_chain(chain, mem, rest, written, &mut num_buffers_at));
        match (copied, chains.get_mut(filled)) {
            (Ok(len), Some(slot)) => {
                // `len` is at most the frame length, far below u32::MAX.
                *slot = (head, len as u32);
                filled += 1;
                written += len;
            }
            (result, _) => {
                *malformed += 1;
                if let Err(e) = result {
                    tracing::debug!("RX chain {head} dropped: {e}");
                }
                // The chains already filled for this frame cannot be handed
                // over without this one, so they go back empty as well (the
                // driver drops empty buffers) and the frame starts over on
                // the next chain.
                for &(filled_head, _) in chains.get(..filled).unwrap_or(&[]) {
                    add_used(queue, mem, filled_head, 0);
                }
                add_used(queue, mem, head, 0);
                filled = 0;
                written = 0;
                num_buffers_at = [None; 2];
                frame_start = queue.next_avail();
            }
        }
    }

    if filled > 1 {
        let count = u16::try_from(filled).unwrap_or(u16::MAX).to_le_bytes();
        for (addr, byte) in num_buffers_at.iter().zip(count) {
            if let Some(addr) = addr
                && let Err(e) = mem.write_slice(&[byte], *addr)
            {
                tracing::debug!("RX num_buffers at {:#x}: {e}", addr.raw_value());
            }
        }
    }
    publish_used(queue, mem, chains.get(..filled).unwrap_or(&[]));
    Delivery::Delivered
}

/// Checks an RX chain without writing to it: only device-writable
/// descriptors inside guest memory, and at least `min` bytes in all.
fn rx_chain_capacity(
    chain: &DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    min: usize,
) -> Result<usize, ChainError> {
    let mut capacity = 0usize;
    for desc in chain.clone() {
        let addr = desc.addr();
        if !desc.is_write_only() {
            return Err(ChainError::WrongDirection {
                addr: addr.raw_value(),
            });
        }
        let len = usize::try_from(desc.len()).map_err(|_| ChainError::TooLong)?;
        if !mem.check_range(addr, len) {
            return Err(ChainError::OutOfMemory {
                addr: addr.raw_value(),
                len: desc.len(),
            });
        }
        capacity = capacity.checked_add(len).ok_or(ChainError::TooLong)?;
    }
    if capacity < min {
        return Err(ChainError::TooShort { len: capacity, min });
    }
    Ok(capacity)
}

/// Copies the start of `data` (which begins at `frame_offset` in the frame)
/// into a checked RX chain and returns how much fit. Records where the
/// guest's copy of the `num_buffers` bytes landed.
fn copy_to_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    data: &[u8],
    frame_offset: usize,
    num_buffers_at: &mut [Option<GuestAddress>; 2],
) -> Result<usize, ChainError> {
    let mut copied = 0usize;
    for desc in chain {
        if copied == data.len() {
            break;
        }
        let addr = desc.addr();
        // The guest may rewrite descriptors after the capacity check.
        if !desc.is_write_only() {
            return Err(ChainError::WrongDirection {
                addr: addr.raw_value(),
            });
        }
        let len = usize::try_from(desc.len())
            .unwrap_or(usize::MAX)
            .min(data.len() - copied);
        let end = copied + len;
        let src = data.get(copied..end).ok_or(ChainError::TooLong)?;
        mem.write_slice(src, addr)
            .map_err(|_| ChainError::OutOfMemory {
                addr: addr.raw_value(),
                len: desc.len(),
            })?;
        let start = frame_offset + copied;
        for (at, offset) in num_buffers_at.iter_mut().zip(NUM_BUFFERS_OFFSET..) {
            if (start..start + len).contains(&offset) {
                *at = addr.checked_add((offset - start) as u64);
            }
        }
        copied = end;
    }
    Ok(copied)
}

/// Returns a chain to the driver.
fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        tracing::debug!("return chain {head} to the used ring: {e}");
    }
}

/// Adds `entries` to the used ring and makes them visible with one index
/// update. A merged frame must appear whole: a driver that sees its first
/// buffer reads `num_buffers` and takes the rest from the used ring at once
/// (Linux drops the frame if they are not there yet), while
/// `Queue::add_used` publishes one entry at a time.
fn publish_used(queue: &mut Queue, mem: &GuestMemory, entries: &[(u16, u32)]) {
    let Some((&(last_head, last_len), earlier)) = entries.split_last() else {
        return;
    };
    let first = queue.next_used();
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    for (&(head, len), position) in earlier.iter().zip(0u16..) {
        let slot = first.wrapping_add(position).checked_rem(size).unwrap_or(0);
        let mut elem = [0u8; USED_ELEM_LEN as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let written = ring
            .checked_add(RING_HEADER_LEN + u64::from(slot) * USED_ELEM_LEN)
            .map(|addr| mem.write_slice(&elem, addr));
        if !matches!(written, Some(Ok(()))) {
            tracing::debug!("used ring element {slot} is not writable");
        }
    }
    // The used ring holds at most `size` (<= 256) entries per frame, so the
    // count fits a u16.
    queue.set_next_used(first.wrapping_add(earlier.len() as u16));
    // Writes the last element and stores the new index with release
    // ordering, which publishes the earlier elements too.
    add_used(queue, mem, last_head, last_len);
}

/// Whether the driver wants an interrupt for the entries added since the
/// used index was `used_before`: EVENT_IDX's used_event when negotiated,
/// VRING_AVAIL_F_NO_INTERRUPT otherwise (which `Queue::needs_notification`
/// ignores, and it miscounts after [`publish_used`]).
fn should_interrupt(queue: &Queue, mem: &GuestMemory, used_before: u16) -> bool {
    let used_now = queue.next_used();
    if used_now == used_before {
        return false;
    }
    // Our used index store must be visible before we read the driver's
    // suppression state, which it updates before re-checking the used index.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let used_event = avail
            .checked_add(RING_HEADER_LEN + AVAIL_ELEM_LEN * u64::from(queue.size()))
            .and_then(|addr| mem.load::<u16>(addr, Ordering::Acquire).ok())
            .map(u16::from_le);
        match used_event {
            // vring_need_event(): did the index cross used_event?
            Some(event) => {
                used_now.wrapping_sub(event).wrapping_sub(1) < used_now.wrapping_sub(used_before)
            }
            None => true,
        }
    } else {
        match mem.load::<u16>(avail, Ordering::Acquire) {
            Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            Err(_) => true,
        }
    }
}

/// Watches the TAP for input, or stops watching it while a frame waits for
/// guest buffers (a readable TAP would otherwise wake the loop for ever).
fn set_tap_polling(active: &mut Active, tap: &Tap, input: bool) {
    let (target, events) = if input {
        (TapPolling::On, EventSet::IN)
    } else {
        (TapPolling::Paused, EventSet::empty())
    };
    if active.tap_polling == target || active.tap_polling == TapPolling::Gone {
        return;
    }
    match active.events.modify(tap.as_raw_fd(), TAP_TOKEN, events) {
        Ok(()) => active.tap_polling = target,
        Err(e) => crate::warn_limited!("{}: change TAP polling: {e}", tap.name()),
    }
}

/// Takes the TAP out of the event loop for good (until reset).
fn stop_tap_polling(active: &mut Active, tap: &Tap) {
    active.events.remove(tap.as_raw_fd());
    active.tap_polling = TapPolling::Gone;
}
