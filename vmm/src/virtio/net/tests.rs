//! The net device driven through its queues in test guest memory against a
//! real TAP, with good chains and hostile ones.
//!
//! Every test runs in a thread of its own inside a fresh network namespace
//! (namespaces are per thread), creates its TAP there and observes or
//! injects frames with an AF_PACKET socket bound to the TAP. Frames use a
//! local experimental EtherType, a broadcast destination and no IP at all;
//! the TAP and the namespace vanish with the thread.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use podvisor_vmm_api::tap::{Tap, TapError, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::virtio::mmio::tests::{QueueLayout, drive_to_active, notify_queue};
use crate::virtio::mmio::{MmioTransport, TransportSnapshot, TransportState};
use crate::virtio::{
    ActivateContext, ActivateError, EventRegistrar, GuestMemory, Interrupt, TYPE_NET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

const MEM_SIZE: u64 = 4 << 20;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
/// Offsets of the avail and used rings from a queue's descriptor table
/// (room for 256 entries each).
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
const BUF: u64 = 0x10_0000;
const BUF2: u64 = 0x14_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const EPOLLIN: u32 = libc::EPOLLIN as u32;

/// IEEE 802 local experimental EtherType: nothing on the host speaks it.
const TEST_ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

const fn bit(feature: u32) -> u64 {
    1 << feature
}

const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MAC);
const MRG_FEATURES: u64 = BASE_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF);

/// One descriptor as the driver writes it: (address, length, device-writable).
type Desc = (u64, u32, bool);

fn readable(addr: u64, len: u32) -> Desc {
    (addr, len, false)
}

fn writable(addr: u64, len: u32) -> Desc {
    (addr, len, true)
}

// ---------------------------------------------------------------------
// Namespaces, TAPs and raw sockets.

/// Runs `test` on a new thread inside a new, empty network namespace.
fn in_netns<F: FnOnce() + Send + 'static>(test: F) {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare() takes no pointers; CLONE_NEWNET moves only this
        // thread (not the test process) to a new network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        // No IPv6 autoconfiguration chatter on the TAP: only the test's own
        // frames cross it. Absent on hosts without IPv6, which is fine.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        test();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A TAP name unique within the test process.
fn tap_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "pvn{}t{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sets the interface up (no address: nothing but our frames flows).
fn link_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    // SAFETY: `ifreq` is plain old data; all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads and writes one `ifreq`, which we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
    assert_eq!(ret, 0, "SIOCGIFFLAGS: {}", io::Error::last_os_error());
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one `ifreq`, which we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    assert_eq!(ret, 0, "SIOCSIFFLAGS: {}", io::Error::last_os_error());
}

/// An AF_PACKET socket on the TAP interface: what it sends the TAP hands to
/// the device, what the device writes to the TAP it receives.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(ifname: &str) -> Self {
        let ifindex = ifindex(ifname);
        assert_ne!(ifindex, 0, "if_nametoindex({ifname})");
        let protocol = TEST_ETHERTYPE.to_be();
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
        // SAFETY: `sockaddr_ll` is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a `sockaddr_ll` and its size is passed along.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one `timeval`, whose size is passed.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        Self { fd }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: the pointer and length describe `frame`.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            sent,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame, or None after the 2 s receive timeout.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; FRAME_BUFFER_LEN];
        // SAFETY: the pointer and length describe `buf`.
        let len = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let len = usize::try_from(len).ok()?;
        buf.truncate(len);
        Some(buf)
    }

    /// The next frame, if one is already queued.
    fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; FRAME_BUFFER_LEN];
        // SAFETY: the pointer and length describe `buf`.
        let len = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let len = usize::try_from(len).ok()?;
        buf.truncate(len);
        Some(buf)
    }
}

/// A broadcast Ethernet frame of `len` bytes with the test EtherType and a
/// payload derived from `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    assert!(len >= 14);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    f
}

/// A plain virtio_net_hdr_v1: no offloads.
fn plain_header() -> [u8; VNET_HDR_LEN] {
    [0; VNET_HDR_LEN]
}

/// A TAP in the current namespace, up, with a packet socket on it.
fn tap_with_socket() -> (Tap, PacketSocket) {
    let tap = Tap::open(&tap_name()).expect("open TAP");
    link_up(tap.name());
    let sock = PacketSocket::open(tap.name());
    (tap, sock)
}

/// Waits until the TAP has a frame for the device.
fn wait_readable(tap: &Tap) {
    let mut pfd = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid `pollfd`, count 1.
    let ret = unsafe { libc::poll(&mut pfd, 1, 2000) };
    assert_eq!(ret, 1, "TAP never became readable");
}

