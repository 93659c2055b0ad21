//! A session's two tasks: the reader, which decodes and dispatches the peer's frames,
//! and the writer, the only one to write the connection.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use super::SpdyError;
use super::frame::{
    self, FLAG_FIN, FLAG_UNIDIRECTIONAL, Frame, GOAWAY_PROTOCOL_ERROR,
    SETTINGS_INITIAL_WINDOW_SIZE, Setting, status,
};
use super::headers::{HeaderDecoder, HeaderEncoder};
use super::state::{INITIAL_WINDOW, MAX_CTL_PENDING, MAX_STREAMS, Out, Shared, StreamShared, lock};

/// Bytes the writer gathers from its queues before one write.
const WRITE_BATCH: usize = 64 << 10;
const MAX_WINDOW: i64 = 0x7fff_ffff;
/// How long a stopping session still tries to write what it has queued.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub(crate) fn spawn<T>(
    io: T,
    shared: Arc<Shared>,
    ctl_rx: mpsc::UnboundedReceiver<Out>,
    data_rx: mpsc::Receiver<Out>,
) where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (r, w) = tokio::io::split(io);
    // Our window, announced first: it tells the peer this side does flow control.
    shared.send_ctl(Out::Frame(Frame::Settings {
        flags: 0,
        entries: vec![Setting {
            flags: 0,
            id: SETTINGS_INITIAL_WINDOW_SIZE,
            value: INITIAL_WINDOW,
        }],
    }));
    let writer = tokio::spawn(write_loop(w, shared.clone(), ctl_rx, data_rx));
    tokio::spawn(async move {
        let mut reader = Reader {
            shared: shared.clone(),
            headers: HeaderDecoder::new(),
        };
        match reader.run(r).await {
            Ok(()) => tracing::debug!("SPDY session ended"),
            Err(e) => {
                tracing::debug!(error = %crate_error_chain(&e), "SPDY session failed");
                if matches!(e, SpdyError::Frame(_) | SpdyError::Header(_)) {
                    shared.send_ctl(Out::Frame(Frame::GoAway {
                        last_good_stream_id: lock(&shared.state).last_peer_id,
                        status: GOAWAY_PROTOCOL_ERROR,
                    }));
                }
            }
        }
        shared.end();
        if let Err(e) = writer.await {
            tracing::warn!(error = %e, "SPDY writer task failed");
        }
        shared.done.send_replace(true);
    });
}

fn crate_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn write_loop<W: AsyncWrite>(
    mut w: WriteHalf<W>,
    shared: Arc<Shared>,
    mut ctl_rx: mpsc::UnboundedReceiver<Out>,
    mut data_rx: mpsc::Receiver<Out>,
) {
    let mut encoder = match HeaderEncoder::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %crate_error_chain(&e), "SPDY header compressor");
            shared.end();
            return;
        }
    };
    let mut stop_rx = shared.stop.subscribe();
    let mut stop = pin!(stop_rx.wait_for(|s| *s));
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    let mut stopping = false;
    loop {
        let first = tokio::select! {
            biased;
            Some(out) = ctl_rx.recv() => Some((out, true)),
            Some(out) = data_rx.recv() => Some((out, false)),
            _ = &mut stop, if !stopping => None,
        };
        match first {
            Some(item) => push(&shared, &mut encoder, &mut buf, item),
            None => stopping = true,
        }
        // Gather what else is ready (control first), all of it when stopping.
        while stopping || buf.len() < WRITE_BATCH {
            let next = match ctl_rx.try_recv() {
                Ok(out) => (out, true),
                Err(_) => match data_rx.try_recv() {
                    Ok(out) => (out, false),
                    Err(_) => break,
                },
            };
            push(&shared, &mut encoder, &mut buf, next);
        }
        let written = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        let result = tokio::select! {
            r = written => r,
            // A session told to stop does not wait long on a peer that stopped reading.
            () = shared.stopped_for(STOP_GRACE) => {
                stopping = true;
                Ok(())
            }
        };
        buf.clear();
        shared.ctl_room.notify_waiters();
        if let Err(e) = result {
            tracing::debug!(error = %e, "SPDY write failed");
            shared.end();
            return;
        }
        if stopping {
            let _ = w.shutdown().await;
            return;
        }
    }
}

