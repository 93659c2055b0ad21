//! PortForward's backend: a TCP connection to a port inside a sandbox's VM, dialled by the
//! guest agent from the pod's own network namespace (so a server listening on 127.0.0.1
//! only is reached, which a connection from the host would not), relayed over the agent's
//! `PortForward` stream.
//!
//! [`PodManager::port_forward`] answers once the agent is connected (or with why it is
//! not); [`PortForwardConn::split`] gives a [`PortForwardSender`] and a
//! [`PortForwardReceiver`] that work independently, so each direction can be half-closed:
//! dropping (or [`PortForwardSender::close_write`]) the sender shuts down the connection's
//! write side while replies still arrive; the receiver's `None` means the server shut down
//! its side while data can still be sent. Dropping both ends the forward and closes the
//! connection in the VM. Nothing is buffered beyond a couple of messages each way: a slow
//! reader holds the writer back (HTTP/2 flow control down to the agent's socket).

use std::time::Duration;

use bytes::Bytes;
use podvisor_proto::v1 as agent;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::PodManager;
use super::agent::call;
use super::error::PodError;
use crate::state::SandboxState;

/// How long the agent may take to answer a PortForward and connect (it gives up connecting
/// after 10 s itself).
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Input messages queued before [`PortForwardSender::send`] waits.
const QUEUED: usize = 2;
/// The largest data message sent to the agent; larger sends are split.
const CHUNK: usize = 64 * 1024;

impl PodManager {
    /// Connects to `port` inside sandbox `sandbox_id`'s VM (its network namespace, so
    /// `127.0.0.1:<port>` there; IPv4 only). NOT_FOUND for an unknown sandbox,
    /// FAILED_PRECONDITION for one that is not ready, [`PodError::Agent`] with UNAVAILABLE
    /// when nothing listens on the port or the connect fails.
    pub async fn port_forward(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> Result<PortForwardConn, PodError> {
        if port == 0 {
            return Err(PodError::InvalidArgument(
                "port forward: port 0 is not a port".into(),
            ));
        }
        self.check_port_forward(sandbox_id)?;
        let sb = self
            .sandbox_arc(sandbox_id)
            .ok_or_else(|| PodError::NotFound(format!("pod sandbox {sandbox_id:?} not found")))?;
        let client = sb.agent()?;
        let conn = PortForwardConn::open(client, port).await?;
        tracing::debug!(sandbox = sandbox_id, port, "port forward connected");
        Ok(conn)
    }
}

impl PodManager {
    /// Whether sandbox `sandbox_id` can take port forwards now: NOT_FOUND when unknown,
    /// FAILED_PRECONDITION when not ready (the CRI PortForward RPC checks before it hands
    /// out a URL).
    pub fn check_port_forward(&self, sandbox_id: &str) -> Result<(), PodError> {
        let sb = self
            .sandbox_arc(sandbox_id)
            .ok_or_else(|| PodError::NotFound(format!("pod sandbox {sandbox_id:?} not found")))?;
        if sb.state() != SandboxState::Ready {
            return Err(PodError::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not ready: no port forward"
            )));
        }
        Ok(())
    }
}

/// A TCP connection to a port inside a sandbox's VM; [`PortForwardConn::split`] it to use
/// it.
#[derive(Debug)]
pub struct PortForwardConn {
    sender: PortForwardSender,
    receiver: PortForwardReceiver,
}

