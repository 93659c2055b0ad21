//! One forwarded stream: a host Unix stream paired with a guest vsock port,
//! with the credit accounting of both directions.
//!
//! Counters follow the spec's names: `tx_cnt` counts bytes sent to the
//! guest, `rx_cnt` bytes received from it and `fwd_cnt` those of them handed
//! to the host stream. The guest may have at most `CONN_BUF_ALLOC` bytes
//! received but not forwarded; anything beyond is a credit violation.

use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::{
    CONN_BUF_ALLOC, HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_F_RCV, SHUTDOWN_F_SEND, TYPE_STREAM,
};
use crate::virtio::EventToken;

/// Once the guest believes less than this much of our buffer is free, a
/// credit update is sent as soon as we forward anything, so a guest that
/// does not ask (Linux mostly does not) never stalls.
const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for the guest's
    /// OP_RESPONSE (bounded by the connection's deadline).
    Connecting,
    /// Data flows.
    Established,
    /// The guest shut down both directions; the connection ends with an
    /// OP_RST once the buffered guest bytes reach the host (or the deadline
    /// passes).
    Closing,
}

/// Control packets owed to the guest, sent ahead of data.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
}

/// Why guest data was refused; both end the connection with OP_RST.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecvError {
    /// The guest sent more than the credit we gave it.
    #[error("guest exceeded its credit: {buffered} buffered + {len} > {CONN_BUF_ALLOC}")]
    CreditExceeded {
        /// Bytes already waiting for the host stream.
        buffered: usize,
        /// Bytes in the offending packet.
        len: usize,
    },
    /// The guest sent data after promising not to.
    #[error("guest sent data after shutting down its send side")]
    AfterShutdown,
    /// Writing to the host stream failed.
    #[error("write to host stream")]
    Io(#[from] io::Error),
}

/// What filling one guest RX buffer produced.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RxOutcome {
    /// A packet was written; `used` bytes of the chain, `data` of them
    /// payload.
    Packet { used: u32, data: u32 },
    /// Nothing to send right now.
    Idle,
    /// Reading the host stream failed: the connection must be reset.
    Kill,
}

/// Header fields of a packet the device sends to the guest.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reply {
    pub local_port: u32,
    pub peer_port: u32,
    pub op: u16,
    pub flags: u32,
    pub len: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Reply {
    /// Writes this header into a guest RX packet; returns the used length.
    /// Every field is set, so stale guest bytes never leak through.
    pub fn write(&self, pkt: &mut VsockPacket<'_, ()>, guest_cid: u64) -> u32 {
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(guest_cid)
            .set_src_port(self.local_port)
            .set_dst_port(self.peer_port)
            .set_len(self.len)
            .set_type(TYPE_STREAM)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
        // PKT_HEADER_SIZE is 44 and len <= MAX_PKT_DATA: no overflow.
        PKT_HEADER_SIZE as u32 + self.len
    }
}

/// A forwarded stream.
#[derive(Debug)]
pub(super) struct Connection {
    pub stream: UnixStream,
    pub token: EventToken,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// When a connecting or closing connection is given up.
    pub deadline: Option<Instant>,
    /// Set while the connection sits in the muxer's RX work list.
    pub in_rx_list: bool,
    pending: Pending,
    /// The host stream may have bytes (or EOF) for the guest. Cleared only
    /// when a read would block: the stream is registered edge-triggered.
    host_readable: bool,
    /// The host stream reached EOF; OP_SHUTDOWN(SEND) has been sent.
    host_eof: bool,
    /// `SHUTDOWN_F_*` bits the guest sent.
    peer_shutdown: u32,
    /// The write half of the host stream was shut after the guest's
    /// SHUTDOWN(SEND) and the buffer drained.
    host_write_shut: bool,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest bytes the host stream did not take yet: `tx_buf[tx_start..]`.
    tx_buf: Vec<u8>,
    tx_start: usize,
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// An OP_CREDIT_REQUEST went out and no guest packet answered yet.
    credit_requested: bool,
}

impl Connection {
    /// A connection the guest asked for and the host socket accepted.
    pub fn guest_initiated(
        stream: UnixStream,
        token: EventToken,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        let mut conn = Self::new(stream, token, local_port, peer_port, ConnState::Established);
        conn.update_peer_credit(peer_buf_alloc, peer_fwd_cnt);
        conn.pending.response = true;
        // Whatever the host wrote before the guest's first RX buffer is
        // picked up without waiting for another edge.
        conn.host_readable = true;
        conn
    }