/// Encodes one queued item into `buf`.
fn push(shared: &Shared, encoder: &mut HeaderEncoder, buf: &mut BytesMut, (out, ctl): (Out, bool)) {
    if ctl {
        shared.ctl_pending.fetch_sub(1, Ordering::AcqRel);
    }
    let frame = match out {
        Out::Frame(f) => f,
        Out::SynStream { stream_id, headers } => match encoder.encode(&headers) {
            Ok(header_block) => Frame::SynStream {
                stream_id,
                associated_id: 0,
                priority: 0,
                flags: 0,
                header_block,
            },
            Err(e) => return header_failure(&e),
        },
        Out::SynReply { stream_id, headers } => match encoder.encode(&headers) {
            Ok(header_block) => Frame::SynReply {
                stream_id,
                flags: 0,
                header_block,
            },
            Err(e) => return header_failure(&e),
        },
    };
    frame::encode(&frame, buf);
}

fn header_failure(e: &super::HeaderError) {
    tracing::warn!(error = %crate_error_chain(e), "SPDY header block not sent");
}

impl Shared {
    /// Resolves `grace` after the session was asked to stop.
    async fn stopped_for(&self, grace: Duration) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    }
}

struct Reader {
    shared: Arc<Shared>,
    headers: HeaderDecoder,
}

impl Reader {
    async fn run<R: AsyncRead>(&mut self, mut r: ReadHalf<R>) -> Result<(), SpdyError> {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut stop_rx = self.shared.stop.subscribe();
        let mut stop = pin!(stop_rx.wait_for(|s| *s));
        loop {
            while let Some((frame, n)) = frame::decode(&buf)? {
                buf.advance(n);
                self.handle(frame).await?;
            }
            self.wait_ctl_room().await;
            buf.reserve(16 << 10);
            tokio::select! {
                n = r.read_buf(&mut buf) => {
                    if n.map_err(SpdyError::Io)? == 0 {
                        return Ok(());
                    }
                }
                _ = &mut stop => return Ok(()),
            }
        }
    }

