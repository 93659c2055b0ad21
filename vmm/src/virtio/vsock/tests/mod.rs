//! The vsock device driven through its queues in test guest memory, with
//! real Unix sockets in a temporary directory and the real epoll set.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::connect::parse_connect_line;
use super::*;
use crate::virtio::mmio::tests::{QueueLayout, drive_to_active, notify_queue};
use crate::virtio::mmio::{MmioTransport, TransportState};
use crate::virtio::{
    ActivateContext, EventRegistrar, GuestMemory, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VirtioDevice,
};
use podvisor_common::lock;

mod budget;
mod deadlines;

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const HDR: usize = 44;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const RX_BUF: u32 = 4096;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

// ---------------------------------------------------------------- parser

#[test]
fn connect_exact() {
    assert_eq!(parse_connect_line(b"CONNECT 1234\n"), Ok(1234));
    assert_eq!(parse_connect_line(b"CONNECT 0\n"), Ok(0));
    assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Ok(u32::MAX));
}

#[test]
fn connect_case_insensitive() {
    assert_eq!(parse_connect_line(b"connect 52\n"), Ok(52));
    assert_eq!(parse_connect_line(b"CoNnEcT 52\n"), Ok(52));
}

#[test]
fn connect_one_byte_at_a_time() {
    let mut parser = ConnectParser::new();
    let line = b"Connect 1024\n";
    let (last, head) = line.split_last().expect("non-empty");
    for byte in head {
        assert_eq!(parser.push(*byte), Ok(ConnectStatus::Incomplete));
    }
    assert_eq!(parser.push(*last), Ok(ConnectStatus::Done(1024)));
    // Nothing past the newline is consumed.
    assert_eq!(parser.push(b'x'), Err(ConnectError::Finished));

    let mut parser = ConnectParser::new();
    assert_eq!(parser.feed(b"CONN"), Ok((ConnectStatus::Incomplete, 4)));
    assert_eq!(parser.feed(b"ECT 7"), Ok((ConnectStatus::Incomplete, 5)));
    assert_eq!(parser.feed(b"7\nDATA"), Ok((ConnectStatus::Done(77), 2)));
}

#[test]
fn connect_oversized() {
    // Leading zeros keep the value small: only the length refuses it.
    let mut line = b"CONNECT ".to_vec();
    line.resize(CONNECT_LINE_MAX + 8, b'0');
    let mut parser = ConnectParser::new();
    assert_eq!(parser.feed(&line), Err(ConnectError::TooLong));
    assert_eq!(parser.buffered(), CONNECT_LINE_MAX);
    // A 32-byte line, newline included, still fits; one more byte does not.
    let mut line = b"CONNECT ".to_vec();
    line.resize(CONNECT_LINE_MAX - 2, b'0');
    line.extend_from_slice(b"9\n");
    assert_eq!(line.len(), CONNECT_LINE_MAX);
    assert_eq!(parse_connect_line(&line), Ok(9));
    line.insert(9, b'0');
    assert_eq!(parse_connect_line(&line), Err(ConnectError::TooLong));
}

#[test]
fn connect_garbage() {
    assert!(matches!(
        parse_connect_line(b"GET / HTTP/1.1\n"),
        Err(ConnectError::Malformed { offset: 0, .. })
    ));
    assert!(matches!(
        parse_connect_line(b"CONNECT  5\n"),
        Err(ConnectError::Malformed { offset: 8, .. })
    ));
    assert!(matches!(
        parse_connect_line(b"CONNECT\n"),
        Err(ConnectError::Malformed { offset: 7, .. })
    ));
    assert!(matches!(
        parse_connect_line(b"CONNECT 5\r\n"),
        Err(ConnectError::Malformed { offset: 9, .. })
    ));
    assert!(parse_connect_line(b"\0\0\0").is_err());
    // Garbage is refused at its first byte, without waiting for a newline.
    let mut parser = ConnectParser::new();
    assert!(parser.push(b'X').is_err());
}

#[test]
fn connect_non_numeric() {
    assert!(matches!(
        parse_connect_line(b"CONNECT abc\n"),
        Err(ConnectError::Malformed { offset: 8, .. })
    ));
    assert!(matches!(
        parse_connect_line(b"CONNECT -1\n"),
        Err(ConnectError::Malformed { .. })
    ));
    assert!(matches!(
        parse_connect_line(b"CONNECT 12a\n"),
        Err(ConnectError::Malformed { offset: 10, .. })
    ));
    assert_eq!(
        parse_connect_line(b"CONNECT \n"),
        Err(ConnectError::MissingPort)
    );
}

#[test]
fn connect_port_overflow() {
    assert_eq!(
        parse_connect_line(b"CONNECT 4294967296\n"),
        Err(ConnectError::PortOverflow)
    );
    assert_eq!(
        parse_connect_line(b"CONNECT 99999999999999999999\n"),
        Err(ConnectError::PortOverflow)
    );
}

#[test]
fn connect_eof_before_newline() {
    assert_eq!(
        parse_connect_line(b"CONNECT 12"),
        Err(ConnectError::Unterminated)
    );
    assert_eq!(parse_connect_line(b""), Err(ConnectError::Unterminated));
}

// ------------------------------------------------------------ test driver

/// A split virtqueue as a guest driver sees it.
struct TestRing {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    /// Descriptor indices of each in-flight chain, by head.
    chains: HashMap<u16, Vec<u16>>,
}

impl TestRing {
    fn new(base: u64, size: u16) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            chains: HashMap::new(),
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes a chain of `(addr, len, device_writable)` available.
    fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, bool)]) -> u16 {
        let idx: Vec<u16> = descs
            .iter()
            .map(|_| self.free.pop().expect("free descriptor"))
            .collect();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            let next = match idx.get(i + 1) {
                Some(n) => {
                    flags |= VRING_DESC_F_NEXT;
                    *n
                }
                None => 0,
            };
            let at = GuestAddress(self.desc + 16 * u64::from(idx[i]));
            mem.write_obj(addr, at).expect("desc addr");
            mem.write_obj(len, at.unchecked_add(8)).expect("desc len");
            mem.write_obj(flags, at.unchecked_add(12))
                .expect("desc flags");
            mem.write_obj(next, at.unchecked_add(14))
                .expect("desc next");
        }
        let head = idx[0];
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
        self.chains.insert(head, idx);
        head
    }

    /// Next used element `(head, len)`, returning its descriptors.
    fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        if used_idx == self.used_seen {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used len");
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = id as u16;
        if let Some(descs) = self.chains.remove(&head) {
            self.free.extend(descs);
        }
        Some((head, len))
    }
}

