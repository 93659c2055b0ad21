//! Configuration, features, config space, activation and reset.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use podvisor_vmm_api::tap::{Tap, TapError};

use super::{
    FRAME_BUFFER_LEN, QUEUE_SIZE, RX_QUEUE, RX_QUEUE_TOKEN, TAP_TOKEN, TX_QUEUE, TX_QUEUE_TOKEN,
};
use crate::virtio::{
    ActivateContext, ActivateError, DeviceCounters, EventRegistrar, EventToken, GuestMemory,
    Interrupt, QueueSnapshot, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Features offered to the driver. GSO and checksum offloads cost nothing
/// here: the TAP takes and returns the virtio_net_hdr as is.
const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
// `activate` takes the queues and their eventfds in this order.
const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1);

/// How a net device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the host TAP interface (created if it does not exist).
    pub tap_name: String,
    /// The guest's MAC address, exposed in config space.
    pub mac: [u8; 6],
}

/// Whether the TAP is in the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TapPolling {
    /// Registered for input.
    On,
    /// Registered without input events: a frame is pending and the guest has
    /// no RX buffers for it.
    Paused,
    /// Removed after the TAP reported an error (e.g. the interface was
    /// deleted); RX is over until reset.
    Gone,
}

/// Everything that exists only between activation and reset.
pub(super) struct Active {
    pub(super) mem: GuestMemory,
    pub(super) rx_queue: Queue,
    pub(super) tx_queue: Queue,
    pub(super) rx_event: EventFd,
    pub(super) tx_event: EventFd,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) events: EventRegistrar,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated: a frame may span RX chains.
    pub(super) mergeable_rx: bool,
    pub(super) tap_polling: TapPolling,
}

/// A frame read from the TAP and not yet delivered to the guest.
pub(super) struct RxFrame {
    /// Device-owned buffer of [`FRAME_BUFFER_LEN`] bytes.
    pub(super) buf: Box<[u8]>,
    /// Bytes of `buf` holding the pending frame; 0 when none is pending.
    pub(super) len: usize,
}

/// Frames dropped by the device, on top of [`DeviceCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Drops {
    /// Frames from the TAP that no guest buffer could hold.
    pub(super) rx: u64,
    /// Frames from the guest the TAP refused (full or error).
    pub(super) tx: u64,
}

/// A virtio-net device on a TAP interface.
///
/// Counters: `completed` counts frames sent to the TAP plus frames delivered
/// to the guest; `tx_bytes`/`rx_bytes` count Ethernet bytes (without the
/// virtio_net_hdr); `malformed_chains` counts chains returned unused;
/// `io_errors` counts TAP reads and writes that failed, including frames
/// dropped because the TAP was full.
pub struct Net {
    pub(super) tap: Tap,
    mac: [u8; 6],
    pub(super) active: Option<Active>,
    pub(super) rx_frame: RxFrame,
    /// Device-owned buffer the TX chains are gathered into.
    pub(super) tx_buf: Box<[u8]>,
    /// (head index, used length) of the chains filled for the frame being
    /// delivered; sized for the largest queue.
    pub(super) rx_chains: Box<[(u16, u32)]>,
    pub(super) counters: DeviceCounters,
    pub(super) drops: Drops,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Opens (or creates) the TAP named in `cfg` and builds the device.
    pub fn new(cfg: NetConfig) -> Result<Self, TapError> {
        let tap = Tap::open(&cfg.tap_name)?;
        Ok(Self::with_tap(tap, cfg.mac))
    }

