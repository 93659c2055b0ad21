//! A SPDY session: the state shared by its reader and writer tasks and its handles,
//! and the public [`Session`] and [`Incoming`] handles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::frame::{Frame, GOAWAY_OK, status};
use super::stream::{Stream, StreamShared};
use super::{Headers, SpdyError};

/// The initial per-stream window both ways, and the SPDY/3.1 session window.
pub(crate) const INITIAL_WINDOW: u32 = 64 << 10;
/// Streams open at once; a SYN_STREAM beyond it is refused.
pub(crate) const MAX_STREAMS: usize = 1000;
/// Data frames queued for the writer task before senders wait.
const DATA_QUEUE: usize = 16;
/// Control frames queued before the reader task stops reading the peer.
pub(crate) const MAX_CTL_PENDING: usize = 1024;
const MAX_STREAM_ID: u32 = 0x7fff_ffff;

/// Locks, ignoring poisoning: every critical section leaves the state consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the writer task sends. Header blocks are compressed there, in wire order.
#[derive(Debug)]
pub(crate) enum Out {
    /// A frame without a header block.
    Frame(Frame),
    /// SYN_STREAM with headers still to compress.
    SynStream { stream_id: u32, headers: Headers },
    /// SYN_REPLY with headers still to compress.
    SynReply { stream_id: u32, headers: Headers },
}

/// The session's mutable state.
pub(crate) struct State {
    pub(crate) streams: HashMap<u32, Arc<StreamShared>>,
    next_id: u32,
    /// The highest stream id the peer opened.
    pub(crate) last_peer_id: u32,
    next_ping: u32,
    pub(crate) pings: HashMap<u32, oneshot::Sender<()>>,
    pub(crate) goaway_sent: bool,
    pub(crate) goaway_received: bool,
    pub(crate) closed: bool,
    /// The peer sent SETTINGS or WINDOW_UPDATE: keep to its windows.
    pub(crate) peer_flow_control: bool,
    /// The peer's initial per-stream window.
    pub(crate) peer_initial_window: i64,
    /// The session window this side may still send (SPDY/3.1).
    pub(crate) send_window: i64,
    /// Session-window credit received but not yet returned.
    pub(crate) recv_unacked: u32,
    /// Where accepted SYN_STREAMs go; `None` once [`Incoming`] is gone.
    pub(crate) incoming: Option<mpsc::UnboundedSender<(Arc<StreamShared>, Headers)>>,
}

/// What the tasks and every handle share.
pub(crate) struct Shared {
    pub(crate) server: bool,
    pub(crate) state: Mutex<State>,
    ctl_tx: mpsc::UnboundedSender<Out>,
    data_tx: mpsc::Sender<Out>,
    /// Control frames queued and not yet taken by the writer.
    pub(crate) ctl_pending: AtomicUsize,
    /// The writer took control frames: the reader task may read on.
    pub(crate) ctl_room: Notify,
    /// Asks both tasks to stop.
    pub(crate) stop: watch::Sender<bool>,
    /// Both tasks stopped.
    pub(crate) done: watch::Sender<bool>,
    /// The session send window or the peer's settings changed.
    pub(crate) window_changed: Notify,
}

impl Shared {
    /// Queues a control frame; never waits (the reader task must not block on the
    /// writer, or two sessions could deadlock on full sockets).
    pub(crate) fn send_ctl(&self, out: Out) {
        self.ctl_pending.fetch_add(1, Ordering::AcqRel);
        if self.ctl_tx.send(out).is_err() {
            self.ctl_pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Queues a data frame behind the others, waiting for room.
    pub(crate) async fn send_data(&self, frame: Frame) -> Result<(), SpdyError> {
        self.data_tx
            .send(Out::Frame(frame))
            .await
            .map_err(|_| SpdyError::Closed)
    }

    /// Queues a data frame from a context that cannot wait (a drop).
    pub(crate) fn send_data_nowait(&self, frame: Frame) {
        match self.data_tx.try_send(Out::Frame(frame)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(out)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.data_tx.clone();
                    rt.spawn(async move {
                        let _ = tx.send(out).await;
                    });
                }
            }
        }
    }

