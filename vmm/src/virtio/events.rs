//! Registration of device file descriptors with the VMM event loop.

use std::os::fd::RawFd;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A device-chosen number that comes back in [`super::VirtioDevice::handle_event`].
pub type EventToken = u32;

/// Adds and removes a device's descriptors on the shared epoll set. The epoll
/// data word carries the device's slot in the high half and the device's own
/// token in the low half, so the loop can route each event.
#[derive(Clone, Debug)]
pub struct EventRegistrar {
    epoll: Arc<Epoll>,
    slot: u32,
}

impl EventRegistrar {
    /// A registrar for the device in `slot` of the event loop.
    pub fn new(epoll: Arc<Epoll>, slot: u32) -> Self {
        Self { epoll, slot }
    }

    /// Splits an epoll data word into (slot, token).
    pub fn decode(data: u64) -> (u32, EventToken) {
        ((data >> 32) as u32, data as u32)
    }

    fn data(&self, token: EventToken) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(token)
    }

    /// Watches `fd` for `events` (e.g. `EventSet::IN`), reporting `token`.
    pub fn add(&self, fd: RawFd, token: EventToken, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, token: EventToken, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    /// Stops watching `fd`. Removing a descriptor that is not registered is
    /// not an error (reset may race with a closed socket).
    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}