    /// Builds the device on an already open TAP.
    pub fn with_tap(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            active: None,
            rx_frame: RxFrame {
                buf: vec![0; FRAME_BUFFER_LEN].into_boxed_slice(),
                len: 0,
            },
            tx_buf: vec![0; FRAME_BUFFER_LEN].into_boxed_slice(),
            rx_chains: vec![(0, 0); usize::from(QUEUE_SIZE)].into_boxed_slice(),
            counters: DeviceCounters::default(),
            drops: Drops::default(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The host TAP interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Frames read from the TAP and dropped because the guest's RX buffers
    /// could never hold them.
    pub fn rx_dropped(&self) -> u64 {
        self.drops.rx
    }

    /// Frames from the guest dropped because the TAP refused them (queue
    /// full or error); each is also counted in `io_errors`.
    pub fn tx_dropped(&self) -> u64 {
        self.drops.tx
    }

    /// Whether the device is between activation and reset.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// TUN_F_* offloads matching the GUEST_* features the driver acked: what
    /// the TAP may hand us is exactly what the guest accepts.
    fn tap_offloads(acked: u64) -> u32 {
        if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
            // Segmentation offloads need checksum offload (the kernel refuses
            // TSO without TUN_F_CSUM).
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        flags
    }

    fn register(events: &EventRegistrar, fd: i32, token: EventToken) -> Result<(), ActivateError> {
        events
            .add(fd, token, EventSet::IN)
            .map_err(|source| ActivateError::Register { fd, source })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    /// Config space is `struct virtio_net_config` up to `mac`: the other
    /// fields belong to features we do not offer.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // VERSION_1 drivers must not write the MAC; nothing else is writable.
        tracing::debug!(
            "{}: ignored config write of {} bytes at {offset:#x}",
            self.name(),
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            crate::warn_limited!("{}: activated twice without reset", self.name());
            self.reset();
        }
        let ActivateContext {
            mem,
            acked_features,
            queues,
            queue_events,
            interrupt,
            events,
        } = ctx;
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        if queue_events.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queue_events.len(),
            });
        }
        self.tap
            .set_offload(Self::tap_offloads(acked_features))
            .map_err(|e| ActivateError::Backend(Box::new(e)))?;

        let mut queues = queues.into_iter();
        let mut queue_events = queue_events.into_iter();
        let (Some(mut rx_queue), Some(mut tx_queue)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: 0,
            });
        };
        let (Some(rx_event), Some(tx_event)) = (queue_events.next(), queue_events.next()) else {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: 0,
            });
        };
        let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        rx_queue.set_event_idx(event_idx);
        tx_queue.set_event_idx(event_idx);

        let registrations = [
            (rx_event.as_raw_fd(), RX_QUEUE_TOKEN),
            (tx_event.as_raw_fd(), TX_QUEUE_TOKEN),
            (self.tap.as_raw_fd(), TAP_TOKEN),
        ];
        for (done, &(fd, token)) in registrations.iter().enumerate() {
            if let Err(e) = Self::register(&events, fd, token) {
                for &(registered, _) in &registrations[..done] {
                    events.remove(registered);
                }
                return Err(e);
            }
        }

        self.rx_frame.len = 0;
        self.active = Some(Active {
            mem,
            rx_queue,
            tx_queue,
            rx_event,
            tx_event,
            interrupt,
            events,
            mergeable_rx: acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            tap_polling: TapPolling::On,
        });
        tracing::debug!("{}: activated, features {acked_features:#x}", self.name());
        Ok(())
    }

    fn handle_event(&mut self, token: EventToken, events: u32) {
        self.dispatch_event(token, events);
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            active.events.remove(active.rx_event.as_raw_fd());
            active.events.remove(active.tx_event.as_raw_fd());
            active.events.remove(self.tap.as_raw_fd());
        }
        // A frame held for the old driver means nothing to the next one.
        self.rx_frame.len = 0;
    }

    fn name(&self) -> String {
        format!("net {}", self.tap.name())
    }

    fn counters(&self) -> DeviceCounters {
        self.counters.clone()
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        // A frame read from the TAP and still waiting for RX buffers is not
        // saved: it is lost like any frame on a congested link.
        self.active
            .iter()
            .flat_map(|active| [&active.rx_queue, &active.tx_queue])
            .map(QueueSnapshot::from)
            .collect()
    }
}
