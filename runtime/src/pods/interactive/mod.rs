//! Interactive sessions with a running container, behind CRI Exec and Attach (the
//! streaming server in `crate::stream` speaks the wire protocols and calls in here with
//! protocol-neutral channels, [`ClientIo`]):
//! - [`exec`]: [`PodManager::exec_stream`], a command run with a client's stdin, stdout,
//!   stderr and terminal size; killed when the client goes away.
//! - [`attach`]: [`PodManager::attach`], a client attached to the container's own process.
//! - [`hub`]: the fanout of a container's output (the one ProcessIo attachment the guest
//!   agent allows, held by its log writer) to attach sessions, and of their stdin back in.
//!
//! Validation ([`PodManager::check_exec`], [`PodManager::check_attach`]) is separate so the
//! CRI Exec and Attach RPCs can refuse a request before handing out a streaming URL.

mod attach;
mod exec;
mod hub;

pub(super) use hub::AttachHub;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::agent::call;
use super::error::PodError;
use super::{Container, PodManager, Sandbox};
use crate::logs::Stream;
use crate::state::{ContainerRecord, ContainerState};

/// How long one ResizePty may take.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(10);
/// ProcessInput messages queued towards the agent (stdin chunks; the agent writes each to
/// the process before reading the next, so a process not reading its stdin holds the
/// client back here).
const INPUT_BUFFER: usize = 8;

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TermSize {
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// The client's ends of an interactive session; every channel bounded. A stream the client
/// did not ask for is `None`.
#[derive(Debug, Default)]
pub struct ClientIo {
    /// The client's stdin; its sender dropped = the client's stdin ended.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Where the process's stdout (or its terminal's output) goes. Dropping the receiver
    /// means the client went away.
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Where the process's stderr goes; always `None` with a terminal. Dropping the
    /// receiver means the client went away.
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// The client's terminal sizes; ignored without a terminal.
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

impl PodManager {
    /// Validates a CRI Exec request before a streaming URL is handed out: the container
    /// exists (NotFound) and runs (FailedPrecondition), `cmd` is not empty, at least one of
    /// stdin, stdout and stderr is asked for and not stderr with a terminal (the terminal
    /// carries both; InvalidArgument).
    pub fn check_exec(
        &self,
        container_id: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> Result<(), PodError> {
        self.running_container(container_id)?;
        check_exec_request(cmd, tty, stdin, stdout, stderr)
    }

    /// Validates a CRI Attach request before a streaming URL is handed out: the container
    /// exists (NotFound) and runs (FailedPrecondition), the streams are as for
    /// [`PodManager::check_exec`], and stdin is asked for only of a container created with
    /// stdin (FailedPrecondition: it would go nowhere).
    ///
    /// `tty` need not match the container's terminal: as in containerd (whose attach uses
    /// the container's `tty`, never the request's), the container decides: a terminal's
    /// output all goes to stdout, and resizes are ignored without one. kubectl warns about
    /// a mismatch itself.
    pub fn check_attach(
        &self,
        container_id: &str,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> Result<(), PodError> {
        let (c, _) = self.running_container(container_id)?;
        check_attach_request(&c.record(), tty, stdin, stdout, stderr)
    }

    /// The container `id` and its sandbox, if it runs.
    fn running_container(&self, id: &str) -> Result<(Arc<Container>, Arc<Sandbox>), PodError> {
        let (c, sb) = self.container_of(id)?;
        if c.state() != ContainerState::Running {
            return Err(PodError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        Ok((c, sb))
    }
}

/// The checks of [`PodManager::check_exec`] that need no container.
fn check_exec_request(
    cmd: &[String],
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), PodError> {
    if cmd.is_empty() {
        return Err(PodError::InvalidArgument("exec: empty command".into()));
    }
    check_streams("exec", tty, stdin, stdout, stderr)
}

/// The checks of [`PodManager::check_attach`] once the running container's record `r` is
/// known.
fn check_attach_request(
    r: &ContainerRecord,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), PodError> {
    check_streams("attach", tty, stdin, stdout, stderr)?;
    if stdin && !r.stdin {
        return Err(PodError::FailedPrecondition(format!(
            "attach: container {} was created without stdin (its config's stdin is false): \
             there is no stdin to attach to",
            r.id
        )));
    }
    Ok(())
}

/// At least one stream, and no stderr with a terminal.
fn check_streams(
    what: &str,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), PodError> {
    if !(stdin || stdout || stderr) {
        return Err(PodError::InvalidArgument(format!(
            "{what}: one of stdin, stdout and stderr must be requested"
        )));
    }
    if tty && stderr {
        return Err(PodError::InvalidArgument(format!(
            "{what}: stderr cannot be requested with a tty: the terminal carries all output \
             on stdout"
        )));
    }
    Ok(())
}

/// Where output of `stream` goes: with a terminal everything is stdout; `None` when the
/// client did not ask for it (it is then dropped).
fn route<'a>(
    stream: Stream,
    tty: bool,
    stdout: Option<&'a mpsc::Sender<Bytes>>,
    stderr: Option<&'a mpsc::Sender<Bytes>>,
) -> Option<&'a mpsc::Sender<Bytes>> {
    match stream {
        Stream::Stderr if !tty => stderr,
        _ => stdout,
    }
}

/// Which stream an agent output message is of.
fn stream_of(m: &agent::ProcessOutput) -> Stream {
    if m.stream == agent::Stream::Stderr as i32 {
        Stream::Stderr
    } else {
        Stream::Stdout
    }
}

/// Resolves once any of the client's output receivers is dropped (never when it has none):
/// the client went away.
async fn client_gone(stdout: Option<&mpsc::Sender<Bytes>>, stderr: Option<&mpsc::Sender<Bytes>>) {
    tokio::select! {
        () = closed(stdout) => {}
        () = closed(stderr) => {}
    }
}

/// Resolves once the receiver of `s` is dropped; never without `s`.
async fn closed(s: Option<&mpsc::Sender<Bytes>>) {
    match s {
        Some(s) => s.closed().await,
        None => std::future::pending().await,
    }
}

/// Runs `main` with `side` polled alongside it (in the same task: dropping the returned
/// future drops both); returns `main`'s result. `side` may finish first.
async fn alongside<T>(main: impl Future<Output = T>, side: impl Future<Output = ()>) -> T {
    tokio::pin!(main);
    tokio::pin!(side);
    let mut side_done = false;
    loop {
        tokio::select! {
            r = &mut main => return r,
            () = &mut side, if !side_done => side_done = true,
        }
    }
}

/// The last size already waiting in `resize`, if any.
fn latest_size(resize: &mut Option<mpsc::Receiver<TermSize>>) -> Option<TermSize> {
    let rx = resize.as_mut()?;
    let mut last = None;
    while let Ok(s) = rx.try_recv() {
        last = Some(s);
    }
    last
}

/// Forwards the client's terminal sizes to process `exec_id` ("" for the container's own)
/// until the client's resize channel ends; without a terminal they are read and dropped.
/// A failed resize is logged and the next one tried.
async fn forward_resizes(
    mut client: AgentClient<Channel>,
    container_id: String,
    exec_id: String,
    resize: Option<mpsc::Receiver<TermSize>>,
    tty: bool,
) {
    let Some(mut resize) = resize else { return };
    while let Some(size) = resize.recv().await {
        if !tty || size.width == 0 || size.height == 0 {
            continue;
        }
        let req = agent::ResizePtyRequest {
            container_id: container_id.clone(),
            exec_id: exec_id.clone(),
            width: size.width.into(),
            height: size.height.into(),
        };
        if let Err(e) = call("ResizePty", RESIZE_TIMEOUT, client.resize_pty(req)).await {
            tracing::debug!(container = %container_id, exec = %exec_id, "resize: {e}");
        }
    }
}

/// The error of a session whose client went away.
fn client_went_away(what: &str) -> PodError {
    PodError::FailedPrecondition(format!("{what}: the client went away"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stdin: bool) -> ContainerRecord {
        ContainerRecord {
            id: "c1".into(),
            sandbox_id: "sb1".into(),
            name: "c".into(),
            attempt: 0,
            labels: Default::default(),
            annotations: Default::default(),
            image: "busybox".into(),
            image_id: "sha256:1".into(),
            image_ref: "sha256:1".into(),
            created_at_ns: 1,
            started_at_ns: 2,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            state: ContainerState::Running,
            log_path: Default::default(),
            mounts: Vec::new(),
            agent_container_id: "c1".into(),
            guest_pid: 1,
            image_drive_id: "img0".into(),
            tty: false,
            stdin,
            stdin_once: false,
        }
    }

    #[test]
    fn exec_requests_are_validated() {
        let sh = vec!["sh".to_string()];
        assert!(check_exec_request(&sh, false, true, true, true).is_ok());
        assert!(check_exec_request(&sh, true, true, true, false).is_ok());
        let empty = check_exec_request(&[], false, false, true, false).unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
        assert!(empty.to_string().contains("empty command"), "{empty}");
        let none = check_exec_request(&sh, false, false, false, false).unwrap_err();
        assert_eq!(none.code(), tonic::Code::InvalidArgument);
        assert!(none.to_string().contains("one of stdin"), "{none}");
        let tty_stderr = check_exec_request(&sh, true, false, true, true).unwrap_err();
        assert_eq!(tty_stderr.code(), tonic::Code::InvalidArgument);
        assert!(tty_stderr.to_string().contains("tty"), "{tty_stderr}");
    }

    #[test]
    fn attach_requests_are_validated() {
        assert!(check_attach_request(&record(true), false, true, true, true).is_ok());
        // The container's terminal decides; the request's flag need not match.
        assert!(check_attach_request(&record(false), true, false, true, false).is_ok());
        let no_stdin = check_attach_request(&record(false), false, true, true, false).unwrap_err();
        assert_eq!(no_stdin.code(), tonic::Code::FailedPrecondition);
        assert!(no_stdin.to_string().contains("without stdin"), "{no_stdin}");
        let none = check_attach_request(&record(true), false, false, false, false).unwrap_err();
        assert_eq!(none.code(), tonic::Code::InvalidArgument);
        let tty_stderr = check_attach_request(&record(true), true, true, true, true).unwrap_err();
        assert_eq!(tty_stderr.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn output_is_routed_by_stream_unless_a_terminal() {
        let (out, _out_rx) = mpsc::channel(1);
        let (err, _err_rx) = mpsc::channel(1);
        let pick = |s, tty, o, e| route(s, tty, o, e).map(|t| t.same_channel(&out));
        assert_eq!(
            pick(Stream::Stdout, false, Some(&out), Some(&err)),
            Some(true)
        );
        assert_eq!(
            pick(Stream::Stderr, false, Some(&out), Some(&err)),
            Some(false)
        );
        assert_eq!(pick(Stream::Stderr, true, Some(&out), None), Some(true));
        assert_eq!(pick(Stream::Stderr, false, Some(&out), None), None);
        assert_eq!(pick(Stream::Stdout, false, None, Some(&err)), None);
    }

    #[tokio::test]
    async fn the_latest_waiting_size_is_taken() {
        let (tx, rx) = mpsc::channel(4);
        let mut resize = Some(rx);
        assert_eq!(latest_size(&mut resize), None);
        tx.send(TermSize {
            width: 80,
            height: 24,
        })
        .await
        .unwrap();
        tx.send(TermSize {
            width: 100,
            height: 40,
        })
        .await
        .unwrap();
        assert_eq!(
            latest_size(&mut resize),
            Some(TermSize {
                width: 100,
                height: 40
            })
        );
        assert_eq!(latest_size(&mut None), None);
    }

    #[tokio::test]
    async fn a_dropped_receiver_means_the_client_went_away() {
        let (out, out_rx) = mpsc::channel::<Bytes>(1);
        let gone = client_gone(Some(&out), None);
        tokio::pin!(gone);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut gone)
                .await
                .is_err()
        );
        drop(out_rx);
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("noticed");
    }
}
