use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::status::*;
use super::*;
use crate::virtio::interrupt::INT_CONFIG;
use crate::virtio::{ActivateError, DeviceCounters, EventToken};

/// A device that records what the transport did to it.
#[derive(Default)]
struct Recorder {
    activations: Vec<(u64, Vec<u16>)>,
    resets: usize,
    config: [u8; 8],
    fail_activate: bool,
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 0b101
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
            return Err(ActivateError::Backend("refused".into()));
        }
        self.activations.push((
            ctx.acked_features,
            ctx.queues.iter().map(|q| q.size()).collect(),
        ));
        Ok(())
    }
    fn handle_event(&mut self, _: EventToken, _: u32) {}
    fn reset(&mut self) {
        self.resets += 1;
    }
    fn name(&self) -> String {
        "recorder".into()
    }
    fn counters(&self) -> DeviceCounters {
        DeviceCounters::default()
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

fn negotiate(t: &mut MmioTransport, features: u64) {
    w32(t, REG_STATUS, ACKNOWLEDGE);
    w32(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    w32(t, REG_DRIVER_FEATURES_SEL, 0);
    w32(t, REG_DRIVER_FEATURES, features as u32);
    w32(t, REG_DRIVER_FEATURES_SEL, 1);
    w32(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
    w32(t, REG_QUEUE_SEL, index);
    w32(t, REG_QUEUE_NUM, 8);
    w32(t, REG_QUEUE_DESC_LOW, base);
    w32(t, REG_QUEUE_DESC_HIGH, 0);
    w32(t, REG_QUEUE_AVAIL_LOW, base + 0x1000);
    w32(t, REG_QUEUE_AVAIL_HIGH, 0);
    w32(t, REG_QUEUE_USED_LOW, base + 0x2000);
    w32(t, REG_QUEUE_USED_HIGH, 0);
    w32(t, REG_QUEUE_READY, 1);
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
