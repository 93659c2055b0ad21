//! The connection table: host sockets on one side, guest packets on the
//! other.
//!
//! Host streams are registered edge-triggered: readiness is remembered per
//! connection and cleared only when a read would block, so a guest that
//! posts no RX buffers leaves host bytes in the socket without the event
//! loop spinning, and a later RX kick resumes from the RX work list.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::mem::offset_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_common::error_chain;
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::EventSet;

use super::connect::{ConnectParser, ConnectStatus};
use super::connection::{ConnState, Connection, RecvError, Reply, RxOutcome};
use super::{
    CONNECT_TIMEOUT, FIRST_HOST_PORT, HOST_CID, MAX_CONNECTIONS, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};
use crate::virtio::{DeviceCounters, EventRegistrar, EventToken};

/// First event token handed to host streams; lower ones are the queues and
/// the listener.
pub(super) const FIRST_CONN_TOKEN: EventToken = 16;
/// Standalone OP_RSTs (for connections no longer in the table) waiting for
/// guest RX buffers. Past this the device stops taking TX packets until the
/// guest drains RX, so replies are never dropped for a well-behaved guest.
const RST_QUEUE_MAX: usize = 1024;
/// Connections accepted per listener event; more wait for the next
/// (level-triggered) event so one burst cannot monopolise the loop.
const ACCEPT_BATCH: usize = 64;

/// Host streams are watched edge-triggered (see the module docs).
fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// A connection's identity: host-side port and guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// An accepted host client that has not finished its CONNECT line.
#[derive(Debug)]
struct PendingConnect {
    stream: UnixStream,
    parser: ConnectParser,
    deadline: Instant,
}

/// What reading a CONNECT line came to.
enum ConnectOutcome {
    Port(u32),
    Close(String),
}

