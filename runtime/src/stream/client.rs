//! The client side of streaming over SPDY, as kubectl and crictl speak it: exec and attach
//! (`v4.channel.k8s.io`) and port forwarding (`portforward.k8s.io`). `podvisorctl` uses it,
//! and the tests drive both podvisord's and containerd's streaming servers with it.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::spdy::{self, Headers, Session, SpdyError, StreamReader, StreamWriter};
use crate::pods::TermSize;

/// The most bytes of a final status or a port-forward error read from the server.
const MAX_STATUS_BYTES: usize = 64 * 1024;
/// Bytes read from local stdin or a local connection at once.
const CHUNK: usize = 32 * 1024;

/// Why a streaming session failed on the client's side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The SPDY connection or a stream failed.
    #[error(transparent)]
    Spdy(#[from] SpdyError),
    /// Local input or output failed.
    #[error("{what}")]
    Local {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server reported a failure without an exit code.
    #[error("the server reported: {0}")]
    Remote(String),
    /// The server's status is not a status.
    #[error("an unreadable status from the server: {0:?}")]
    BadStatus(String),
}

/// The local ends of an exec or attach session; a `None` channel is not requested.
#[derive(Default)]
pub struct LocalIo {
    /// Sent to the remote process; its end closes the remote stdin.
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// The remote stdout (and, with a terminal, all output).
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// The remote stderr (never with a terminal).
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// A terminal: its sizes as they change (the first one right away).
    pub tty: Option<mpsc::Receiver<TermSize>>,
}

/// Runs an exec or attach session at `url` (the URL the Exec or Attach RPC answered, made
/// with the same stdin/stdout/stderr/tty choices as `io`); returns the remote exit code (0
/// for an attach that ended normally).
pub async fn remotecommand(url: &str, io: LocalIo) -> Result<i32, ClientError> {
    let (session, _incoming, _) = spdy::upgrade::connect(url, &["v4.channel.k8s.io"]).await?;
    let open = |kind: &str| session.open(Headers::new().with("streamType", kind));
    // The error stream first, its sending side closed at once, as kubectl does.
    let (mut error, error_w) = open("error").await?.split();
    error_w.finish().await?;
    let stdin = match io.stdin {
        Some(input) => Some((input, open("stdin").await?.split().1)),
        None => None,
    };
    let mut outputs = Vec::new();
    for (kind, sink) in [("stdout", io.stdout), ("stderr", io.stderr)] {
        if let Some(sink) = sink {
            let (reader, _) = open(kind).await?.split();
            outputs.push(copy_out(reader, sink));
        }
    }
    let sizes = match io.tty {
        Some(sizes) => Some((sizes, open("resize").await?.split().1)),
        None => None,
    };
    // Everything runs inside this future (nothing spawned): dropping it ends the session.
    let inputs = async {
        let stdin = async {
            if let Some((input, writer)) = stdin {
                copy_in(input, writer).await;
            }
        };
        let sizes = async {
            if let Some((sizes, writer)) = sizes {
                send_sizes(sizes, writer).await;
            }
        };
        tokio::join!(stdin, sizes);
        // The inputs may end first; the session ends with the status.
        std::future::pending::<Result<Vec<u8>, ClientError>>().await
    };
    let ending = async {
        let (status, outputs) =
            tokio::join!(read_capped(&mut error), futures::future::join_all(outputs));
        for r in outputs {
            r?;
        }
        Ok::<_, ClientError>(status)
    };
    let status = tokio::select! {
        s = ending => s?,
        s = inputs => s?,
    };
    drop(session);
    exit_code(&status)
}

/// The exit code a v4 status means: 0 for none or Success, the ExitCode cause's for
/// NonZeroExitCode, an error for other failures.
fn exit_code(status: &[u8]) -> Result<i32, ClientError> {
    if status.is_empty() {
        return Ok(0);
    }
    let text = String::from_utf8_lossy(status).into_owned();
    let v: serde_json::Value =
        serde_json::from_slice(status).map_err(|_| ClientError::BadStatus(text.clone()))?;
    if v["status"] == "Success" {
        return Ok(0);
    }
    if v["reason"] == "NonZeroExitCode"
        && let Some(causes) = v["details"]["causes"].as_array()
    {
        for c in causes {
            if c["reason"] == "ExitCode"
                && let Some(code) = c["message"].as_str().and_then(|m| m.parse().ok())
            {
                return Ok(code);
            }
        }
    }
    Err(ClientError::Remote(
        v["message"].as_str().map_or(text, str::to_string),
    ))
}

async fn read_capped(reader: &mut StreamReader) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = reader.recv().await {
        let room = MAX_STATUS_BYTES.saturating_sub(out.len());
        out.extend_from_slice(&b[..b.len().min(room)]);
    }
    out
}