/// A vsock packet header, as the guest writes or reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    /// A guest → host packet from guest port `src` to host port `dst`.
    fn guest(op: u16, src: u32, dst: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8; HDR]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A packet the device put in an RX buffer.
#[derive(Debug)]
struct RxPkt {
    hdr: Hdr,
    data: Vec<u8>,
    used_len: u32,
}

/// Bump allocator over a guest memory range that wraps around; tests keep
/// far less than the range in flight.
struct Arena {
    start: u64,
    end: u64,
    next: u64,
}

impl Arena {
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1).next_multiple_of(16);
        if self.next + len > self.end {
            self.next = self.start;
        }
        let addr = self.next;
        self.next += len;
        addr
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemory,
    epoll: Arc<Epoll>,
    irq: Arc<Interrupt>,
    kicks: Vec<EventFd>,
    rings: Vec<TestRing>,
    rx_bufs: HashMap<u16, (u64, u64)>,
    rx_arena: Arena,
    tx_arena: Arena,
    dev: Vsock,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .expect("vsock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let rings: Vec<TestRing> = (0..NUM_QUEUES as u64)
            .map(|i| TestRing::new(0x10000 * (i + 1), QUEUE_SIZE))
            .collect();
        let queue_events: Vec<EventFd> = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let kicks = queue_events
            .iter()
            .map(|e| e.try_clone().expect("clone"))
            .collect();
        let ctx = ActivateContext {
            mem: mem.clone(),
            acked_features: VIRTIO_F_VERSION_1,
            queues: rings.iter().map(TestRing::queue).collect(),
            queue_events,
            interrupt: irq.clone(),
            events: EventRegistrar::new(epoll.clone(), 0),
        };
        dev.activate(ctx).expect("activate");
        Self {
            _dir: dir,
            uds,
            mem,
            epoll,
            irq,
            kicks,
            rings,
            rx_bufs: HashMap::new(),
            rx_arena: Arena {
                start: 0x10_0000,
                end: 0x80_0000,
                next: 0x10_0000,
            },
            tx_arena: Arena {
                start: 0x80_0000,
                end: MEM_SIZE as u64,
                next: 0x80_0000,
            },
            dev,
        }
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.dev.active.as_mut().expect("active").muxer.timeout = timeout;
    }

    fn pending_count(&self) -> usize {
        self.dev
            .active
            .as_ref()
            .expect("active")
            .muxer
            .pending_count()
    }

    /// Dispatches epoll events until none arrive for 20 ms; returns how
    /// many were dispatched (a spinning device would never stop).
    fn pump(&mut self) -> usize {
        let mut events = [EpollEvent::default(); 32];
        let mut total = 0;
        for _ in 0..200 {
            let n = self.epoll.wait(20, &mut events).expect("epoll wait");
            if n == 0 {
                return total;
            }
            for ev in &events[..n] {
                let (_, token) = EventRegistrar::decode(ev.data());
                self.dev.handle_event(token, ev.events());
            }
            total += n;
        }
        panic!("event loop never went idle: {total} events");
    }

    fn kick(&mut self, queue: usize) {
        self.kicks[queue].write(1).expect("kick");
        self.pump();
    }

    /// Posts `n` RX buffers (header and data descriptors) and kicks.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let hdr = self.rx_arena.alloc(HDR as u64);
            let data = self.rx_arena.alloc(u64::from(RX_BUF));
            let head = self.rings[RX_QUEUE]
                .add_chain(&self.mem, &[(hdr, HDR as u32, true), (data, RX_BUF, true)]);
            self.rx_bufs.insert(head, (hdr, data));
        }
        self.kick(RX_QUEUE);
    }

    /// Every packet the device has put in RX buffers since the last call.
    fn take_rx(&mut self) -> Vec<RxPkt> {
        let mut out = Vec::new();
        while let Some((head, used_len)) = self.rings[RX_QUEUE].pop_used(&self.mem) {
            let (hdr_addr, data_addr) = self.rx_bufs.remove(&head).expect("known RX head");
            let mut raw = [0u8; HDR];
            self.mem
                .read_slice(&mut raw, GuestAddress(hdr_addr))
                .expect("read hdr");
            let hdr = Hdr::parse(&raw);
            let mut data = vec![0u8; used_len.saturating_sub(HDR as u32) as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(data_addr))
                .expect("read data");
            out.push(RxPkt {
                hdr,
                data,
                used_len,
            });
        }
        out
    }

    /// Queues a TX chain of raw descriptors without kicking.
    fn queue_tx_descs(&mut self, descs: &[(u64, u32, bool)]) {
        self.rings[TX_QUEUE].add_chain(&self.mem, descs);
    }

    /// Queues one packet (header and data in separate descriptors).
    fn queue_tx(&mut self, mut hdr: Hdr, data: &[u8]) {
        hdr.len = data.len() as u32;
        let hdr_addr = self.tx_arena.alloc(HDR as u64);
        self.mem
            .write_slice(&hdr.bytes(), GuestAddress(hdr_addr))
            .expect("write hdr");
        if data.is_empty() {
            self.queue_tx_descs(&[(hdr_addr, HDR as u32, false)]);
        } else {
            let data_addr = self.tx_arena.alloc(data.len() as u64);
            self.mem
                .write_slice(data, GuestAddress(data_addr))
                .expect("write data");
            self.queue_tx_descs(&[
                (hdr_addr, HDR as u32, false),
                (data_addr, data.len() as u32, false),
            ]);
        }
    }

    /// Sends one packet and lets the device process it.
    fn send(&mut self, hdr: Hdr, data: &[u8]) {
        self.queue_tx(hdr, data);
        self.kick(TX_QUEUE);
    }

    /// TX chains the device has returned since the last call.
    fn tx_used(&mut self) -> Vec<(u16, u32)> {
        std::iter::from_fn(|| self.rings[TX_QUEUE].pop_used(&self.mem)).collect()
    }

    fn irq_count(&self) -> u64 {
        self.irq.irq_fd().read().unwrap_or(0)
    }

    fn host_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// Runs the host-initiated handshake to guest `port`; returns the client
    /// and the host-side port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("write CONNECT");
        self.pump();
        let pkts = self.take_rx();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].hdr;
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(req.dst_port, port);
        let local = req.src_port;
        self.send(Hdr::guest(OP_RESPONSE, port, local), &[]);
        let expected = format!("OK {local}\n");
        let mut ok = vec![0u8; expected.len()];
        client.read_exact(&mut ok).expect("read OK line");
        assert_eq!(ok, expected.as_bytes());
        (client, local)
    }

    /// Runs a guest-initiated connection from guest `src` to host `port`;
    /// returns the host-side stream.
    fn guest_connect(&mut self, listener: &UnixListener, src: u32, port: u32) -> UnixStream {
        self.send(Hdr::guest(OP_REQUEST, src, port), &[]);
        let pkts = self.take_rx();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        assert_eq!(pkts[0].hdr.op, OP_RESPONSE);
        let (server, _) = listener.accept().expect("accept");
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        server
    }
}