// ---------------------------------------------------------------------
// The driver side of the queues.

/// A split virtqueue as the guest driver sees it.
struct Driver {
    desc: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    fn new(desc: u64, size: u16) -> Self {
        Self {
            desc,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn avail(&self) -> u64 {
        self.desc + AVAIL_OFFSET
    }

    fn used(&self) -> u64 {
        self.desc + USED_OFFSET
    }

    /// The queue as the transport hands it over after DRIVER_OK.
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail() as u32), Some(0));
        q.set_used_ring_address(Some(self.used() as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes a chain and makes it available; returns its head.
    fn add_chain(&mut self, mem: &GuestMemory, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            let last = i + 1 == descs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&(if last { 0 } else { next }).to_le_bytes());
            mem.write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(index)))
                .expect("write descriptor");
            self.next_desc = next;
        }
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the avail ring, whatever it is.
    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail() + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2))
            .expect("avail idx");
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used() + 2))
            .expect("used idx")
    }

    /// Used element `i`: (head, length).
    fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u16, u32) {
        let at = self.used() + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id as u16, len)
    }

    /// Writes used_event (EVENT_IDX): interrupt once the used index passes it.
    fn set_used_event(&self, mem: &GuestMemory, event: u16) {
        let at = self.avail() + 4 + 2 * u64::from(self.size);
        mem.write_obj(event, GuestAddress(at)).expect("used_event");
    }

    /// Reads avail_event (EVENT_IDX): where the device wants the next kick.
    fn avail_event(&self, mem: &GuestMemory) -> u16 {
        let at = self.used() + 4 + 8 * u64::from(self.size);
        mem.read_obj(GuestAddress(at)).expect("avail_event")
    }
}

fn read_mem(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .expect("read guest memory");
    buf
}

/// A net device, its guest memory, both queues and the event loop pieces.
struct Harness {
    mem: GuestMemory,
    net: Net,
    rx: Driver,
    tx: Driver,
    epoll: Arc<Epoll>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    interrupt: Arc<Interrupt>,
}

impl Harness {
    fn new(tap: Tap) -> Self {
        Self::with_sizes(tap, QUEUE_SIZE, QUEUE_SIZE)
    }

    fn with_sizes(tap: Tap, rx_size: u16, tx_size: u16) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        Self {
            mem,
            net: Net::with_tap(tap, GUEST_MAC),
            rx: Driver::new(RX_RING, rx_size),
            tx: Driver::new(TX_RING, tx_size),
            epoll: Arc::new(Epoll::new().expect("epoll")),
            rx_kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            tx_kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))),
        }
    }

    fn context(&self, features: u64) -> ActivateContext {
        ActivateContext {
            mem: self.mem.clone(),
            acked_features: features,
            queues: vec![self.rx.queue(), self.tx.queue()],
            queue_events: vec![
                self.rx_kick.try_clone().expect("clone eventfd"),
                self.tx_kick.try_clone().expect("clone eventfd"),
            ],
            interrupt: self.interrupt.clone(),
            events: EventRegistrar::new(self.epoll.clone(), 0),
        }
    }

    fn activate(&mut self, features: u64) {
        let ctx = self.context(features);
        self.net.activate(ctx).expect("activate");
    }

    fn kick_rx(&mut self) {
        self.rx_kick.write(1).expect("kick");
        self.net.handle_event(RX_QUEUE_TOKEN, EPOLLIN);
    }

    fn kick_tx(&mut self) {
        self.tx_kick.write(1).expect("kick");
        self.net.handle_event(TX_QUEUE_TOKEN, EPOLLIN);
    }

    /// Waits for a frame on the TAP and reports it as the event loop would.
    fn tap_ready(&mut self) {
        wait_readable(&self.net.tap);
        self.net.handle_event(TAP_TOKEN, EPOLLIN);
    }

    /// Interrupts raised since the last call.
    fn interrupts(&self) -> u64 {
        self.interrupt.irq_fd().read().unwrap_or(0)
    }

    /// The tokens the event loop would report right now.
    fn ready_tokens(&self) -> Vec<EventToken> {
        let mut events = [EpollEvent::default(); 8];
        let n = self.epoll.wait(0, &mut events).expect("epoll_wait");
        events[..n]
            .iter()
            .map(|e| EventRegistrar::decode(e.data()).1)
            .collect()
    }

    /// Injects `frames` on the interface and lets the device read them.
    fn inject(&mut self, sock: &PacketSocket, frames: &[&[u8]]) {
        for f in frames {
            sock.send(f);
        }
        self.tap_ready();
    }
}