    /// A host client's connection to the guest, waiting for OP_RESPONSE.
    pub fn host_initiated(
        stream: UnixStream,
        token: EventToken,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, token, local_port, peer_port, ConnState::Connecting);
        conn.pending.request = true;
        conn.deadline = Some(deadline);
        conn
    }

    fn new(
        stream: UnixStream,
        token: EventToken,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
    ) -> Self {
        Self {
            stream,
            token,
            local_port,
            peer_port,
            state,
            deadline: None,
            in_rx_list: false,
            pending: Pending::default(),
            host_readable: false,
            host_eof: false,
            peer_shutdown: 0,
            host_write_shut: false,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: Vec::new(),
            tx_start: 0,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
        }
    }

    /// Every guest packet carries its receive buffer state.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        self.credit_requested = false;
    }

    /// Bytes we may still send to the guest. A guest reporting a `fwd_cnt`
    /// ahead of what we sent gets no more than its `buf_alloc`.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes not yet written to the host stream.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len().saturating_sub(self.tx_start)
    }

    /// The guest accepted our OP_REQUEST: tell the host client which local
    /// port it got. The line is a few bytes on a fresh socket, so a short
    /// write means the client is gone or misbehaving.
    pub fn accept_response(&mut self) -> io::Result<()> {
        let line = format!("OK {}\n", self.local_port);
        let written = self.stream.write(line.as_bytes())?;
        if written != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write of the OK line: {written} of {}", line.len()),
            ));
        }
        self.state = ConnState::Established;
        self.deadline = None;
        // The client may have written before reading the OK line.
        self.host_readable = true;
        Ok(())
    }

    /// The host stream reported readiness to read (or hang-up, or error: a
    /// read tells which).
    pub fn set_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// OP_CREDIT_REQUEST from the guest.
    pub fn request_credit_update(&mut self) {
        self.pending.credit_update = true;
    }

    /// OP_SHUTDOWN from the guest.
    pub fn peer_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (SHUTDOWN_F_RCV | SHUTDOWN_F_SEND);
        if self.peer_shutdown == SHUTDOWN_F_RCV | SHUTDOWN_F_SEND {
            self.state = ConnState::Closing;
        }
        self.shut_host_write_if_drained();
    }

    /// Whether neither side will send anything more and every guest byte
    /// reached the host: the connection ends with OP_RST.
    pub fn is_done(&self) -> bool {
        let guest_done = self.peer_shutdown & SHUTDOWN_F_SEND != 0;
        let host_done = self.host_eof || self.peer_shutdown & SHUTDOWN_F_RCV != 0;
        guest_done && host_done && self.buffered() == 0
    }

    /// Guest data for the host stream: written straight through when
    /// nothing is buffered, the rest buffered within our advertised space.
    pub fn recv_from_guest(&mut self, data: &VolatileSlice<'_, ()>) -> Result<(), RecvError> {
        if self.peer_shutdown & SHUTDOWN_F_SEND != 0 || self.state == ConnState::Closing {
            return Err(RecvError::AfterShutdown);
        }
        let len = data.len();
        let buffered = self.buffered();
        if buffered.saturating_add(len) > CONN_BUF_ALLOC as usize {
            return Err(RecvError::CreditExceeded { buffered, len });
        }
        // len <= CONN_BUF_ALLOC, so it fits in u32.
        self.rx_cnt += Wrapping(len as u32);

        let mut rest = data.offset(0).map_err(volatile_to_io)?;
        if buffered == 0 {
            while !rest.is_empty() {
                match self.stream.write_volatile(&rest) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.fwd_cnt += Wrapping(n as u32);
                        rest = rest.offset(n).map_err(volatile_to_io)?;
                    }
                    Err(e) => match volatile_to_io(e) {
                        e if e.kind() == io::ErrorKind::WouldBlock => break,
                        e if e.kind() == io::ErrorKind::Interrupted => continue,
                        e => return Err(RecvError::Io(e)),
                    },
                }
            }
        }
        if !rest.is_empty() {
            self.compact();
            self.tx_buf.write_volatile(&rest).map_err(volatile_to_io)?;
        }
        self.check_credit_update();
        Ok(())
    }

    /// Writes buffered guest bytes to the host stream (on EPOLLOUT).
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while self.tx_start < self.tx_buf.len() {
            let Some(chunk) = self.tx_buf.get(self.tx_start..) else {
                break;
            };
            match self.stream.write(chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_start += n;
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.buffered() == 0 {
            self.tx_buf = Vec::new();
            self.tx_start = 0;
        }
        self.check_credit_update();
        self.shut_host_write_if_drained();
        Ok(())
    }

    /// Passes the guest's SHUTDOWN(SEND) on to the host client once every
    /// buffered byte reached it.
    fn shut_host_write_if_drained(&mut self) {
        if self.buffered() != 0 {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_F_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // The host client may already be gone; the guest is done
            // sending either way.
            if let Err(e) = self.stream.shutdown(std::net::Shutdown::Write) {
                tracing::debug!("vsock: shut host stream port {}: {e}", self.local_port);
            }
        }
    }

    /// Drops the forwarded prefix of the buffer before it grows again.
    fn compact(&mut self) {
        if self.tx_start > 0 {
            self.tx_buf.drain(..self.tx_start);
            self.tx_start = 0;
        }
    }

    fn check_credit_update(&mut self) {
        if self.fwd_cnt == self.last_fwd_cnt_sent {
            return;
        }
        let unacked = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        if CONN_BUF_ALLOC.saturating_sub(unacked) < CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    fn wants_data(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_F_RCV == 0
    }

    /// Whether [`Self::fill_rx`] could produce a packet now.
    pub fn has_rx_work(&self) -> bool {
        let p = self.pending;
        p.request
            || p.response
            || p.credit_update
            || (self.wants_data() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    fn reply(&mut self, op: u16, flags: u32, len: u32) -> Reply {
        // Every packet carries our receive state, so no separate credit
        // update is owed after this one.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        Reply {
            local_port: self.local_port,
            peer_port: self.peer_port,
            op,
            flags,
            len,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Writes the next packet owed to the guest into `pkt`: control replies
    /// first, then host stream data within the guest's credit.
    pub fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>, guest_cid: u64) -> RxOutcome {
        let control = if self.pending.request {
            self.pending.request = false;
            Some(OP_REQUEST)
        } else if self.pending.response {
            self.pending.response = false;
            Some(OP_RESPONSE)
        } else {
            None
        };
        if let Some(op) = control {
            let used = self.reply(op, 0, 0).write(pkt, guest_cid);
            return RxOutcome::Packet { used, data: 0 };
        }

        if self.wants_data() {
            match self.read_host(pkt, guest_cid) {
                RxOutcome::Idle => {}
                outcome => return outcome,
            }
        }

        if self.pending.credit_update {
            let used = self.reply(OP_CREDIT_UPDATE, 0, 0).write(pkt, guest_cid);
            return RxOutcome::Packet { used, data: 0 };
        }
        RxOutcome::Idle
    }

    /// Reads host stream bytes straight into the guest buffer.
    fn read_host(&mut self, pkt: &mut VsockPacket<'_, ()>, guest_cid: u64) -> RxOutcome {
        let credit = self.peer_credit();
        if credit == 0 {
            if self.credit_requested {
                return RxOutcome::Idle;
            }
            self.credit_requested = true;
            let used = self.reply(OP_CREDIT_REQUEST, 0, 0).write(pkt, guest_cid);
            return RxOutcome::Packet { used, data: 0 };
        }
        let Some(data) = pkt.data_slice() else {
            return RxOutcome::Idle;
        };
        let room = data.len().min(credit as usize).min(MAX_PKT_DATA as usize);
        let Ok(mut dst) = data.subslice(0, room) else {
            return RxOutcome::Idle;
        };
        loop {
            return match self.stream.read_volatile(&mut dst) {
                Ok(0) => {
                    self.host_eof = true;
                    self.host_readable = false;
                    let used = self
                        .reply(OP_SHUTDOWN, SHUTDOWN_F_SEND, 0)
                        .write(pkt, guest_cid);
                    RxOutcome::Packet { used, data: 0 }
                }
                Ok(n) => {
                    // n <= room <= MAX_PKT_DATA.
                    let n = n as u32;
                    self.tx_cnt += Wrapping(n);
                    let used = self.reply(OP_RW, 0, n).write(pkt, guest_cid);
                    RxOutcome::Packet { used, data: n }
                }
                Err(e) => match volatile_to_io(e) {
                    e if e.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                        RxOutcome::Idle
                    }
                    e if e.kind() == io::ErrorKind::Interrupted => continue,
                    e => {
                        tracing::debug!("vsock: read host stream port {}: {e}", self.local_port);
                        RxOutcome::Kill
                    }
                },
            };
        }
    }
}

fn volatile_to_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}