// ------------------------------------------------------------ device surface

#[test]
fn config_features_and_name() {
    let h = Harness::new();
    assert_eq!(h.dev.device_type(), TYPE_VSOCK);
    assert_eq!(h.dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(h.dev.device_features(), VIRTIO_F_VERSION_1);
    assert_eq!(h.dev.name(), "vsock cid=3");
    let mut cfg = [0xffu8; 8];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), GUEST_CID);
    let mut tail = [0xffu8; 4];
    h.dev.read_config(6, &mut tail);
    assert_eq!(tail, [0; 4]);
    h.dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
}

#[test]
fn new_rejects_existing_path_and_bad_cid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("taken");
    std::fs::write(&path, b"x").expect("write");
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    });
    assert!(matches!(err, Err(VsockError::PathExists(_))));
    // The file that was there is left alone.
    assert_eq!(std::fs::read(&path).expect("read"), b"x");

    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let err = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: dir.path().join("ok"),
        });
        assert!(matches!(err, Err(VsockError::InvalidCid(c)) if c == cid));
    }

    let sock = dir.path().join("dev.sock");
    let dev = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: sock.clone(),
    })
    .expect("vsock");
    assert!(sock.exists());
    drop(dev);
    assert!(!sock.exists(), "drop unlinks the socket");
}

#[test]
fn activate_wrong_queue_count_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("s"),
    })
    .expect("vsock");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
    let ctx = ActivateContext {
        mem,
        acked_features: VIRTIO_F_VERSION_1,
        queues: vec![TestRing::new(0x1_0000, 16).queue()],
        queue_events: vec![EventFd::new(EFD_NONBLOCK).expect("eventfd")],
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq"))),
        events: EventRegistrar::new(Arc::new(Epoll::new().expect("epoll")), 0),
    };
    assert!(matches!(
        dev.activate(ctx),
        Err(crate::virtio::ActivateError::QueueCount {
            expected: 3,
            got: 1
        })
    ));
}

// ------------------------------------------------------------ host-initiated

#[test]
fn host_initiated_flow() {
    let mut h = Harness::new();
    h.post_rx(8);
    let mut client = UnixStream::connect(&h.uds).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client.write_all(b"connect 1234\n").expect("write");
    h.pump();

    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].hdr;
    assert_eq!(
        req,
        Hdr {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: FIRST_HOST_PORT,
            dst_port: 1234,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: 0,
        }
    );
    assert_eq!(pkts[0].used_len, HDR as u32);
    assert!(h.irq_count() > 0, "RX used buffers raise the interrupt");

    h.send(Hdr::guest(OP_RESPONSE, 1234, FIRST_HOST_PORT), &[]);
    let mut line = [0u8; 14];
    client.read_exact(&mut line).expect("OK line");
    assert_eq!(&line, b"OK 1073741824\n");
    assert_eq!(h.dev.connection_count(), 1);

    // Host → guest.
    client.write_all(b"hello guest").expect("write");
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RW);
    assert_eq!(pkts[0].hdr.len, 11);
    assert_eq!(pkts[0].hdr.src_port, FIRST_HOST_PORT);
    assert_eq!(pkts[0].hdr.dst_port, 1234);
    assert_eq!(pkts[0].data, b"hello guest");

    // Guest → host, acknowledging what it received.
    let mut rw = Hdr::guest(OP_RW, 1234, FIRST_HOST_PORT);
    rw.fwd_cnt = 11;
    h.send(rw, b"hello host");
    let mut got = [0u8; 10];
    client.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"hello host");

    // Credit: a credit request is answered with our buf_alloc and the bytes
    // forwarded so far.
    h.send(Hdr::guest(OP_CREDIT_REQUEST, 1234, FIRST_HOST_PORT), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].hdr.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(pkts[0].hdr.fwd_cnt, 10);

    let c = h.dev.counters();
    assert_eq!(c.tx_bytes, 10);
    assert_eq!(c.rx_bytes, 11);
    assert_eq!(c.malformed_chains, 0);
    assert_eq!(c.completed, 3 + 3, "3 TX packets + 3 RX packets");
}

#[test]
fn host_initiated_large_transfer_intact() {
    let mut h = Harness::new();
    h.post_rx(4);
    let (mut client, local) = h.host_connect(80);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();

    // Host → guest in 4 KiB RX buffers, acknowledging as the guest would.
    client.write_all(&payload).expect("write");
    let mut received = Vec::new();
    let mut rounds = 0;
    while received.len() < payload.len() {
        rounds += 1;
        assert!(rounds < 200, "stalled at {}", received.len());
        h.post_rx(16);
        for pkt in h.take_rx() {
            match pkt.hdr.op {
                OP_RW => received.extend_from_slice(&pkt.data),
                // Out of credit until the update below.
                OP_CREDIT_REQUEST => {}
                op => panic!("unexpected op {op}"),
            }
        }
        let mut update = Hdr::guest(OP_CREDIT_UPDATE, 80, local);
        update.fwd_cnt = received.len() as u32;
        h.send(update, &[]);
    }
    assert_eq!(received, payload);

    // Guest → host in 64 KiB packets.
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 100_000];
        client.read_exact(&mut buf).map(|()| buf)
    });
    for chunk in payload.chunks(MAX_PKT_DATA as usize) {
        let mut hdr = Hdr::guest(OP_RW, 80, local);
        hdr.fwd_cnt = payload.len() as u32;
        h.send(hdr, chunk);
    }
    // The reader drains the socket; EPOLLOUT flushes anything buffered.
    let got = loop {
        h.pump();
        if reader.is_finished() {
            break reader.join().expect("join").expect("read");
        }
    };
    assert_eq!(got, payload);
}

