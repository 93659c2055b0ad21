//! One SPDY stream as an application holds it: [`Stream`] and its [`StreamReader`] and
//! [`StreamWriter`] halves. The state they share with the session is in `state`.

use std::pin::pin;
use std::sync::Arc;

use bytes::Bytes;

use super::frame::{FLAG_FIN, Frame, status};
use super::state::{Handle, INITIAL_WINDOW, Out, Shared, StreamShared, StreamState, lock};
use super::{Headers, SpdyError};

/// The largest data frame this side sends.
pub(crate) const MAX_SEND_FRAME: usize = 32 << 10;

/// A stream, before it is split into its halves.
pub struct Stream {
    id: u32,
    headers: Headers,
    reader: StreamReader,
    writer: StreamWriter,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl Stream {
    pub(crate) fn new(
        shared: Arc<Shared>,
        handle: Arc<Handle>,
        stream: Arc<StreamShared>,
        headers: Headers,
    ) -> Self {
        Self {
            id: stream.id,
            headers,
            reader: StreamReader {
                shared: shared.clone(),
                stream: stream.clone(),
                _handle: handle.clone(),
            },
            writer: StreamWriter {
                shared,
                stream,
                _handle: handle,
            },
        }
    }

    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The SYN_STREAM's headers (the peer's for accepted streams, ours for opened ones).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The first value of one of [`Stream::headers`].
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The receiving and sending halves.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }
}

/// The receiving half of a stream. Dropping it discards what else arrives.
pub struct StreamReader {
    shared: Arc<Shared>,
    stream: Arc<StreamShared>,
    _handle: Arc<Handle>,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("id", &self.stream.id)
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    /// The next chunk the peer sent; `None` after its FIN, a reset, or the session's
    /// end. Reading returns window to the peer.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            let mut notified = pin!(self.stream.readable.notified());
            notified.as_mut().enable();
            if let Some(ready) = self.poll_buffer() {
                return ready;
            }
            notified.await;
        }
    }

    /// `Some` when `recv` can answer without waiting.
    fn poll_buffer(&self) -> Option<Option<Bytes>> {
        let mut st = lock(&self.stream.st);
        if let Some(chunk) = st.buf.pop_front() {
            st.buffered -= chunk.len();
            st.unacked = st.unacked.saturating_add(chunk.len() as u32);
            let update = st.unacked >= INITIAL_WINDOW / 2 && !st.remote_fin && st.reset.is_none();
            if update {
                let delta = std::mem::take(&mut st.unacked);
                st.recv_window += i64::from(delta);
                drop(st);
                self.shared.send_ctl(Out::Frame(Frame::WindowUpdate {
                    stream_id: self.stream.id,
                    delta,
                }));
            } else {
                drop(st);
            }
            self.stream.space.notify_waiters();
            return Some(Some(chunk));
        }
        if st.remote_fin || st.reset.is_some() || st.closed {
            return Some(None);
        }
        None
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        let mut st = lock(&self.stream.st);
        st.reader_gone = true;
        st.buf.clear();
        st.buffered = 0;
        // Nobody will read what else comes: if this side is done sending too, cancel.
        let cancel = st.local_fin && !st.remote_fin && st.reset.is_none() && !st.closed;
        drop(st);
        self.stream.space.notify_waiters();
        if cancel {
            self.shared.reset_stream(&self.stream, status::CANCEL, true);
        }
    }
}

/// The sending half of a stream. Dropping it without [`StreamWriter::finish`] sends FIN.
pub struct StreamWriter {
    shared: Arc<Shared>,
    stream: Arc<StreamShared>,
    _handle: Arc<Handle>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("id", &self.stream.id)
            .finish_non_exhaustive()
    }
}

impl StreamWriter {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.stream.id
    }

    /// Sends `data`, in frames of at most 32 KiB, each within the peer's windows when
    /// it does flow control.
    pub async fn send(&self, mut data: Bytes) -> Result<(), SpdyError> {
        while !data.is_empty() {
            let n = self.reserve(data.len()).await?;
            let chunk = data.split_to(n);
            self.shared
                .send_data(Frame::Data {
                    stream_id: self.stream.id,
                    flags: 0,
                    data: chunk,
                })
                .await?;
        }
        Ok(())
    }

    /// Whether more can be sent, as an error when not.
    fn check_open(&self, st: &StreamState) -> Result<(), SpdyError> {
        if let Some(status) = st.reset {
            return Err(SpdyError::Reset {
                stream_id: self.stream.id,
                status,
            });
        }
        if st.closed {
            return Err(SpdyError::Closed);
        }
        if st.local_fin {
            return Err(SpdyError::Finished(self.stream.id));
        }
        Ok(())
    }

    /// Waits until up to `want` bytes may be sent and takes them from the windows.
    async fn reserve(&self, want: usize) -> Result<usize, SpdyError> {
        let want = want.min(MAX_SEND_FRAME);
        loop {
            let mut stream_note = pin!(self.stream.writable.notified());
            let mut session_note = pin!(self.shared.window_changed.notified());
            stream_note.as_mut().enable();
            session_note.as_mut().enable();
            {
                let mut state = lock(&self.shared.state);
                let mut st = lock(&self.stream.st);
                self.check_open(&st)?;
                // Windows are counted even for a peer without flow control, in case
                // it announces flow control later; they only hold back a peer with.
                let window = st.send_window.min(state.send_window);
                if window > 0 || !state.peer_flow_control {
                    let n = if state.peer_flow_control {
                        want.min(window as usize)
                    } else {
                        want
                    };
                    st.send_window -= n as i64;
                    state.send_window -= n as i64;
                    return Ok(n);
                }
            }
            tokio::select! {
                _ = stream_note => {}
                _ = session_note => {}
            }
        }
    }

    /// Sends FIN: this side is done; the peer may still send.
    pub async fn finish(&self) -> Result<(), SpdyError> {
        {
            let mut st = lock(&self.stream.st);
            if st.local_fin {
                return Ok(());
            }
            self.check_open(&st)?;
            st.local_fin = true;
        }
        let sent = self
            .shared
            .send_data(Frame::Data {
                stream_id: self.stream.id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await;
        self.shared.stream_progress(&self.stream);
        sent
    }

    /// Ends the stream both ways with RST_STREAM CANCEL.
    pub fn reset(&self) {
        self.shared.reset_stream(&self.stream, status::CANCEL, true);
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.stream.st);
            if st.local_fin || st.reset.is_some() || st.closed {
                return;
            }
            st.local_fin = true;
        }
        self.shared.send_data_nowait(Frame::Data {
            stream_id: self.stream.id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        });
        self.shared.stream_progress(&self.stream);
    }
}
