//! The request-queue loop devices that answer each chain within the event share (block,
//! fs): pop up to a budget, return each chain used, yield the event loop once the budget is
//! spent, and interrupt the driver only when it asked to be told.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemory, Interrupt};

/// One queue to serve and what to tell its driver through.
pub(crate) struct ServedQueue<'a> {
    /// The device's name for logs ("block", "virtio-fs").
    pub(crate) name: &'static str,
    pub(crate) mem: &'a GuestMemory,
    pub(crate) queue: &'a mut Queue,
    /// The queue's notify eventfd: written to come back once the budget is spent.
    pub(crate) evt: &'a EventFd,
    pub(crate) interrupt: &'a Interrupt,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub(crate) event_idx: bool,
}

impl ServedQueue<'_> {
    /// Serves every available chain with `serve` (which returns the bytes it wrote into
    /// guest memory), at most `budget` of them, then interrupts the driver if it asked.
    pub(crate) fn serve(
        self,
        budget: u32,
        mut serve: impl FnMut(DescriptorChain<&GuestMemory>) -> u32,
    ) {
        let Self {
            name,
            mem,
            queue,
            evt,
            interrupt,
            event_idx,
        } = self;
        let mut used = 0u32;
        let mut budget = budget;
        // Rounds in a row that popped nothing although the ring claimed more.
        let mut stalled = 0u32;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::debug!("{name}: disable queue notification: {e}");
            }
            let mut popped = 0u32;
            while budget > 0 {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                popped += 1;
                let head = chain.head_index();
                let len = serve(chain);
                match queue.add_used(mem, head, len) {
                    Ok(()) => used += 1,
                    Err(e) => tracing::debug!("{name}: return chain {head}: {e}"),
                }
            }
            if budget == 0 {
                // Let the other devices run; the kick brings us back.
                if let Err(e) = evt.write(1) {
                    crate::warn_limited!("{name}: re-kick queue eventfd: {e}");
                }
                break;
            }
            // Re-enable notifications, then look once more: a request the driver added
            // while they were off came without a kick, and nothing else may ever kick (a
            // guest whose other processes wait on this one). That holds for a round that
            // popped nothing too: the request may have come just after the pop found the
            // ring empty. Only a second such round in a row means a broken avail index:
            // stop rather than spin.
            let more = queue.enable_notification(mem).unwrap_or_else(|e| {
                tracing::debug!("{name}: enable queue notification: {e}");
                false
            });
            if !more {
                break;
            }
            stalled = if popped == 0 { stalled + 1 } else { 0 };
            if stalled > 1 {
                crate::warn_limited!("{name}: avail index ahead of what can be popped");
                break;
            }
        }
        if used > 0 && (!event_idx || queue.needs_notification(mem).unwrap_or(true)) {
            interrupt.signal_used_queue();
        }
    }
}