#[test]
fn host_client_closing_before_newline_is_quiet() {
    let mut h = Harness::new();
    h.post_rx(2);
    {
        let mut client = UnixStream::connect(&h.uds).expect("connect");
        client.write_all(b"CONNECT 12").expect("write");
        h.pump();
        assert_eq!(h.pending_count(), 1);
    }
    h.pump();
    assert_eq!(h.pending_count(), 0);
    assert!(h.take_rx().is_empty());
    assert_eq!(h.dev.connection_count(), 0);
    // The device still serves.
    let (_client, _) = h.host_connect(12);
    assert_eq!(h.dev.connection_count(), 1);
}

#[test]
fn host_client_garbage_and_oversized_are_closed() {
    let mut h = Harness::new();
    h.post_rx(2);
    for line in [
        &b"HELLO\n"[..],
        &[b'C'; 64][..],
        b"CONNECT 00000000000000000000000000000001\n",
    ] {
        let mut client = UnixStream::connect(&h.uds).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        client.write_all(line).expect("write");
        h.pump();
        let mut buf = [0u8; 8];
        // EOF (or a reset if unread bytes were left behind): closed.
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
    }
    assert_eq!(h.pending_count(), 0);
    assert!(h.take_rx().is_empty());
}

#[test]
fn host_client_bytes_split_across_reads() {
    let mut h = Harness::new();
    h.post_rx(2);
    let mut client = UnixStream::connect(&h.uds).expect("connect");
    for byte in b"CONNECT 99\n" {
        client.write_all(&[*byte]).expect("write");
        h.pump();
    }
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_REQUEST);
    assert_eq!(pkts[0].hdr.dst_port, 99);
}

#[test]
fn host_initiated_rst_closes_client() {
    let mut h = Harness::new();
    h.post_rx(2);
    let mut client = UnixStream::connect(&h.uds).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client.write_all(b"CONNECT 7\n").expect("write");
    h.pump();
    let req = h.take_rx()[0].hdr;
    h.send(Hdr::guest(OP_RST, 7, req.src_port), &[]);
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).expect("read"), 0);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_ports_count_up_and_skip_ones_in_use() {
    let mut h = Harness::new();
    h.post_rx(8);
    let (_a, pa) = h.host_connect(5);
    let (_b, pb) = h.host_connect(5);
    assert_eq!(pa, FIRST_HOST_PORT);
    assert_eq!(pb, FIRST_HOST_PORT + 1);
    assert_eq!(h.dev.connection_count(), 2);
}

// ----------------------------------------------------------- guest-initiated

#[test]
fn guest_initiated_with_listener() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(5000)).expect("bind");
    h.post_rx(4);
    h.send(Hdr::guest(OP_REQUEST, 1025, 5000), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RESPONSE);
    assert_eq!(pkts[0].hdr.src_port, 5000);
    assert_eq!(pkts[0].hdr.dst_port, 1025);
    assert_eq!(pkts[0].hdr.dst_cid, GUEST_CID);
    assert_eq!(pkts[0].hdr.buf_alloc, CONN_BUF_ALLOC);
    let (mut server, _) = listener.accept().expect("accept");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");

    h.send(Hdr::guest(OP_RW, 1025, 5000), b"ping");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");

    server.write_all(b"pong").expect("write");
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RW);
    assert_eq!(pkts[0].data, b"pong");
    assert_eq!(pkts[0].hdr.fwd_cnt, 4, "the 4 guest bytes were forwarded");
}

#[test]
fn guest_initiated_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.post_rx(2);
    h.send(Hdr::guest(OP_REQUEST, 1025, 5001), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(pkts[0].hdr.src_port, 5001);
    assert_eq!(pkts[0].hdr.dst_port, 1025);
    assert_eq!(h.dev.connection_count(), 0);
    assert_eq!(h.dev.counters().io_errors, 1);
}

#[test]
fn packets_for_unknown_connections_get_rst_but_rst_does_not() {
    let mut h = Harness::new();
    h.post_rx(4);
    h.send(Hdr::guest(OP_RW, 1, 2), b"data");
    h.send(Hdr::guest(OP_RST, 1, 2), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
}

#[test]
fn shutdown_both_ways() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(6000)).expect("bind");
    h.post_rx(8);
    let mut server = h.guest_connect(&listener, 1026, 6000);

    // Host EOF → SHUTDOWN(SEND) to the guest.
    server
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_SHUTDOWN);
    assert_eq!(pkts[0].hdr.flags, SHUTDOWN_F_SEND);
    assert_eq!(h.dev.connection_count(), 1, "guest may still send");

    // The guest still sends, then shuts down both directions.
    h.send(Hdr::guest(OP_RW, 1026, 6000), b"last");
    let mut shut = Hdr::guest(OP_SHUTDOWN, 1026, 6000);
    shut.flags = SHUTDOWN_F_RCV | SHUTDOWN_F_SEND;
    h.send(shut, &[]);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).expect("read to EOF");
    assert_eq!(rest, b"last");
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn guest_shutdown_send_gives_host_eof() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(6001)).expect("bind");
    h.post_rx(8);
    let mut server = h.guest_connect(&listener, 1027, 6001);
    let mut shut = Hdr::guest(OP_SHUTDOWN, 1027, 6001);
    shut.flags = SHUTDOWN_F_SEND;
    h.send(shut, &[]);
    let mut buf = [0u8; 4];
    assert_eq!(server.read(&mut buf).expect("read"), 0);
    // The host can still answer.
    server.write_all(b"bye").expect("write");
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, b"bye");
}

#[test]
fn host_close_with_guest_data_pending_resets() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(6002)).expect("bind");
    h.post_rx(8);
    let server = h.guest_connect(&listener, 1028, 6002);
    drop(server);
    h.pump();
    // EOF → SHUTDOWN; then guest data to a closed stream → RST.
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_SHUTDOWN);
    h.send(Hdr::guest(OP_RW, 1028, 6002), b"x");
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(h.dev.connection_count(), 0);
}

// ----------------------------------------------------------------- credit

