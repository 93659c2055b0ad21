//! Deadlines fire on the device's timer: a guest (or host client) that stays silent loses
//! its connection once the deadline passes, with no other event to notice it.

use std::time::Instant;

use super::*;

/// The device's timeout in these tests: long enough that the set-up steps finish well
/// within it on a loaded machine.
const TIMEOUT: Duration = Duration::from_millis(300);
/// How long a test waits for a deadline that falls within [`TIMEOUT`].
const WAIT: Duration = Duration::from_secs(10);

/// Dispatches what `epoll` reports to `dev` until `done` holds or `limit` passes; whether
/// it holds. Waiting on the epoll set waits on the real readiness of every device fd.
fn pump_until<D: VirtioDevice + ?Sized>(
    epoll: &Epoll,
    dev: &mut D,
    limit: Duration,
    mut done: impl FnMut(&D) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    let mut events = [EpollEvent::default(); 32];
    while !done(dev) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        let n = epoll.wait(ms, &mut events).expect("epoll wait");
        for ev in &events[..n] {
            let (_, token) = EventRegistrar::decode(ev.data());
            dev.handle_event(token, ev.events());
        }
    }
    true
}

fn pending(dev: &Vsock) -> usize {
    dev.active.as_ref().map_or(0, |a| a.muxer.pending_count())
}

fn timer_armed(dev: &Vsock) -> bool {
    dev.timer.is_armed()
}

/// A host client that asks for a guest port the guest never answers, and one that never
/// finishes its CONNECT line: both are dropped when their deadline passes, though nothing
/// else happens.
#[test]
fn silent_guest_and_host_client_time_out_on_the_timer() {
    let mut h = Harness::new();
    h.set_timeout(TIMEOUT);
    h.post_rx(4);
    let start = Instant::now();
    let mut client = UnixStream::connect(&h.uds).expect("connect");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"CONNECT 7\n").expect("write");
    let mut silent = UnixStream::connect(&h.uds).expect("connect");
    silent.set_read_timeout(Some(WAIT)).expect("timeout");
    silent.write_all(b"CONN").expect("write");
    assert!(pump_until(&h.epoll, &mut h.dev, WAIT, |d| {
        d.connection_count() == 1 && pending(d) == 1
    }));
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_REQUEST);
    let local = pkts[0].hdr.src_port;
    assert!(timer_armed(&h.dev), "a deadline is pending");

    // Nothing more from the guest or the clients: the timer alone ends both.
    assert!(
        pump_until(&h.epoll, &mut h.dev, WAIT, |d| {
            d.connection_count() == 0 && pending(d) == 0
        }),
        "deadlines never fired"
    );
    assert!(start.elapsed() >= TIMEOUT, "not before the deadline");
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(pkts[0].hdr.src_port, local);
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).expect("read"), 0, "client closed");
    assert_eq!(silent.read(&mut buf).expect("read"), 0, "silent closed");
    assert!(!timer_armed(&h.dev), "nothing left to wait for");
    assert_eq!(h.pump(), 0, "idle afterwards");
}

/// A guest that shut its connection down while bytes for the host are still buffered
/// (the host service does not read) has it reset when the drain deadline passes.
#[test]
fn closing_connection_that_never_drains_is_reset_on_the_timer() {
    let mut h = Harness::new();
    h.set_timeout(TIMEOUT);
    let listener = UnixListener::bind(h.host_path(6100)).expect("bind");
    h.post_rx(64);
    let server = h.guest_connect(&listener, 1040, 6100);
    // Send until the device reports (via a credit request's fwd_cnt) that some bytes did
    // not reach the host socket: the server never reads.
    let chunk = vec![0x5au8; MAX_PKT_DATA as usize];
    let mut sent = 0usize;
    let mut buffered = 0usize;
    while buffered == 0 && sent + chunk.len() <= CONN_BUF_ALLOC as usize * 4 {
        h.send(Hdr::guest(OP_RW, 1040, 6100), &chunk);
        sent += chunk.len();
        h.send(Hdr::guest(OP_CREDIT_REQUEST, 1040, 6100), &[]);
        for pkt in h.take_rx() {
            assert_eq!(pkt.hdr.op, OP_CREDIT_UPDATE, "{pkt:?}");
            buffered = sent - pkt.hdr.fwd_cnt as usize;
        }
    }
    assert!(buffered > 0, "the host socket took {sent} bytes");
    let mut shut = Hdr::guest(OP_SHUTDOWN, 1040, 6100);
    shut.flags = SHUTDOWN_F_RCV | SHUTDOWN_F_SEND;
    h.send(shut, &[]);
    assert_eq!(h.dev.connection_count(), 1, "waits for the drain");
    assert!(h.take_rx().is_empty());

    assert!(
        pump_until(&h.epoll, &mut h.dev, WAIT, |d| d.connection_count() == 0),
        "drain deadline never fired"
    );
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    // The host side is closed: what reached it, then EOF.
    let mut got = Vec::new();
    (&server).read_to_end(&mut got).expect("read to EOF");
    assert_eq!(got.len(), sent - buffered);
}

/// A request the guest answers in time is not touched by the timer that was armed for it,
/// and the timer ends up disarmed.
#[test]
fn answered_request_outlives_its_deadline() {
    let mut h = Harness::new();
    h.set_timeout(TIMEOUT);
    h.post_rx(4);
    let (mut client, _) = h.host_connect(9);
    let start = Instant::now();
    // The timer may fire once for the deadline the connection no longer has.
    assert!(
        pump_until(&h.epoll, &mut h.dev, WAIT, |d| !timer_armed(d)),
        "timer never went off or was disarmed"
    );
    assert!(start.elapsed() < WAIT);
    h.pump();
    assert!(!timer_armed(&h.dev), "not armed again without a deadline");
    assert_eq!(h.dev.connection_count(), 1);
    client.write_all(b"still here").expect("write");
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].data, b"still here");
}

/// After a snapshot restore the device (a new one, in a new process) enforces deadlines
/// on the timer too: the timer is registered when the restored device is activated.
#[test]
fn restored_device_times_out_silent_host_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
    let new = restored(dir.path(), &mem, reload(&mem));
    lock(&new.dev)
        .active
        .as_mut()
        .expect("active")
        .muxer
        .timeout = TIMEOUT;

    let mut silent = UnixStream::connect(&new.uds).expect("connect");
    silent.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut dev = lock(&new.dev);
    assert!(pump_until(&new.epoll, &mut *dev, WAIT, |d| pending(d) == 1));
    assert!(
        pump_until(&new.epoll, &mut *dev, WAIT, |d| pending(d) == 0),
        "deadline never fired after restore"
    );
    drop(dev);
    let mut buf = [0u8; 4];
    assert_eq!(silent.read(&mut buf).expect("read"), 0);
}
