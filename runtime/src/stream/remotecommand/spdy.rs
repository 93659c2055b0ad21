//! Exec and attach over SPDY/3.1: the client opens one stream per channel, named by its
//! `streamType` header (error, stdin, stdout, stderr, resize); the session starts once every
//! stream the request needs is open and ends with the status on the error stream.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Channels, Options, Outcome, ResizeDecoder, STREAM_CREATION_TIMEOUT, Version};
use crate::stream::idle::Idle;
use crate::stream::reply::text;
use crate::stream::request::StreamRequest;
use crate::stream::server::Shared;
use crate::stream::spdy::{Incoming as SpdyIncoming, Session, Stream, StreamReader, StreamWriter};
use crate::stream::{handshake, spdy};

/// The remotecommand versions served over SPDY, newest first.
const SUPPORTED: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// How long the end of a session may take to reach the client.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers the SPDY upgrade of an exec or attach URL and runs the session.
pub(in crate::stream) fn spdy(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    request: StreamRequest,
) -> Response<Full<Bytes>> {
    let protocol = match spdy::negotiate(req.headers(), &SUPPORTED) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::FORBIDDEN, e.to_string()),
    };
    let Some(version) = Version::from_name(protocol) else {
        return text(StatusCode::FORBIDDEN, format!("{protocol}: not served"));
    };
    handshake::accept(req, protocol, move |session, incoming| async move {
        serve(shared, session, incoming, version, request).await;
    })
}

/// The client's streams, by type.
#[derive(Default)]
struct Streams {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

impl Streams {
    /// Whether every stream `opts` needs is open.
    fn complete(&self, opts: Options, version: Version) -> bool {
        self.error.is_some()
            && (!opts.stdin || self.stdin.is_some())
            && (!opts.stdout || self.stdout.is_some())
            && (!opts.stderr || opts.tty || self.stderr.is_some())
            && (!(opts.tty && version >= Version::V3) || self.resize.is_some())
    }
}

/// Accepts the client's streams until those the request needs are open.
async fn collect(incoming: &mut SpdyIncoming, opts: Options, version: Version) -> Option<Streams> {
    let mut s = Streams::default();
    while !s.complete(opts, version) {
        let stream = incoming.accept().await?;
        let slot = match stream.header("streamtype").unwrap_or_default() {
            "error" => &mut s.error,
            "stdin" => &mut s.stdin,
            "stdout" => &mut s.stdout,
            "stderr" => &mut s.stderr,
            "resize" => &mut s.resize,
            other => {
                tracing::debug!(stream_type = other, "unexpected SPDY stream; reset");
                stream.split().1.reset();
                continue;
            }
        };
        if slot.is_some() {
            tracing::debug!("a second SPDY stream of one type; reset");
            stream.split().1.reset();
            continue;
        }
        *slot = Some(stream);
    }
    Some(s)
}

async fn serve(
    shared: Arc<Shared>,
    session: Session,
    mut incoming: SpdyIncoming,
    version: Version,
    request: StreamRequest,
) {
    let opts = Options::of(&request);
    let streams = match tokio::time::timeout(
        STREAM_CREATION_TIMEOUT,
        collect(&mut incoming, opts, version),
    )
    .await
    {
        Ok(Some(s)) => s,
        Ok(None) => return tracing::debug!("the client left before opening its streams"),
        Err(_) => {
            return tracing::info!(
                "a streaming client did not open its streams within {STREAM_CREATION_TIMEOUT:?}"
            );
        }
    };
    // Every task of the session ends with it (a JoinSet aborts its tasks when dropped).
    let mut tasks = JoinSet::new();
    // Streams opened later are refused.
    tasks.spawn(async move {
        while let Some(s) = incoming.accept().await {
            s.split().1.reset();
        }
    });
    let idle = Idle::new(shared.idle_timeout);
    let channels = Channels::new(opts, version);
    let mut writers: Vec<StreamWriter> = Vec::new();
    let mut outputs = JoinSet::new();
    if let (Some(s), Some(tx)) = (streams.stdin, channels.stdin) {
        let (reader, writer) = s.split();
        writers.push(writer);
        tasks.spawn(pump_in(reader, tx, idle.clone()));
    }
    for (s, rx) in [
        (streams.stdout, channels.stdout),
        (streams.stderr, channels.stderr),
    ] {
        if let Some(s) = s {
            let (_, writer) = s.split();
            match rx {
                Some(rx) => {
                    outputs.spawn(pump_out(rx, writer, idle.clone()));
                }
                None => writers.push(writer),
            }
        }
    }
    if let (Some(s), Some(tx)) = (streams.resize, channels.resize) {
        let (reader, writer) = s.split();
        writers.push(writer);
        tasks.spawn(pump_resize(reader, tx));
    }
    let Some(error) = streams.error else { return };
    let (_, error) = error.split();

    let outcome = tokio::select! {
        o = super::run(&shared.pods, &request, channels.io) => o,
        () = session.closed() => return tracing::debug!("the streaming client went away"),
        () = idle.expired() => Outcome::Idle,
    };
    // The backend's senders are gone: the output pumps end once they have sent the rest.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, outputs.join_all()).await;
    if let Some(status) = super::final_status(version, &request, &outcome) {
        let _ = error.send(status).await;
    }
    let _ = error.finish().await;
    for w in writers {
        let _ = w.finish().await;
    }
    session.goaway();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, session.closed()).await;
}

/// The client's stdin to the backend; the stream's end closes the backend's stdin.
async fn pump_in(mut reader: StreamReader, tx: mpsc::Sender<Bytes>, idle: Idle) {
    while let Some(data) = reader.recv().await {
        idle.touch();
        if tx.send(data).await.is_err() {
            return;
        }
    }
}

/// The backend's output to the client; a failed write drops `rx`, which tells the backend
/// its client is gone.
async fn pump_out(mut rx: mpsc::Receiver<Bytes>, writer: StreamWriter, idle: Idle) {
    while let Some(data) = rx.recv().await {
        idle.touch();
        if writer.send(data).await.is_err() {
            return;
        }
    }
    let _ = writer.finish().await;
}

/// The client's resize messages to the backend.
async fn pump_resize(mut reader: StreamReader, tx: mpsc::Sender<crate::pods::TermSize>) {
    let mut decoder = ResizeDecoder::default();
    while let Some(data) = reader.recv().await {
        match decoder.push(&data) {
            Ok(sizes) => {
                for size in sizes {
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::info!("streaming client: {e}; resizes ignored");
                return;
            }
        }
    }
}