/// Asserts that a guest buffer holds a plain header with `num_buffers`
/// followed by `payload`.
fn assert_rx(mem: &GuestMemory, addr: u64, num_buffers: u16, payload: &[u8]) {
    let got = read_mem(mem, addr, VNET_HDR_LEN + payload.len());
    let mut header = plain_header();
    header[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    assert_eq!(got[..VNET_HDR_LEN], header, "virtio_net_hdr");
    assert!(got[VNET_HDR_LEN..] == *payload, "frame bytes differ");
}

// ---------------------------------------------------------------------
// Device surface.

#[test]
fn device_surface() {
    in_netns(|| {
        let name = tap_name();
        let net = Net::new(NetConfig {
            tap_name: name.clone(),
            mac: GUEST_MAC,
        })
        .expect("Net::new");
        assert_eq!(net.tap_name(), name);
        assert_eq!(net.mac(), GUEST_MAC);
        assert_eq!(net.name(), format!("net {name}"));
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let features = net.device_features();
        for wanted in [
            VIRTIO_F_VERSION_1,
            bit(VIRTIO_NET_F_MAC),
            bit(VIRTIO_NET_F_MRG_RXBUF),
            bit(VIRTIO_NET_F_GUEST_CSUM),
            bit(VIRTIO_NET_F_GUEST_TSO4),
        ] {
            assert_ne!(features & wanted, 0, "feature {wanted:#x} missing");
        }

        let mut config = [0xaau8; 8];
        net.read_config(0, &mut config);
        assert_eq!(config, [2, 0, 0, 0, 0, 1, 0, 0]);
        let mut tail = [0xaau8; 4];
        net.read_config(4, &mut tail);
        assert_eq!(tail, [0, 1, 0, 0]);
        net.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
    });
}

#[test]
fn tap_names_are_checked() {
    for bad in ["", "a-name-that-is-too-long", "nul\0byte"] {
        match Tap::open(bad) {
            Err(TapError::InvalidTapName { name }) => assert_eq!(name, bad),
            other => panic!("{bad:?}: expected InvalidTapName, got {other:?}"),
        }
    }
}

#[test]
fn tap_opens_an_existing_interface() {
    in_netns(|| {
        // A persistent TAP stands in for one made by the runtime (`ip tuntap
        // add`): it outlives its creator's fd and is attached, not replaced.
        let creator = Tap::open(&tap_name()).expect("create");
        let name = creator.name().to_owned();
        set_persist(&creator, true);
        // A second attach while one is open is refused and names the TAP.
        let err = Tap::open(&name).expect_err("busy TAP");
        assert!(err.to_string().contains(&name), "{err}");
        drop(creator);
        assert_ne!(ifindex(&name), 0, "persistent TAP vanished");

        let mut h = Harness::new(Tap::open(&name).expect("attach existing TAP"));
        assert_eq!(h.net.tap_name(), name);
        link_up(&name);
        let sock = PacketSocket::open(&name);
        h.activate(BASE_FEATURES);
        let mem = h.mem.clone();
        h.rx.add_chain(&mem, &[writable(BUF, 2048)]);
        let f = frame(90, 1);
        h.inject(&sock, &[&f]);
        assert_rx(&mem, BUF, 1, &f);

        // Clean up: a non-persistent TAP goes away with its last fd.
        set_persist(&h.net.tap, false);
        drop(h);
        assert_eq!(ifindex(&name), 0, "TAP left behind");
    });
}

fn set_persist(tap: &Tap, persist: bool) {
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let ret = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    };
    assert_eq!(ret, 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
}

fn ifindex(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: `name` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

#[test]
fn activation_checks_queues_and_reset_unregisters() {
    in_netns(|| {
        let mut h = Harness::new(Tap::open(&tap_name()).expect("tap"));
        let mut ctx = h.context(BASE_FEATURES);
        ctx.queues.pop();
        assert!(matches!(
            h.net.activate(ctx),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
        assert!(!h.net.is_active());

        // Every offload combination the guest may ack is accepted by the TAP,
        // including TSO without checksum offload (which we then leave off).
        for features in [
            BASE_FEATURES,
            BASE_FEATURES | bit(VIRTIO_NET_F_GUEST_CSUM),
            BASE_FEATURES
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6),
            BASE_FEATURES | bit(VIRTIO_NET_F_GUEST_TSO4),
        ] {
            h.activate(features);
            assert!(h.net.is_active());
            // Reset removes every fd, so the next activation can add them
            // to the same epoll again.
            h.net.reset();
            assert!(!h.net.is_active());
        }
        h.rx_kick.write(1).expect("kick");
        h.tx_kick.write(1).expect("kick");
        assert!(
            h.ready_tokens().is_empty(),
            "fds still registered after reset"
        );
    });
}

// ---------------------------------------------------------------------
// TX.

#[test]
fn tx_frames_reach_the_tap_with_one_interrupt() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(BASE_FEATURES);

        let frames = [frame(60, 1), frame(1514, 2), frame(200, 3)];
        let mem = h.mem.clone();
        // Header and frame in separate descriptors.
        mem.write_slice(&plain_header(), GuestAddress(BUF))
            .expect("header");
        mem.write_slice(&frames[0], GuestAddress(BUF + 0x100))
            .expect("frame");
        let mut heads = vec![h.tx.add_chain(
            &mem,
            &[
                readable(BUF, 12),
                readable(BUF + 0x100, frames[0].len() as u32),
            ],
        )];
        // Header and frame in one descriptor.
        let mut joined = plain_header().to_vec();
        joined.extend_from_slice(&frames[1]);
        mem.write_slice(&joined, GuestAddress(BUF + 0x1000))
            .expect("frame");
        heads.push(h.tx.add_chain(&mem, &[readable(BUF + 0x1000, joined.len() as u32)]));
        // The frame split over three descriptors, the header over two.
        let mut joined = plain_header().to_vec();
        joined.extend_from_slice(&frames[2]);
        mem.write_slice(&joined, GuestAddress(BUF2)).expect("frame");
        heads.push(h.tx.add_chain(
            &mem,
            &[
                readable(BUF2, 5),
                readable(BUF2 + 5, 50),
                readable(BUF2 + 55, 100),
                readable(BUF2 + 155, joined.len() as u32 - 155),
            ],
        ));
        h.kick_tx();

        for expected in &frames {
            let got = sock.recv().expect("frame on the TAP");
            assert_eq!(got.len(), expected.len());
            assert!(got == *expected, "frame bytes differ");
        }
        assert_eq!(h.tx.used_idx(&mem), 3);
        for (i, &head) in heads.iter().enumerate() {
            assert_eq!(h.tx.used_elem(&mem, i as u16), (head, 0));
        }
        assert_eq!(h.interrupts(), 1, "one interrupt per batch");
        let c = h.net.counters();
        assert_eq!(c.completed, 3);
        assert_eq!(c.tx_bytes, (60 + 1514 + 200) as u64);
        assert_eq!(c.malformed_chains, 0);
        assert_eq!(c.io_errors, 0);
    });
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(BASE_FEATURES);
        let mem = h.mem.clone();
        let good = frame(100, 9);
        let mut joined = plain_header().to_vec();
        joined.extend_from_slice(&good);
        mem.write_slice(&joined, GuestAddress(BUF)).expect("frame");

        let bad_chains: [&[Desc]; 8] = [
            // A device-writable descriptor.
            &[readable(BUF, 12), writable(BUF + 12, 100)],
            // Outside guest memory.
            &[readable(MEM_SIZE + 0x1000, 112)],
            // Straddling the end of guest memory.
            &[readable(MEM_SIZE - 50, 112)],
            // An address that overflows.
            &[readable(u64::MAX - 4, 112)],
            // More than the device buffer.
            &[readable(BUF, FRAME_BUFFER_LEN as u32 + 1)],
            &[
                readable(BUF, 0x8000),
                readable(BUF, 0x8000),
                readable(BUF, 0x8000),
            ],
            // Header shorter than 12 bytes, and a zero-length chain.
            &[readable(BUF, 8)],
            &[readable(BUF, 0)],
        ];
        for chain in bad_chains {
            h.tx.add_chain(&mem, chain);
        }
        // A head index beyond the queue.
        h.tx.publish(&mem, QUEUE_SIZE + 7);
        h.tx.add_chain(&mem, &[readable(BUF, joined.len() as u32)]);
        h.kick_tx();

        let got = sock.recv().expect("the good frame");
        assert!(got == good, "frame bytes differ");
        assert!(
            sock.try_recv().is_none(),
            "a malformed chain reached the TAP"
        );
        // All but the out-of-range head are returned, with length 0.
        assert_eq!(h.tx.used_idx(&mem), bad_chains.len() as u16 + 1);
        for i in 0..=bad_chains.len() as u16 {
            assert_eq!(h.tx.used_elem(&mem, i).1, 0);
        }
        let c = h.net.counters();
        assert_eq!(c.malformed_chains, bad_chains.len() as u64 + 1);
        assert_eq!(c.completed, 1);
        assert_eq!(c.tx_bytes, good.len() as u64);
    });
}

