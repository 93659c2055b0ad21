//! Talking to a pod's guest agent: connecting (and waiting for a new VM's agent to answer),
//! one call with a deadline, and how long each of those may take.

use std::time::{Duration, Instant};

use podvisor_common::error_chain;
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tonic::transport::Channel;

use super::error::PodError;
use crate::vmm::VmmHandle;

/// How long a new VM may take until its agent answers (40-120 s on an emulating kvm_pvm
/// host; far less on real KVM).
pub(super) const AGENT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a VM restored from a template may take until its agent answers: far less than
/// a boot; past it the pod boots the kernel instead.
pub(super) const AGENT_RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// One connect-and-Ping attempt.
pub(super) const AGENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts, growing from the first to the last. A restored VM answers
/// within milliseconds of its VMM's start: short first pauses do not make it wait; a failed
/// attempt (no socket yet) costs next to nothing.
pub(super) const AGENT_RETRY_FIRST: Duration = Duration::from_millis(10);
pub(super) const AGENT_RETRY_MAX: Duration = Duration::from_millis(500);
/// How long a reconnect after a podvisord restart may take.
pub(super) const AGENT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One agent call (creating a container takes seconds where the guest kernel is emulated).
pub(super) const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs one agent call with a deadline.
pub(super) async fn call<T>(
    what: impl Into<String>,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, PodError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(PodError::Agent {
            what: what.into(),
            status,
        }),
        Err(_) => Err(PodError::AgentTimeout {
            what: what.into(),
            timeout,
        }),
    }
}

/// Connects to the agent behind `handle` and pings it until it answers, the VMM ends or
/// `timeout` passes.
pub(super) async fn connect_agent(
    sandbox: &str,
    handle: &VmmHandle,
    timeout: Duration,
) -> Result<AgentClient<Channel>, PodError> {
    let started = Instant::now();
    let mut pause = AGENT_RETRY_FIRST;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = async {
            let mut client = podvisor_proto::hybrid::agent_client(&handle.vsock_uds)
                .await
                .map_err(|e| error_chain(&e))?;
            let pong = client
                .ping(agent::PingRequest {})
                .await
                .map_err(|s| format!("Ping: {}", s.message()))?
                .into_inner();
            Ok::<_, String>((client, pong))
        };
        let last = match tokio::time::timeout(AGENT_ATTEMPT_TIMEOUT, attempt).await {
            Ok(Ok((client, pong))) => {
                tracing::info!(
                    sandbox,
                    agent_version = %pong.agent_version,
                    guest_uptime_s = pong.uptime_ns as f64 / 1e9,
                    waited_s = started.elapsed().as_secs_f64(),
                    attempts,
                    "guest agent answered"
                );
                return Ok(client);
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {AGENT_ATTEMPT_TIMEOUT:?}"),
        };
        tracing::trace!(sandbox, "agent not up yet: {last}");
        if !handle.is_alive() {
            return Err(PodError::VmExited {
                sandbox: sandbox.to_string(),
                log_tail: handle.log_tail(),
            });
        }
        if started.elapsed() >= timeout {
            return Err(PodError::AgentUnreachable {
                sandbox: sandbox.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(AGENT_RETRY_MAX);
    }
}

/// Agent answers meaning "already gone" are success for stop and remove.
pub(super) fn ignore_gone<T>(r: Result<T, PodError>) -> Result<(), PodError> {
    match r {
        Ok(_) => Ok(()),
        Err(PodError::Agent { status, .. })
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
