//! Streaming exec (CRI Exec): a command run in a running container with its exec defaults
//! (as ExecSync), its stdin, stdout, stderr and terminal connected to a client.
//!
//! The exec is killed (SIGKILL, from a task of its own so it outlives the session) when
//! the session ends before the process did: the future dropped or a client's output
//! receiver dropped, as containerd does. Nothing is buffered beyond the channels' bounds:
//! a slow client holds the agent's output stream back, and a process not reading its stdin
//! holds the client's stdin back.

use bytes::Bytes;
use podvisor_common::lock;
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{
    ClientIo, INPUT_BUFFER, alongside, check_exec_request, client_gone, client_went_away,
    forward_resizes, latest_size, route, stream_of,
};
use crate::pods::agent::{AGENT_CALL_TIMEOUT, call};
use crate::pods::error::PodError;
use crate::pods::exec::{agent_error, kill_exec, read_exec_defaults};
use crate::pods::{PodManager, random_hex};

impl PodManager {
    /// Runs `cmd` in the running container with its user, environment and working directory
    /// (its exec defaults), with a terminal when `tty`, connected to the client's `io`:
    /// stdin streamed in (its end closes the process's stdin), stdout and stderr out apart
    /// (one stream with a terminal), terminal sizes forwarded (a size already waiting when
    /// the process starts is its initial size). Returns the process's exit code (128+n when
    /// killed by signal n).
    ///
    /// Refused like [`PodManager::check_exec`]. When the future is dropped or a client's
    /// output receiver is dropped, the process is killed; the latter returns
    /// FailedPrecondition ("the client went away").
    pub async fn exec_stream(
        &self,
        container_id: &str,
        cmd: Vec<String>,
        tty: bool,
        io: ClientIo,
    ) -> Result<i32, PodError> {
        let (c, sb) = self.running_container(container_id)?;
        let ClientIo {
            stdin,
            stdout,
            stderr,
            mut resize,
        } = io;
        check_exec_request(
            &cmd,
            tty,
            stdin.is_some(),
            stdout.is_some(),
            stderr.is_some(),
        )?;
        let mut client = sb.agent()?;
        let defaults = read_exec_defaults(&sb.exec_defaults_path(container_id), container_id)?;
        let agent_id = lock(&c.record).agent_container_id.clone();
        let exec_id = random_hex(8)?;
        let mut process = defaults.process(cmd)?;
        process.terminal = tty;
        process.stdin = stdin.is_some();
        if tty && let Some(size) = latest_size(&mut resize) {
            process.console_width = size.width.into();
            process.console_height = size.height.into();
        }
        let req = agent::ExecProcessRequest {
            container_id: agent_id.clone(),
            exec_id: exec_id.clone(),
            process: Some(process),
        };
        // Armed before ExecProcess: a session dropped while the agent starts it kills it too.
        let mut kill = KillOnDrop(Some((client.clone(), agent_id.clone(), exec_id.clone())));
        if let Err(e) = call("ExecProcess", AGENT_CALL_TIMEOUT, client.exec_process(req)).await {
            kill.disarm();
            return Err(e);
        }
        tracing::info!(container = container_id, exec = %exec_id, tty, "exec session begins");

        let (input, input_rx) = mpsc::channel(INPUT_BUFFER);
        let first = agent::ProcessInput {
            container_id: agent_id.clone(),
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        input
            .send(first)
            .await
            .map_err(|_| PodError::Internal("exec: the input stream closed at once".into()))?;
        let output = client
            .process_io(ReceiverStream::new(input_rx))
            .await
            .map_err(agent_error("ProcessIo"))?
            .into_inner();
        let side = async {
            tokio::join!(
                stdin_to_process(input, stdin),
                forward_resizes(
                    client.clone(),
                    agent_id.clone(),
                    exec_id.clone(),
                    resize,
                    tty
                ),
            );
        };
        let pump = output_to_client(output, tty, stdout.as_ref(), stderr.as_ref());
        alongside(pump, side).await?;

        let wait = client.wait_process(agent::WaitProcessRequest {
            container_id: agent_id,
            exec_id: exec_id.clone(),
        });
        let w = tokio::select! {
            w = wait => w.map_err(agent_error("WaitProcess"))?.into_inner(),
            () = client_gone(stdout.as_ref(), stderr.as_ref()) => {
                return Err(client_went_away("exec"));
            }
        };
        kill.disarm();
        tracing::info!(container = container_id, exec = %exec_id, exit_code = w.exit_code, "exec session ended");
        Ok(w.exit_code)
    }
}

/// Copies the client's stdin (if any) to the process; its end closes the process's stdin.
async fn stdin_to_process(
    input: mpsc::Sender<agent::ProcessInput>,
    stdin: Option<mpsc::Receiver<Bytes>>,
) {
    let Some(mut stdin) = stdin else { return };
    while let Some(data) = stdin.recv().await {
        if data.is_empty() {
            continue;
        }
        let msg = agent::ProcessInput {
            stdin: Vec::from(data),
            ..Default::default()
        };
        if input.send(msg).await.is_err() {
            return;
        }
    }
    let close = agent::ProcessInput {
        close_stdin: true,
        ..Default::default()
    };
    let _ = input.send(close).await;
}

/// Copies the process's output to the client until both streams ended; fails when the
/// stream breaks or the client went away.
async fn output_to_client(
    mut output: tonic::Streaming<agent::ProcessOutput>,
    tty: bool,
    stdout: Option<&mpsc::Sender<Bytes>>,
    stderr: Option<&mpsc::Sender<Bytes>>,
) -> Result<(), PodError> {
    loop {
        let m = tokio::select! {
            m = output.message() => m.map_err(agent_error("ProcessIo"))?,
            () = client_gone(stdout, stderr) => return Err(client_went_away("exec")),
        };
        let Some(m) = m else { return Ok(()) };
        if m.data.is_empty() {
            continue;
        }
        if let Some(tx) = route(stream_of(&m), tty, stdout, stderr)
            && tx.send(Bytes::from(m.data)).await.is_err()
        {
            return Err(client_went_away("exec"));
        }
    }
}

/// Kills the exec on drop unless disarmed (from a task of its own: the session's future
/// may be being dropped).
struct KillOnDrop(Option<(AgentClient<Channel>, String, String)>);

impl KillOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some((mut client, container_id, exec_id)) = self.0.take() else {
            return;
        };
        tracing::info!(container = %container_id, exec = %exec_id, "exec session ended early; killing the process");
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move { kill_exec(&mut client, container_id, exec_id).await });
            }
            Err(_) => tracing::warn!(exec = %exec_id, "no runtime to kill the exec"),
        }
    }
}
