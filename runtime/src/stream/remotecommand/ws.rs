//! Exec and attach over a WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`): one
//! connection, the channel in each message's first byte — 0 stdin, 1 stdout, 2 stderr,
//! 3 error (the final status), 4 resize — and, in v5, `255 <channel>` closing a channel
//! (the client's stdin end).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Channels, Options, Outcome, ResizeDecoder, Version};
use crate::pods::TermSize;
use crate::stream::idle::{AbortOnDrop, Idle};
use crate::stream::request::StreamRequest;
use crate::stream::server::Shared;
use crate::stream::websocket::{self, Outgoing, Ws, WsReader};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: `255 <channel>` closes that channel.
const CLOSE: u8 = 255;

/// The remotecommand versions served over WebSocket, newest first.
const SUPPORTED: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// How long the end of a session may take to reach the client.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers the WebSocket upgrade of an exec or attach URL and runs the session.
pub(in crate::stream) fn websocket(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    request: StreamRequest,
) -> Response<Full<Bytes>> {
    websocket::accept(req, &SUPPORTED, move |ws, protocol| async move {
        let version = Version::from_name(protocol).unwrap_or(Version::V4);
        serve(shared, ws, version, request).await;
    })
}

async fn serve(shared: Arc<Shared>, ws: Ws, version: Version, request: StreamRequest) {
    let opts = Options::of(&request);
    let (out, reader) = Outgoing::start(ws);
    let idle = Idle::new(shared.idle_timeout);
    let channels = Channels::new(opts, version);
    // Every task of the session ends with it (a JoinSet aborts its tasks when dropped).
    let mut outputs = JoinSet::new();
    for (channel, rx) in [(STDOUT, channels.stdout), (STDERR, channels.stderr)] {
        if let Some(rx) = rx {
            outputs.spawn(pump_out(rx, out.clone(), channel, idle.clone()));
        }
    }
    let mut input = AbortOnDrop(tokio::spawn(read_input(
        reader,
        channels.stdin,
        channels.resize,
        idle.clone(),
        version,
    )));
    let outcome = tokio::select! {
        o = super::run(&shared.pods, &request, channels.io) => o,
        _ = &mut input.0 => return tracing::debug!("the streaming client went away"),
        () = out.closed() => return tracing::debug!("the streaming client went away"),
        () = idle.expired() => Outcome::Idle,
    };
    drop(input);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, outputs.join_all()).await;
    if let Some(status) = super::final_status(version, &request, &outcome) {
        let _ = out.send(ERROR, &status).await;
    }
    // The last Outgoing dropped: the writer sends Close.
}

async fn pump_out(mut rx: mpsc::Receiver<Bytes>, out: Outgoing, channel: u8, idle: Idle) {
    while let Some(data) = rx.recv().await {
        idle.touch();
        if !out.send(channel, &data).await {
            return;
        }
    }
}

/// Routes the client's messages until it closes the connection.
async fn read_input(
    mut reader: WsReader,
    mut stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<TermSize>>,
    idle: Idle,
    version: Version,
) {
    let mut decoder = ResizeDecoder::default();
    while let Some((channel, data)) = websocket::next_message(&mut reader).await {
        idle.touch();
        match channel {
            STDIN => {
                if let Some(tx) = &stdin
                    && !data.is_empty()
                    && tx.send(data).await.is_err()
                {
                    stdin = None;
                }
            }
            RESIZE => {
                let Some(tx) = &resize else { continue };
                match decoder.push(&data) {
                    Ok(sizes) => {
                        for s in sizes {
                            let _ = tx.send(s).await;
                        }
                    }
                    Err(e) => tracing::info!("streaming client: {e}"),
                }
            }
            CLOSE if version >= Version::V5 => {
                if data.first() == Some(&STDIN) {
                    stdin = None;
                }
            }
            other => tracing::debug!(channel = other, "websocket message on no input channel"),
        }
    }
}
