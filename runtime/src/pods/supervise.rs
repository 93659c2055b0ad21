//! A container's background tasks once it exists: its output copied to its log (and fanned
//! out to attach sessions through its `AttachHub`, whose stdin goes back in on the same
//! ProcessIo stream), its exit awaited and recorded (or its VM's end noticed), and its
//! copied host paths kept current.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use podvisor_common::{lock, now_ns};
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::agent::AGENT_RETRY_MAX;
use super::vm::vmm_ended;
use super::{Container, LOST_EXIT_CODE, PodManager, VM_EXITED};
use crate::logs::Stream;

/// How long re-attaching to a container's output after a restart may be refused.
const ATTACH_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// ProcessInput messages (attach sessions' stdin) queued towards the container.
const INPUT_BUFFER: usize = 8;

impl PodManager {
    /// Copies the container's output to its log and its attach sessions (when `attach`),
    /// then waits for its exit.
    pub(super) fn supervise(
        &self,
        c: Arc<Container>,
        mut client: AgentClient<Channel>,
        attach: bool,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let agent_id = lock(&c.record).agent_container_id.clone();
            if attach {
                match attach_output(&mut client, &agent_id).await {
                    Ok((stream, input)) => {
                        c.attach.connect(input);
                        pump_output(&c, stream).await;
                    }
                    Err(s) => tracing::warn!(
                        container = %c.id,
                        "attach output: {}; the container's output is not logged",
                        s.message()
                    ),
                }
                c.attach.end();
                if let Some(w) = lock(&c.log).take()
                    && let Err(e) = w.close()
                {
                    tracing::warn!(container = %c.id, "close log: {e}");
                }
            }
            let wait = client
                .wait_process(agent::WaitProcessRequest {
                    container_id: agent_id,
                    exec_id: String::new(),
                })
                .await;
            match wait {
                Ok(w) => this.record_exit(&c, &w.into_inner()),
                Err(s) => this.wait_failed(&c, &s).await,
            }
        });
    }

    /// Records the exit the agent reported.
    fn record_exit(&self, c: &Container, w: &agent::WaitProcessResponse) {
        let reason = if w.oom_killed {
            "OOMKilled"
        } else if w.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        };
        self.mark_exited_with(c, |r| {
            r.exit_code = w.exit_code;
            r.reason = reason.to_string();
            r.message = String::new();
            if r.started_at_ns == 0 && w.started_at_unix_nanos > 0 {
                r.started_at_ns = w.started_at_unix_nanos;
            }
            r.finished_at_ns = if w.finished_at_unix_nanos > 0 {
                w.finished_at_unix_nanos
            } else {
                now_ns()
            };
        });
    }

    /// Waiting for the container's exit failed with `s`: the container is gone from its VM,
    /// or the VM is stopping or gone.
    async fn wait_failed(&self, c: &Container, s: &tonic::Status) {
        let message = if s.code() == tonic::Code::NotFound {
            "the container is gone from the pod's VM".to_string()
        } else {
            format!("lost the container's VM: {}", s.message())
        };
        // A stopping VM is reported by StopPodSandbox, a dead one as the VM's exit
        // (here, as the connection usually breaks before the watcher looks).
        tracing::info!(container = %c.id, "wait: {}", s.message());
        let Some(sb) = self.sandbox_arc(&c.sandbox_id) else {
            return;
        };
        if sb.stopping.load(Ordering::SeqCst) {
            return;
        }
        let handle = lock(&sb.record).vmm.clone();
        if vmm_ended(&handle).await {
            if !sb.stopping.load(Ordering::SeqCst) {
                tracing::warn!(sandbox = %sb.id, "the pod's VM exited");
                self.vm_gone(&sb, VM_EXITED);
            }
            return;
        }
        self.mark_exited(c, LOST_EXIT_CODE, "Error", &message);
    }
}

/// Attaches to a container's output; also returns the input side of the stream (the
/// container's stdin). After a podvisord restart the agent may not have seen
/// the previous attachment's connection end yet and answers FailedPrecondition ("already
/// attached") until it has: that is retried for [`ATTACH_RETRY_TIMEOUT`].
async fn attach_output(
    client: &mut AgentClient<Channel>,
    agent_id: &str,
) -> Result<
    (
        tonic::Streaming<agent::ProcessOutput>,
        mpsc::Sender<agent::ProcessInput>,
    ),
    tonic::Status,
> {
    let until = Instant::now() + ATTACH_RETRY_TIMEOUT;
    loop {
        let first = agent::ProcessInput {
            container_id: agent_id.to_string(),
            ..Default::default()
        };
        let (input, input_rx) = mpsc::channel(INPUT_BUFFER);
        input
            .try_send(first)
            .map_err(|_| tonic::Status::internal("the ProcessIo input channel is full"))?;
        match client.process_io(ReceiverStream::new(input_rx)).await {
            Ok(stream) => return Ok((stream.into_inner(), input)),
            Err(s) if s.code() == tonic::Code::FailedPrecondition && Instant::now() < until => {
                tracing::debug!(
                    container = agent_id,
                    "attach output: {}; retrying",
                    s.message()
                );
                tokio::time::sleep(AGENT_RETRY_MAX).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Copies a container's output stream to its log, and hands each chunk to the current
/// attach sessions without waiting for them, until both streams end.
async fn pump_output(c: &Container, mut stream: tonic::Streaming<agent::ProcessOutput>) {
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if m.data.is_empty() {
                    continue;
                }
                let which = if m.stream == agent::Stream::Stderr as i32 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                if let Some(w) = lock(&c.log).as_mut()
                    && let Err(e) = w.write(which, &m.data)
                {
                    tracing::warn!(container = %c.id, "write log: {e}");
                }
                c.attach.publish(which, &Bytes::from(m.data));
            }
            Ok(None) => return,
            Err(s) => {
                tracing::info!(container = %c.id, "output stream ended: {}", s.message());
                return;
            }
        }
    }
}