#[test]
fn host_data_respects_guest_credit() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(7000)).expect("bind");
    h.post_rx(8);
    let mut req = Hdr::guest(OP_REQUEST, 1029, 7000);
    req.buf_alloc = 8;
    h.send(req, &[]);
    assert_eq!(h.take_rx()[0].hdr.op, OP_RESPONSE);
    let (mut server, _) = listener.accept().expect("accept");

    server.write_all(b"0123456789abcdefghij").expect("write");
    h.pump();
    let pkts = h.take_rx();
    // 8 bytes, then out of credit: one credit request, nothing more.
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RW);
    assert_eq!(pkts[0].data, b"01234567");
    assert_eq!(pkts[1].hdr.op, OP_CREDIT_REQUEST);
    h.pump();
    assert!(h.take_rx().is_empty());

    // The guest consumed 8: 8 more may flow.
    let mut update = Hdr::guest(OP_CREDIT_UPDATE, 1029, 7000);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    h.send(update, &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts[0].data, b"89abcdef");
    // A bigger buffer lets the rest through.
    update.buf_alloc = 1024;
    update.fwd_cnt = 16;
    h.send(update, &[]);
    let data: Vec<u8> = h.take_rx().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(data, b"ghij");
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(7001)).expect("bind");
    h.post_rx(8);
    let _server = h.guest_connect(&listener, 1030, 7001);
    // The server never reads: the socket fills, then our buffer, then the
    // guest is over its credit.
    let chunk = vec![0x5au8; MAX_PKT_DATA as usize];
    let mut reset = false;
    for _ in 0..64 {
        h.send(Hdr::guest(OP_RW, 1030, 7001), &chunk);
        let pkts = h.take_rx();
        if pkts.iter().any(|p| p.hdr.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "credit violation must reset");
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn credit_update_sent_when_buffer_drains() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(7002)).expect("bind");
    h.post_rx(32);
    let mut server = h.guest_connect(&listener, 1031, 7002);
    // A well-behaved guest: send while the credit it heard of allows, with
    // the server not reading, until it has no credit left.
    let mut sent = 0usize;
    let mut acked = 0usize;
    for _ in 0..64 {
        for pkt in h.take_rx() {
            assert_eq!(pkt.hdr.op, OP_CREDIT_UPDATE);
            assert_eq!(pkt.hdr.buf_alloc, CONN_BUF_ALLOC);
            acked = pkt.hdr.fwd_cnt as usize;
        }
        let credit = CONN_BUF_ALLOC as usize - (sent - acked);
        if credit == 0 {
            break;
        }
        let n = credit.min(MAX_PKT_DATA as usize);
        h.send(Hdr::guest(OP_RW, 1031, 7002), &vec![0xa5u8; n]);
        sent += n;
    }
    assert!(
        sent > CONN_BUF_ALLOC as usize,
        "the socket took some directly"
    );
    assert_eq!(h.dev.connection_count(), 1, "credit respected: no reset");

    // The host drains everything: the guest hears about it.
    let first = MAX_PKT_DATA as usize;
    let mut buf = vec![0u8; sent];
    server.read_exact(&mut buf[..first]).expect("read");
    h.pump();
    // Keep the server open (its EOF would add a SHUTDOWN) while it reads.
    let reader =
        std::thread::spawn(move || server.read_exact(&mut buf[first..]).map(|()| (buf, server)));
    let (got, _server) = loop {
        h.pump();
        if reader.is_finished() {
            break reader.join().expect("join").expect("read");
        }
    };
    assert!(got.iter().all(|b| *b == 0xa5));
    h.pump();
    let updates: Vec<RxPkt> = h.take_rx();
    let last = updates.last().expect("a credit update");
    assert_eq!(last.hdr.op, OP_CREDIT_UPDATE);
    // Unsolicited updates keep the guest's view of our free space above
    // the threshold; they are not sent for every byte.
    let unacked = sent - last.hdr.fwd_cnt as usize;
    assert!(
        unacked < 64 * 1024,
        "guest still believes {unacked} bytes are buffered"
    );
    // Asked, the device reports everything forwarded.
    h.send(Hdr::guest(OP_CREDIT_REQUEST, 1031, 7002), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].hdr.fwd_cnt as usize, sent);
}

// --------------------------------------------------------------- malformed

#[test]
fn malformed_tx_chains_are_counted_and_device_keeps_serving() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(8000)).expect("bind");
    h.post_rx(8);
    let hdr_addr = 0xF0_0000u64;

    // Header descriptor too short.
    h.mem
        .write_slice(
            &Hdr::guest(OP_REQUEST, 1, 8000).bytes(),
            GuestAddress(hdr_addr),
        )
        .expect("write");
    h.queue_tx_descs(&[(hdr_addr, 20, false)]);
    // len larger than the data buffer.
    let mut big = Hdr::guest(OP_RW, 1, 8000);
    big.len = 100;
    h.mem
        .write_slice(&big.bytes(), GuestAddress(hdr_addr + 0x100))
        .expect("write");
    h.queue_tx_descs(&[
        (hdr_addr + 0x100, HDR as u32, false),
        (hdr_addr + 0x200, 10, false),
    ]);
    // len beyond the per-packet cap.
    big.len = MAX_PKT_DATA + 1;
    h.mem
        .write_slice(&big.bytes(), GuestAddress(hdr_addr + 0x300))
        .expect("write");
    h.queue_tx_descs(&[
        (hdr_addr + 0x300, HDR as u32, false),
        (hdr_addr + 0x400, MAX_PKT_DATA + 1, false),
    ]);
    // Header outside guest memory.
    h.queue_tx_descs(&[(0x4000_0000, HDR as u32, false)]);
    // Data outside guest memory.
    let mut rw = Hdr::guest(OP_RW, 1, 8000);
    rw.len = 16;
    h.mem
        .write_slice(&rw.bytes(), GuestAddress(hdr_addr + 0x500))
        .expect("write");
    h.queue_tx_descs(&[
        (hdr_addr + 0x500, HDR as u32, false),
        (MEM_SIZE as u64 - 8, 16, false),
    ]);
    // Device-writable TX header.
    h.queue_tx_descs(&[(hdr_addr, HDR as u32, true)]);
    // Zero-length header descriptor.
    h.queue_tx_descs(&[(hdr_addr, 0, false)]);
    h.kick(TX_QUEUE);
    assert_eq!(h.dev.counters().malformed_chains, 7);
    assert_eq!(h.tx_used().len(), 7, "every chain is returned");
    assert!(h.take_rx().is_empty());

    // Wrong source CID and wrong destination CID: dropped, no reply.
    let mut spoofed = Hdr::guest(OP_REQUEST, 1, 8000);
    spoofed.src_cid = 42;
    h.send(spoofed, &[]);
    let mut elsewhere = Hdr::guest(OP_REQUEST, 1, 8000);
    elsewhere.dst_cid = 7;
    h.send(elsewhere, &[]);
    // Wrong type (SEQPACKET) and unknown op: RST.
    let mut seqpacket = Hdr::guest(OP_REQUEST, 1, 8000);
    seqpacket.type_ = 2;
    h.send(seqpacket, &[]);
    h.send(Hdr::guest(99, 1, 8000), &[]);
    assert_eq!(h.dev.counters().malformed_chains, 11);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 2);
    assert!(pkts.iter().all(|p| p.hdr.op == OP_RST));
    assert_eq!(
        listener
            .set_nonblocking(true)
            .map(|()| listener.accept().is_err())
            .ok(),
        Some(true)
    );

    // Still serving.
    listener.set_nonblocking(false).expect("blocking");
    let _server = h.guest_connect(&listener, 1, 8000);
    assert_eq!(h.dev.connection_count(), 1);
}

