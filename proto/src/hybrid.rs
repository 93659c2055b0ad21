//! Host side of the hybrid vsock transport: the VMM exposes the guest's vsock
//! ports on one Unix socket; a client connects, writes `CONNECT <port>\n` and
//! gets `OK <host_port>\n` once the guest accepted, after which the stream is
//! the guest connection. This module dials the agent that way and wraps the
//! stream in a tonic channel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::AgentClient;

/// Longest answer line the VMM sends (`OK 4294967295\n` is 14 bytes).
const MAX_ANSWER: usize = 32;

/// Why a hybrid vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    /// The VMM's socket could not be reached.
    #[error("connect to vsock socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed (the guest refused, or the VMM closed).
    #[error("vsock handshake for port {port} on {path}: {reason}")]
    Handshake {
        /// The socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// What went wrong.
        reason: String,
    },
    /// The gRPC channel could not be set up.
    #[error("gRPC channel over vsock")]
    Channel(#[source] tonic::transport::Error),
}

/// Opens a byte stream to guest vsock `port` through the VMM socket `uds`.
pub async fn dial(uds: &Path, port: u32) -> Result<UnixStream, HybridError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| HybridError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
    let fail = |reason: String| HybridError::Handshake {
        path: uds.to_path_buf(),
        port,
        reason,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| fail(format!("write: {e}")))?;
    // Read the answer one byte at a time: nothing after the newline belongs
    // to the handshake.
    let mut line = Vec::with_capacity(MAX_ANSWER);
    loop {
        let b = stream.read_u8().await.map_err(|e| {
            fail(format!(
                "no answer ({e}): is anything listening on that port?"
            ))
        })?;
        if b == b'\n' {
            break;
        }
        if line.len() == MAX_ANSWER {
            return Err(fail("answer too long".into()));
        }
        line.push(b);
    }
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("OK ") {
        return Err(fail(format!("unexpected answer {text:?}")));
    }
    Ok(stream)
}

/// A gRPC channel to the agent behind `uds`, one hybrid connection per
/// (re)connect.
pub async fn agent_channel(uds: &Path, port: u32) -> Result<Channel, HybridError> {
    let uds = uds.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://agent.vsock")
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    let connector = tower::service_fn(move |_: Uri| {
        let uds = uds.clone();
        async move {
            let stream = dial(&uds, port)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(HybridError::Channel)
}

/// An agent client over the hybrid vsock socket of a VM.
pub async fn agent_client(uds: &Path) -> Result<AgentClient<Channel>, HybridError> {
    Ok(AgentClient::new(
        agent_channel(uds, crate::AGENT_VSOCK_PORT).await?,
    ))
}
