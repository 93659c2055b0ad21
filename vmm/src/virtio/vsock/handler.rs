//! Queue processing: TX packets into the muxer, muxer output into guest RX
//! buffers, transport events into the event queue, and the dispatch of
//! event loop callbacks.
//!
//! Every queue loop is bounded by [`CHAINS_PER_EVENT`]: a guest refilling a
//! ring from another vCPU while the device works on it cannot keep the event
//! loop here. When a chain is left over, the device kicks the queue's own
//! eventfd, so epoll reports it again after the other ready descriptors.

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::timer::DeadlineTimer;
use super::{
    EVENT_QUEUE, EVENT_TRANSPORT_RESET, MAX_PKT_DATA, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::virtio::{DeviceCounters, EventRegistrar, EventToken, GuestMemory, Interrupt};

/// Event token of a queue's notify eventfd: the queue index.
pub(super) const fn queue_token(queue: usize) -> EventToken {
    queue as EventToken
}
/// Event token of the device's Unix listener.
pub(super) const LISTENER_TOKEN: EventToken = NUM_QUEUES as EventToken;
/// Event token of the deadline timer.
pub(super) const TIMER_TOKEN: EventToken = LISTENER_TOKEN + 1;
/// Chains taken from one queue in one pass: half the largest ring, so a guest
/// that keeps its ring full is served in turns with the rest of the event loop.
pub(super) const CHAINS_PER_EVENT: usize = QUEUE_SIZE as usize / 2;

/// Gives back the chain just popped (it stays available) and kicks `queue`'s
/// eventfd so the event loop comes back for it after the other ready
/// descriptors: the budget of this pass is spent.
fn yield_queue(queue: &mut Queue, evt: &EventFd, index: usize) {
    queue.go_to_previous_position();
    if let Err(e) = evt.write(1) {
        crate::warn_limited!("vsock: re-kick queue {index} eventfd: {e}");
    }
}

/// Everything that exists only between activate and reset.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemory,
    pub queues: [Queue; NUM_QUEUES],
    pub queue_events: [EventFd; NUM_QUEUES],
    pub interrupt: Arc<Interrupt>,
    pub events: EventRegistrar,
    pub muxer: Muxer,
    /// TX processing paused because replies are backed up behind a guest
    /// that is not posting RX buffers; an RX kick resumes it.
    pub tx_stalled: bool,
    /// A transport reset the driver has not been told about: it had no
    /// event buffer posted. Sent when an event queue kick brings one.
    pub reset_pending: bool,
    /// A transport reset was delivered and the driver has not handled it yet. Nothing goes
    /// to the guest's RX queue meanwhile: a host connection request it saw before the
    /// event would be reset by it (seen right after a restore). The driver posts a new
    /// event buffer once it handled the event (the ring's avail index moves past the one
    /// recorded here when the event was delivered); that is the acknowledgement.
    pub reset_unacked: Option<u16>,
    /// Queues that got used buffers since the last interrupt.
    used: [bool; NUM_QUEUES],
}

impl Active {
    pub fn new(
        mem: GuestMemory,
        queues: [Queue; NUM_QUEUES],
        queue_events: [EventFd; NUM_QUEUES],
        interrupt: Arc<Interrupt>,
        events: EventRegistrar,
        muxer: Muxer,
    ) -> Self {
        Self {
            mem,
            queues,
            queue_events,
            interrupt,
            events,
            muxer,
            tx_stalled: false,
            reset_pending: false,
            reset_unacked: None,
            used: [false; NUM_QUEUES],
        }
    }