#[test]
fn malformed_rx_chains_are_counted_and_data_not_lost() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(8001)).expect("bind");
    h.post_rx(2);
    let mut server = h.guest_connect(&listener, 5, 8001);
    h.post_rx(0);
    h.take_rx();
    // Use up the posted buffers, then post only broken ones.
    server.write_all(b"a").expect("write");
    h.pump();
    assert_eq!(h.take_rx().len(), 1);
    let broken: [&[(u64, u32, bool)]; 4] = [
        &[(0x70_0000, HDR as u32, false), (0x70_1000, 64, true)],
        &[(0x4000_0000, HDR as u32, true), (0x70_1000, 64, true)],
        &[(0x70_0000, 16, true)],
        &[(0x70_0000, HDR as u32, true)],
    ];
    for descs in broken {
        h.rings[RX_QUEUE].add_chain(&h.mem, descs);
    }
    server.write_all(b"payload").expect("write");
    h.kick(RX_QUEUE);
    // The broken buffers are returned with length 0.
    while let Some((_, len)) = h.rings[RX_QUEUE].pop_used(&h.mem) {
        assert_eq!(len, 0);
    }
    assert_eq!(h.dev.counters().malformed_chains, 4);
    h.post_rx(2);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].data, b"payload");
}

// ---------------------------------------------------------------- RX flow

#[test]
fn rx_without_buffers_keeps_data_and_resumes_on_kick() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(9000)).expect("bind");
    h.post_rx(1);
    let mut server = h.guest_connect(&listener, 77, 9000);

    // No RX buffers: the data waits in the socket and the loop goes idle
    // (a spinning device would keep generating events; pump would panic).
    let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    server.write_all(&payload).expect("write");
    let events = h.pump();
    assert!(events <= 2, "{events} events without RX buffers");
    assert!(h.take_rx().is_empty());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.pump(), 0, "idle while the guest posts nothing");

    // Buffers and a kick: everything arrives, in order.
    h.post_rx(8);
    let data: Vec<u8> = h.take_rx().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(data, payload);
    assert_eq!(h.dev.counters().rx_bytes, payload.len() as u64);
}

#[test]
fn control_replies_wait_for_rx_buffers() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(9001)).expect("bind");
    h.send(Hdr::guest(OP_REQUEST, 1, 9001), &[]);
    h.send(Hdr::guest(OP_REQUEST, 2, 9002), &[]);
    assert!(h.take_rx().is_empty());
    h.post_rx(4);
    let pkts = h.take_rx();
    let ops: Vec<u16> = pkts.iter().map(|p| p.hdr.op).collect();
    assert_eq!(ops, [OP_RST, OP_RESPONSE]);
    assert!(listener.accept().is_ok());
}

// ------------------------------------------------------- events and reset

#[test]
fn transport_reset_uses_event_buffer_and_drops_connections() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(9100)).expect("bind");
    h.post_rx(4);
    let mut server = h.guest_connect(&listener, 1, 9100);
    let (mut client, _) = h.host_connect(2);
    assert_eq!(h.dev.connection_count(), 2);

    // A broken event buffer first (read-only), then a good one.
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(0x7f_0000))
        .expect("poison");
    h.rings[EVENT_QUEUE].add_chain(&h.mem, &[(0x7e_0000, 4, false)]);
    h.rings[EVENT_QUEUE].add_chain(&h.mem, &[(0x7f_0000, 8, true)]);
    h.kick(EVENT_QUEUE);
    assert!(
        h.rings[EVENT_QUEUE].pop_used(&h.mem).is_none(),
        "kept until needed"
    );
    h.irq_count();

    h.dev.send_transport_reset();
    assert_eq!(h.rings[EVENT_QUEUE].pop_used(&h.mem).map(|u| u.1), Some(0));
    assert_eq!(h.rings[EVENT_QUEUE].pop_used(&h.mem).map(|u| u.1), Some(4));
    let event: u32 = h.mem.read_obj(GuestAddress(0x7f_0000)).expect("read");
    assert_eq!(event, EVENT_TRANSPORT_RESET);
    assert!(h.irq_count() > 0);
    assert_eq!(h.dev.connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(server.read(&mut buf).expect("read"), 0);
    assert_eq!(client.read(&mut buf).expect("read"), 0);

    // Until the driver posts a new event buffer (Linux does once it handled the event),
    // nothing reaches its RX queue: a connection request it saw first would be reset.
    h.send(Hdr::guest(OP_REQUEST, 3, 9100), &[]);
    assert!(
        h.take_rx().is_empty(),
        "RX is held until the reset is handled"
    );
    h.rings[EVENT_QUEUE].add_chain(&h.mem, &[(0x7f_0000, 8, true)]);
    h.kick(EVENT_QUEUE);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RESPONSE);
    let _server = listener.accept().expect("accept");

    // Without an event buffer it still drops connections.
    h.rings[EVENT_QUEUE].pop_used(&h.mem);
    h.dev.send_transport_reset();
    h.dev.send_transport_reset();
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn reset_unregisters_everything_and_reactivates() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.host_path(9200)).expect("bind");
    h.post_rx(2);
    let _server = h.guest_connect(&listener, 1, 9200);
    let _pending = UnixStream::connect(&h.uds).expect("connect");
    h.pump();
    h.dev.reset();
    assert_eq!(h.dev.connection_count(), 0);
    // Kicks, clients and host streams no longer reach the device.
    for kick in &h.kicks {
        kick.write(1).expect("kick");
    }
    let _late = UnixStream::connect(&h.uds).expect("connect");
    let mut events = [EpollEvent::default(); 8];
    assert_eq!(h.epoll.wait(20, &mut events).expect("wait"), 0);
    // Events that were already in flight are ignored.
    h.dev.handle_event(TX_QUEUE as u32, libc::EPOLLIN as u32);
}

