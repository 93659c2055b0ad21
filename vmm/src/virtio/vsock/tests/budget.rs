//! Work per event is bounded: a guest that keeps a ring full is served [`CHAINS_PER_EVENT`]
//! chains per event, and the rest follows on the next events (the device kicks the queue's
//! own eventfd) until the ring is empty; then the loop goes idle.

use super::super::handler::{CHAINS_PER_EVENT, queue_token};
use super::*;

/// How long one event may take to be reported (it is due at once).
const WAIT_MS: i32 = 5000;

/// One epoll wait: dispatches the events it reports and returns their tokens (none when
/// nothing was ready within [`WAIT_MS`]).
fn dispatch_once(h: &mut Harness) -> Vec<u32> {
    let mut events = [EpollEvent::default(); 32];
    let n = h.epoll.wait(WAIT_MS, &mut events).expect("epoll wait");
    let mut tokens = Vec::new();
    for ev in &events[..n] {
        let (_, token) = EventRegistrar::decode(ev.data());
        h.dev.handle_event(token, ev.events());
        tokens.push(token);
    }
    tokens
}

/// Queues header-only TX packets with `op`, each for a connection that does not exist,
/// until the ring is full; how many.
fn fill_tx(h: &mut Harness, op: u16) -> usize {
    let free = h.rings[TX_QUEUE].free.len();
    for port in 0..free {
        h.queue_tx(Hdr::guest(op, 5000 + port as u32, 1), &[]);
    }
    free
}

/// Posts RX buffers until the ring is full, without kicking: one descriptor each, header
/// and data together (as Linux 6.2 and later post them), so the ring holds more buffers
/// than one event may fill.
fn fill_rx(h: &mut Harness) {
    let len = HDR as u32 + RX_BUF;
    while !h.rings[RX_QUEUE].free.is_empty() {
        let hdr = h.rx_arena.alloc(u64::from(len));
        let head = h.rings[RX_QUEUE].add_chain(&h.mem, &[(hdr, len, true)]);
        h.rx_bufs.insert(head, (hdr, hdr + HDR as u64));
    }
}

/// The guest refills the TX ring after every event: each event takes at most the budget,
/// the device comes back by itself for the rest, and once the guest stops everything is
/// taken and the loop goes idle.
#[test]
fn tx_ring_refilled_continuously_is_served_in_turns() {
    let mut h = Harness::new();
    // RSTs need no reply: the RX queue stays out of it.
    assert_eq!(fill_tx(&mut h, OP_RST), usize::from(QUEUE_SIZE));
    h.kicks[TX_QUEUE].write(1).expect("kick");
    for turn in 0..4 {
        let tokens = dispatch_once(&mut h);
        assert_eq!(tokens, [queue_token(TX_QUEUE)], "turn {turn}");
        assert_eq!(h.tx_used().len(), CHAINS_PER_EVENT, "turn {turn}");
        // Refilled while the device was busy: the ring is full again.
        assert_eq!(fill_tx(&mut h, OP_RST), CHAINS_PER_EVENT);
    }
    // The guest stops: what is left is taken without another kick from it.
    let mut left = usize::from(QUEUE_SIZE);
    while left > 0 {
        assert_eq!(dispatch_once(&mut h), [queue_token(TX_QUEUE)]);
        let used = h.tx_used().len();
        assert!(
            (1..=CHAINS_PER_EVENT).contains(&used),
            "{used} in one event"
        );
        left -= used;
    }
    assert_eq!(h.pump(), 0, "idle once the ring is empty");
    let expected = 4 * CHAINS_PER_EVENT + usize::from(QUEUE_SIZE);
    assert_eq!(h.dev.counters().completed, expected as u64);
}

/// More replies are owed than one event may deliver: the guest's RX buffers are filled in
/// turns, each event at most the budget, until nothing is owed.
#[test]
fn rx_buffers_are_filled_in_turns() {
    let mut h = Harness::new();
    // Without RX buffers every packet for an unknown connection leaves an RST owed.
    fill_tx(&mut h, OP_RW);
    h.kicks[TX_QUEUE].write(1).expect("kick");
    h.pump();
    assert_eq!(h.tx_used().len(), usize::from(QUEUE_SIZE));
    assert!(h.take_rx().is_empty());

    fill_rx(&mut h);
    h.kicks[RX_QUEUE].write(1).expect("kick");
    let mut delivered = 0;
    for turn in 0..2 {
        assert_eq!(
            dispatch_once(&mut h),
            [queue_token(RX_QUEUE)],
            "turn {turn}"
        );
        let pkts = h.take_rx();
        assert_eq!(pkts.len(), CHAINS_PER_EVENT, "turn {turn}");
        assert!(pkts.iter().all(|p| p.hdr.op == OP_RST));
        delivered += pkts.len();
    }
    assert_eq!(delivered, usize::from(QUEUE_SIZE));
    assert_eq!(h.pump(), 0, "idle once nothing is owed");
}

/// A transport reset looks through unusable event buffers at most the budget per event;
/// the rest, then a usable buffer, follow on later events.
#[test]
fn reset_event_search_is_served_in_turns() {
    let mut h = Harness::new();
    let ring = &mut h.rings[EVENT_QUEUE];
    while !ring.free.is_empty() {
        // Read-only: unusable for the event.
        ring.add_chain(&h.mem, &[(0x7e_0000, 4, false)]);
    }
    h.dev.send_transport_reset();
    let returned = std::iter::from_fn(|| h.rings[EVENT_QUEUE].pop_used(&h.mem)).count();
    assert_eq!(returned, CHAINS_PER_EVENT);
    assert_eq!(dispatch_once(&mut h), [queue_token(EVENT_QUEUE)]);
    let returned = std::iter::from_fn(|| h.rings[EVENT_QUEUE].pop_used(&h.mem)).count();
    assert_eq!(returned, usize::from(QUEUE_SIZE) - CHAINS_PER_EVENT);
    assert_eq!(h.pump(), 0, "nothing left to look at");
    assert_eq!(
        h.dev.counters().malformed_chains,
        u64::from(QUEUE_SIZE),
        "every unusable buffer counted"
    );

    h.rings[EVENT_QUEUE].add_chain(&h.mem, &[(0x7f_0000, 4, true)]);
    h.kick(EVENT_QUEUE);
    assert_eq!(
        h.rings[EVENT_QUEUE].pop_used(&h.mem).map(|u| u.1),
        Some(4),
        "the reset is delivered"
    );
}
