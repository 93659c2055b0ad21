//! The MMIO transport driven register by register, with a test device.

// A test scenario reads top to bottom; the length limit is for the VMM's own code.
#![allow(clippy::too_many_lines)]

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::status::*;
use super::*;
use crate::virtio::interrupt::INT_CONFIG;
use crate::virtio::{ActivateError, DeviceCounters, EventToken, TYPE_BLOCK};

/// A device that records what the transport did to it.
#[derive(Default)]
struct Recorder {
    activations: Vec<(u64, Vec<u16>)>,
    /// The queues of the current activation, as handed over.
    queues: Vec<QueueSnapshot>,
    resets: usize,
    restored: usize,
    config: [u8; 8],
    fail_activate: bool,
    /// Offered on top of VERSION_1 | 0b101.
    extra_features: u64,
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 0b101 | self.extra_features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = *self.config.get(offset as usize + i).unwrap_or(&0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend(
                std::io::Error::other("refused").into(),
            ));
        }
        self.activations.push((
            ctx.acked_features,
            ctx.queues.iter().map(|q| q.size()).collect(),
        ));
        self.queues = ctx.queues.iter().map(QueueSnapshot::from).collect();
        Ok(())
    }
    fn handle_event(&mut self, _: EventToken, _: u32) {}
    fn reset(&mut self) {
        self.resets += 1;
        self.queues.clear();
    }
    fn name(&self) -> String {
        "recorder".into()
    }
    fn counters(&self) -> DeviceCounters {
        DeviceCounters::default()
    }
    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.queues.clone()
    }
    fn restored(&mut self) {
        self.restored += 1;
    }
}

