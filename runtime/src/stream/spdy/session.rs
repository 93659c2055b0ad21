//! A SPDY session's public handles, [`Session`] and [`Incoming`], and its start: the
//! state they share with the session's tasks is in `state`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::frame::{Frame, status};
use super::state::{Handle, Out, Shared, StreamShared, lock};
use super::stream::Stream;
use super::{Headers, SpdyError};

/// The highest stream id (and PING id) SPDY allows.
const MAX_STREAM_ID: u32 = 0x7fff_ffff;

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
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (shared, ctl_rx, data_rx) = Shared::new(server, in_tx);
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
