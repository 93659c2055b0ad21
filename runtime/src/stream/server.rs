//! The HTTP side: the listener (TLS when configured), one hyper HTTP/1.1 connection per
//! client with upgrades, the routes `/exec|attach|portforward/<token>`, and the hand-over of
//! an upgraded connection to the SPDY or WebSocket session for its request.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::config::StreamingSettings;
use super::reply::text;
use super::request::StreamRequest;
use super::tokens::{TOKEN_TTL, Tokens};
use super::{remotecommand, websocket};
use crate::pods::PodManager;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Why the streaming server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Binding the address failed.
    #[error("bind the streaming server to {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file could not be read.
    #[error("read the streaming server's TLS file {path}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate and key do not make a TLS configuration.
    #[error("the streaming server's TLS certificate and key")]
    Tls(#[source] tokio_rustls::rustls::Error),
}

/// What every connection shares.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) tokens: Tokens<StreamRequest>,
    pub(super) base_url: String,
    pub(super) local_addr: SocketAddr,
    pub(super) idle_timeout: Duration,
    pub(super) pods: PodManager,
}

/// Binds and spawns the accept loop.
pub(super) async fn start(
    settings: &StreamingSettings,
    pods: PodManager,
) -> Result<Arc<Shared>, StreamError> {
    let addr = SocketAddr::new(settings.address, settings.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StreamError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StreamError::Bind { addr, source })?;
    let tls = match &settings.tls {
        Some(files) => Some(tls_acceptor(&files.cert, &files.key)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let shared = Arc::new(Shared {
        tokens: Tokens::new(TOKEN_TTL),
        base_url: format!("{scheme}://{}", url_authority(local_addr)),
        local_addr,
        idle_timeout: settings.idle_timeout,
        pods,
    });
    tracing::info!(url = %shared.base_url, "streaming server listening");
    tokio::spawn(accept_loop(listener, tls, shared.clone()));
    Ok(shared)
}

/// `host:port` for URLs: an unspecified address is reached on loopback (kubelet dials the
/// URL on its own node).
fn url_authority(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, StreamError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let file_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| StreamError::TlsFile { path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(file_err(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_err(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(file_err(key))?;
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(StreamError::Tls)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("streaming server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (tls, shared) = (tls.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(TokioIo::new(tcp), shared).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), shared).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(shared, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("streaming connection: {e}");
    }
}

/// Finds the request for the URL and starts its session.
fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !matches!(kind, "exec" | "attach" | "portforward") || token.is_empty() {
        return text(StatusCode::NOT_FOUND, format!("{path}: not found"));
    }
    let request = match shared.tokens.take(token) {
        Some(r) if r.kind() == kind => r,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                format!("{path}: unknown, used or expired token"),
            );
        }
    };
    tracing::debug!(kind, "streaming request");
    if websocket::is_upgrade(req.headers()) {
        match request {
            StreamRequest::PortForward(pf) => super::portforward::websocket(shared, req, pf),
            other => remotecommand::websocket(shared, req, other),
        }
    } else if super::spdy::is_spdy_upgrade(req.headers()) {
        match request {
            StreamRequest::PortForward(pf) => super::portforward::spdy(shared, req, pf),
            other => remotecommand::spdy(shared, req, other),
        }
    } else {
        text(
            StatusCode::BAD_REQUEST,
            "expected an upgrade to SPDY/3.1 or to a WebSocket",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_reachable_address() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(url_authority(a("0.0.0.0:10010")), "127.0.0.1:10010");
        assert_eq!(url_authority(a("[::]:80")), "[::1]:80");
        assert_eq!(url_authority(a("10.0.0.5:1")), "10.0.0.5:1");
    }
}
