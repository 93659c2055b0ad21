//! SPDY/3.1, written here by hand: no maintained Rust crate speaks it, and Kubernetes'
//! `exec`, `attach` and `port-forward` still run over it (`k8s.io/apimachinery`'s
//! `httpstream/spdy` on Go's `github.com/moby/spdystream`, used by kubelet, kubectl,
//! crictl and containerd's CRI streaming server).
//!
//! - [`frame`]: frames on the wire, incremental decoding under size caps.
//! - [`headers`]: header blocks and their per-direction zlib contexts.
//! - `state`: what a session's parts share: the session and per-stream state, the
//!   writer's queue entries, the limits.
//! - `stream`: a stream's halves ([`Stream`], [`StreamReader`], [`StreamWriter`]).
//! - `conn`: a session's reader and writer tasks.
//! - `session`: the session's handles ([`server`], [`client`], [`Session`], [`Incoming`]).
//! - [`upgrade`]: the HTTP/1.1 `Upgrade: SPDY/3.1` handshake.
//!
//! `state` names none of the others; `stream` and `conn` build on it alone, and
//! `session` on all three.
//!
//! Flow control: spdystream implements none — it neither sends WINDOW_UPDATE nor
//! honours one, and relies on TCP back-pressure. A session here therefore announces
//! its own window with SETTINGS and keeps to the peer's windows only once the peer has
//! shown it does flow control (SETTINGS or WINDOW_UPDATE); a Go peer is instead
//! slowed by not reading the connection while a stream's buffer is full. A peer that
//! announced flow control and overruns a window gets RST_STREAM FLOW_CONTROL_ERROR.

mod conn;
pub mod frame;
pub mod headers;
mod session;
mod state;
mod stream;
pub mod upgrade;

#[cfg(test)]
mod tests;

pub use headers::Headers;
pub use session::{Incoming, Session, client, server};
pub use stream::{Stream, StreamReader, StreamWriter};
pub use upgrade::{NegotiateError, connect, is_spdy_upgrade, negotiate, upgrade_response_headers};

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A length over this side's cap, refused before reading the payload.
    #[error("a {kind} frame of {len} bytes is over the {cap}-byte cap")]
    TooLarge {
        /// "data" or "control".
        kind: &'static str,
        /// The length the peer claimed.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// A control frame of a SPDY version other than 3.
    #[error("SPDY version {0} is not supported")]
    Version(u16),
    /// A control frame whose length does not fit its type.
    #[error("a {kind} frame with a bad length ({len})")]
    Length {
        /// The frame type.
        kind: &'static str,
        /// Its payload length.
        len: usize,
    },
    /// Stream id 0 where a stream is required.
    #[error("stream id 0 in a {0} frame")]
    ZeroStreamId(&'static str),
}

/// Why a header block could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// zlib refused to compress.
    #[error("compressing a header block")]
    Compress(#[source] flate2::CompressError),
    /// zlib refused the peer's block.
    #[error("decompressing a header block")]
    Decompress(#[source] flate2::DecompressError),
    /// The block inflates past the cap.
    #[error("a header block over {cap} bytes decompressed")]
    TooLarge {
        /// The cap.
        cap: usize,
    },
    /// More headers than the cap.
    #[error("a header block with more than {cap} headers")]
    TooMany {
        /// The cap.
        cap: usize,
    },
    /// The decompressed block does not parse.
    #[error("a malformed header block: {0}")]
    Malformed(&'static str),
}

/// What can go wrong on a session or stream.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// Reading or writing the connection.
    #[error("SPDY session I/O")]
    Io(#[source] std::io::Error),
    /// The peer sent a frame that does not decode.
    #[error("a bad frame from the peer")]
    Frame(#[from] FrameError),
    /// A header block that could not be built or read.
    #[error("a bad header block")]
    Header(#[from] HeaderError),
    /// The session has ended.
    #[error("the SPDY session is closed")]
    Closed,
    /// A GOAWAY was sent or received: no new streams.
    #[error("the SPDY session is going away")]
    GoingAway,
    /// This side has used every stream id.
    #[error("no stream ids left on this session")]
    StreamIdsExhausted,
    /// The stream was reset (by either side).
    #[error("stream {stream_id} was reset (status {status})")]
    Reset {
        /// The stream.
        stream_id: u32,
        /// The RST_STREAM status.
        status: u32,
    },
    /// This side already sent FIN on the stream.
    #[error("stream {0} is already finished for writing")]
    Finished(u32),
    /// A URL `connect` cannot use.
    #[error("bad URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Connecting to the server.
    #[error("connecting to {addr}")]
    Connect {
        /// host:port.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange before the upgrade.
    #[error("HTTP upgrade request")]
    Http(#[source] hyper::Error),
    /// Building the upgrade request.
    #[error("building the upgrade request")]
    Request(#[source] hyper::http::Error),
    /// The server answered something other than 101.
    #[error("the server refused the upgrade: {status}: {body}")]
    UpgradeRefused {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The 101 answer lacks what SPDY needs.
    #[error("bad upgrade answer: {0}")]
    BadUpgrade(&'static str),
}