    /// Resets a stream: marks it, tells the peer if `tell`, forgets it. A reset of ours
    /// drops what was received and not read yet; the peer's (`!tell`) leaves it readable:
    /// kubelet's streaming servers write the exec status and then reset every stream
    /// (apimachinery's `connection.Close`), and the status must not be lost.
    pub(crate) fn reset_stream(&self, stream: &Arc<StreamShared>, code: u32, tell: bool) {
        {
            let mut st = lock(&stream.st);
            if st.reset.is_some() || st.closed || (st.local_fin && st.remote_fin) {
                return;
            }
            st.reset = Some(code);
            if tell {
                st.buf.clear();
                st.buffered = 0;
            }
        }
        if tell {
            self.send_ctl(Out::Frame(Frame::RstStream {
                stream_id: stream.id,
                status: code,
            }));
        }
        stream.wake_all();
        self.remove_stream(stream.id);
    }

    /// Forgets a stream once both sides sent FIN.
    pub(crate) fn stream_progress(&self, stream: &Arc<StreamShared>) {
        let done = {
            let st = lock(&stream.st);
            st.local_fin && st.remote_fin
        };
        if done {
            self.remove_stream(stream.id);
        }
    }

    fn remove_stream(&self, id: u32) {
        let finished = {
            let mut state = lock(&self.state);
            state.streams.remove(&id);
            (state.goaway_sent || state.goaway_received) && state.streams.is_empty()
        };
        if finished {
            self.shutdown();
        }
    }

    /// Sends GOAWAY (once) and asks the tasks to stop.
    pub(crate) fn shutdown(&self) {
        self.send_goaway();
        self.stop.send_replace(true);
    }

    /// Sends GOAWAY OK once; new streams are refused from now on.
    pub(crate) fn send_goaway(&self) {
        let mut state = lock(&self.state);
        if state.goaway_sent || state.closed {
            return;
        }
        state.goaway_sent = true;
        let last = state.last_peer_id;
        drop(state);
        self.send_ctl(Out::Frame(Frame::GoAway {
            last_good_stream_id: last,
            status: GOAWAY_OK,
        }));
    }

    /// The session ended: every stream and waiter learns it.
    pub(crate) fn end(&self) {
        let (streams, pings) = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.incoming = None;
            (
                std::mem::take(&mut state.streams),
                std::mem::take(&mut state.pings),
            )
        };
        drop(pings);
        for stream in streams.values() {
            lock(&stream.st).closed = true;
            stream.wake_all();
        }
        self.window_changed.notify_waiters();
        self.ctl_room.notify_waiters();
        self.stop.send_replace(true);
    }
}

/// Held by every public handle; the last one dropped closes the session.
pub(crate) struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A SPDY session: opens streams, sends GOAWAY, reports its end. Clones share it.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.shared.server)
            .finish_non_exhaustive()
    }
}

/// The streams the peer opens, in order.
pub struct Incoming {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
    rx: mpsc::UnboundedReceiver<(Arc<StreamShared>, Headers)>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

/// Starts the server side of a session over `io`: this side opens even stream ids.
pub fn server<T>(io: T) -> (Session, Incoming)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    start(io, true)
}

/// Starts the client side of a session over `io`: this side opens odd stream ids.
pub fn client<T>(io: T) -> (Session, Incoming)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    start(io, false)
}

fn start<T>(io: T, server: bool) -> (Session, Incoming)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        server,
        state: Mutex::new(State {
            streams: HashMap::new(),
            next_id: if server { 2 } else { 1 },
            last_peer_id: 0,
            next_ping: if server { 2 } else { 1 },
            pings: HashMap::new(),
            goaway_sent: false,
            goaway_received: false,
            closed: false,
            peer_flow_control: false,
            peer_initial_window: i64::from(INITIAL_WINDOW),
            send_window: i64::from(INITIAL_WINDOW),
            recv_unacked: 0,
            incoming: Some(in_tx),
        }),
        ctl_tx,
        data_tx,
        ctl_pending: AtomicUsize::new(0),
        ctl_room: Notify::new(),
        stop: watch::Sender::new(false),
        done: watch::Sender::new(false),
        window_changed: Notify::new(),
    });
    super::conn::spawn(io, shared.clone(), ctl_rx, data_rx);
    let handle = Arc::new(Handle(shared.clone()));
    let session = Session {
        shared: shared.clone(),
        handle: handle.clone(),
    };
    let incoming = Incoming {
        shared,
        handle,
        rx: in_rx,
    };
    (session, incoming)
}