#[test]
fn interrupt_once_per_batch() {
    let mut h = Harness::new();
    h.post_rx(8);
    for port in 1..=4 {
        h.queue_tx(Hdr::guest(OP_RW, port, 1), b"x");
    }
    h.irq_count();
    h.kick(TX_QUEUE);
    assert_eq!(h.take_rx().len(), 4);
    assert_eq!(h.tx_used().len(), 4);
    assert_eq!(h.irq_count(), 1, "one interrupt for the whole batch");
}

// ------------------------------------------------------ snapshot/restore

/// A vsock device behind a real MMIO transport, as the VMM builds it, with
/// the driver's side of its three queues.
struct Window {
    uds: PathBuf,
    mem: GuestMemory,
    dev: Arc<Mutex<Vsock>>,
    transport: MmioTransport,
    epoll: Arc<Epoll>,
    irq: Arc<Interrupt>,
    rings: Vec<TestRing>,
    /// Header address of each posted RX chain, by head.
    rx_hdrs: HashMap<u16, u64>,
}

/// Where each queue's rings live (the same layout as [`Harness`]).
fn ring_base(queue: usize) -> u64 {
    0x10000 * (queue as u64 + 1)
}

impl Window {
    /// A device at `dir/<name>` with CID `cid` on guest memory `mem`; the
    /// driver-side rings start out empty.
    fn new(dir: &std::path::Path, name: &str, cid: u64, mem: GuestMemory) -> Self {
        let uds = dir.join(name);
        let dev = Arc::new(Mutex::new(
            Vsock::new(VsockConfig {
                guest_cid: cid,
                uds_path: uds.clone(),
            })
            .expect("vsock"),
        ));
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let transport = MmioTransport::new(
            dev.clone(),
            mem.clone(),
            irq.clone(),
            EventRegistrar::new(epoll.clone(), 0),
        )
        .expect("transport");
        Self {
            uds,
            mem,
            dev,
            transport,
            epoll,
            irq,
            rings: (0..NUM_QUEUES)
                .map(|q| TestRing::new(ring_base(q), QUEUE_SIZE))
                .collect(),
            rx_hdrs: HashMap::new(),
        }
    }

    fn bring_up(&mut self) {
        let layouts: Vec<QueueLayout> = self
            .rings
            .iter()
            .map(|r| QueueLayout {
                size: r.size,
                desc: r.desc,
                avail: r.avail,
                used: r.used,
            })
            .collect();
        drive_to_active(&mut self.transport, VIRTIO_F_VERSION_1, &layouts);
        assert_eq!(self.transport.state(), TransportState::Active);
    }

    /// Dispatches events until none arrive for 20 ms.
    fn pump(&self) {
        let mut events = [EpollEvent::default(); 32];
        for _ in 0..200 {
            let n = self.epoll.wait(20, &mut events).expect("epoll wait");
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let (_, token) = EventRegistrar::decode(ev.data());
                lock(&self.dev).handle_event(token, ev.events());
            }
        }
        panic!("event loop never went idle");
    }

    /// Posts `n` RX chains (header, data) at addresses derived from `base`.
    fn post_rx(&mut self, n: u64, base: u64) {
        for i in 0..n {
            let hdr = base + i * 0x2000;
            let head = self.rings[RX_QUEUE].add_chain(
                &self.mem,
                &[(hdr, HDR as u32, true), (hdr + 0x100, RX_BUF, true)],
            );
            self.rx_hdrs.insert(head, hdr);
        }
    }

    /// Posts `n` 4-byte event buffers starting at `base`.
    fn post_events(&mut self, n: u64, base: u64) {
        for i in 0..n {
            self.rings[EVENT_QUEUE].add_chain(&self.mem, &[(base + 0x10 * i, 4, true)]);
        }
    }

    /// Queues one TX packet (header only) at `addr` without kicking.
    fn queue_tx(&mut self, hdr: Hdr, addr: u64) {
        self.mem
            .write_slice(&hdr.bytes(), GuestAddress(addr))
            .expect("write hdr");
        self.rings[TX_QUEUE].add_chain(&self.mem, &[(addr, HDR as u32, false)]);
    }

    /// Headers of the packets the device put in RX buffers since last time.
    fn take_rx(&mut self) -> Vec<Hdr> {
        let mut out = Vec::new();
        while let Some((head, _)) = self.rings[RX_QUEUE].pop_used(&self.mem) {
            let addr = self.rx_hdrs.remove(&head).expect("known RX head");
            let mut raw = [0u8; HDR];
            self.mem
                .read_slice(&mut raw, GuestAddress(addr))
                .expect("read hdr");
            out.push(Hdr::parse(&raw));
        }
        out
    }

    /// Used event buffers since last time: (event id read back, used length).
    fn take_events(&mut self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rings[EVENT_QUEUE].pop_used(&self.mem) {
            let at = GuestAddress(self.rings[EVENT_QUEUE].desc + 16 * u64::from(head));
            let addr: u64 = self.mem.read_obj(at).expect("desc addr");
            let id: u32 = self.mem.read_obj(GuestAddress(addr)).expect("event");
            out.push((id, len));
        }
        out
    }

    fn cid_in_config(&mut self) -> u64 {
        let mut cfg = [0u8; 8];
        self.transport.read(0x100, &mut cfg);
        u64::from_le_bytes(cfg)
    }
}

/// Guest memory as a new process maps it back from the memory file: the
/// same bytes, a new mapping.
/// A device brought up in `dir` (socket `old.sock`), snapshotted and gone, and restored
/// into a new window on `new_mem` (socket `new.sock`).
fn restored(dir: &Path, mem: &GuestMemory, new_mem: GuestMemory) -> Window {
    let mut old = Window::new(dir, "old.sock", GUEST_CID, mem.clone());
    old.bring_up();
    let snap = old.transport.snapshot();
    let rings = old.rings;
    drop(old.transport);
    drop(old.dev);
    let mut new = Window::new(dir, "new.sock", GUEST_CID, new_mem);
    new.rings = rings;
    new.transport.restore(&snap).expect("restore");
    new.pump();
    new
}

