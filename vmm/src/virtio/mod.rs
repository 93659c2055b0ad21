//! Virtio devices on the MMIO transport.
//!
//! Every device has the same layout: `mod.rs` (public surface), `device.rs`
//! (features, config space, activation, reset), `handler.rs` (queue and
//! backend event handling), `persist.rs` (its constructor from the VM
//! configuration and the state a snapshot records, registered in
//! [`crate::device_table`]) and `tests.rs` (the device driven through its
//! queues in test guest memory with good and malformed chains).
//!
//! Threading: the MMIO transport runs on vCPU threads and owns the device
//! behind a mutex; after activation the device registers its file
//! descriptors (queue notify eventfds, TAP, sockets) with the VMM's single
//! event loop through an [`EventRegistrar`] and is called back on
//! [`VirtioDevice::handle_event`] from that loop.

pub mod block;
mod events;
pub mod fs;
mod interrupt;
pub mod mmio;
pub mod net;
mod serve;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;

pub use events::{EventRegistrar, EventToken};
pub use interrupt::Interrupt;
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as the devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Device types (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
/// Block device type.
pub const TYPE_BLOCK: u32 = 2;
/// Socket device type.
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits every device of ours offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver may use event-index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The largest descriptor chain payload any device accepts from the guest.
/// Nothing a guest sizes is allocated beyond this.
pub const MAX_CHAIN_BYTES: u32 = 1 << 20;

/// What a device is given when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory; every address the guest hands over is checked against it.
    pub mem: GuestMemory,
    /// Features the driver acknowledged (a subset of the device's offer).
    pub acked_features: u64,
    /// The queues the driver configured, frozen: the transport refuses any
    /// further queue register write until reset.
    pub queues: Vec<Queue>,
    /// One notify eventfd per queue (same index as `queues`), written by KVM
    /// (ioeventfd) or by the transport when the driver writes QueueNotify.
    pub queue_events: Vec<EventFd>,
    /// Raises the device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// Registers file descriptors with the VMM event loop.
    pub events: EventRegistrar,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateContext")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured fewer or more queues than the device has.
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// Registering a file descriptor with the event loop failed.
    #[error("register fd {fd} with the event loop")]
    Register {
        /// The descriptor.
        fd: RawFd,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A backend (file, TAP, socket) could not be set up; the error's type is the
    /// device's own.
    #[error("device backend")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One split virtqueue as saved in a snapshot: the driver's configuration
/// plus the device's ring positions.
///
/// A snapshot is read back from a file, so this is untrusted input: it only
/// becomes a [`Queue`] through [`QueueSnapshot::to_queue`], which validates
/// it (sizes, alignment), and the transport checks it against guest memory
/// before any device uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size the device offered.
    pub max_size: u16,
    /// Size the driver selected.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// The next available ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was in effect.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        q.state().into()
    }
}

impl QueueSnapshot {
    /// The queue this snapshot describes, if its sizes and ring alignments
    /// are valid (`Queue::try_from(QueueState)`). Whether the rings lie in
    /// guest memory is checked separately (`QueueT::is_valid`).
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState::from(*self))
    }
}

/// Copies the read-only config space `config` at `offset` into `data`: bytes past its end
/// (or at an offset that does not fit) read as 0, as every device's config reads.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let src = usize::try_from(offset)
        .ok()
        .and_then(|offset| config.get(offset..))
        .unwrap_or_default();
    for (dst, src) in data.iter_mut().zip(src) {
        *dst = *src;
    }
}

/// Counters a device keeps for the control API and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounters {
    /// Descriptor chains dropped because they were malformed (bad address,
    /// wrong direction, too short, too long). Never a panic, never a hang.
    pub malformed_chains: u64,
    /// Requests or packets completed.
    pub completed: u64,
    /// Bytes moved from the guest to the backend.
    pub tx_bytes: u64,
    /// Bytes moved from the backend into the guest.
    pub rx_bytes: u64,
    /// Backend I/O errors reported to the guest.
    pub io_errors: u64,
}

impl From<DeviceCounters> for podvisor_vmm_api::DeviceCountersBody {
    fn from(c: DeviceCounters) -> Self {
        Self {
            malformed_chains: c.malformed_chains,
            completed: c.completed,
            tx_bytes: c.tx_bytes,
            rx_bytes: c.rx_bytes,
            io_errors: c.io_errors,
        }
    }
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (including [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads device config space at `offset`; bytes out of range read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; writes out of range or to read-only
    /// fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Called from the event loop when a descriptor registered with `token`
    /// is ready; `events` are epoll bits (`libc::EPOLLIN`, ...).
    fn handle_event(&mut self, token: EventToken, events: u32);
    /// Returns the device to its state before activation: unregisters its
    /// descriptors from the event loop and drops the queues.
    fn reset(&mut self);
    /// A short name for logs and the API ("block vda", "net eth0", ...).
    fn name(&self) -> String;
    /// Current counters.
    fn counters(&self) -> DeviceCounters;
    /// The activated queues with their ring positions, in queue order, for
    /// a snapshot; empty before activation and after reset.
    fn queue_snapshots(&self) -> Vec<QueueSnapshot>;
    /// Called once after the transport re-activated the device from a
    /// snapshot (in a new process, with new backends), before the queues
    /// are kicked. Devices whose backend state did not survive tell the
    /// driver here.
    fn restored(&mut self) {}
}