    /// One event loop callback. Whatever it was, expired deadlines are given up,
    /// replies and host data then go to the guest, the interrupt fires at most once, and
    /// the timer is set for the next deadline.
    pub fn handle_event(
        &mut self,
        token: EventToken,
        events: u32,
        listener: &UnixListener,
        timer: &mut DeadlineTimer,
        counters: &mut DeviceCounters,
    ) {
        match token {
            t if t == queue_token(RX_QUEUE) => {
                self.drain_queue_event(RX_QUEUE, events);
            }
            t if t == queue_token(TX_QUEUE) => {
                self.drain_queue_event(TX_QUEUE, events);
                self.process_tx(counters);
            }
            // Event buffers are only consumed by a transport reset.
            t if t == queue_token(EVENT_QUEUE) => {
                self.drain_queue_event(EVENT_QUEUE, events);
                self.deliver_reset_event(counters);
            }
            LISTENER_TOKEN => self.muxer.accept(listener, counters),
            TIMER_TOKEN => timer.consume(),
            t => self.muxer.handle_stream_event(t, events, counters),
        }
        self.check_reset_acked();
        self.muxer.sweep(Instant::now());
        self.process_rx(counters);
        if self.tx_stalled && !self.muxer.rx_backlogged() {
            self.process_tx(counters);
            self.process_rx(counters);
        }
        self.notify();
        timer.set(self.muxer.next_deadline());
    }