    /// Stops reading while the writer is far behind on control frames (a peer
    /// flooding PINGs without reading the answers).
    async fn wait_ctl_room(&self) {
        loop {
            let mut room = pin!(self.shared.ctl_room.notified());
            room.as_mut().enable();
            let stopping = *self.shared.stop.borrow();
            if stopping || self.shared.ctl_pending.load(Ordering::Acquire) < MAX_CTL_PENDING {
                return;
            }
            room.await;
        }
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), SpdyError> {
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                header_block,
                ..
            } => {
                let headers = self.headers.decode(&header_block)?;
                self.syn_stream(stream_id, flags, headers);
            }
            Frame::SynReply {
                stream_id,
                flags,
                header_block,
            } => {
                self.headers.decode(&header_block)?;
                self.syn_reply(stream_id, flags);
            }
            Frame::Headers {
                stream_id,
                flags,
                header_block,
            } => {
                self.headers.decode(&header_block)?;
                if flags & FLAG_FIN != 0 {
                    self.remote_fin(stream_id);
                }
            }
            Frame::RstStream { stream_id, status } => {
                if let Some(stream) = self.stream(stream_id) {
                    self.shared.reset_stream(&stream, status, false);
                }
            }
            Frame::Settings { entries, .. } => self.settings(&entries),
            Frame::Ping { id } => self.ping(id),
            Frame::GoAway {
                last_good_stream_id,
                ..
            } => self.goaway(last_good_stream_id),
            Frame::WindowUpdate { stream_id, delta } => self.window_update(stream_id, delta),
            Frame::Data {
                stream_id,
                flags,
                data,
            } => self.data(stream_id, flags, data).await,
            Frame::Unknown { frame_type } => {
                tracing::debug!(frame_type, "skipping an unknown SPDY control frame");
            }
        }
        Ok(())
    }

    fn stream(&self, id: u32) -> Option<Arc<StreamShared>> {
        lock(&self.shared.state).streams.get(&id).cloned()
    }

    fn rst(&self, stream_id: u32, code: u32) {
        self.shared.send_ctl(Out::Frame(Frame::RstStream {
            stream_id,
            status: code,
        }));
    }

    fn syn_stream(&mut self, id: u32, flags: u8, headers: super::Headers) {
        let peers = (id % 2 == 1) == self.shared.server;
        let mut state = lock(&self.shared.state);
        if !peers || id <= state.last_peer_id {
            drop(state);
            tracing::debug!(id, "SYN_STREAM with a bad stream id");
            return self.rst(id, status::PROTOCOL_ERROR);
        }
        state.last_peer_id = id;
        let refuse = state.goaway_sent || state.closed || state.streams.len() >= MAX_STREAMS;
        let Some(incoming) = state.incoming.clone().filter(|_| !refuse) else {
            drop(state);
            return self.rst(id, status::REFUSED_STREAM);
        };
        let stream = StreamShared::new(id, state.peer_initial_window);
        {
            let mut st = lock(&stream.st);
            st.remote_fin = flags & FLAG_FIN != 0;
            st.local_fin = flags & FLAG_UNIDIRECTIONAL != 0;
            st.replied = true;
        }
        state.streams.insert(id, stream.clone());
        drop(state);
        if incoming.send((stream.clone(), headers)).is_err() {
            self.shared
                .reset_stream(&stream, status::REFUSED_STREAM, true);
        }
    }

    fn syn_reply(&self, id: u32, flags: u8) {
        let Some(stream) = self.stream(id) else {
            return;
        };
        {
            let mut st = lock(&stream.st);
            if st.replied {
                return;
            }
            st.replied = true;
        }
        stream.writable.notify_waiters();
        if flags & FLAG_FIN != 0 {
            self.remote_fin(id);
        }
    }

    fn remote_fin(&self, id: u32) {
        let Some(stream) = self.stream(id) else {
            return;
        };
        lock(&stream.st).remote_fin = true;
        stream.readable.notify_waiters();
        self.shared.stream_progress(&stream);
    }

    fn settings(&self, entries: &[Setting]) {
        let mut state = lock(&self.shared.state);
        state.peer_flow_control = true;
        for e in entries {
            if e.id != SETTINGS_INITIAL_WINDOW_SIZE {
                continue;
            }
            let new = i64::from(e.value).min(MAX_WINDOW);
            let delta = new - state.peer_initial_window;
            state.peer_initial_window = new;
            for stream in state.streams.values() {
                lock(&stream.st).send_window += delta;
                stream.writable.notify_waiters();
            }
        }
        drop(state);
        self.shared.window_changed.notify_waiters();
    }

    fn ping(&self, id: u32) {
        // The peer's pings have the peer's parity: echo them; ours come back.
        let theirs = (id % 2 == 1) == self.shared.server;
        if theirs {
            self.shared.send_ctl(Out::Frame(Frame::Ping { id }));
        } else if let Some(tx) = lock(&self.shared.state).pings.remove(&id) {
            let _ = tx.send(());
        }
    }

    fn goaway(&self, last_good: u32) {
        let (refused, empty) = {
            let mut state = lock(&self.shared.state);
            state.goaway_received = true;
            let server = self.shared.server;
            let refused: Vec<_> = state
                .streams
                .values()
                .filter(|s| (s.id % 2 == 0) == server && s.id > last_good)
                .cloned()
                .collect();
            (refused, state.streams.is_empty())
        };
        // Streams the peer never saw will never be answered.
        for stream in &refused {
            self.shared
                .reset_stream(stream, status::REFUSED_STREAM, false);
        }
        if empty {
            self.shared.shutdown();
        }
    }

    fn window_update(&self, id: u32, delta: u32) {
        let delta = i64::from(delta);
        if id == 0 {
            let mut state = lock(&self.shared.state);
            state.peer_flow_control = true;
            state.send_window = (state.send_window + delta).min(MAX_WINDOW);
            drop(state);
            self.shared.window_changed.notify_waiters();
            return;
        }
        lock(&self.shared.state).peer_flow_control = true;
        let Some(stream) = self.stream(id) else {
            return;
        };
        let overflow = {
            let mut st = lock(&stream.st);
            st.send_window += delta;
            st.send_window > MAX_WINDOW
        };
        if overflow {
            return self
                .shared
                .reset_stream(&stream, status::FLOW_CONTROL_ERROR, true);
        }
        stream.writable.notify_waiters();
        self.shared.window_changed.notify_waiters();
    }

    /// Returns session-window credit for `len` received bytes, 32 KiB at a time.
    fn credit_session(&self, len: usize) {
        let delta = {
            let mut state = lock(&self.shared.state);
            state.recv_unacked = state.recv_unacked.saturating_add(len as u32);
            if state.recv_unacked < INITIAL_WINDOW / 2 {
                return;
            }
            std::mem::take(&mut state.recv_unacked)
        };
        self.shared.send_ctl(Out::Frame(Frame::WindowUpdate {
            stream_id: 0,
            delta,
        }));
    }

    async fn data(&self, id: u32, flags: u8, data: bytes::Bytes) {
        let len = data.len();
        // Each stream's buffer is bounded by its own window, so the session window
        // is credited on arrival: one unread stream cannot starve the others.
        if len > 0 {
            self.credit_session(len);
        }
        let Some(stream) = self.stream(id) else {
            tracing::trace!(id, "data for a stream no longer open");
            return;
        };
        let flow_control = lock(&self.shared.state).peer_flow_control;
        let mut stop_rx = self.shared.stop.subscribe();
        loop {
            let mut space = pin!(stream.space.notified());
            space.as_mut().enable();
            match self.deliver(&stream, flags, &data, flow_control) {
                Delivery::Done => return,
                Delivery::Reset(code) => {
                    tracing::debug!(id, code, "resetting a stream on a data frame");
                    return self.shared.reset_stream(&stream, code, true);
                }
                Delivery::Full => {}
            }
            // A peer without flow control waits here, behind TCP, like spdystream.
            tokio::select! {
                _ = space => {}
                _ = stop_rx.wait_for(|s| *s) => return,
            }
        }
    }

    fn deliver(
        &self,
        stream: &Arc<StreamShared>,
        flags: u8,
        data: &bytes::Bytes,
        flow_control: bool,
    ) -> Delivery {
        let len = data.len();
        let mut st = lock(&stream.st);
        if st.reset.is_some() || st.closed {
            return Delivery::Done;
        }
        if st.remote_fin {
            return Delivery::Reset(status::STREAM_ALREADY_CLOSED);
        }
        if flow_control && len as i64 > st.recv_window {
            return Delivery::Reset(status::FLOW_CONTROL_ERROR);
        }
        let window = INITIAL_WINDOW as usize;
        if !st.reader_gone && st.buffered > 0 && st.buffered + len > window {
            return Delivery::Full;
        }
        st.recv_window -= len as i64;
        if st.reader_gone {
            // Nobody reads: hand the window straight back.
            st.recv_window += len as i64;
            if len > 0 && flags & FLAG_FIN == 0 {
                self.shared.send_ctl(Out::Frame(Frame::WindowUpdate {
                    stream_id: stream.id,
                    delta: len as u32,
                }));
            }
        } else if len > 0 {
            st.buf.push_back(data.clone());
            st.buffered += len;
        }
        if flags & FLAG_FIN != 0 {
            st.remote_fin = true;
        }
        drop(st);
        stream.readable.notify_waiters();
        if flags & FLAG_FIN != 0 {
            self.shared.stream_progress(stream);
        }
        Delivery::Done
    }
}

enum Delivery {
    Done,
    Full,
    Reset(u32),
}