/// The connection table of one activated device.
#[derive(Debug)]
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    events: EventRegistrar,
    conns: HashMap<ConnKey, Connection>,
    by_token: HashMap<EventToken, ConnKey>,
    pending: HashMap<EventToken, PendingConnect>,
    /// Connections with something for the guest, served round-robin.
    rx_list: VecDeque<ConnKey>,
    /// OP_RSTs owed to the guest for connections not (or no longer) in the
    /// table.
    rst_queue: VecDeque<ConnKey>,
    next_token: EventToken,
    next_local_port: u32,
    /// The earliest deadline of any pending or connection, so sweeping costs
    /// nothing until one can have expired.
    next_deadline: Option<Instant>,
    /// Timeout for CONNECT lines, guest responses and closing drains.
    pub timeout: Duration,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, events: EventRegistrar) -> Self {
        Self {
            guest_cid,
            uds_path,
            events,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            rx_list: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_HOST_PORT,
            next_deadline: None,
            timeout: CONNECT_TIMEOUT,
        }
    }

    /// Forwarded connections in the table.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients still sending their CONNECT line.
    #[cfg(test)]
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
    }

    /// Whether a packet is waiting for a guest RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_list.is_empty()
    }

    /// Whether TX processing should pause until the guest drains RX.
    pub fn rx_backlogged(&self) -> bool {
        self.rst_queue.len() >= RST_QUEUE_MAX
    }

    /// No deadline passes before this one (it may be earlier than any left: a
    /// connection that got its answer keeps it until the next sweep).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_deadline
    }

    fn set_deadline_hint(&mut self, deadline: Instant) {
        self.next_deadline = Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
    }

    fn alloc_token(&mut self) -> Option<EventToken> {
        // At most MAX_CONNECTIONS tokens are live, so this many tries always
        // find a free one.
        for _ in 0..=MAX_CONNECTIONS {
            let token = self.next_token;
            self.next_token = token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if !self.by_token.contains_key(&token) && !self.pending.contains_key(&token) {
                return Some(token);
            }
        }
        None
    }

    /// The next host-side port, counting up from `FIRST_HOST_PORT` and
    /// skipping ports any connection uses.
    fn alloc_local_port(&mut self) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are in use.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// Queues an OP_RST for a connection outside the table. Past the cap
    /// the guest is not draining RX at all; it loses the reply.
    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < RST_QUEUE_MAX {
            self.rst_queue.push_back(key);
        } else {
            tracing::debug!("vsock: RST queue full, dropping RST for {key:?}");
        }
    }

    /// Puts a connection on the RX work list if it has something to send.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key)
            && !conn.in_rx_list
            && conn.has_rx_work()
        {
            conn.in_rx_list = true;
            self.rx_list.push_back(key);
        }
    }

    /// Removes a connection and unregisters its stream; with `notify` the
    /// guest is told with an OP_RST.
    fn kill(&mut self, key: ConnKey, notify: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            self.events.remove(conn.stream.as_raw_fd());
            self.by_token.remove(&conn.token);
            if notify {
                self.queue_rst(key);
            }
        }
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        if let Some(deadline) = conn.deadline {
            self.set_deadline_hint(deadline);
        }
        self.by_token.insert(conn.token, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Drops every forwarded connection without telling the guest (after a
    /// transport reset the guest has already forgotten them).
    pub fn drop_connections(&mut self) {
        for (_, conn) in self.conns.drain() {
            self.events.remove(conn.stream.as_raw_fd());
        }
        self.by_token.clear();
        self.rx_list.clear();
        self.rst_queue.clear();
    }

    /// Drops everything, host clients mid-CONNECT included (device reset).
    pub fn clear(&mut self) {
        self.drop_connections();
        for (_, pending) in self.pending.drain() {
            self.events.remove(pending.stream.as_raw_fd());
        }
        self.next_deadline = None;
    }

    /// Accepts host clients on the device's listener.
    pub fn accept(&mut self, listener: &UnixListener, counters: &mut DeviceCounters) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::warn_limited!("vsock: accept on {}: {e}", self.uds_path.display());
                    counters.io_errors += 1;
                    return;
                }
            };
            // Closing at once (rather than leaving it in the backlog) keeps
            // the level-triggered listener from firing forever.
            if self.at_capacity() {
                tracing::debug!("vsock: {MAX_CONNECTIONS} connections open, refusing host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                crate::warn_limited!("vsock: set host client non-blocking: {e}");
                counters.io_errors += 1;
                continue;
            }
            let Some(token) = self.alloc_token() else {
                continue;
            };
            if let Err(e) = self.events.add(stream.as_raw_fd(), token, EventSet::IN) {
                crate::warn_limited!("vsock: register host client: {e}");
                counters.io_errors += 1;
                continue;
            }
            let deadline = Instant::now() + self.timeout;
            self.set_deadline_hint(deadline);
            self.pending.insert(
                token,
                PendingConnect {
                    stream,
                    parser: ConnectParser::new(),
                    deadline,
                },
            );
        }
    }

    /// An event on a host stream (pending or forwarded). Unknown tokens (a
    /// stream closed earlier in the same epoll batch) are ignored.
    pub fn handle_stream_event(
        &mut self,
        token: EventToken,
        events: u32,
        counters: &mut DeviceCounters,
    ) {
        if self.pending.contains_key(&token) {
            self.read_connect(token, counters);
            return;
        }
        let Some(&key) = self.by_token.get(&token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if events & readable != 0 {
            conn.set_host_readable();
        }
        if conn.buffered() > 0 {
            if let Err(e) = conn.flush_to_host() {
                tracing::debug!("vsock: write host stream port {}: {e}", key.local_port);
                counters.io_errors += 1;
                self.kill(key, true);
                return;
            }
            if conn.is_done() {
                self.kill(key, true);
                return;
            }
        }
        self.schedule(key);
    }

    /// Reads a host client's CONNECT line one byte at a time: whatever
    /// follows the newline belongs to the guest stream and stays in the
    /// socket.
    fn read_connect(&mut self, token: EventToken, counters: &mut DeviceCounters) {
        let Some(pending) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // The parser finishes within CONNECT_LINE_MAX bytes, bounding this.
        let outcome = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break ConnectOutcome::Close("closed before the newline".into()),
                Ok(_) => match pending.parser.push(byte[0]) {
                    Ok(ConnectStatus::Incomplete) => continue,
                    Ok(ConnectStatus::Done(port)) => break ConnectOutcome::Port(port),
                    Err(e) => break ConnectOutcome::Close(e.to_string()),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break ConnectOutcome::Close(e.to_string()),
            }
        };
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        match outcome {
            ConnectOutcome::Port(port) => {
                self.connect_to_guest(token, pending.stream, port, counters)
            }
            ConnectOutcome::Close(why) => {
                tracing::debug!("vsock: host client dropped: {why}");
                self.events.remove(pending.stream.as_raw_fd());
            }
        }
    }

    /// A host client asked for guest `port`: send the guest OP_REQUEST.
    fn connect_to_guest(
        &mut self,
        token: EventToken,
        stream: UnixStream,
        port: u32,
        counters: &mut DeviceCounters,
    ) {
        let Some(local_port) = self.alloc_local_port() else {
            tracing::debug!("vsock: no free host port for a connection to guest port {port}");
            self.events.remove(stream.as_raw_fd());
            return;
        };
        if let Err(e) = self.events.modify(stream.as_raw_fd(), token, conn_events()) {
            crate::warn_limited!("vsock: re-register host client: {e}");
            counters.io_errors += 1;
            self.events.remove(stream.as_raw_fd());
            return;
        }
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let deadline = Instant::now() + self.timeout;
        let conn = Connection::host_initiated(stream, token, local_port, port, deadline);
        self.insert(key, conn);
    }

    /// Gives up on host clients and connections whose deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        match self.next_deadline {
            Some(deadline) if deadline <= now => {}
            _ => return,
        }
        let expired: Vec<EventToken> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(pending) = self.pending.remove(&token) {
                tracing::debug!("vsock: host client sent no CONNECT line in time");
                self.events.remove(pending.stream.as_raw_fd());
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!("vsock: connection {key:?} timed out");
            self.kill(key, true);
        }
        let pending = self.pending.values().map(|p| p.deadline);
        let conns = self.conns.values().filter_map(|c| c.deadline);
        self.next_deadline = pending.chain(conns).min();
    }

    /// Whether `pkt`'s header is one the device handles: from the guest's CID to the host,
    /// a stream packet with a known op. A bad one is counted as malformed and, unless it is
    /// an RST, its connection is reset.
    fn check_header(
        &mut self,
        key: ConnKey,
        pkt: &VsockPacket<'_, ()>,
        counters: &mut DeviceCounters,
    ) -> bool {
        // A spoofed source or a packet for another CID gets no reply.
        if pkt.src_cid() != self.guest_cid || pkt.dst_cid() != HOST_CID {
            tracing::debug!(
                "vsock: dropping packet {} -> {} (guest cid {})",
                pkt.src_cid(),
                pkt.dst_cid(),
                self.guest_cid
            );
            counters.malformed_chains += 1;
            return false;
        }
        let op = pkt.op();
        if pkt.type_() != TYPE_STREAM
            || !matches!(
                op,
                OP_REQUEST
                    | OP_RESPONSE
                    | OP_RST
                    | OP_SHUTDOWN
                    | OP_RW
                    | OP_CREDIT_UPDATE
                    | OP_CREDIT_REQUEST
            )
        {
            tracing::debug!("vsock: bad packet type {} op {op}", pkt.type_());
            counters.malformed_chains += 1;
            if op != OP_RST {
                self.kill(key, false);
                self.queue_rst(key);
            }
            return false;
        }
        true
    }

    /// Handles one packet from the guest's TX queue. Returns false when its
    /// header was invalid (counted as malformed).
    pub fn handle_tx(&mut self, pkt: &VsockPacket<'_, ()>, counters: &mut DeviceCounters) -> bool {
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if !self.check_header(key, pkt, counters) {
            return false;
        }
        let op = pkt.op();

        if op == OP_REQUEST {
            self.guest_connect(key, pkt, counters);
            return true;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            // Never answer an RST with an RST: two devices could ping-pong.
            if op != OP_RST {
                self.queue_rst(key);
            }
            return true;
        };
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());

        match op {
            OP_RST => {
                self.kill(key, false);
                return true;
            }
            OP_RESPONSE => {
                if conn.state != ConnState::Connecting {
                    tracing::debug!("vsock: unexpected RESPONSE on {key:?}");
                    self.kill(key, true);
                    return true;
                }
                if let Err(e) = conn.accept_response() {
                    tracing::debug!("vsock: host client of {key:?} gone: {e}");
                    counters.io_errors += 1;
                    self.kill(key, true);
                    return true;
                }
            }
            OP_RW => {
                if conn.state == ConnState::Connecting {
                    tracing::debug!("vsock: data before RESPONSE on {key:?}");
                    self.kill(key, true);
                    return true;
                }
                if let Some(data) = pkt.data_slice() {
                    match conn.recv_from_guest(data) {
                        Ok(()) => counters.tx_bytes += data.len() as u64,
                        Err(e) => {
                            tracing::debug!("vsock: {key:?}: {}", error_chain(&e));
                            if matches!(e, RecvError::Io(_)) {
                                counters.io_errors += 1;
                            }
                            self.kill(key, true);
                            return true;
                        }
                    }
                }
            }
            OP_SHUTDOWN => {
                conn.peer_shutdown(pkt.flags());
                if conn.state == ConnState::Closing && conn.deadline.is_none() {
                    let deadline = Instant::now() + self.timeout;
                    conn.deadline = Some(deadline);
                    self.set_deadline_hint(deadline);
                }
            }
            OP_CREDIT_REQUEST => conn.request_credit_update(),
            // The credit fields were applied above.
            _ => {}
        }
        if self.conns.get(&key).is_some_and(Connection::is_done) {
            self.kill(key, true);
            return true;
        }
        self.schedule(key);
        true
    }

    /// OP_REQUEST from the guest to host port `key.local_port`: connect to
    /// `<uds_path>_<port>`. The port number is the only guest input in the
    /// path.
    fn guest_connect(
        &mut self,
        key: ConnKey,
        pkt: &VsockPacket<'_, ()>,
        counters: &mut DeviceCounters,
    ) {
        if self.conns.contains_key(&key) {
            tracing::debug!("vsock: duplicate REQUEST for {key:?}");
            self.kill(key, true);
            return;
        }
        if self.at_capacity() {
            tracing::debug!("vsock: {MAX_CONNECTIONS} connections open, refusing {key:?}");
            self.queue_rst(key);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("vsock: connect {}: {e}", Path::new(&path).display());
                counters.io_errors += 1;
                self.queue_rst(key);
                return;
            }
        };
        let Some(token) = self.alloc_token() else {
            self.queue_rst(key);
            return;
        };
        if let Err(e) = self.events.add(stream.as_raw_fd(), token, conn_events()) {
            crate::warn_limited!("vsock: register host stream: {e}");
            counters.io_errors += 1;
            self.queue_rst(key);
            return;
        }
        let conn = Connection::guest_initiated(
            stream,
            token,
            key.local_port,
            key.peer_port,
            pkt.buf_alloc(),
            pkt.fwd_cnt(),
        );
        self.insert(key, conn);
    }

    /// Writes the next packet owed to the guest into `pkt` (an RX buffer
    /// with room for data). Returns the used length, or `None` when nothing
    /// is owed after all (the caller puts the buffer back).
    pub fn fill_rx(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        counters: &mut DeviceCounters,
    ) -> Option<u32> {
        if let Some(key) = self.rst_queue.pop_front() {
            return Some(rst_reply(key).write(pkt, self.guest_cid));
        }
        while let Some(key) = self.rx_list.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            match conn.fill_rx(pkt, self.guest_cid) {
                RxOutcome::Packet { used, data } => {
                    counters.rx_bytes += u64::from(data);
                    if conn.is_done() {
                        self.kill(key, true);
                    } else {
                        self.schedule(key);
                    }
                    return Some(used);
                }
                RxOutcome::Idle => {}
                RxOutcome::Kill => {
                    counters.io_errors += 1;
                    self.kill(key, false);
                    return Some(rst_reply(key).write(pkt, self.guest_cid));
                }
            }
        }
        None
    }
}

fn rst_reply(key: ConnKey) -> Reply {
    Reply {
        local_port: key.local_port,
        peer_port: key.peer_port,
        op: OP_RST,
        flags: 0,
        len: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

/// Connects a non-blocking Unix stream socket to `path`. Unix stream
/// connects complete or fail at once (a full backlog is EAGAIN), so the
/// event loop never waits on a slow host service.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // Keep the terminating NUL inside sun_path.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} too long", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes only integer arguments; the result is checked
    // before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let len = offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the
    // call, and `len` is within its size (checked above).
    let ret = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}