    /// Consumes a queue kick. Read only when epoll reported it readable, so
    /// a spurious call cannot block on an empty eventfd.
    fn drain_queue_event(&mut self, queue: usize, events: u32) {
        if events & libc::EPOLLIN as u32 == 0 {
            return;
        }
        if let Some(evt) = self.queue_events.get(queue)
            && let Err(e) = evt.read()
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            crate::warn_limited!("vsock: read queue {queue} eventfd: {e}");
        }
    }

    /// Takes the available TX chains, up to [`CHAINS_PER_EVENT`], hands their
    /// packets to the muxer and returns the chains (nothing is written to TX
    /// buffers: used length 0).
    pub fn process_tx(&mut self, counters: &mut DeviceCounters) {
        let Self {
            mem,
            queues,
            queue_events,
            muxer,
            used,
            tx_stalled,
            ..
        } = self;
        let queue = &mut queues[TX_QUEUE];
        for taken in 0..=CHAINS_PER_EVENT {
            if muxer.rx_backlogged() {
                *tx_stalled = true;
                return;
            }
            let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            if taken == CHAINS_PER_EVENT {
                yield_queue(queue, &queue_events[TX_QUEUE], TX_QUEUE);
                break;
            }
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    if muxer.handle_tx(&pkt, counters) {
                        counters.completed += 1;
                    }
                }
                Err(e) => {
                    tracing::debug!("vsock: malformed TX chain {head}: {e}");
                    counters.malformed_chains += 1;
                }
            }
            if let Err(e) = queue.add_used(&*mem, head, 0) {
                crate::warn_limited!("vsock: TX add_used {head}: {e}");
            }
            used[TX_QUEUE] = true;
        }
        *tx_stalled = false;
    }

    /// Fills guest RX buffers, up to [`CHAINS_PER_EVENT`], while the muxer has
    /// packets for them. With no buffers left the work stays queued (host
    /// bytes stay in their sockets) until the next RX kick.
    pub fn process_rx(&mut self, counters: &mut DeviceCounters) {
        if self.reset_unacked.is_some() {
            return;
        }
        let Self {
            mem,
            queues,
            queue_events,
            muxer,
            used,
            ..
        } = self;
        let queue = &mut queues[RX_QUEUE];
        let mut taken = 0;
        while muxer.has_rx_work() {
            let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            if taken == CHAINS_PER_EVENT {
                yield_queue(queue, &queue_events[RX_QUEUE], RX_QUEUE);
                break;
            }
            taken += 1;
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                // Linux always posts header plus data space; a header-only
                // buffer could not carry the data that may be next.
                Ok(pkt) if pkt.data_slice().is_none() => {
                    tracing::debug!("vsock: RX chain {head} has no data space");
                    counters.malformed_chains += 1;
                    0
                }
                Ok(mut pkt) => match muxer.fill_rx(&mut pkt, counters) {
                    Some(len) => {
                        counters.completed += 1;
                        len
                    }
                    None => {
                        // Nothing was owed after all (the host stream had no
                        // bytes): the buffer stays with the device.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::debug!("vsock: malformed RX chain {head}: {e}");
                    counters.malformed_chains += 1;
                    0
                }
            };
            if let Err(e) = queue.add_used(&*mem, head, len) {
                crate::warn_limited!("vsock: RX add_used {head}: {e}");
            }
            used[RX_QUEUE] = true;
        }
    }

    /// Drops all connections and tells the driver with a transport reset
    /// event, now if it posted an event buffer, else as soon as it posts
    /// one.
    pub fn transport_reset(&mut self, counters: &mut DeviceCounters) {
        self.muxer.drop_connections();
        self.reset_pending = true;
        self.deliver_reset_event(counters);
        if self.reset_pending {
            tracing::info!("vsock: no event buffer for the transport reset yet, keeping it");
        }
        self.notify();
    }

    /// Puts a pending transport reset event in the first usable event
    /// buffer (a writable descriptor of at least 4 bytes); unusable buffers
    /// on the way are returned empty, up to [`CHAINS_PER_EVENT`] of them.
    fn deliver_reset_event(&mut self, counters: &mut DeviceCounters) {
        if !self.reset_pending {
            return;
        }
        let Self {
            mem,
            queues,
            queue_events,
            used,
            ..
        } = self;
        let queue = &mut queues[EVENT_QUEUE];
        for taken in 0..=CHAINS_PER_EVENT {
            let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                return;
            };
            if taken == CHAINS_PER_EVENT {
                yield_queue(queue, &queue_events[EVENT_QUEUE], EVENT_QUEUE);
                return;
            }
            let head = chain.head_index();
            let written = match chain.next() {
                Some(desc) if desc.is_write_only() && desc.len() >= 4 => mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), desc.addr())
                    .is_ok(),
                _ => false,
            };
            let len = if written { 4 } else { 0 };
            if let Err(e) = queue.add_used(&*mem, head, len) {
                crate::warn_limited!("vsock: event add_used {head}: {e}");
            }
            used[EVENT_QUEUE] = true;
            if written {
                self.reset_pending = false;
                // Unreadable: nothing to wait for, the driver cannot post buffers either.
                self.reset_unacked = queue.avail_idx(&*mem, Ordering::Acquire).ok().map(|i| i.0);
                // The driver resets every socket when it reads the event,
                // including any opened while the event waited for a buffer.
                self.muxer.drop_connections();
                return;
            }
            tracing::debug!("vsock: malformed event chain {head}");
            counters.malformed_chains += 1;
        }
    }

    /// Ends the hold on RX once the driver posted an event buffer after the reset event
    /// (Linux refills the event queue right after handling an event).
    fn check_reset_acked(&mut self) {
        let Some(at_delivery) = self.reset_unacked else {
            return;
        };
        let queue = &self.queues[EVENT_QUEUE];
        match queue.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(avail) if avail.0 != at_delivery => {
                tracing::debug!("vsock: the driver handled the transport reset");
                self.reset_unacked = None;
            }
            Ok(_) => {}
            // A broken ring: stop waiting rather than hold RX forever.
            Err(e) => {
                tracing::debug!("vsock: event queue avail index: {e}");
                self.reset_unacked = None;
            }
        }
    }

    /// Raises the interrupt once if any queue that got used buffers wants
    /// a notification.
    fn notify(&mut self) {
        let mut signal = false;
        for (queue, used) in self.queues.iter_mut().zip(self.used.iter_mut()) {
            if !std::mem::take(used) {
                continue;
            }
            // On a broken ring, notify anyway: the driver finds out.
            signal |= queue.needs_notification(&self.mem).unwrap_or(true);
        }
        if signal {
            self.interrupt.signal_used_queue();
        }
    }
}
