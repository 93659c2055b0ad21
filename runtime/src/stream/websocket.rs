//! WebSocket sessions (RFC 6455 on `tokio-tungstenite`), as kubelet's server speaks them to
//! WebSocket clients: the subprotocol negotiated from `Sec-WebSocket-Protocol`, every
//! message binary (text accepted) with its channel number as the first byte, and one writer
//! task so channels never interleave within a message.

use std::future::Future;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::reply::text;

/// An upgraded WebSocket connection.
pub(super) type Ws = WebSocketStream<TokioIo<Upgraded>>;
/// Its read half.
pub(super) type WsReader = SplitStream<Ws>;

/// The largest message a client may send: stdin and port-forward data arrive in chunks
/// far below it; a larger one ends the session instead of being buffered.
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Messages queued for the writer task.
const OUTGOING_QUEUE: usize = 32;

/// Whether the request asks for a WebSocket.
pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// Answers the handshake with the first of the client's subprotocols that `supported`
/// holds, and runs `session` on the upgraded connection; a missing or unsupported
/// subprotocol gets 400 with a message.
pub(super) fn accept<F, Fut>(
    mut req: Request<Incoming>,
    supported: &[&'static str],
    session: F,
) -> Response<Full<Bytes>>
where
    F: FnOnce(Ws, &'static str) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let Some(protocol) = offered
        .iter()
        .find_map(|o| supported.iter().find(|s| **s == o.as_str()).copied())
    else {
        let why = if offered.is_empty() {
            "no subprotocol in Sec-WebSocket-Protocol".to_string()
        } else {
            format!("none of the subprotocols {offered:?} is served")
        };
        return text(
            StatusCode::BAD_REQUEST,
            format!("{why}; this server speaks {}", supported.join(", ")),
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("websocket upgrade: {e}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session(ws, protocol).await;
    });
    let mut rsp = Response::new(Full::new(Bytes::new()));
    *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = rsp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    rsp
}

/// The write half: channel messages to one writer task, which closes the connection once
/// every [`Outgoing`] is gone.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    tx: mpsc::Sender<Message>,
}

impl Outgoing {
    /// Splits `ws`: its writer task starts; the read half is returned.
    pub(super) fn start(ws: Ws) -> (Outgoing, WsReader) {
        let (mut sink, stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<Message>(OUTGOING_QUEUE);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Err(e) = sink.send(m).await {
                    tracing::debug!("websocket write: {e}");
                    return;
                }
            }
            let _ = sink.close().await;
        });
        (Outgoing { tx }, stream)
    }

    /// Sends `data` on `channel`; false once the connection is gone.
    pub(super) async fn send(&self, channel: u8, data: &[u8]) -> bool {
        let mut m = BytesMut::with_capacity(data.len() + 1);
        m.put_u8(channel);
        m.put_slice(data);
        self.tx.send(Message::Binary(m.freeze())).await.is_ok()
    }

    /// Completes when the writer task has ended (the connection failed).
    pub(super) async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// The next channel message from the client: `(channel, data)`; `None` when the client
/// closed the connection or it failed. Pings are answered by tungstenite.
pub(super) async fn next_message(reader: &mut WsReader) -> Option<(u8, Bytes)> {
    loop {
        let m = match reader.next().await? {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("websocket read: {e}");
                return None;
            }
        };
        let data: Bytes = match m {
            Message::Binary(b) => b,
            Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
            Message::Close(_) => return None,
            _ => continue,
        };
        if let Some((&channel, _)) = data.split_first() {
            return Some((channel, data.slice(1..)));
        }
    }
}
