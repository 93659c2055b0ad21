//! Port forwarding over SPDY/3.1 (`portforward.k8s.io`): per forwarded connection the
//! client opens an error and a data stream carrying the same `requestID` and `port`
//! headers; the pair is dialled in the pod and relayed, half-closes passed on both ways,
//! and a failure written to the error stream. Any number of connections at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use k8s_cri::v1 as cri;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{forward_error, parse_port};
use crate::pods::PodManager;
use crate::stream::idle::Idle;
use crate::stream::remotecommand::STREAM_CREATION_TIMEOUT;
use crate::stream::reply::text;
use crate::stream::server::Shared;
use crate::stream::spdy::{Incoming as SpdyIncoming, Session, Stream};
use crate::stream::{handshake, spdy};

/// The port-forward protocol over SPDY.
const SUPPORTED: [&str; 1] = ["portforward.k8s.io"];
/// The most half-open pairs (one stream of two arrived) a session keeps.
const MAX_PENDING_PAIRS: usize = 256;

/// Answers the SPDY upgrade of a port-forward URL and runs the session.
pub(in crate::stream) fn spdy(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    pf: cri::PortForwardRequest,
) -> Response<Full<Bytes>> {
    let protocol = match spdy::negotiate(req.headers(), &SUPPORTED) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::FORBIDDEN, e.to_string()),
    };
    handshake::accept(req, protocol, move |session, incoming| async move {
        serve(shared, session, incoming, pf.pod_sandbox_id).await;
    })
}

/// One connection's two streams, as they arrive.
struct Pair {
    data: Option<Stream>,
    error: Option<Stream>,
    since: Instant,
}

async fn serve(shared: Arc<Shared>, session: Session, mut incoming: SpdyIncoming, sandbox: String) {
    let idle = Idle::new(shared.idle_timeout);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // The forwards end with the session (a JoinSet aborts its tasks when dropped).
    let mut forwards = JoinSet::new();
    loop {
        let stream = tokio::select! {
            s = incoming.accept() => match s {
                Some(s) => s,
                None => break,
            },
            () = idle.expired() => {
                tracing::info!(sandbox, "port forward idle; closing");
                break;
            }
        };
        idle.touch();
        let now = Instant::now();
        pairs.retain(|_, p| now.duration_since(p.since) < STREAM_CREATION_TIMEOUT);
        let Some(id) = stream.header("requestid").map(str::to_string) else {
            tracing::debug!("port-forward stream without requestID; reset");
            stream.split().1.reset();
            continue;
        };
        if !pairs.contains_key(&id) && pairs.len() >= MAX_PENDING_PAIRS {
            stream.split().1.reset();
            continue;
        }
        let pair = pairs.entry(id.clone()).or_insert_with(|| Pair {
            data: None,
            error: None,
            since: now,
        });
        let slot = match stream.header("streamtype") {
            Some("data") => &mut pair.data,
            Some("error") => &mut pair.error,
            _ => {
                stream.split().1.reset();
                continue;
            }
        };
        if slot.is_some() {
            stream.split().1.reset();
            continue;
        }
        *slot = Some(stream);
        let complete = pair.data.is_some() && pair.error.is_some();
        if complete
            && let Some(Pair {
                data: Some(data),
                error: Some(error),
                ..
            }) = pairs.remove(&id)
        {
            let pods = shared.pods.clone();
            forwards.spawn(forward(pods, sandbox.clone(), data, error, idle.clone()));
            // Reap the finished ones so the set does not grow with the session's age.
            while forwards.try_join_next().is_some() {}
        }
    }
    session.goaway();
    let _ = tokio::time::timeout(Duration::from_secs(5), session.closed()).await;
}

/// Dials the pair's port in the pod and relays until both sides have finished.
async fn forward(pods: PodManager, sandbox: String, data: Stream, error: Stream, idle: Idle) {
    let port = data.header("port").map(parse_port);
    let (_, error) = error.split();
    let port = match port {
        Some(Ok(p)) => p,
        Some(Err(why)) => {
            let _ = error.send(Bytes::from(why)).await;
            let _ = error.finish().await;
            return data.split().1.reset();
        }
        None => {
            let _ = error.send(Bytes::from("no port header")).await;
            let _ = error.finish().await;
            return data.split().1.reset();
        }
    };
    let conn = match pods.port_forward(&sandbox, port).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(sandbox, port, "port forward: {e}");
            let _ = error
                .send(Bytes::from(forward_error(port, &sandbox, &e)))
                .await;
            let _ = error.finish().await;
            let (_, w) = data.split();
            let _ = w.finish().await;
            return;
        }
    };
    let (mut to_pod, mut from_pod) = conn.split();
    let (mut reader, writer) = data.split();
    let up = async {
        while let Some(b) = reader.recv().await {
            idle.touch();
            if let Err(e) = to_pod.send(b).await {
                return tracing::debug!(sandbox, port, "port forward to the pod: {e}");
            }
        }
        to_pod.close_write();
    };
    let down = async {
        while let Some(b) = from_pod.recv().await {
            match b {
                Ok(b) => {
                    idle.touch();
                    if writer.send(b).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = error
                        .send(Bytes::from(forward_error(port, &sandbox, &e)))
                        .await;
                    break;
                }
            }
        }
        let _ = writer.finish().await;
    };
    tokio::join!(up, down);
    let _ = error.finish().await;
}