fn reload(mem: &GuestMemory) -> GuestMemory {
    let mut image = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut image, GuestAddress(0)).expect("read");
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
    copy.write_slice(&image, GuestAddress(0)).expect("write");
    copy
}

/// Fills event buffers with a value that is not an event id, so a buffer
/// the device did not write is told apart.
const NOT_AN_EVENT: u32 = 0xdead_beef;

#[test]
fn restore_sends_exactly_one_transport_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
    let mut old = Window::new(dir.path(), "old.sock", GUEST_CID, mem.clone());
    old.bring_up();
    // What a Linux driver has posted: event buffers and RX buffers.
    for i in 0..4u64 {
        mem.write_obj(NOT_AN_EVENT, GuestAddress(0x7f_0000 + 0x10 * i))
            .expect("poison");
    }
    old.post_events(4, 0x7f_0000);
    old.post_rx(8, 0x10_0000);
    notify_queue(&mut old.transport, EVENT_QUEUE as u32);
    notify_queue(&mut old.transport, RX_QUEUE as u32);
    old.pump();
    // A guest connection to a host service is open at snapshot time.
    let listener = UnixListener::bind(format!("{}_7000", old.uds.display())).expect("bind");
    old.queue_tx(Hdr::guest(OP_REQUEST, 1030, 7000), 0x90_0000);
    notify_queue(&mut old.transport, TX_QUEUE as u32);
    old.pump();
    let replies = old.take_rx();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].op, OP_RESPONSE);
    let (mut server, _) = listener.accept().expect("accept");
    assert_eq!(lock(&old.dev).connection_count(), 1);
    assert!(old.take_events().is_empty(), "event buffers are only kept");
    // The guest queued data on that connection; the kick never happened.
    old.queue_tx(Hdr::guest(OP_RW, 1030, 7000), 0x90_1000);

    let snap = old.transport.snapshot();
    let rings = (old.rings, old.rx_hdrs);
    let mem = reload(&mem);
    drop(old.transport);
    drop(old.dev);
    // The old process is gone, and its host sockets with it.
    let mut buf = [0u8; 1];
    assert_eq!(server.read(&mut buf).expect("read"), 0);

    // New process, new socket path, new CID.
    let mut new = Window::new(dir.path(), "new.sock", GUEST_CID + 1, mem.clone());
    (new.rings, new.rx_hdrs) = rings;
    new.irq.irq_fd().read().expect_err("no interrupt yet");
    new.transport.restore(&snap).expect("restore");

    let events = new.take_events();
    assert_eq!(events, [(EVENT_TRANSPORT_RESET, 4)], "exactly one reset");
    assert!(new.irq.irq_fd().read().expect("interrupt") >= 1);
    assert_eq!(new.cid_in_config(), GUEST_CID + 1);
    assert_eq!(lock(&new.dev).connection_count(), 0);

    // The kicks from restore: the data queued for the old connection is
    // taken, and dropped without a reply since it comes from the old CID;
    // no further event is sent.
    new.pump();
    let tx_used: Vec<_> = std::iter::from_fn(|| new.rings[TX_QUEUE].pop_used(&new.mem)).collect();
    assert_eq!(tx_used.len(), 2, "the REQUEST before, the RW after restore");
    assert!(new.take_rx().is_empty());
    assert_eq!(lock(&new.dev).counters().malformed_chains, 1);
    notify_queue(&mut new.transport, EVENT_QUEUE as u32);
    new.pump();
    assert!(new.take_events().is_empty(), "one reset, not one per kick");
    for i in 1..4u64 {
        let v: u32 = mem
            .read_obj(GuestAddress(0x7f_0000 + 0x10 * i))
            .expect("read");
        assert_eq!(v, NOT_AN_EVENT, "event buffer {i} untouched");
    }

    // Host clients reach the guest through the new socket, once the driver handled the
    // reset: until it refills the event queue, the request waits.
    let mut client = UnixStream::connect(&new.uds).expect("connect new socket");
    client.write_all(b"CONNECT 52\n").expect("write");
    new.pump();
    assert!(new.take_rx().is_empty(), "held until the reset is handled");
    new.post_events(1, 0x7f_0000);
    notify_queue(&mut new.transport, EVENT_QUEUE as u32);
    new.pump();
    let pkts = new.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].op, OP_REQUEST);
    assert_eq!(pkts[0].dst_port, 52);
    assert!(!dir.path().join("old.sock").exists());
}

#[test]
fn reset_without_event_buffer_waits_for_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
    let mut new = restored(dir.path(), &mem, mem.clone());
    assert!(new.take_events().is_empty());
    let _ = new.irq.irq_fd().read();

    // The driver posts two buffers: the reset goes into the first only.
    mem.write_obj(NOT_AN_EVENT, GuestAddress(0x7f_0010))
        .expect("poison");
    new.post_events(2, 0x7f_0000);
    notify_queue(&mut new.transport, EVENT_QUEUE as u32);
    new.pump();
    assert_eq!(new.take_events(), [(EVENT_TRANSPORT_RESET, 4)]);
    assert!(new.irq.irq_fd().read().expect("interrupt") >= 1);
    notify_queue(&mut new.transport, EVENT_QUEUE as u32);
    new.pump();
    assert!(new.take_events().is_empty());
    let v: u32 = mem.read_obj(GuestAddress(0x7f_0010)).expect("read");
    assert_eq!(v, NOT_AN_EVENT);
}

#[test]
fn queue_snapshots_follow_activation() {
    let mut h = Harness::new();
    let snaps = h.dev.queue_snapshots();
    let descs: Vec<u64> = snaps.iter().map(|q| q.desc_table).collect();
    assert_eq!(descs, [ring_base(0), ring_base(1), ring_base(2)]);
    h.post_rx(2);
    h.send(Hdr::guest(OP_RW, 1, 2), b"x");
    let snaps = h.dev.queue_snapshots();
    assert_eq!(
        (snaps[TX_QUEUE].next_avail, snaps[TX_QUEUE].next_used),
        (1, 1)
    );
    // The RST reply took one RX buffer.
    assert_eq!(
        (snaps[RX_QUEUE].next_avail, snaps[RX_QUEUE].next_used),
        (1, 1)
    );
    h.dev.reset();
    assert!(h.dev.queue_snapshots().is_empty());
}