#[test]
fn tx_with_event_idx_arms_the_next_kick_and_honours_used_event() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(BASE_FEATURES | VIRTIO_RING_F_EVENT_IDX);
        let mem = h.mem.clone();
        let mut joined = plain_header().to_vec();
        joined.extend_from_slice(&frame(64, 4));
        mem.write_slice(&joined, GuestAddress(BUF)).expect("frame");

        // The driver wants an interrupt only after the 3rd used entry.
        h.tx.set_used_event(&mem, 2);
        h.tx.add_chain(&mem, &[readable(BUF, joined.len() as u32)]);
        h.tx.add_chain(&mem, &[readable(BUF, joined.len() as u32)]);
        h.kick_tx();
        assert_eq!(h.tx.used_idx(&mem), 2);
        assert_eq!(h.interrupts(), 0, "interrupt before used_event");
        assert_eq!(h.tx.avail_event(&mem), 2, "next kick not armed");

        h.tx.add_chain(&mem, &[readable(BUF, joined.len() as u32)]);
        h.kick_tx();
        assert_eq!(h.interrupts(), 1);
        for _ in 0..3 {
            sock.recv().expect("frame");
        }
    });
}

// ---------------------------------------------------------------------
// RX.

#[test]
fn rx_frame_lands_in_a_guest_chain() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(BASE_FEATURES);
        let mem = h.mem.clone();
        let head = h.rx.add_chain(&mem, &[writable(BUF, 2048)]);
        // The second chain splits its buffer over three descriptors.
        let head2 = h.rx.add_chain(
            &mem,
            &[
                writable(BUF2, 7),
                writable(BUF2 + 7, 100),
                writable(BUF2 + 107, 1941),
            ],
        );

        let first = frame(100, 5);
        let second = frame(1514, 6);
        h.inject(&sock, &[&first]);
        assert_eq!(h.rx.used_idx(&mem), 1);
        assert_eq!(h.rx.used_elem(&mem, 0), (head, 112));
        assert_rx(&mem, BUF, 1, &first);
        assert_eq!(h.interrupts(), 1);

        h.inject(&sock, &[&second]);
        assert_eq!(h.rx.used_idx(&mem), 2);
        assert_eq!(h.rx.used_elem(&mem, 1), (head2, 12 + 1514));
        assert_rx(&mem, BUF2, 1, &second);

        let c = h.net.counters();
        assert_eq!(c.completed, 2);
        assert_eq!(c.rx_bytes, 100 + 1514);
        assert_eq!(h.net.rx_dropped(), 0);
    });
}

