//! The server side of the SPDY/3.1 upgrade: the 101 answer with the subprotocol chosen
//! ([`spdy::negotiate`]) and the session started on the upgraded connection.

use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::reply::text;
use super::spdy;

/// Answers 101 with `protocol` and runs `session` on the SPDY session over the upgraded
/// connection. A refused negotiation is the caller's 4xx.
pub(super) fn accept<F, Fut>(
    mut req: Request<Incoming>,
    protocol: &'static str,
    session: F,
) -> Response<Full<Bytes>>
where
    F: FnOnce(spdy::Session, spdy::Incoming) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let (s, incoming) = spdy::server(TokioIo::new(upgraded));
                session(s, incoming).await;
            }
            Err(e) => tracing::debug!("SPDY upgrade: {e}"),
        }
    });
    let mut rsp = Response::new(Full::new(Bytes::new()));
    *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    match spdy::upgrade_response_headers(protocol) {
        Ok(h) => *rsp.headers_mut() = h,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    rsp
}