async fn copy_out(
    mut reader: StreamReader,
    mut sink: Box<dyn AsyncWrite + Send + Unpin>,
) -> Result<(), ClientError> {
    let local = |source| ClientError::Local {
        what: "write output",
        source,
    };
    while let Some(b) = reader.recv().await {
        sink.write_all(&b).await.map_err(local)?;
        sink.flush().await.map_err(local)?;
    }
    Ok(())
}

async fn copy_in(mut input: Box<dyn AsyncRead + Send + Unpin>, writer: StreamWriter) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match input.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if writer
                    .send(Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("read stdin: {e}");
                break;
            }
        }
    }
    let _ = writer.finish().await;
}

async fn send_sizes(mut sizes: mpsc::Receiver<TermSize>, writer: StreamWriter) {
    while let Some(s) = sizes.recv().await {
        let json = serde_json::json!({"Width": s.width, "Height": s.height}).to_string();
        if writer.send(Bytes::from(json)).await.is_err() {
            return;
        }
    }
}

/// A port-forward session: any number of connections to the pod's ports over one
/// SPDY connection.
pub struct PortForwarder {
    session: Session,
    next_id: AtomicU64,
}

impl std::fmt::Debug for PortForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForwarder").finish_non_exhaustive()
    }
}

impl PortForwarder {
    /// Connects to the URL a PortForward RPC answered.
    pub async fn connect(url: &str) -> Result<PortForwarder, ClientError> {
        let (session, _incoming, _) = spdy::upgrade::connect(url, &["portforward.k8s.io"]).await?;
        Ok(PortForwarder {
            session,
            next_id: AtomicU64::new(0),
        })
    }

    /// Relays `local` to `port` in the pod until both sides have finished; the server's
    /// error message, if it sent one, is the error.
    pub async fn forward<S>(&self, port: u16, local: S) -> Result<(), ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let headers = |kind: &str| {
            Headers::new()
                .with("streamType", kind)
                .with("port", &port.to_string())
                .with("requestID", &id)
        };
        let (mut error, error_w) = self.session.open(headers("error")).await?.split();
        error_w.finish().await?;
        let (mut reader, writer) = self.session.open(headers("data")).await?.split();
        let (mut local_r, mut local_w) = tokio::io::split(local);
        let up = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match local_r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if writer
                            .send(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = writer.finish().await;
        };
        let down = async {
            while let Some(b) = reader.recv().await {
                if local_w.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = local_w.shutdown().await;
        };
        let relay = async { tokio::join!(up, down) };
        let errors = read_capped(&mut error);
        tokio::pin!(relay, errors);
        // An error ends the connection at once; without one it ends when both sides have.
        let message = tokio::select! {
            m = &mut errors => {
                if m.is_empty() {
                    relay.await;
                }
                m
            }
            _ = &mut relay => errors.await,
        };
        if message.is_empty() {
            Ok(())
        } else {
            Err(ClientError::Remote(
                String::from_utf8_lossy(&message).into_owned(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_from_statuses() {
        assert_eq!(exit_code(b"").unwrap(), 0);
        assert_eq!(
            exit_code(br#"{"metadata":{},"status":"Success"}"#).unwrap(),
            0
        );
        let nonzero = br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"137"}]}}"#;
        assert_eq!(exit_code(nonzero).unwrap(), 137);
        let failed =
            br#"{"status":"Failure","message":"container not found","reason":"InternalError"}"#;
        assert!(
            matches!(exit_code(failed), Err(ClientError::Remote(m)) if m == "container not found")
        );
        assert!(matches!(exit_code(b"oops"), Err(ClientError::BadStatus(_))));
    }
}