#[test]
fn rx_merges_a_frame_over_several_chains() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(MRG_FEATURES);
        let mem = h.mem.clone();
        // The first chain splits num_buffers itself over two descriptors.
        let heads = [
            h.rx.add_chain(&mem, &[writable(BUF, 11), writable(BUF + 11, 53)]),
            h.rx.add_chain(&mem, &[writable(BUF + 64, 64)]),
            h.rx.add_chain(&mem, &[writable(BUF + 128, 64)]),
            h.rx.add_chain(&mem, &[writable(BUF + 192, 64)]),
        ];
        let f = frame(150, 7);
        h.inject(&sock, &[&f]);

        // 12 + 150 = 162 bytes: 64 + 64 + 34, the 4th chain untouched.
        assert_eq!(h.rx.used_idx(&mem), 3);
        assert_eq!(h.rx.used_elem(&mem, 0), (heads[0], 64));
        assert_eq!(h.rx.used_elem(&mem, 1), (heads[1], 64));
        assert_eq!(h.rx.used_elem(&mem, 2), (heads[2], 34));
        assert_rx(&mem, BUF, 3, &f);
        assert_eq!(h.interrupts(), 1);

        // The next frame fits the remaining chain alone.
        let small = frame(40, 8);
        h.inject(&sock, &[&small]);
        assert_eq!(h.rx.used_idx(&mem), 4);
        assert_eq!(h.rx.used_elem(&mem, 3), (heads[3], 52));
        assert_rx(&mem, BUF + 192, 1, &small);
        assert_eq!(h.net.counters().completed, 2);
    });
}