fn setup(dev: Recorder) -> (MmioTransport, Arc<Mutex<Recorder>>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let events = EventRegistrar::new(Arc::new(Epoll::new().unwrap()), 0);
    let t = MmioTransport::new(dev.clone(), mem, interrupt, events).unwrap();
    (t, dev)
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Where a driver put one queue in guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLayout {
    /// Queue size the driver selects.
    pub(crate) size: u16,
    /// Descriptor table address.
    pub(crate) desc: u64,
    /// Available ring address.
    pub(crate) avail: u64,
    /// Used ring address.
    pub(crate) used: u64,
}

/// Brings a transport up as a guest driver does: ACKNOWLEDGE, DRIVER,
/// `features`, FEATURES_OK, the queues in `queues` (index order), then
/// DRIVER_OK. For device tests that need a real transport.
pub(crate) fn drive_to_active(t: &mut MmioTransport, features: u64, queues: &[QueueLayout]) {
    negotiate(t, features);
    for (index, layout) in queues.iter().enumerate() {
        program_queue(t, index as u32, layout);
    }
    w32(
        t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

/// The driver's QueueNotify write for `queue`.
pub(crate) fn notify_queue(t: &mut MmioTransport, queue: u32) {
    w32(t, REG_QUEUE_NOTIFY, queue);
}

fn negotiate(t: &mut MmioTransport, features: u64) {
    w32(t, REG_STATUS, ACKNOWLEDGE);
    w32(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    w32(t, REG_DRIVER_FEATURES_SEL, 0);
    w32(t, REG_DRIVER_FEATURES, features as u32);
    w32(t, REG_DRIVER_FEATURES_SEL, 1);
    w32(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

fn program_queue(t: &mut MmioTransport, index: u32, q: &QueueLayout) {
    w32(t, REG_QUEUE_SEL, index);
    w32(t, REG_QUEUE_NUM, u32::from(q.size));
    w32(t, REG_QUEUE_DESC_LOW, q.desc as u32);
    w32(t, REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
    w32(t, REG_QUEUE_AVAIL_LOW, q.avail as u32);
    w32(t, REG_QUEUE_AVAIL_HIGH, (q.avail >> 32) as u32);
    w32(t, REG_QUEUE_USED_LOW, q.used as u32);
    w32(t, REG_QUEUE_USED_HIGH, (q.used >> 32) as u32);
    w32(t, REG_QUEUE_READY, 1);
}

fn layout(base: u32) -> QueueLayout {
    let base = u64::from(base);
    QueueLayout {
        size: 8,
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
    }
}

fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
    program_queue(t, index, &layout(base));
}

fn bring_up(t: &mut MmioTransport) {
    negotiate(t, VIRTIO_F_VERSION_1 | 1);
    setup_queue(t, 0, 0x1_0000);
    setup_queue(t, 1, 0x2_0000);
    w32(
        t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

#[test]
fn identifies_itself() {
    let (mut t, _) = setup(Recorder::default());
    assert_eq!(r32(&mut t, REG_MAGIC), MAGIC_VALUE);
    assert_eq!(r32(&mut t, REG_VERSION), 2);
    assert_eq!(r32(&mut t, REG_DEVICE_ID), 42);
    w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    w32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 0b101);
    w32(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 16);
}

#[test]
fn full_bring_up_activates_with_acked_features() {
    let (mut t, dev) = setup(Recorder::default());
    bring_up(&mut t);
    assert_eq!(t.state(), TransportState::Active);
    assert_eq!(r32(&mut t, REG_STATUS), 0xf);
    let d = dev.lock().unwrap();
    assert_eq!(d.activations, vec![(VIRTIO_F_VERSION_1 | 1, vec![8, 8])]);
}

#[test]
fn status_steps_cannot_be_skipped_or_cleared() {
    let (mut t, _) = setup(Recorder::default());
    w32(
        &mut t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(t.state(), TransportState::Reset);
    w32(&mut t, REG_STATUS, ACKNOWLEDGE);
    w32(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    // Clearing ACKNOWLEDGE while adding FEATURES_OK is refused.
    w32(&mut t, REG_STATUS, DRIVER | FEATURES_OK);
    assert_eq!(t.state(), TransportState::Driver);
    assert_eq!(r32(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(t.counters().bad_status_writes, 2);
}

#[test]
fn features_ok_needs_version_1_and_a_subset_of_the_offer() {
    let (mut t, _) = setup(Recorder::default());
    negotiate(&mut t, 1);
    assert_eq!(t.state(), TransportState::Driver, "no VERSION_1");
    assert_eq!(r32(&mut t, REG_STATUS) & FEATURES_OK, 0);

    let (mut t, _) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
    assert_eq!(t.state(), TransportState::Driver, "bit 1 was not offered");

    let (mut t, _) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100);
    assert_eq!(t.state(), TransportState::FeaturesOk);
}

#[test]
fn features_are_frozen_after_features_ok() {
    let (mut t, dev) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    w32(&mut t, REG_DRIVER_FEATURES_SEL, 0);
    w32(&mut t, REG_DRIVER_FEATURES, 0b101);
    setup_queue(&mut t, 0, 0x1_0000);
    setup_queue(&mut t, 1, 0x2_0000);
    w32(
        &mut t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(dev.lock().unwrap().activations[0].0, VIRTIO_F_VERSION_1);
}

#[test]
fn queue_setup_is_frozen_at_driver_ok() {
    let (mut t, dev) = setup(Recorder::default());
    bring_up(&mut t);
    let refused = t.counters().refused_writes;
    // A guest rewriting the size and the rings after activation changes nothing.
    w32(&mut t, REG_QUEUE_SEL, 0);
    w32(&mut t, REG_QUEUE_NUM, 16);
    w32(&mut t, REG_QUEUE_DESC_LOW, 0xdead_0000);
    w32(&mut t, REG_QUEUE_READY, 0);
    assert_eq!(t.counters().refused_writes, refused + 3);
    assert_eq!(t.queues[0].size(), 8);
    assert_eq!(t.queues[0].desc_table(), 0x1_0000);
    assert_eq!(dev.lock().unwrap().activations.len(), 1);
}

#[test]
fn queue_writes_before_features_ok_are_refused() {
    let (mut t, _) = setup(Recorder::default());
    w32(&mut t, REG_QUEUE_NUM, 4);
    assert_eq!(t.queues[0].size(), 16);
    assert_eq!(t.counters().refused_writes, 1);
}

#[test]
fn out_of_range_queue_select_is_harmless() {
    let (mut t, _) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    w32(&mut t, REG_QUEUE_SEL, 0xffff_ffff);
    assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 0);
    assert_eq!(r32(&mut t, REG_QUEUE_READY), 0);
    w32(&mut t, REG_QUEUE_NUM, 8);
    w32(&mut t, REG_QUEUE_READY, 1);
    assert_eq!(t.counters().refused_writes, 2);
}

#[test]
fn invalid_queue_at_driver_ok_needs_reset() {
    let (mut t, dev) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 0x1_0000);
    // Queue 1 points outside guest memory.
    setup_queue(&mut t, 1, 0xf000_0000);
    w32(
        &mut t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(t.state(), TransportState::Failed);
    assert_ne!(r32(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert!(dev.lock().unwrap().activations.is_empty());
    // A reset brings it back.
    w32(&mut t, REG_STATUS, 0);
    assert_eq!(t.state(), TransportState::Reset);
    bring_up(&mut t);
    assert_eq!(t.state(), TransportState::Active);
}

#[test]
fn failed_activation_needs_reset() {
    let (mut t, _) = setup(Recorder {
        fail_activate: true,
        ..Default::default()
    });
    bring_up(&mut t);
    assert_eq!(t.state(), TransportState::Failed);
    assert_ne!(r32(&mut t, REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert_ne!(r32(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
}

#[test]
fn reset_resets_the_device_and_queues() {
    let (mut t, dev) = setup(Recorder::default());
    bring_up(&mut t);
    w32(&mut t, REG_STATUS, 0);
    assert_eq!(dev.lock().unwrap().resets, 1);
    assert_eq!(r32(&mut t, REG_STATUS), 0);
    assert!(!t.queues[0].ready());
    assert_eq!(t.queues[0].size(), 16);
}

#[test]
fn odd_sized_and_unaligned_accesses_do_nothing() {
    let (mut t, _) = setup(Recorder::default());
    let mut b = [0xffu8; 2];
    t.read(REG_MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    t.write(REG_STATUS, &[1]);
    t.write(REG_STATUS + 1, &1u32.to_le_bytes());
    assert_eq!(r32(&mut t, REG_STATUS), 0);
    assert_eq!(t.counters().refused_writes, 2);
}

#[test]
fn notify_kicks_the_right_queue_only_when_active() {
    let (mut t, _) = setup(Recorder::default());
    w32(&mut t, REG_QUEUE_NOTIFY, 0);
    assert!(t.queue_events()[0].read().is_err(), "not active yet");
    bring_up(&mut t);
    w32(&mut t, REG_QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    assert!(t.queue_events()[0].read().is_err());
    w32(&mut t, REG_QUEUE_NOTIFY, 7);
}

#[test]
fn config_space_goes_to_the_device() {
    let (mut t, _) = setup(Recorder::default());
    w32(&mut t, REG_STATUS, ACKNOWLEDGE);
    w32(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    t.write(CONFIG_SPACE + 2, &[7, 8]);
    let mut b = [0u8; 4];
    t.read(CONFIG_SPACE, &mut b);
    assert_eq!(b, [0, 0, 7, 8]);
    // Past the end reads zero and writes are dropped, no panic.
    let mut b = [0xffu8; 8];
    t.read(CONFIG_SPACE + 0x1000, &mut b);
    assert_eq!(b, [0; 8]);
    t.write(CONFIG_SPACE + u64::MAX / 2, &[1]);
}

#[test]
fn interrupt_ack_clears_status_bits() {
    let (mut t, _) = setup(Recorder::default());
    t.interrupt.signal_used_queue();
    t.interrupt.signal_config_change();
    assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 3);
    w32(&mut t, REG_INTERRUPT_ACK, 1);
    assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 2);
}

// ------------------------------------------------------- snapshot/restore

/// Every register a driver can read, for queue 0 and queue 1 and both
/// feature words. Leaves QueueSel and DeviceFeaturesSel at 1.
fn registers(t: &mut MmioTransport) -> Vec<u32> {
    let mut regs = vec![
        r32(t, REG_STATUS),
        r32(t, REG_INTERRUPT_STATUS),
        r32(t, REG_CONFIG_GENERATION),
        r32(t, REG_DEVICE_FEATURES),
    ];
    for sel in 0..2 {
        w32(t, REG_DEVICE_FEATURES_SEL, sel);
        regs.push(r32(t, REG_DEVICE_FEATURES));
        w32(t, REG_QUEUE_SEL, sel);
        regs.push(r32(t, REG_QUEUE_NUM_MAX));
        regs.push(r32(t, REG_QUEUE_READY));
    }
    regs
}

/// A snapshot goes through a file as JSON; nothing may be lost on the way.
fn through_json(snap: &TransportSnapshot) -> TransportSnapshot {
    let json = serde_json::to_string(snap).expect("serialize");
    let back: TransportSnapshot = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(&back, snap);
    back
}

/// Transports driven to each state, with non-default registers.
fn transports_in_every_state() -> Vec<(&'static str, MmioTransport)> {
    let mut all = Vec::new();

    let (mut t, _) = setup(Recorder::default());
    w32(&mut t, REG_QUEUE_SEL, 1);
    w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    all.push(("reset", t));

    let (mut t, _) = setup(Recorder::default());
    w32(&mut t, REG_STATUS, ACKNOWLEDGE);
    t.config_changed();
    all.push(("acknowledged", t));

    let (mut t, _) = setup(Recorder::default());
    w32(&mut t, REG_STATUS, ACKNOWLEDGE);
    w32(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    w32(&mut t, REG_DRIVER_FEATURES_SEL, 1);
    w32(&mut t, REG_DRIVER_FEATURES, 1);
    all.push(("driver", t));

    let (mut t, _) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
    // Queue 0 half programmed: size and descriptor table only.
    w32(&mut t, REG_QUEUE_SEL, 0);
    w32(&mut t, REG_QUEUE_NUM, 4);
    w32(&mut t, REG_QUEUE_DESC_LOW, 0x1_0000);
    all.push(("features_ok", t));

    let (mut t, _) = setup(Recorder::default());
    bring_up(&mut t);
    t.config_changed();
    t.interrupt.signal_used_queue();
    all.push(("active", t));

    let (mut t, _) = setup(Recorder::default());
    bring_up(&mut t);
    w32(&mut t, REG_STATUS, 0xf | FAILED);
    all.push(("failed_by_driver", t));

    let (mut t, _) = setup(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 0x1_0000);
    setup_queue(&mut t, 1, 0xf000_0000);
    w32(&mut t, REG_STATUS, 0xf);
    all.push(("needs_reset", t));
    all
}

#[test]
fn snapshot_round_trips_in_every_state() {
    let expected_states = [
        TransportState::Reset,
        TransportState::Acknowledged,
        TransportState::Driver,
        TransportState::FeaturesOk,
        TransportState::Active,
        TransportState::Failed,
        TransportState::Failed,
    ];
    let transports = transports_in_every_state();
    assert_eq!(transports.len(), expected_states.len());
    for ((name, mut old), state) in transports.into_iter().zip(expected_states) {
        assert_eq!(old.state(), state, "{name}");
        let snap = through_json(&old.snapshot());
        assert_eq!(snap.device_type, 42, "{name}");
        assert_eq!(snap.queues.len(), 2, "{name}");

        let (mut new, dev) = setup(Recorder::default());
        new.restore(&snap).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(new.state(), state, "{name}");
        assert_eq!(new.snapshot(), snap, "{name}");
        assert_eq!(registers(&mut new), registers(&mut old), "{name}");
        let irq_raised = new.interrupt.irq_fd().read().is_ok();
        assert_eq!(irq_raised, snap.interrupt_status != 0, "{name}");

        let kicks: Vec<bool> = new
            .queue_events()
            .iter()
            .map(|e| e.read().is_ok())
            .collect();
        let d = dev.lock().unwrap();
        if state == TransportState::Active {
            assert_eq!(d.activations, vec![(VIRTIO_F_VERSION_1 | 1, vec![8, 8])]);
            assert_eq!(d.restored, 1);
            assert_eq!(kicks, [true, true], "every queue is kicked");
        } else {
            assert!(d.activations.is_empty(), "{name}");
            assert_eq!(d.restored, 0, "{name}");
            assert_eq!(kicks, [false, false], "{name}");
        }
    }
}

#[test]
fn restored_transport_carries_on() {
    // Mid-initialisation: the driver finishes the queues and starts it.
    let (mut old, _) = setup(Recorder::default());
    negotiate(&mut old, VIRTIO_F_VERSION_1 | 1);
    setup_queue(&mut old, 0, 0x1_0000);
    let (mut t, dev) = setup(Recorder::default());
    t.restore(&old.snapshot()).expect("restore");
    setup_queue(&mut t, 1, 0x2_0000);
    w32(&mut t, REG_STATUS, 0xf);
    assert_eq!(t.state(), TransportState::Active);
    assert_eq!(dev.lock().unwrap().restored, 0, "a normal activation");

    // Active: notifies reach the queues, the queues stay frozen, and a
    // reset resets the device.
    let (mut old, _) = setup(Recorder::default());
    bring_up(&mut old);
    let (mut t, dev) = setup(Recorder::default());
    t.restore(&old.snapshot()).expect("restore");
    for evt in t.queue_events() {
        assert_eq!(evt.read().unwrap(), 1);
    }
    notify_queue(&mut t, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    w32(&mut t, REG_QUEUE_NUM, 4);
    assert_eq!(t.counters().refused_writes, 1);
    w32(&mut t, REG_STATUS, 0);
    assert_eq!(dev.lock().unwrap().resets, 1);
    assert_eq!(t.state(), TransportState::Reset);

    // A queue outside guest memory is only refused where the guest would
    // be: at DRIVER_OK, not in a FeaturesOk snapshot.
    let (mut old, _) = setup(Recorder::default());
    negotiate(&mut old, VIRTIO_F_VERSION_1);
    setup_queue(&mut old, 0, 0x1_0000);
    setup_queue(&mut old, 1, 0xf000_0000);
    let (mut t, _) = setup(Recorder::default());
    t.restore(&old.snapshot()).expect("restore");
    w32(&mut t, REG_STATUS, 0xf);
    assert_eq!(t.state(), TransportState::Failed);
}

#[test]
fn restore_keeps_ring_positions_and_event_idx() {
    let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1;
    let recorder = || Recorder {
        extra_features: VIRTIO_RING_F_EVENT_IDX,
        ..Default::default()
    };
    let (mut old, _) = setup(recorder());
    negotiate(&mut old, features);
    setup_queue(&mut old, 0, 0x1_0000);
    setup_queue(&mut old, 1, 0x2_0000);
    w32(&mut old, REG_STATUS, 0xf);
    let mut snap = old.snapshot();
    assert!(snap.queues.iter().all(|q| q.event_idx_enabled));
    // As if the device had served requests before the snapshot.
    snap.queues[0].next_avail = 5;
    snap.queues[0].next_used = 3;
    snap.queues[1].next_avail = u16::MAX;
    snap.queues[1].next_used = u16::MAX;
    // The acked features decide, as at DRIVER_OK.
    snap.queues[1].event_idx_enabled = false;

    let (mut t, dev) = setup(recorder());
    t.restore(&snap).expect("restore");
    let d = dev.lock().unwrap();
    assert_eq!(d.activations, vec![(features, vec![8, 8])]);
    let positions: Vec<_> = d
        .queues
        .iter()
        .map(|q| (q.next_avail, q.next_used, q.event_idx_enabled))
        .collect();
    assert_eq!(positions, [(5, 3, true), (u16::MAX, u16::MAX, true)]);
    assert_eq!(d.queues[1].desc_table, 0x2_0000);
}

#[test]
fn restore_refuses_bad_snapshots_and_changes_nothing() {
    let (mut old, _) = setup(Recorder::default());
    bring_up(&mut old);
    let good = old.snapshot();

    type Mutation = fn(&mut TransportSnapshot);
    let cases: [(&str, Mutation); 14] = [
        ("device type", |s| s.device_type = TYPE_BLOCK),
        ("queue count", |s| {
            s.queues.pop();
        }),
        ("queue outside memory", |s| {
            s.queues[1].desc_table = 0xf000_0000
        }),
        ("used ring past the end", |s| {
            s.queues[1].used_ring = 0x10_0000 - 16
        }),
        ("queue not ready", |s| s.queues[0].ready = false),
        ("misaligned ring", |s| s.queues[0].avail_ring = 0x1_1001),
        ("queue size", |s| s.queues[0].size = 3),
        ("queue max size", |s| s.queues[0].max_size = 32),
        ("features not offered", |s| s.acked_features |= 0b10),
        ("no VERSION_1", |s| s.acked_features = 1),
        ("status of another state", |s| {
            s.status = ACKNOWLEDGE | DRIVER
        }),
        ("state without its status", |s| {
            s.state = TransportState::Reset
        }),
        ("failed without a failure bit", |s| {
            s.state = TransportState::Failed
        }),
        ("interrupt bits", |s| s.interrupt_status = 0x10),
    ];
    for (name, mutate) in cases {
        let mut snap = good.clone();
        mutate(&mut snap);
        let (mut t, dev) = setup(Recorder::default());
        let err = t.restore(&snap).expect_err(name);
        let expected = match name {
            "device type" => matches!(
                err,
                MmioRestoreError::DeviceType {
                    saved: 2,
                    device: 42
                }
            ),
            "queue count" => matches!(
                err,
                MmioRestoreError::QueueCount {
                    saved: 1,
                    device: 2
                }
            ),
            "queue outside memory" | "used ring past the end" => {
                matches!(err, MmioRestoreError::QueueUnusable { index: 1 })
            }
            "queue not ready" => matches!(err, MmioRestoreError::QueueUnusable { index: 0 }),
            "misaligned ring" | "queue size" => {
                matches!(err, MmioRestoreError::Queue { index: 0, .. })
            }
            "queue max size" => matches!(
                err,
                MmioRestoreError::QueueMaxSize {
                    index: 0,
                    saved: 32,
                    device: 16
                }
            ),
            "features not offered" | "no VERSION_1" => {
                matches!(err, MmioRestoreError::Features { .. })
            }
            "interrupt bits" => matches!(err, MmioRestoreError::InterruptStatus(0x10)),
            _ => matches!(err, MmioRestoreError::Status { .. }),
        };
        assert!(expected, "{name}: {err:?}");
        assert_eq!(t.state(), TransportState::Reset, "{name}");
        assert_eq!(r32(&mut t, REG_STATUS), 0, "{name}");
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 0, "{name}");
        assert!(t.interrupt.irq_fd().read().is_err(), "{name}");
        assert!(t.queue_events().iter().all(|e| e.read().is_err()), "{name}");
        assert!(dev.lock().unwrap().activations.is_empty(), "{name}");
    }

    // The messages name both values.
    let mut snap = good.clone();
    snap.device_type = TYPE_BLOCK;
    let (mut t, _) = setup(Recorder::default());
    let msg = t.restore(&snap).expect_err("device type").to_string();
    assert!(msg.contains('2') && msg.contains("42"), "{msg}");

    // A device that refuses to start, and a transport already in use.
    let (mut t, dev) = setup(Recorder {
        fail_activate: true,
        ..Default::default()
    });
    assert!(matches!(
        t.restore(&good),
        Err(MmioRestoreError::Activate { .. })
    ));
    assert_eq!(t.state(), TransportState::Reset);
    assert_eq!(dev.lock().unwrap().restored, 0);
    let (mut t, dev) = setup(Recorder::default());
    bring_up(&mut t);
    assert!(matches!(
        t.restore(&good),
        Err(MmioRestoreError::NotFresh(TransportState::Active))
    ));
    assert_eq!(dev.lock().unwrap().activations.len(), 1);
}

#[test]
fn restore_never_panics_on_garbage() {
    let (mut old, _) = setup(Recorder::default());
    bring_up(&mut old);
    let good = old.snapshot();
    let u16s = [0, 1, 3, 8, 16, 0x8000, u16::MAX];
    let u64s = [0, 1, 0xf_fff0, 0x10_0000, u64::MAX - 15, u64::MAX];
    let states = [
        TransportState::Reset,
        TransportState::FeaturesOk,
        TransportState::Active,
        TransportState::Failed,
    ];
    let mut tried = 0;
    for state in states {
        for &a in &u16s {
            for &b in &u64s {
                let mut snap = good.clone();
                snap.state = state;
                snap.status = status_of(state).unwrap_or(FAILED);
                snap.queues[0].max_size = a;
                snap.queues[0].size = a;
                snap.queues[0].next_avail = a;
                snap.queues[1].desc_table = b;
                snap.queues[1].avail_ring = b;
                snap.queues[1].used_ring = b;
                snap.acked_features = b;
                snap.queue_sel = b as u32;
                let (mut t, _) = setup(Recorder::default());
                if t.restore(&snap).is_ok() {
                    // Whatever was accepted is usable.
                    let _ = registers(&mut t);
                    w32(&mut t, REG_STATUS, 0);
                    assert_eq!(t.state(), TransportState::Reset);
                }
                tried += 1;
            }
        }
    }
    assert_eq!(tried, states.len() * u16s.len() * u64s.len());
}