impl PortForwardConn {
    /// Opens a forward to `port` (127.0.0.1 inside the VM) through the agent `client`:
    /// answers once the agent is connected. [`PodManager::port_forward`] is this for a
    /// sandbox; tests call it with their own agent client.
    pub async fn open(
        mut client: podvisor_proto::AgentClient<tonic::transport::Channel>,
        port: u16,
    ) -> Result<Self, PodError> {
        let what = format!("PortForward to port {port}");
        let (tx, rx) = mpsc::channel(QUEUED);
        tx.try_send(agent::PortForwardInput {
            port: port.into(),
            ..Default::default()
        })
        .map_err(|_| PodError::Internal("port forward: input queue full at start".into()))?;
        let input = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut output = call(what.clone(), OPEN_TIMEOUT, client.port_forward(input)).await?;
        let first = match tokio::time::timeout(OPEN_TIMEOUT, output.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => {
                return Err(PodError::Internal(format!(
                    "{what}: the agent ended the stream before connecting"
                )));
            }
            Ok(Err(status)) => return Err(PodError::Agent { what, status }),
            Err(_) => {
                return Err(PodError::AgentTimeout {
                    what,
                    timeout: OPEN_TIMEOUT,
                });
            }
        };
        if !first.connected {
            return Err(PodError::Internal(format!(
                "{what}: the agent's first message is not `connected`"
            )));
        }
        Ok(Self {
            sender: PortForwardSender { tx, port },
            receiver: PortForwardReceiver {
                output,
                port,
                done: false,
            },
        })
    }

    /// The two directions, to be used (and half-closed) independently.
    pub fn split(self) -> (PortForwardSender, PortForwardReceiver) {
        (self.sender, self.receiver)
    }
}

/// Bytes toward the server in the VM. Dropping it half-closes: the server reads EOF.
#[derive(Debug)]
pub struct PortForwardSender {
    tx: mpsc::Sender<agent::PortForwardInput>,
    port: u16,
}

impl PortForwardSender {
    /// Sends `bytes` to the server (waits while the agent is behind). Fails once the
    /// forward has ended (the agent failed it or the receiver saw an error).
    pub async fn send(&mut self, mut bytes: Bytes) -> Result<(), PodError> {
        while !bytes.is_empty() {
            let chunk = bytes.split_to(bytes.len().min(CHUNK));
            let m = agent::PortForwardInput {
                data: chunk.to_vec(),
                ..Default::default()
            };
            self.tx.send(m).await.map_err(|_| {
                PodError::FailedPrecondition(format!(
                    "the port forward to port {} has ended",
                    self.port
                ))
            })?;
        }
        Ok(())
    }

    /// Half-closes: shuts down the connection's write side (the server reads EOF); replies
    /// still arrive at the receiver. The same as dropping the sender.
    pub fn close_write(self) {
        drop(self);
    }
}

/// Bytes from the server in the VM.
#[derive(Debug)]
pub struct PortForwardReceiver {
    output: Streaming<agent::PortForwardOutput>,
    port: u16,
    /// The server's EOF or an error was returned: nothing more comes.
    done: bool,
}

impl PortForwardReceiver {
    /// The next bytes from the server; `None` once the server shut down its side (the
    /// sender still works until the agent's stream ends). An error ends the forward.
    pub async fn recv(&mut self) -> Option<Result<Bytes, PodError>> {
        while !self.done {
            match self.output.message().await {
                Ok(Some(m)) if m.eof => self.done = true,
                Ok(Some(m)) if !m.data.is_empty() => return Some(Ok(Bytes::from(m.data))),
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.done = true;
                    return Some(Err(PodError::Internal(format!(
                        "port forward to port {}: the agent ended the stream without eof",
                        self.port
                    ))));
                }
                Err(status) => {
                    self.done = true;
                    return Some(Err(PodError::Agent {
                        what: format!("PortForward to port {}", self.port),
                        status,
                    }));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::image::ImageStore;
    use crate::state::StateStore;

    #[tokio::test]
    async fn unknown_sandboxes_and_port_0_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let text = format!(
            "root_dir = {root:?}\nstate_dir = {state:?}\nvmm_user = \"\"\n",
            root = root.display().to_string(),
            state = state.display().to_string()
        );
        let config = Config::parse(&text).unwrap();
        let images = ImageStore::open(&root.join("images"), Default::default()).unwrap();
        let m = PodManager::new(config, StateStore::open(&state).unwrap(), images).unwrap();
        let e = m.port_forward("nope", 80).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        let e = m.port_forward("nope", 0).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    }
}
