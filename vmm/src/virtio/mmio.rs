//! virtio-mmio transport (virtio 1.2, 4.2.2), version 2 only.
//!
//! The transport is an explicit state machine over the device status:
//!
//! ```text
//!  Reset ──ACK──▶ Acknowledged ──DRIVER──▶ Driver ──FEATURES_OK──▶ FeaturesOk ──DRIVER_OK──▶ Active
//!    ▲                                     (features writable)     (queues writable)         (frozen)
//!    └──────────────────────── status = 0 (reset) from any state ◀──────────────────────────────┘
//! ```
//!
//! A status write that clears bits, skips a step, or sets an unknown bit is
//! refused. Feature registers are only writable in `Driver`; queue registers
//! only in `FeaturesOk`. At DRIVER_OK the queues are validated against guest
//! memory and handed to the device; nothing the guest writes afterwards
//! changes them (a guest rewriting the queue size after activation is a bug
//! Firecracker shipped).
//!
//! [`MmioTransport::snapshot`] saves the registers and the device's queues;
//! [`MmioTransport::restore`] loads them into a fresh transport in a new
//! process, re-activating the device on the saved ring positions when the
//! snapshot was taken while it ran.

use std::sync::{Arc, Mutex};

use podvisor_common::{error_chain, lock};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::interrupt::{INT_CONFIG, INT_VRING};
use super::{
    ActivateContext, ActivateError, EventRegistrar, GuestMemory, Interrupt, QueueSnapshot,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5356_4450; // "PDVS"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Queue notify register: a write here kicks a queue.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Where the transport is in device initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransportState {
    /// Status 0.
    Reset,
    /// ACKNOWLEDGE set.
    Acknowledged,
    /// DRIVER set: features may be negotiated.
    Driver,
    /// FEATURES_OK accepted: queues may be configured.
    FeaturesOk,
    /// DRIVER_OK: the device runs with frozen queues.
    Active,
    /// The driver set FAILED, or activation failed (DEVICE_NEEDS_RESET).
    Failed,
}

/// Counters of guest mistakes the transport refused.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TransportCounters {
    /// Register writes refused in the current state.
    pub refused_writes: u64,
    /// Status writes that broke the initialisation order.
    pub bad_status_writes: u64,
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    events: EventRegistrar,
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    state: TransportState,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    counters: TransportCounters,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("state", &self.state)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("create queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device declares a queue of size 0 or not a power of two.
    #[error("device queue {index} has invalid max size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Its declared max size.
        size: u16,
    },
}

/// Everything the transport holds for a device, saved with a paused VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    /// The device type behind the window; a restore refuses another one.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// The initialisation state matching `status`.
    pub state: TransportState,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote (acknowledged once past FEATURES_OK).
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus bits the driver had not acknowledged.
    pub interrupt_status: u32,
    /// One per device queue: the device's own queues (with its ring
    /// positions) when `state` is `Active`, else the transport's registers.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a snapshot could not be restored into a transport. The transport is
/// left as it was (reset) on every error.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    /// Restoring is only done into a transport the driver has not touched.
    #[error("restore into a transport in state {0:?}, need Reset")]
    NotFresh(TransportState),
    /// The snapshot is of another kind of device.
    #[error("snapshot of device type {saved}, this window holds device type {device}")]
    DeviceType {
        /// Type in the snapshot.
        saved: u32,
        /// Type of the device now.
        device: u32,
    },
    /// The snapshot has a different number of queues from the device.
    #[error("snapshot has {saved} queues, the device has {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device now.
        device: usize,
    },
    /// The status register does not match the saved state.
    #[error("status {status:#x} is impossible in state {state:?}")]
    Status {
        /// The saved status.
        status: u32,
        /// The saved state.
        state: TransportState,
    },
    /// InterruptStatus holds bits no device raises.
    #[error("interrupt status {0:#x} has unknown bits")]
    InterruptStatus(u32),
    /// The driver acknowledged features the device does not offer (any
    /// more), or VERSION_1 is missing.
    #[error(
        "acked features {acked:#x} are not within the device's offer {offered:#x} with VERSION_1"
    )]
    Features {
        /// Features in the snapshot.
        acked: u64,
        /// Features the device offers now.
        offered: u64,
    },
    /// A queue's maximum size differs from the device's.
    #[error("queue {index} has max size {saved}, the device's is {device}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Max size in the snapshot.
        saved: u16,
        /// The device's max size.
        device: u16,
    },
    /// A queue's sizes or ring alignments are invalid.
    #[error("queue {index} is invalid")]
    Queue {
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue of a running device is not ready or its rings are not in
    /// guest memory.
    #[error("queue {index} of an active device is not ready or lies outside guest memory")]
    QueueUnusable {
        /// Queue index.
        index: usize,
    },
    /// A queue eventfd could not be duplicated for the device.
    #[error("clone queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device refused to start on the saved queues.
    #[error("activate {device}")]
    Activate {
        /// The device's name.
        device: String,
        /// Why it refused.
        #[source]
        source: ActivateError,
    },
}

