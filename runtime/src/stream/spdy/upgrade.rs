//! The HTTP/1.1 upgrade to SPDY/3.1, as Kubernetes does it: the client POSTs with
//! `Connection: Upgrade`, `Upgrade: SPDY/3.1` and one `X-Stream-Protocol-Version`
//! per subprotocol it speaks; the server answers 101 with the one it chose.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::header::{CONNECTION, HOST, HeaderMap, HeaderValue, UPGRADE};
use hyper_util::rt::TokioIo;

use super::{Incoming, Session, SpdyError, client};

/// The `Upgrade` token.
pub const SPDY_31: &str = "SPDY/3.1";
/// The subprotocol header: offered by the client (one per value), chosen by the server.
pub const PROTOCOL_VERSION_HEADER: &str = "x-stream-protocol-version";
/// How much of a refusal's body is kept for the error.
const MAX_ERROR_BODY: usize = 4096;

/// Whether a request asks for a SPDY/3.1 upgrade (`Connection` lists `upgrade`, and
/// `Upgrade` is `SPDY/3.1`, without regard to case).
pub fn is_spdy_upgrade(headers: &HeaderMap) -> bool {
    let connection = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(SPDY_31));
    connection && upgrade
}

/// Why no subprotocol could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    /// The client named none.
    #[error(
        "unable to upgrade: the request names no subprotocol in X-Stream-Protocol-Version; this server speaks {0}"
    )]
    Missing(String),
    /// None of the client's is served.
    #[error(
        "unable to upgrade: unable to negotiate protocol: the client speaks {offered:?}, this server {supported}"
    )]
    Unsupported {
        /// What the client offered.
        offered: Vec<String>,
        /// What is served.
        supported: String,
    },
}

/// The client's first offered subprotocol that `supported` holds, as Kubernetes picks it
/// (offers may also be comma-separated within one header).
pub fn negotiate(
    headers: &HeaderMap,
    supported: &[&'static str],
) -> Result<&'static str, NegotiateError> {
    let offered: Vec<String> = headers
        .get_all(PROTOCOL_VERSION_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Err(NegotiateError::Missing(supported.join(", ")));
    }
    offered
        .iter()
        .find_map(|o| supported.iter().find(|s| **s == o.as_str()).copied())
        .ok_or_else(|| NegotiateError::Unsupported {
            offered,
            supported: supported.join(", "),
        })
}

/// The headers of the 101 answer that switches to SPDY/3.1 with `protocol`.
pub fn upgrade_response_headers(protocol: &str) -> Result<HeaderMap, SpdyError> {
    let mut h = HeaderMap::new();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static(SPDY_31));
    let value = HeaderValue::from_str(protocol)
        .map_err(|_| SpdyError::BadUpgrade("a protocol name that is no header value"))?;
    h.insert(PROTOCOL_VERSION_HEADER, value);
    Ok(h)
}

/// host:port and path of an `http://` URL.
fn split_url(url: &str) -> Result<(String, String), SpdyError> {
    let bad = |why| SpdyError::Url {
        url: url.to_owned(),
        why,
    };
    let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URI"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// is supported"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    Ok((format!("{host}:{port}"), path))
}

/// Connects to `url` (`http://host:port/path`), upgrades to SPDY/3.1 offering
/// `protocols`, and starts the client side of the session. Returns the subprotocol
/// the server chose (empty if none was offered and none chosen).
pub async fn connect(
    url: &str,
    protocols: &[&str],
) -> Result<(Session, Incoming, String), SpdyError> {
    let (addr, path) = split_url(url)?;
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|source| SpdyError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(SpdyError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "HTTP connection for a SPDY upgrade");
        }
    });
    let mut req = hyper::Request::post(path)
        .header(HOST, addr.as_str())
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, SPDY_31);
    for p in protocols {
        req = req.header(PROTOCOL_VERSION_HEADER, *p);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(SpdyError::Request)?;
    let resp = sender.send_request(req).await.map_err(SpdyError::Http)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status().as_u16();
        let body = capped_body(resp.into_body()).await;
        return Err(SpdyError::UpgradeRefused { status, body });
    }
    let chosen = resp
        .headers()
        .get(PROTOCOL_VERSION_HEADER)
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| SpdyError::BadUpgrade("a protocol version that is not text"))?
        .unwrap_or_default();
    if !protocols.is_empty() && !protocols.contains(&chosen.as_str()) {
        return Err(SpdyError::BadUpgrade(
            "the server chose no protocol this client offered",
        ));
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(SpdyError::Http)?;
    let (session, incoming) = client(TokioIo::new(upgraded));
    Ok((session, incoming, chosen))
}

