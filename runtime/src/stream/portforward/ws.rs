//! Port forwarding over a WebSocket, as kubelet serves it: the ports come from the URL's
//! query (`port=80&port=8080`, or `ports=80,8080` as PyPI's `kubernetes` client sends it;
//! the CRI request's ports when neither is given); port `i` has data channel `2i` and
//! error channel `2i+1`, each opened by a message carrying the port (u16, little endian).
//! One connection per port per WebSocket; the WebSocket closes once every one has ended.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use k8s_cri::v1 as cri;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{forward_error, parse_port};
use crate::pods::PodManager;
use crate::stream::idle::{AbortOnDrop, Idle};
use crate::stream::reply::text;
use crate::stream::server::Shared;
use crate::stream::websocket::{self, Outgoing, Ws, WsReader};

/// The subprotocols kubelet serves port forwarding on.
const SUPPORTED: [&str; 2] = ["v4.channel.k8s.io", "portforward.k8s.io"];
/// The most ports one WebSocket forwards (channel numbers are one byte).
const MAX_PORTS: usize = 64;
/// Client chunks queued per port.
const DEPTH: usize = 16;

/// Answers the WebSocket upgrade of a port-forward URL and runs the session.
pub(in crate::stream) fn websocket(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    pf: cri::PortForwardRequest,
) -> Response<Full<Bytes>> {
    let ports = match ports_of(req.uri().query().unwrap_or(""), &pf.port) {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    websocket::accept(req, &SUPPORTED, move |ws, _| async move {
        serve(shared, ws, pf.pod_sandbox_id, ports).await;
    })
}

/// The ports to forward: the query's, else the request's.
fn ports_of(query: &str, requested: &[i32]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "port" || key == "ports" {
            for v in value.split(',').filter(|v| !v.is_empty()) {
                ports.push(parse_port(v)?);
            }
        }
    }
    if ports.is_empty() {
        for p in requested {
            ports.push(parse_port(&p.to_string())?);
        }
    }
    if ports.is_empty() {
        return Err("no port to forward: give port=N in the query".into());
    }
    if ports.len() > MAX_PORTS {
        return Err(format!("at most {MAX_PORTS} ports per connection"));
    }
    Ok(ports)
}

async fn serve(shared: Arc<Shared>, ws: Ws, sandbox: String, ports: Vec<u16>) {
    let (out, reader) = Outgoing::start(ws);
    let idle = Idle::new(shared.idle_timeout);
    let mut inputs = Vec::new();
    // The forwards end with the session (a JoinSet aborts its tasks when dropped).
    let mut forwards = JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let data = (2 * i) as u8;
        for channel in [data, data + 1] {
            if !out.send(channel, &port.to_le_bytes()).await {
                return;
            }
        }
        let (tx, rx) = mpsc::channel::<Bytes>(DEPTH);
        inputs.push(tx);
        forwards.spawn(forward(
            shared.pods.clone(),
            sandbox.clone(),
            port,
            data,
            rx,
            out.clone(),
            idle.clone(),
        ));
    }
    let input = AbortOnDrop(tokio::spawn(read_input(reader, inputs, idle.clone())));
    tokio::select! {
        _ = forwards.join_all() => {}
        () = idle.expired() => tracing::info!(sandbox, "port forward idle; closing"),
        () = out.closed() => {}
    }
    drop(input);
    // The last Outgoing dropped: the writer sends Close.
}

/// Routes the client's data messages to their port's forward.
async fn read_input(mut reader: WsReader, mut inputs: Vec<mpsc::Sender<Bytes>>, idle: Idle) {
    while let Some((channel, data)) = websocket::next_message(&mut reader).await {
        idle.touch();
        let i = usize::from(channel / 2);
        if channel % 2 == 1 || i >= inputs.len() || data.is_empty() {
            continue;
        }
        if inputs[i].send(data).await.is_err() {
            // That forward has ended; its further data is dropped.
            inputs[i] = mpsc::channel(1).0;
        }
    }
    // The client closed: every forward's input ends.
}

/// One port's connection: dialled in the pod, relayed until both sides have finished.
async fn forward(
    pods: PodManager,
    sandbox: String,
    port: u16,
    channel: u8,
    mut from_client: mpsc::Receiver<Bytes>,
    out: Outgoing,
    idle: Idle,
) {
    let conn = match pods.port_forward(&sandbox, port).await {
        Ok(c) => c,
        Err(e) => {
            let _ = out
                .send(channel + 1, forward_error(port, &sandbox, &e).as_bytes())
                .await;
            return;
        }
    };
    let (mut to_pod, mut from_pod) = conn.split();
    let up = async {
        while let Some(b) = from_client.recv().await {
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
                    if !out.send(channel, &b).await {
                        return;
                    }
                }
                Err(e) => {
                    let _ = out
                        .send(channel + 1, forward_error(port, &sandbox, &e).as_bytes())
                        .await;
                    return;
                }
            }
        }
    };
    // The WebSocket protocol has no half-close: the forward ends with the pod's side.
    tokio::select! {
        () = down => {}
        () = async { up.await; std::future::pending::<()>().await } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_from_the_query_or_the_request() {
        assert_eq!(ports_of("port=80&port=8080", &[]).unwrap(), [80, 8080]);
        assert_eq!(ports_of("ports=80,443", &[1]).unwrap(), [80, 443]);
        assert_eq!(ports_of("", &[22]).unwrap(), [22]);
        assert!(ports_of("", &[]).is_err());
        assert!(ports_of("port=0", &[]).is_err());
        assert!(ports_of("port=x", &[]).is_err());
    }
}