#[test]
fn rx_without_buffers_keeps_the_frame_until_the_guest_kicks() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(BASE_FEATURES | VIRTIO_RING_F_EVENT_IDX);
        let mem = h.mem.clone();
        let first = frame(300, 1);
        let second = frame(400, 2);
        h.inject(&sock, &[&first, &second]);
        assert_eq!(h.rx.used_idx(&mem), 0);
        assert_eq!(h.interrupts(), 0);
        // The TAP still holds the second frame, yet it is out of the loop:
        // no busy wakeups while the guest has no buffers.
        assert!(
            !h.ready_tokens().contains(&TAP_TOKEN),
            "TAP still polled with a frame pending"
        );

        let a = h.rx.add_chain(&mem, &[writable(BUF, 2048)]);
        let b = h.rx.add_chain(&mem, &[writable(BUF2, 2048)]);
        h.kick_rx();
        assert_eq!(h.rx.used_idx(&mem), 2);
        assert_eq!(h.rx.used_elem(&mem, 0), (a, 312));
        assert_eq!(h.rx.used_elem(&mem, 1), (b, 412));
        assert_rx(&mem, BUF, 1, &first);
        assert_rx(&mem, BUF2, 1, &second);
        assert_eq!(h.interrupts(), 1);
        assert_eq!(h.net.counters().completed, 2);

        // Polling is back: the next frame is reported by the event loop.
        sock.send(&frame(50, 3));
        wait_readable(&h.net.tap);
        assert!(h.ready_tokens().contains(&TAP_TOKEN));
    });
}

#[test]
fn oversized_rx_frame_is_dropped_and_the_next_flows() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        let mut h = Harness::new(tap);
        h.activate(BASE_FEATURES);
        let mem = h.mem.clone();
        let head = h.rx.add_chain(&mem, &[writable(BUF, 128)]);

        h.inject(&sock, &[&frame(500, 1)]);
        assert_eq!(h.net.rx_dropped(), 1);
        assert_eq!(h.rx.used_idx(&mem), 0, "the small chain was consumed");

        let small = frame(100, 2);
        h.inject(&sock, &[&small]);
        assert_eq!(h.rx.used_idx(&mem), 1);
        assert_eq!(h.rx.used_elem(&mem, 0), (head, 112));
        assert_rx(&mem, BUF, 1, &small);
        assert_eq!(h.net.rx_dropped(), 1);
        assert_eq!(h.net.counters().malformed_chains, 0);
    });
}

