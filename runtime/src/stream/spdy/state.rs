//! The state a SPDY session's parts share: the session's [`Shared`] state and its
//! [`Handle`], the frames queued for the writer ([`Out`]), each stream's [`StreamShared`]
//! state, and the limits all of them keep to. It names none of `session`, `conn` or
//! `stream`, which all build on it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::frame::{Frame, GOAWAY_OK};
use super::{Headers, SpdyError};

/// The initial per-stream window both ways, and the SPDY/3.1 session window.
pub(crate) const INITIAL_WINDOW: u32 = 64 << 10;
/// Streams open at once; a SYN_STREAM beyond it is refused.
pub(crate) const MAX_STREAMS: usize = 1000;
/// Data frames queued for the writer task before senders wait.
const DATA_QUEUE: usize = 16;
/// Control frames queued before the reader task stops reading the peer.
pub(crate) const MAX_CTL_PENDING: usize = 1024;

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
    /// The id of the next stream this side opens.
    pub(crate) next_id: u32,
    /// The highest stream id the peer opened.
    pub(crate) last_peer_id: u32,
    /// The id of the next PING this side sends.
    pub(crate) next_ping: u32,
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
    /// This side is the server (opens even stream ids).
    pub(crate) server: bool,
    /// The session's mutable state.
    pub(crate) state: Mutex<State>,
    /// Control frames for the writer task: unbounded, so the reader task never waits.
    ctl_tx: mpsc::UnboundedSender<Out>,
    /// Data frames for the writer task, at most `DATA_QUEUE` queued.
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
    /// A new session's state, and the receiving ends of its control and data queues
    /// for the writer task. The peer's accepted streams go to `incoming`.
    pub(crate) fn new(
        server: bool,
        incoming: mpsc::UnboundedSender<(Arc<StreamShared>, Headers)>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Out>, mpsc::Receiver<Out>) {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
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
                incoming: Some(incoming),
            }),
            ctl_tx,
            data_tx,
            ctl_pending: AtomicUsize::new(0),
            ctl_room: Notify::new(),
            stop: watch::Sender::new(false),
            done: watch::Sender::new(false),
            window_changed: Notify::new(),
        });
        (shared, ctl_rx, data_rx)
    }

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
pub(crate) struct Handle(pub(crate) Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// Everything about a stream both the session's tasks and its halves touch.
pub(crate) struct StreamShared {
    /// The stream id.
    pub(crate) id: u32,
    /// The stream's mutable state.
    pub(crate) st: Mutex<StreamState>,
    /// Data, FIN, reset or session end for the reader.
    pub(crate) readable: Notify,
    /// Window, SYN_REPLY, reset or session end for writers and `open`.
    pub(crate) writable: Notify,
    /// The reader consumed: room for the session's reader task.
    pub(crate) space: Notify,
}

/// A stream's mutable state.
#[derive(Debug)]
pub(crate) struct StreamState {
    /// Received, not yet read.
    pub(crate) buf: VecDeque<Bytes>,
    /// Bytes in `buf`.
    pub(crate) buffered: usize,
    /// What the peer may still send before our next WINDOW_UPDATE.
    pub(crate) recv_window: i64,
    /// Read by the application, not yet returned to the peer.
    pub(crate) unacked: u32,
    /// The peer sent FIN.
    pub(crate) remote_fin: bool,
    /// The [`StreamReader`] is gone: data is dropped on arrival.
    pub(crate) reader_gone: bool,
    /// What this side may still send (when the peer does flow control).
    pub(crate) send_window: i64,
    /// This side sent FIN.
    pub(crate) local_fin: bool,
    /// RST_STREAM status, from either side.
    pub(crate) reset: Option<u32>,
    /// The session ended under the stream.
    pub(crate) closed: bool,
    /// For streams this side opened: SYN_REPLY came.
    pub(crate) replied: bool,
}

impl StreamShared {
    /// A new stream's state; this side may first send `send_window` bytes.
    pub(crate) fn new(id: u32, send_window: i64) -> Arc<Self> {
        Arc::new(Self {
            id,
            st: Mutex::new(StreamState {
                buf: VecDeque::new(),
                buffered: 0,
                recv_window: i64::from(INITIAL_WINDOW),
                unacked: 0,
                remote_fin: false,
                reader_gone: false,
                send_window,
                local_fin: false,
                reset: None,
                closed: false,
                replied: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            space: Notify::new(),
        })
    }

    /// Wakes every waiter: after a reset or the session's end.
    pub(crate) fn wake_all(&self) {
        self.readable.notify_waiters();
        self.writable.notify_waiters();
        self.space.notify_waiters();
    }
}
