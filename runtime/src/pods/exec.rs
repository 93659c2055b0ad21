//! ExecSync: a command run in a running container with the container's user, environment
//! and working directory (its exec defaults, recorded at CreateContainer next to the VMM's
//! files), its output collected and its exit code returned.

use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_common::{IoError, lock};
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tonic::transport::Channel;

use super::agent::{AGENT_CALL_TIMEOUT, call};
use super::error::PodError;
use super::process::ExecDefaults;
use super::{PodManager, random_hex};
use crate::state::ContainerState;

/// What ExecSync returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Standard output (at most 16 MiB).
    pub stdout: Vec<u8>,
    /// Standard error (at most 16 MiB).
    pub stderr: Vec<u8>,
    /// Exit code (128+n when killed by signal n).
    pub exit_code: i32,
}

/// The most ExecSync output kept per stream.
const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;

impl PodManager {
    /// ExecSync: runs `cmd` in the running container with its user, environment and working
    /// directory; past `timeout` the process is killed and DeadlineExceeded returned.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, PodError> {
        let (c, sb) = self.container_of(id)?;
        if c.state() != ContainerState::Running {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        if cmd.is_empty() {
            return Err(PodError::InvalidArgument("exec: empty command".into()));
        }
        let mut client = sb.agent()?;
        let defaults = read_exec_defaults(&sb.exec_defaults_path(id), id)?;
        let agent_id = lock(&c.record).agent_container_id.clone();
        let exec_id = random_hex(8)?;
        let t = Instant::now();
        call(
            "ExecProcess",
            AGENT_CALL_TIMEOUT,
            client.exec_process(agent::ExecProcessRequest {
                container_id: agent_id.clone(),
                exec_id: exec_id.clone(),
                process: Some(defaults.process(cmd)?),
            }),
        )
        .await?;
        let run = collect_exec(client.clone(), agent_id.clone(), exec_id.clone());
        let result = match timeout {
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(r) => r,
                Err(_) => {
                    kill_exec(&mut client, agent_id, exec_id).await;
                    return Err(PodError::DeadlineExceeded(format!(
                        "exec in container {id} did not finish within {limit:?}; killed"
                    )));
                }
            },
            None => run.await,
        };
        tracing::debug!(
            container = id,
            ms = t.elapsed().as_millis(),
            "exec finished"
        );
        result
    }
}

/// Records a new container's exec defaults in `path`.
pub(super) fn write_exec_defaults(path: &Path, defaults: &ExecDefaults) -> Result<(), PodError> {
    let json = serde_json::to_vec(defaults)
        .map_err(|e| PodError::Internal(format!("encode exec defaults: {e}")))?;
    std::fs::write(path, json).map_err(IoError::at("write", path))?;
    Ok(())
}

/// The exec defaults recorded in `path` for container `id`. Without them an exec would not
/// know its container's user and capabilities: it is refused rather than run as root with
/// the default set.
pub(super) fn read_exec_defaults(path: &Path, id: &str) -> Result<ExecDefaults, PodError> {
    let bytes = std::fs::read(path).map_err(|e| {
        PodError::FailedPrecondition(format!(
            "container {id}: its exec defaults {} cannot be read ({e}): exec refused",
            path.display()
        ))
    })?;
    let corrupt = |e: &dyn std::error::Error| {
        PodError::FailedPrecondition(format!(
            "container {id}: its exec defaults {} are corrupt ({}): exec refused",
            path.display(),
            podvisor_common::error_chain(e)
        ))
    };
    let defaults: ExecDefaults = serde_json::from_slice(&bytes).map_err(|e| corrupt(&e))?;
    defaults.seccomp_filter_bytes().map_err(|e| corrupt(&e))?;
    Ok(defaults)
}

/// Collects the output of exec `eid` in container `cid` (at most [`MAX_EXEC_OUTPUT`] per
/// stream) until it ends, then its exit code.
async fn collect_exec(
    mut client: AgentClient<Channel>,
    cid: String,
    eid: String,
) -> Result<ExecOutput, PodError> {
    let first = agent::ProcessInput {
        container_id: cid.clone(),
        exec_id: eid.clone(),
        ..Default::default()
    };
    let mut out = ExecOutput::default();
    let mut stream = client
        .process_io(tokio_stream::iter([first]))
        .await
        .map_err(agent_error("ProcessIo"))?
        .into_inner();
    while let Some(m) = stream.message().await.map_err(agent_error("ProcessIo"))? {
        let buf = if m.stream == agent::Stream::Stderr as i32 {
            &mut out.stderr
        } else {
            &mut out.stdout
        };
        let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
        buf.extend_from_slice(&m.data[..m.data.len().min(room)]);
    }
    let w = client
        .wait_process(agent::WaitProcessRequest {
            container_id: cid,
            exec_id: eid,
        })
        .await
        .map_err(agent_error("WaitProcess"))?
        .into_inner();
    out.exit_code = w.exit_code;
    Ok(out)
}

/// For `map_err`: the agent's answer to call `what` as a [`PodError::Agent`].
pub(super) fn agent_error(what: &'static str) -> impl Fn(tonic::Status) -> PodError {
    move |status| PodError::Agent {
        what: what.into(),
        status,
    }
}

/// Kills an exec that ran past its deadline or lost its client (best effort).
pub(super) async fn kill_exec(
    client: &mut AgentClient<Channel>,
    container_id: String,
    exec_id: String,
) {
    let req = agent::SignalProcessRequest {
        container_id,
        exec_id,
        signal: libc::SIGKILL as u32,
        all: false,
    };
    let _ = call(
        "SignalProcess",
        AGENT_CALL_TIMEOUT,
        client.signal_process(req),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_without_its_defaults_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("exec-c1.json");
        let missing = read_exec_defaults(&path, "c1").unwrap_err();
        assert_eq!(missing.code(), tonic::Code::FailedPrecondition);
        std::fs::write(&path, "{not json").unwrap();
        let corrupt = read_exec_defaults(&path, "c1").unwrap_err();
        assert!(corrupt.to_string().contains("corrupt"), "{corrupt}");
        let defaults = ExecDefaults {
            uid: 1000,
            capabilities: Some(vec![]),
            ..Default::default()
        };
        write_exec_defaults(&path, &defaults).unwrap();
        assert_eq!(read_exec_defaults(&path, "c1").unwrap(), defaults);
    }
}