impl From<TransportCounters> for podvisor_vmm_api::TransportCountersBody {
    fn from(c: TransportCounters) -> Self {
        Self {
            refused_writes: c.refused_writes,
            bad_status_writes: c.bad_status_writes,
        }
    }
}

/// Why the device could not be started on a set of queues.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("clone queue eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Activate(ActivateError),
}

/// The status register value each state has (besides `Failed`, which has
/// FAILED or DEVICE_NEEDS_RESET on top of any of them).
fn status_of(state: TransportState) -> Option<u32> {
    use status::*;
    match state {
        TransportState::Reset => Some(0),
        TransportState::Acknowledged => Some(ACKNOWLEDGE),
        TransportState::Driver => Some(ACKNOWLEDGE | DRIVER),
        TransportState::FeaturesOk => Some(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        TransportState::Active => Some(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
        TransportState::Failed => None,
    }
}

/// Whether `status` can be the status register in `state`.
fn status_matches(state: TransportState, status: u32) -> bool {
    use status::*;
    match status_of(state) {
        Some(expected) => status == expected,
        None => {
            let known =
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET | FAILED;
            status & !known == 0 && status & (FAILED | DEVICE_NEEDS_RESET) != 0
        }
    }
}

impl MmioTransport {
    /// A transport for `device` raising `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        events: EventRegistrar,
    ) -> Result<Self, MmioError> {
        let sizes: Vec<u16> = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_events = Vec::with_capacity(sizes.len());
        for (index, size) in sizes.into_iter().enumerate() {
            let q = Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })?;
            queues.push(q);
            queue_events.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            events,
            queue_events,
            queues,
            status: 0,
            state: TransportState::Reset,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            counters: TransportCounters::default(),
        })
    }

    /// The queue notify eventfds, for KVM ioeventfd registration.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device behind this window.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The current state.
    pub fn state(&self) -> TransportState {
        self.state
    }

    /// Counters of refused guest writes.
    pub fn counters(&self) -> TransportCounters {
        self.counters.clone()
    }

    /// Bumps the config generation and tells the driver the config changed.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).device_features() | VIRTIO_F_VERSION_1
    }

    /// Saves the transport and, when the device runs, its queues. Call it
    /// with the vCPUs paused and the event loop stopped: the device must
    /// not move its rings between this and the guest memory dump.
    pub fn snapshot(&self) -> TransportSnapshot {
        let dev = lock(&self.device);
        let queues = if self.state == TransportState::Active {
            dev.queue_snapshots()
        } else {
            self.queues.iter().map(QueueSnapshot::from).collect()
        };
        TransportSnapshot {
            device_type: dev.device_type(),
            status: self.status,
            state: self.state,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Loads `snap` into this freshly built transport (same device type and
    /// queue count). The snapshot comes from a file: everything in it is
    /// checked before anything changes.
    ///
    /// For an `Active` snapshot the saved queues are validated against guest
    /// memory as at DRIVER_OK, the device is activated on them (ring
    /// positions kept) and told [`VirtioDevice::restored`], then every queue
    /// is kicked so requests the guest queued before the snapshot are served.
    /// Other states get their registers and queues back only. The saved
    /// interrupt status is raised again in both cases.
    pub fn restore(&mut self, snap: &TransportSnapshot) -> Result<(), MmioRestoreError> {
        if self.state != TransportState::Reset {
            return Err(MmioRestoreError::NotFresh(self.state));
        }
        let (device_type, max_sizes) = {
            let dev = lock(&self.device);
            (dev.device_type(), dev.queue_max_sizes().to_vec())
        };
        if snap.device_type != device_type {
            return Err(MmioRestoreError::DeviceType {
                saved: snap.device_type,
                device: device_type,
            });
        }
        if snap.queues.len() != max_sizes.len() {
            return Err(MmioRestoreError::QueueCount {
                saved: snap.queues.len(),
                device: max_sizes.len(),
            });
        }
        if !status_matches(snap.state, snap.status) {
            return Err(MmioRestoreError::Status {
                status: snap.status,
                state: snap.state,
            });
        }
        if snap.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(MmioRestoreError::InterruptStatus(snap.interrupt_status));
        }
        // Past FEATURES_OK the features were accepted; they must still be.
        // (In Driver the driver may hold anything: FEATURES_OK rechecks.)
        let negotiated = matches!(
            snap.state,
            TransportState::FeaturesOk | TransportState::Active
        );
        if negotiated && !self.features_acceptable(snap.acked_features) {
            return Err(MmioRestoreError::Features {
                acked: snap.acked_features,
                offered: self.device_features(),
            });
        }
        let active = snap.state == TransportState::Active;
        let event_idx = snap.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(snap.queues.len());
        let mut device_queues = Vec::with_capacity(snap.queues.len());
        for (index, (saved, &device)) in snap.queues.iter().zip(&max_sizes).enumerate() {
            if saved.max_size != device {
                return Err(MmioRestoreError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device,
                });
            }
            let invalid = |source| MmioRestoreError::Queue { index, source };
            let q = saved.to_queue().map_err(invalid)?;
            if active {
                if !q.is_valid(&self.mem) {
                    return Err(MmioRestoreError::QueueUnusable { index });
                }
                // The device's own copy, as at DRIVER_OK.
                let mut dq = saved.to_queue().map_err(invalid)?;
                dq.set_event_idx(event_idx);
                device_queues.push(dq);
            }
            queues.push(q);
        }

        if active && let Err(e) = self.start_device(snap.acked_features, device_queues) {
            return Err(match e {
                StartError::EventFd(e) => MmioRestoreError::EventFd(e),
                StartError::Activate(source) => MmioRestoreError::Activate {
                    device: lock(&self.device).name(),
                    source,
                },
            });
        }
        self.queues = queues;
        self.status = snap.status;
        self.state = snap.state;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.acked_features = snap.acked_features;
        self.queue_sel = snap.queue_sel;
        self.config_generation = snap.config_generation;
        // Before `restored`, which may raise bits of its own: those are
        // added to the saved ones, never overwritten.
        self.interrupt.restore_status(snap.interrupt_status);
        if active {
            lock(&self.device).restored();
            for (index, evt) in self.queue_events.iter().enumerate() {
                // The kicks of the old process are lost; whatever the guest
                // queued before the snapshot is found again this way.
                if let Err(e) = evt.write(1) {
                    crate::warn_limited!("kick queue {index} after restore: {e}");
                }
            }
        }
        tracing::debug!(
            "{}: restored in state {:?}",
            lock(&self.device).name(),
            self.state
        );
        Ok(())
    }

    /// A guest read at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and must be read as such.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length all ones means "absent".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(
                self.state,
                TransportState::Driver | TransportState::FeaturesOk | TransportState::Active
            ) {
                lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            } else {
                self.counters.refused_writes += 1;
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.counters.refused_writes += 1;
            return;
        };
        if !offset.is_multiple_of(4) {
            self.counters.refused_writes += 1;
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => {}
            _ => self.counters.refused_writes += 1,
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.state != TransportState::Driver {
            self.counters.refused_writes += 1;
            return;
        }
        let (mask, shift) = match self.driver_features_sel {
            0 => (0xffff_ffffu64, 0),
            1 => (0xffff_ffff_0000_0000u64, 32),
            _ => {
                self.counters.refused_writes += 1;
                return;
            }
        };
        self.acked_features = (self.acked_features & !mask) | (u64::from(v) << shift);
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if self.state != TransportState::FeaturesOk {
            self.counters.refused_writes += 1;
            return;
        }
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            self.counters.refused_writes += 1;
            return;
        };
        match offset {
            // Queue::set_size keeps the old size when the value is invalid
            // (zero, above the max, not a power of two); is_valid rechecks.
            REG_QUEUE_NUM => q.set_size(v.try_into().unwrap_or(0)),
            REG_QUEUE_READY => q.set_ready(v == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            REG_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn notify(&mut self, queue: u32) {
        // With KVM ioeventfds registered this only runs for queue indexes
        // that matched no eventfd, or when no ioeventfd could be registered.
        if self.state != TransportState::Active {
            self.counters.refused_writes += 1;
            return;
        }
        match self.queue_events.get(queue as usize) {
            Some(evt) => {
                let _ = evt.write(1);
            }
            None => self.counters.refused_writes += 1,
        }
    }

    fn write_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            self.status |= FAILED;
            self.state = TransportState::Failed;
            return;
        }
        // Bits may only be added, one step at a time, in order.
        let next = match (self.state, v) {
            (TransportState::Reset, s) if s == ACKNOWLEDGE => TransportState::Acknowledged,
            (TransportState::Acknowledged, s) if s == ACKNOWLEDGE | DRIVER => {
                TransportState::Driver
            }
            (TransportState::Driver, s) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                if !self.features_acceptable(self.acked_features) {
                    // FEATURES_OK stays clear; the driver reads it back and fails.
                    self.counters.bad_status_writes += 1;
                    return;
                }
                TransportState::FeaturesOk
            }
            (TransportState::FeaturesOk, s)
                if s == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK =>
            {
                self.activate();
                return;
            }
            (state, s) if s == self.status && state != TransportState::Reset => return,
            _ => {
                self.counters.bad_status_writes += 1;
                return;
            }
        };
        self.status = v;
        self.state = next;
    }

    fn features_acceptable(&self, acked: u64) -> bool {
        let offered = self.device_features();
        acked & !offered == 0 && acked & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        use status::*;
        let all_valid = self.queues.iter().all(|q| q.is_valid(&self.mem));
        if !all_valid {
            crate::warn_limited!(
                "{}: driver set DRIVER_OK with an invalid or unready queue",
                lock(&self.device).name()
            );
            self.needs_reset();
            return;
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        // The device gets its own copies: what the guest writes to the
        // transport's registers from now on never reaches it.
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(mut q) => {
                    q.set_event_idx(event_idx);
                    queues.push(q);
                }
                Err(e) => {
                    crate::warn_limited!("{}: queue state: {e:?}", lock(&self.device).name());
                    self.needs_reset();
                    return;
                }
            }
        }
        match self.start_device(self.acked_features, queues) {
            Ok(()) => {
                self.status = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
                self.state = TransportState::Active;
            }
            Err(e) => {
                crate::warn_limited!(
                    "{}: activation failed: {}",
                    lock(&self.device).name(),
                    error_chain(&e)
                );
                self.needs_reset();
            }
        }
    }

    /// Activates the device on `queues` with clones of the notify eventfds.
    fn start_device(&self, acked_features: u64, queues: Vec<Queue>) -> Result<(), StartError> {
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::EventFd)?;
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features,
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            events: self.events.clone(),
        };
        lock(&self.device)
            .activate(ctx)
            .map_err(StartError::Activate)
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.state = TransportState::Failed;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        if self.state == TransportState::Active || self.state == TransportState::Failed {
            lock(&self.device).reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_events {
            // Drop stale kicks so a new activation starts clean.
            let _ = evt.read();
        }
        self.status = 0;
        self.state = TransportState::Reset;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }
}

#[cfg(test)]
pub(crate) mod tests;
