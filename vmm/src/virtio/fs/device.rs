//! The virtio-fs device: features, config space (tag and queue count), activation, reset.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use podvisor_vmm_api::config::FS_TAG_MAX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::{HIPRIO_QUEUE_TOKEN, QUEUE_SIZES, REQUEST_QUEUE_TOKEN, TYPE_FS};
use crate::virtio::{
    ActivateContext, ActivateError, DeviceCounters, EventRegistrar, EventToken, GuestMemory,
    Interrupt, QueueSnapshot, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

/// Config space: `u8 tag[36]; le32 num_request_queues` (virtio 1.2, 5.11.4).
const CONFIG_LEN: usize = FS_TAG_MAX + 4;

/// One activated queue and its notify eventfd.
#[derive(Debug)]
pub(super) struct ActiveQueue {
    pub(super) queue: Queue,
    pub(super) evt: EventFd,
}

/// What the device holds between DRIVER_OK and reset.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemory,
    /// High-priority queue, then the request queue.
    pub(super) queues: Vec<ActiveQueue>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) events: EventRegistrar,
    pub(super) event_idx: bool,
}

/// A virtio-fs device.
#[derive(Debug)]
pub struct Fs {
    tag: String,
    pub(super) backend: Backend,
    pub(super) counters: DeviceCounters,
    pub(super) active: Option<Active>,
}

impl Fs {
    /// A device the guest mounts by `tag` (checked by the configuration: 1 to 36 bytes),
    /// answered by `backend`.
    pub fn new(tag: &str, backend: Backend) -> Self {
        tracing::info!(
            tag,
            dir = ?backend.dir(),
            "virtio-fs device created"
        );
        Self {
            tag: tag.to_string(),
            backend,
            counters: DeviceCounters::default(),
            active: None,
        }
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        for (dst, src) in config.iter_mut().zip(self.tag.as_bytes()) {
            *dst = *src;
        }
        if let Some(dst) = config.get_mut(FS_TAG_MAX..) {
            dst.copy_from_slice(&1u32.to_le_bytes());
        }
        config
    }

    fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            for q in &active.queues {
                active.events.remove(q.evt.as_raw_fd());
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            tag = %self.tag,
            offset,
            len = data.len(),
            "ignored write to virtio-fs config space"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let expected = QUEUE_SIZES.len();
        for got in [ctx.queues.len(), ctx.queue_events.len()] {
            if got != expected {
                return Err(ActivateError::QueueCount { expected, got });
            }
        }
        self.deactivate();
        let event_idx = ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let tokens = [HIPRIO_QUEUE_TOKEN, REQUEST_QUEUE_TOKEN];
        let mut queues = Vec::with_capacity(expected);
        for ((mut queue, evt), token) in ctx.queues.into_iter().zip(ctx.queue_events).zip(tokens) {
            queue.set_event_idx(event_idx);
            let fd = evt.as_raw_fd();
            if let Err(source) = ctx.events.add(fd, token, EventSet::IN) {
                for q in &queues {
                    let q: &ActiveQueue = q;
                    ctx.events.remove(q.evt.as_raw_fd());
                }
                return Err(ActivateError::Register { fd, source });
            }
            queues.push(ActiveQueue { queue, evt });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
            events: ctx.events,
            event_idx,
        });
        tracing::debug!(tag = %self.tag, event_idx, "virtio-fs device activated");
        Ok(())
    }

    fn handle_event(&mut self, token: EventToken, events: u32) {
        match token {
            HIPRIO_QUEUE_TOKEN | REQUEST_QUEUE_TOKEN => self.handle_queue_event(token, events),
            _ => tracing::debug!(tag = %self.tag, token, "virtio-fs: unknown event token"),
        }
    }

    fn reset(&mut self) {
        self.deactivate();
        tracing::debug!(tag = %self.tag, "virtio-fs device reset");
    }

    fn name(&self) -> String {
        format!("fs {}", self.tag)
    }

    fn counters(&self) -> DeviceCounters {
        self.counters.clone()
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        // Every request is answered within the event that took it: nothing is in flight.
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| QueueSnapshot::from(&q.queue)))
            .collect()
    }
}
