//! Fuzzes the virtio-net queues: the fuzzer owns both descriptor tables,
//! both available rings and every buffer; the device gathers TX chains into
//! its TX buffer (and writes them to a TAP that is never brought up, so
//! nothing leaves the machine) and delivers one RX frame into whatever RX
//! chains it finds. It must never panic or hang.
//!
//! Input layout: byte 0 picks the features (MRG_RXBUF, EVENT_IDX, checksum
//! and TSO offloads), bytes 1 and 2 the RX and TX queue sizes, bytes 3-4 the
//! RX frame length (le16) and bytes 5-6 how many chains each avail index
//! announces; the rest is copied over guest memory from address 0 on, so it
//! supplies descriptors, ring entries and frame data alike.
//!
//! Needs root (it creates a TAP); without /dev/net/tun every input is a
//! no-op.

#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::virtio::net::{FRAME_BUFFER_LEN, Net, RX_QUEUE_TOKEN, TX_QUEUE_TOKEN};
use podvisor_vmm::virtio::{
    ActivateContext, EventRegistrar, GuestMemory, Interrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};
use podvisor_vmm_api::tap::{Tap, VNET_HDR_LEN};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_SIZE: usize = 0x2_0000;
const RX_DESC: u64 = 0x0;
const TX_DESC: u64 = 0x3000;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_HOST_TSO4: u64 = 1 << 11;
const F_MRG_RXBUF: u64 = 1 << 15;

const EPOLLIN: u32 = 0x1;

thread_local! {
    /// One device (and so one TAP) for the whole run; every input activates
    /// it afresh and resets it at the end, which fuzzes reset too.
    static NET: RefCell<Option<Net>> = RefCell::new(
        Tap::open("pvfuzz%d")
            .map(|tap| Net::with_tap(tap, [0x02, 0, 0, 0, 0, 1]))
            .map_err(|e| eprintln!("virtio_net fuzz target needs a TAP: {e}"))
            .ok(),
    );
}

fn queue(desc: u64, size: u16) -> Queue {
    let mut q = Queue::new(256).expect("256 is a valid queue size");
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some((desc + AVAIL_OFFSET) as u32), Some(0));
    q.set_used_ring_address(Some((desc + USED_OFFSET) as u32), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    let [
        feature_sel,
        rx_size_sel,
        tx_size_sel,
        len_lo,
        len_hi,
        rx_avail,
        tx_avail,
        image @ ..,
    ] = data
    else {
        return;
    };
    let mut acked = VIRTIO_F_VERSION_1 | F_MAC;
    for (bit, feature) in [
        F_MRG_RXBUF,
        VIRTIO_RING_F_EVENT_IDX,
        F_GUEST_CSUM,
        F_GUEST_TSO4,
        F_CSUM,
        F_HOST_TSO4,
    ]
    .into_iter()
    .enumerate()
    {
        if feature_sel & (1 << bit) != 0 {
            acked |= feature;
        }
    }
    let rx_size = 1u16 << (rx_size_sel % 9); // 1..=256, a power of two
    let tx_size = 1u16 << (tx_size_sel % 9);
    let frame_len =
        (usize::from(u16::from_le_bytes([*len_lo, *len_hi])) % FRAME_BUFFER_LEN).max(VNET_HDR_LEN);

    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0)).expect("image fits");
    // The avail indexes come from the header so that short inputs still
    // announce chains.
    for (desc, announced) in [(RX_DESC, rx_avail), (TX_DESC, tx_avail)] {
        mem.write_obj(u16::from(*announced), GuestAddress(desc + AVAIL_OFFSET + 2))
            .expect("avail idx");
    }

    NET.with_borrow_mut(|net| {
        let Some(net) = net.as_mut() else {
            return;
        };
        let rx_kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let tx_kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let ctx = ActivateContext {
            mem: mem.clone(),
            acked_features: acked,
            queues: vec![queue(RX_DESC, rx_size), queue(TX_DESC, tx_size)],
            queue_events: vec![
                rx_kick.try_clone().expect("eventfd"),
                tx_kick.try_clone().expect("eventfd"),
            ],
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))),
            events: EventRegistrar::new(Arc::new(Epoll::new().expect("epoll")), 0),
        };
        if net.activate(ctx).is_err() {
            return;
        }

        tx_kick.write(1).expect("kick");
        net.handle_event(TX_QUEUE_TOKEN, EPOLLIN);

        // The frame's own bytes matter little to the device; its length and
        // header decide how it is spread over the chains.
        let frame: Vec<u8> = (0..frame_len).map(|i| i as u8).collect();
        net.inject_rx_frame(&frame);
        rx_kick.write(1).expect("kick");
        net.handle_event(RX_QUEUE_TOKEN, EPOLLIN);

        net.reset();
    });
});