#[test]
fn oversized_merged_rx_frame_is_dropped_and_the_next_flows() {
    in_netns(|| {
        let (tap, sock) = tap_with_socket();
        // Four RX slots of 32 bytes can never hold 12 + 200 bytes.
        let mut h = Harness::with_sizes(tap, 4, QUEUE_SIZE);
        h.activate(MRG_FEATURES);
        let mem = h.mem.clone();
        let heads: Vec<u16> = (0..4)
            .map(|i| h.rx.add_chain(&mem, &[writable(BUF + 32 * i, 32)]))
            .collect();

        h.inject(&sock, &[&frame(200, 1)]);
        assert_eq!(h.net.rx_dropped(), 1);
        assert_eq!(h.rx.used_idx(&mem), 0);

        let small = frame(40, 2);
        h.inject(&sock, &[&small]);
        assert_eq!(h.rx.used_idx(&mem), 2);
        assert_eq!(h.rx.used_elem(&mem, 0), (heads[0], 32));
        assert_eq!(h.rx.used_elem(&mem, 1), (heads[1], 20));
        assert_rx(&mem, BUF, 2, &small);
    });
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_counted() {
    in_netns(|| {
        let mut h = Harness::new(Tap::open(&tap_name()).expect("tap"));
        h.activate(BASE_FEATURES);
        let mem = h.mem.clone();
        let bad: [&[Desc]; 5] = [
            &[readable(BUF, 2048)],
            &[writable(BUF, 12), readable(BUF + 12, 2048)],
            &[writable(MEM_SIZE - 16, 2048)],
            &[writable(u64::MAX - 8, 2048)],
            &[writable(BUF, 0)],
        ];
        let bad_heads: Vec<u16> = bad.iter().map(|c| h.rx.add_chain(&mem, c)).collect();
        h.rx.publish(&mem, QUEUE_SIZE + 1);
        let good = h.rx.add_chain(&mem, &[writable(BUF2, 2048)]);

        let mut injected = plain_header().to_vec();
        injected.extend_from_slice(&frame(80, 3));
        assert!(h.net.inject_rx_frame(&injected));

        // The out-of-range head cannot be returned; the others come back
        // empty, then the frame lands in the good chain.
        assert_eq!(h.rx.used_idx(&mem), bad.len() as u16 + 1);
        for (i, &head) in bad_heads.iter().enumerate() {
            assert_eq!(h.rx.used_elem(&mem, i as u16), (head, 0));
        }
        assert_eq!(h.rx.used_elem(&mem, bad.len() as u16), (good, 92));
        assert_rx(&mem, BUF2, 1, &injected[VNET_HDR_LEN..]);
        let c = h.net.counters();
        assert_eq!(c.malformed_chains, bad.len() as u64 + 1);
        assert_eq!(c.completed, 1);
        assert_eq!(h.interrupts(), 1);
    });
}

#[test]
fn malformed_chain_in_a_merged_frame_restarts_the_frame() {
    in_netns(|| {
        let mut h = Harness::new(Tap::open(&tap_name()).expect("tap"));
        h.activate(MRG_FEATURES);
        let mem = h.mem.clone();
        let first = h.rx.add_chain(&mem, &[writable(BUF, 32)]);
        let bad = h.rx.add_chain(&mem, &[readable(BUF + 32, 64)]);
        let tiny = h.rx.add_chain(&mem, &[writable(BUF + 96, 11)]);
        let a = h.rx.add_chain(&mem, &[writable(BUF + 0x100, 64)]);
        let b = h.rx.add_chain(&mem, &[writable(BUF + 0x200, 64)]);

        let mut injected = plain_header().to_vec();
        injected.extend_from_slice(&frame(100, 4));
        assert!(h.net.inject_rx_frame(&injected));

        // 112 bytes: the first chain filled, then the bad one aborts the
        // attempt; both go back empty, as does the chain smaller than a
        // header; the frame then takes 64 + 48.
        let used: Vec<(u16, u32)> = (0..h.rx.used_idx(&mem))
            .map(|i| h.rx.used_elem(&mem, i))
            .collect();
        assert_eq!(used, [(first, 0), (bad, 0), (tiny, 0), (a, 64), (b, 48)]);
        let got_first = read_mem(&mem, BUF + 0x100, 64);
        let got_rest = read_mem(&mem, BUF + 0x200, 48);
        let mut expected = injected.clone();
        expected[10..12].copy_from_slice(&2u16.to_le_bytes());
        assert!(got_first == expected[..64] && got_rest == expected[64..]);
        assert_eq!(h.net.counters().malformed_chains, 2);
        assert_eq!(h.net.counters().completed, 1);
    });
}

#[test]
fn inject_refuses_what_the_tap_could_not_return() {
    in_netns(|| {
        let mut h = Harness::new(Tap::open(&tap_name()).expect("tap"));
        assert!(
            !h.net.inject_rx_frame(&[0; 64]),
            "inactive device took a frame"
        );
        h.activate(BASE_FEATURES);
        assert!(!h.net.inject_rx_frame(&[0; VNET_HDR_LEN - 1]));
        assert!(!h.net.inject_rx_frame(&vec![0; FRAME_BUFFER_LEN + 1]));
        // No buffers: the frame is kept, so a second one is refused.
        assert!(h.net.inject_rx_frame(&[0; 64]));
        assert!(!h.net.inject_rx_frame(&[0; 64]));
        // Reset forgets it.
        h.net.reset();
        h.activate(BASE_FEATURES);
        assert!(h.net.inject_rx_frame(&[0; 64]));
    });
}

// ---------------------------------------------------------------------
// Snapshot and restore.

/// A net device behind a real MMIO transport, as the VMM builds it.
struct Window {
    net: Arc<Mutex<Net>>,
    transport: MmioTransport,
    epoll: Arc<Epoll>,
}

impl Window {
    fn new(mem: &GuestMemory, tap: Tap) -> Self {
        let net = Arc::new(Mutex::new(Net::with_tap(tap, GUEST_MAC)));
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
        let transport = MmioTransport::new(
            net.clone(),
            mem.clone(),
            interrupt,
            EventRegistrar::new(epoll.clone(), 0),
        )
        .expect("transport");
        Self {
            net,
            transport,
            epoll,
        }
    }

    /// Dispatches what the event loop has ready within `timeout_ms`;
    /// returns the tokens.
    fn run_events(&self, timeout_ms: i32) -> Vec<EventToken> {
        let mut events = [EpollEvent::default(); 8];
        let n = self
            .epoll
            .wait(timeout_ms, &mut events)
            .expect("epoll wait");
        let mut tokens = Vec::new();
        for ev in &events[..n] {
            let (_, token) = EventRegistrar::decode(ev.data());
            self.net
                .lock()
                .expect("net")
                .handle_event(token, ev.events());
            tokens.push(token);
        }
        tokens.sort_unstable();
        tokens
    }
}

/// Queues one TX chain (header and frame in one descriptor) at `addr`.
fn queue_tx_frame(mem: &GuestMemory, tx: &mut Driver, addr: u64, f: &[u8]) -> u16 {
    let mut chain = plain_header().to_vec();
    chain.extend_from_slice(f);
    mem.write_slice(&chain, GuestAddress(addr)).expect("frame");
    tx.add_chain(mem, &[readable(addr, chain.len() as u32)])
}

#[test]
fn restore_onto_a_new_tap_serves_what_the_guest_queued() {
    in_netns(|| {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let (tap, sock) = tap_with_socket();
        let mut old = Window::new(&mem, tap);
        let layouts = [RX_RING, TX_RING].map(|desc| QueueLayout {
            size: QUEUE_SIZE,
            desc,
            avail: desc + AVAIL_OFFSET,
            used: desc + USED_OFFSET,
        });
        drive_to_active(&mut old.transport, BASE_FEATURES, &layouts);
        let mut rx = Driver::new(RX_RING, QUEUE_SIZE);
        let mut tx = Driver::new(TX_RING, QUEUE_SIZE);

        // One frame out before the snapshot.
        let sent = frame(100, 1);
        queue_tx_frame(&mem, &mut tx, BUF, &sent);
        notify_queue(&mut old.transport, TX_QUEUE as u32);
        assert_eq!(old.run_events(0), [TX_QUEUE_TOKEN]);
        assert!(sock.recv().expect("frame on the old TAP") == sent);
        // Then an RX buffer posted and a second frame queued, not kicked.
        let rx_head = rx.add_chain(&mem, &[writable(BUF2, 2048)]);
        let queued = frame(300, 2);
        let tx_head = queue_tx_frame(&mem, &mut tx, BUF + 0x1000, &queued);
        let snap = old.transport.snapshot();
        let positions: Vec<_> = snap
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        assert_eq!(positions, [(0, 0), (1, 1)]);

        // A new process on a new TAP, memory from the memory file.
        let image = read_mem(&mem, 0, MEM_SIZE as usize);
        drop(old);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        mem.write_slice(&image, GuestAddress(0))
            .expect("restore memory");
        let (tap, sock) = tap_with_socket();
        let mut new = Window::new(&mem, tap);
        let json = serde_json::to_string(&snap).expect("serialize");
        let snap: TransportSnapshot = serde_json::from_str(&json).expect("deserialize");
        new.transport.restore(&snap).expect("restore");
        assert_eq!(new.transport.state(), TransportState::Active);

        // The restore kicks both queues: the queued frame leaves on the new
        // TAP and the used index continues.
        assert_eq!(new.run_events(0), [RX_QUEUE_TOKEN, TX_QUEUE_TOKEN]);
        assert!(sock.recv().expect("frame on the new TAP") == queued);
        assert_eq!(tx.used_idx(&mem), 2);
        assert_eq!(tx.used_elem(&mem, 1), (tx_head, 0));

        // The RX buffer posted before the snapshot takes the next frame.
        let incoming = frame(80, 3);
        sock.send(&incoming);
        assert_eq!(new.run_events(2000), [TAP_TOKEN]);
        assert_eq!(rx.used_idx(&mem), 1);
        assert_eq!(
            rx.used_elem(&mem, 0),
            (rx_head, (VNET_HDR_LEN + incoming.len()) as u32)
        );
        assert_rx(&mem, BUF2, 1, &incoming);
        let c = new.net.lock().expect("net").counters();
        assert_eq!((c.completed, c.tx_bytes, c.rx_bytes), (2, 300, 80));
    });
}

#[test]
fn queue_snapshots_follow_activation() {
    in_netns(|| {
        let mut h = Harness::new(Tap::open(&tap_name()).expect("tap"));
        assert!(h.net.queue_snapshots().is_empty());
        h.activate(BASE_FEATURES | VIRTIO_RING_F_EVENT_IDX);
        let snaps = h.net.queue_snapshots();
        let rings: Vec<_> = snaps
            .iter()
            .map(|q| (q.desc_table, q.used_ring, q.event_idx_enabled))
            .collect();
        assert_eq!(
            rings,
            [
                (RX_RING, RX_RING + USED_OFFSET, true),
                (TX_RING, TX_RING + USED_OFFSET, true)
            ]
        );
        h.net.reset();
        assert!(h.net.queue_snapshots().is_empty());
    });
}
