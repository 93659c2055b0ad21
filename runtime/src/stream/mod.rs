//! The CRI streaming server: what `kubectl exec`, `attach` and `port-forward` (through
//! kubelet) and `crictl` connect to.
//!
//! The Exec, Attach and PortForward RPCs validate their request, store it under a random
//! single-use [`tokens`] entry and answer a URL `/exec|attach|portforward/<token>` on this
//! server ([`StreamServer::url`]). The client then upgrades an HTTP/1.1 connection to that
//! URL to SPDY/3.1 ([`spdy`], as kubelet, the API server and crictl speak it) or to a
//! WebSocket ([`websocket`]), and the session runs on the pod manager's backends:
//! [`remotecommand`] for exec and attach, [`portforward`] for port forwarding, dialled
//! inside the pod's VM. The behaviour matched is kubelet's `k8s.io/kubelet/pkg/cri/streaming`
//! as containerd serves it.

pub mod client;
pub mod config;
mod handshake;
mod idle;
mod portforward;
mod remotecommand;
mod reply;
mod request;
mod server;
pub mod spdy;
mod tokens;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::pods::PodManager;
pub use config::StreamingSettings;
pub use request::StreamRequest;
pub use server::StreamError;
pub use tokens::TokenError;

/// The running streaming server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamServer {
    inner: Arc<server::Shared>,
}

impl StreamServer {
    /// Binds the configured address and serves streaming sessions on `pods` until the
    /// process ends.
    pub async fn start(
        settings: &StreamingSettings,
        pods: PodManager,
    ) -> Result<StreamServer, StreamError> {
        let inner = server::start(settings, pods).await?;
        Ok(StreamServer { inner })
    }

    /// Stores `request` and answers the URL its client connects to.
    pub fn url(&self, request: StreamRequest) -> Result<String, TokenError> {
        let kind = request.kind();
        let token = self.inner.tokens.insert(request)?;
        Ok(format!("{}/{kind}/{token}", self.inner.base_url))
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// How long an idle session may stay open.
    pub fn idle_timeout(&self) -> Duration {
        self.inner.idle_timeout
    }
}
