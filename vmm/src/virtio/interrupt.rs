//! The interrupt line of one virtio-mmio device.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// Interrupt status plus the eventfd that KVM turns into the device's IRQ
/// (irqfd, edge triggered).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// Wraps an irqfd.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// Tells the driver that the config space changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            crate::warn_limited!("raise virtio interrupt: {e}");
        }
    }

    /// InterruptStatus as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver clears the bits it handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets `bits` saved in a snapshot (on top of any raised since) and, if
    /// any is set, raises the irqfd: the driver had not acknowledged them
    /// when the VM was saved and must still see an edge.
    pub fn restore_status(&self, bits: u32) {
        if bits != 0 {
            self.raise(bits);
        }
    }

    /// Clears all status bits (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The irqfd, for registration with KVM and for tests.
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }
}