impl Session {
    /// Opens a stream with `headers` (SYN_STREAM) and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers) -> Result<Stream, SpdyError> {
        let stream = {
            let mut state = lock(&self.shared.state);
            if state.closed {
                return Err(SpdyError::Closed);
            }
            if state.goaway_sent || state.goaway_received {
                return Err(SpdyError::GoingAway);
            }
            let id = state.next_id;
            if id > MAX_STREAM_ID {
                return Err(SpdyError::StreamIdsExhausted);
            }
            state.next_id += 2;
            let stream = StreamShared::new(id, state.peer_initial_window);
            state.streams.insert(id, stream.clone());
            stream
        };
        // Queued under no lock: the writer compresses blocks in queue order.
        self.shared.send_ctl(Out::SynStream {
            stream_id: stream.id,
            headers: headers.clone(),
        });
        // Cancelled before the reply: the stream is reset rather than left open.
        let mut guard = OpenGuard {
            shared: &self.shared,
            stream: Some(&stream),
        };
        loop {
            let mut notified = std::pin::pin!(stream.writable.notified());
            notified.as_mut().enable();
            {
                let st = lock(&stream.st);
                if let Some(code) = st.reset {
                    return Err(SpdyError::Reset {
                        stream_id: stream.id,
                        status: code,
                    });
                }
                if st.closed {
                    return Err(SpdyError::Closed);
                }
                if st.replied {
                    break;
                }
            }
            notified.await;
        }
        guard.stream = None;
        drop(guard);
        Ok(Stream::new(
            self.shared.clone(),
            self.handle.clone(),
            stream,
            headers,
        ))
    }

    /// Sends GOAWAY: the peer may open no more streams; open ones carry on, and the
    /// session closes when the last one ends.
    pub fn goaway(&self) {
        self.shared.send_goaway();
        if lock(&self.shared.state).streams.is_empty() {
            self.shared.shutdown();
        }
    }

    /// Sends a PING and waits for its echo: the round trip.
    pub async fn ping(&self) -> Result<Duration, SpdyError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = lock(&self.shared.state);
            if state.closed {
                return Err(SpdyError::Closed);
            }
            let id = state.next_ping;
            state.next_ping = if id >= MAX_STREAM_ID - 2 {
                id % 2 + 1
            } else {
                id + 2
            };
            state.pings.insert(id, tx);
            id
        };
        let start = Instant::now();
        self.shared.send_ctl(Out::Frame(Frame::Ping { id }));
        rx.await.map_err(|_| SpdyError::Closed)?;
        Ok(start.elapsed())
    }

    /// Resolves once the session has ended (the connection closed, or both sides are
    /// done) and its tasks have stopped.
    pub async fn closed(&self) {
        let mut rx = self.shared.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }
}

/// Resets a stream whose `open` was dropped before the peer replied.
struct OpenGuard<'a> {
    shared: &'a Shared,
    stream: Option<&'a Arc<StreamShared>>,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if let Some(stream) = self.stream {
            self.shared.reset_stream(stream, status::CANCEL, true);
        }
    }
}

impl Incoming {
    /// The next stream the peer opened, answered with SYN_REPLY; `None` once the
    /// session has ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        loop {
            let (stream, headers) = self.rx.recv().await?;
            {
                let st = lock(&stream.st);
                if st.reset.is_some() || st.closed {
                    continue;
                }
            }
            self.shared.send_ctl(Out::SynReply {
                stream_id: stream.id,
                headers: Headers::new(),
            });
            return Some(Stream::new(
                self.shared.clone(),
                self.handle.clone(),
                stream,
                headers,
            ));
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        lock(&self.shared.state).incoming = None;
        self.rx.close();
        while let Ok((stream, _)) = self.rx.try_recv() {
            self.shared
                .reset_stream(&stream, status::REFUSED_STREAM, true);
        }
    }
}