/// The first [`MAX_ERROR_BODY`] bytes of a body, as text; read errors end it.
async fn capped_body(mut body: hyper::body::Incoming) -> String {
    let mut out = Vec::new();
    while out.len() < MAX_ERROR_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_ERROR_BODY - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper::{Request, Response};

    use super::*;
    use crate::stream::spdy::{Headers, server};

    /// What `podvisord`'s streaming server will do: upgrade, then echo one stream.
    async fn handle(
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let protocol = negotiate(req.headers(), &["v5.channel.k8s.io", "v4.channel.k8s.io"]);
        let (true, Ok(protocol)) = (is_spdy_upgrade(req.headers()), protocol) else {
            let mut resp = Response::new(Full::new(Bytes::from("no upgrade for you\n")));
            *resp.status_mut() = StatusCode::FORBIDDEN;
            return Ok(resp);
        };
        tokio::spawn(async move {
            let upgraded = hyper::upgrade::on(req).await.expect("upgrade");
            let (_session, mut incoming) = server(TokioIo::new(upgraded));
            while let Some(stream) = incoming.accept().await {
                let (mut r, w) = stream.split();
                while let Some(chunk) = r.recv().await {
                    w.send(chunk).await.expect("echo");
                }
                w.finish().await.expect("fin");
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = upgrade_response_headers(protocol).expect("headers");
        Ok(resp)
    }

    async fn serve_one() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.expect("accept");
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service_fn(handle))
                        .with_upgrades(),
                );
            }
        });
        format!("http://{addr}/exec/token")
    }

    #[tokio::test]
    async fn connect_upgrades_and_negotiates() {
        let url = serve_one().await;
        let (session, _incoming, protocol) =
            connect(&url, &["v4.channel.k8s.io", "v5.channel.k8s.io"])
                .await
                .expect("connect");
        assert_eq!(protocol, "v4.channel.k8s.io");
        let stream = session
            .open(Headers::new().with("streamType", "stdin"))
            .await
            .expect("open");
        let (mut r, w) = stream.split();
        w.send(Bytes::from_static(b"echo me")).await.expect("send");
        w.finish().await.expect("fin");
        let mut got = Vec::new();
        while let Some(chunk) = r.recv().await {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"echo me");
    }

    #[tokio::test]
    async fn a_refusal_carries_status_and_body() {
        let url = serve_one().await;
        let err = connect(&url, &["v1.unknown"]).await.expect_err("refused");
        match err {
            SpdyError::UpgradeRefused { status, body } => {
                assert_eq!((status, body.as_str()), (403, "no upgrade for you"));
            }
            e => panic!("{e}"),
        }
        assert!(matches!(
            connect("https://x/", &[]).await,
            Err(SpdyError::Url { .. })
        ));
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("spdy/3.1"));
        assert!(is_spdy_upgrade(&h));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_spdy_upgrade(&h));
        h.append(
            PROTOCOL_VERSION_HEADER,
            HeaderValue::from_static("v5.channel.k8s.io, v4.channel.k8s.io"),
        );
        assert_eq!(
            negotiate(&h, &["v4.channel.k8s.io"]).unwrap(),
            "v4.channel.k8s.io"
        );
        let e = negotiate(&h, &["v1"]).unwrap_err().to_string();
        assert!(e.contains("v5.channel.k8s.io") && e.contains("v1"), "{e}");
        // The client's order wins over the server's.
        assert_eq!(
            negotiate(&h, &["v4.channel.k8s.io", "v5.channel.k8s.io"]).unwrap(),
            "v5.channel.k8s.io"
        );
        assert!(matches!(
            negotiate(&HeaderMap::new(), &["v1"]),
            Err(NegotiateError::Missing(_))
        ));
    }
}
