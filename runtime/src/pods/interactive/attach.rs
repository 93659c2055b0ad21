//! Attach: a client's session with a running container's own process, through the
//! container's [`AttachHub`] (the log writer holds the agent's one ProcessIo attachment).
//!
//! - Output: the session sees the container's output from when it attached, with
//!   backpressure from its client up to the hub's buffer; past that it is dropped
//!   (ResourceExhausted) while the log and other sessions go on.
//! - Stdin (containers created with CRI `stdin`): the client's stdin reaches the
//!   container's; several sessions' stdin interleave, as in containerd. The client's stdin
//!   ending does not close the container's, unless the container has `stdin_once`: then the
//!   first session that had stdin closes it when its stdin ends or the session ends.
//! - Terminal (containers created with CRI `tty`): the client's sizes go to ResizePty of
//!   the container's process; all output is the terminal's, on stdout.

use bytes::Bytes;
use podvisor_proto::v1 as agent;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::hub::{AttachHub, Ended, SUBSCRIBER_BUFFER, Subscription};
use super::{ClientIo, alongside, check_attach_request, client_gone, forward_resizes, route};
use crate::pods::PodManager;
use crate::pods::error::PodError;

impl PodManager {
    /// Attaches a client to the running container's process until the container's output
    /// ends (it exited) or the client goes away (a dropped output receiver or a dropped
    /// future); both return `Ok`. Refused like [`PodManager::check_attach`]; the
    /// container's terminal, not the client's, decides how output is split (a client's
    /// stderr gets nothing with a terminal). A client that falls too far behind the output
    /// is dropped with ResourceExhausted.
    pub async fn attach(&self, container_id: &str, io: ClientIo) -> Result<(), PodError> {
        let (c, sb) = self.running_container(container_id)?;
        let r = c.record();
        check_attach_request(
            &r,
            false,
            io.stdin.is_some(),
            io.stdout.is_some(),
            io.stderr.is_some(),
        )?;
        let client = sb.agent()?;
        let Some(sub) = c.attach.subscribe() else {
            tracing::debug!(container = container_id, "attach: the output already ended");
            return Ok(());
        };
        let ClientIo {
            stdin,
            stdout,
            stderr,
            resize,
        } = io;
        let resizes = forward_resizes(
            client,
            r.agent_container_id.clone(),
            String::new(),
            resize,
            r.tty,
        );
        let io = ClientIo {
            stdin,
            stdout,
            stderr,
            resize: None,
        };
        tracing::info!(container = container_id, "attach session begins");
        let result = alongside(
            run_session(&c.attach, sub, r.tty, r.stdin_once, io),
            resizes,
        )
        .await;
        tracing::info!(
            container = container_id,
            ok = result.is_ok(),
            "attach session ended"
        );
        result
    }
}

/// One attach session over `sub` and the hub's input, with `io`'s stdin, stdout and stderr
/// (its resize is not read here): see the module's documentation.
async fn run_session(
    hub: &AttachHub,
    sub: Subscription,
    tty: bool,
    stdin_once: bool,
    io: ClientIo,
) -> Result<(), PodError> {
    // Closes the container's stdin however the session ends, if it is the first with stdin.
    let _once = (stdin_once && io.stdin.is_some()).then_some(CloseStdinOnDrop(hub));
    let output = output_to_client(sub, tty, io.stdout.as_ref(), io.stderr.as_ref());
    let input = async {
        if let Some(stdin) = io.stdin {
            stdin_to_container(hub, stdin).await;
            if stdin_once && let Some(input) = hub.take_stdin_close() {
                tracing::debug!("attach: the client's stdin ended; closing the container's");
                let _ = input.send(close_stdin()).await;
            }
        }
    };
    alongside(output, input).await
}

/// Copies the session's output to the client until it ends or the client goes away.
async fn output_to_client(
    mut sub: Subscription,
    tty: bool,
    stdout: Option<&mpsc::Sender<Bytes>>,
    stderr: Option<&mpsc::Sender<Bytes>>,
) -> Result<(), PodError> {
    loop {
        let next = tokio::select! {
            next = sub.next() => next,
            () = client_gone(stdout, stderr) => return Ok(()),
        };
        match next {
            Ok(chunk) => {
                if let Some(tx) = route(chunk.stream, tty, stdout, stderr)
                    && tx.send(chunk.data).await.is_err()
                {
                    return Ok(());
                }
            }
            Err(Ended::Output) => return Ok(()),
            Err(Ended::TooSlow) => {
                return Err(PodError::ResourceExhausted(format!(
                    "attach: the client fell {SUBSCRIBER_BUFFER} chunks behind the container's \
                     output and was dropped"
                )));
            }
        }
    }
}

/// Copies the client's stdin to the container's until it ends or the output did.
async fn stdin_to_container(hub: &AttachHub, mut stdin: mpsc::Receiver<Bytes>) {
    while let Some(data) = stdin.recv().await {
        if data.is_empty() {
            continue;
        }
        let Some(input) = hub.input() else {
            tracing::debug!("attach: the container's output is not attached; stdin dropped");
            continue;
        };
        let msg = agent::ProcessInput {
            stdin: Vec::from(data),
            ..Default::default()
        };
        if input.send(msg).await.is_err() {
            return;
        }
    }
}

/// A ProcessInput closing the process's stdin.
fn close_stdin() -> agent::ProcessInput {
    agent::ProcessInput {
        close_stdin: true,
        ..Default::default()
    }
}

/// On drop, closes the container's stdin unless it was already (`stdin_once`).
struct CloseStdinOnDrop<'a>(&'a AttachHub);

impl Drop for CloseStdinOnDrop<'_> {
    fn drop(&mut self) {
        let Some(input) = self.0.take_stdin_close() else {
            return;
        };
        tracing::debug!("attach: the first session with stdin ended; closing the container's");
        match input.try_send(close_stdin()) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(msg)) => match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(async move {
                        let _ = input.send(msg).await;
                    });
                }
                Err(_) => tracing::warn!("attach: no runtime to close the container's stdin"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::logs::Stream;

    const WAIT: Duration = Duration::from_secs(5);

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// A client with stdout (and stdin when `stdin`), its other ends.
    fn client(stdin: bool) -> (ClientIo, Option<mpsc::Sender<Bytes>>, mpsc::Receiver<Bytes>) {
        let (out_tx, out_rx) = mpsc::channel(4);
        let (in_tx, in_rx) = mpsc::channel(4);
        let io = ClientIo {
            stdin: stdin.then_some(in_rx),
            stdout: Some(out_tx),
            ..Default::default()
        };
        (io, stdin.then_some(in_tx), out_rx)
    }

    fn session(
        hub: &Arc<AttachHub>,
        stdin_once: bool,
        io: ClientIo,
    ) -> tokio::task::JoinHandle<Result<(), PodError>> {
        let hub = hub.clone();
        let sub = hub.subscribe().unwrap();
        tokio::spawn(async move { run_session(&hub, sub, false, stdin_once, io).await })
    }

    #[tokio::test]
    async fn two_attachers_both_get_the_output_and_end_with_it() {
        let hub = Arc::new(AttachHub::default());
        let (io1, _, mut out1) = client(false);
        let (mut io2, _, mut out2) = client(false);
        let (err_tx, mut err2) = mpsc::channel(4);
        io2.stderr = Some(err_tx);
        let (s1, s2) = (session(&hub, false, io1), session(&hub, false, io2));
        hub.publish(Stream::Stdout, &b("out"));
        hub.publish(Stream::Stderr, &b("err"));
        assert_eq!(out1.recv().await, Some(b("out")));
        assert_eq!(out2.recv().await, Some(b("out")));
        assert_eq!(err2.recv().await, Some(b("err")));
        hub.end();
        assert!(s1.await.unwrap().is_ok());
        assert!(s2.await.unwrap().is_ok());
        assert_eq!(out1.recv().await, None, "session 1 had no stderr: dropped");
    }

    #[tokio::test]
    async fn a_stalled_attacher_is_dropped_and_the_log_goes_on() {
        let hub = Arc::new(AttachHub::default());
        let (io, _, mut stalled_out) = client(false);
        let stalled = session(&hub, false, io);
        // publish never waits for the stalled client.
        for _ in 0..SUBSCRIBER_BUFFER * 2 {
            hub.publish(Stream::Stdout, &b("chunk"));
            tokio::task::yield_now().await;
        }
        // The client wakes up: it gets what was buffered, then the session ends.
        let mut got = 0;
        while tokio::time::timeout(WAIT, stalled_out.recv())
            .await
            .unwrap()
            .is_some()
        {
            got += 1;
        }
        assert!(got <= SUBSCRIBER_BUFFER + 8, "{got} chunks");
        let e = tokio::time::timeout(WAIT, stalled)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(hub.subscribe().is_some(), "the hub itself goes on");
    }

    #[tokio::test]
    async fn the_client_going_away_ends_the_session() {
        let hub = Arc::new(AttachHub::default());
        let (io, _, out) = client(false);
        let s = session(&hub, false, io);
        drop(out);
        assert!(
            tokio::time::timeout(WAIT, s)
                .await
                .unwrap()
                .unwrap()
                .is_ok()
        );
    }

    #[tokio::test]
    async fn stdin_once_closes_after_the_first_attacher_with_stdin() {
        let hub = Arc::new(AttachHub::default());
        let (input, mut container_in) = mpsc::channel(8);
        hub.connect(input);

        let (io, stdin, _out) = client(true);
        let first = session(&hub, true, io);
        let stdin = stdin.unwrap();
        stdin.send(b("hi\n")).await.unwrap();
        drop(stdin);
        let m = container_in.recv().await.unwrap();
        assert_eq!((m.stdin.as_slice(), m.close_stdin), (&b"hi\n"[..], false));
        let m = container_in.recv().await.unwrap();
        assert!(
            m.close_stdin,
            "the first session's stdin end closes the container's"
        );

        let (io, stdin, _out2) = client(true);
        let second = session(&hub, true, io);
        let stdin = stdin.unwrap();
        stdin.send(b("late")).await.unwrap();
        drop(stdin);
        let m = container_in.recv().await.unwrap();
        assert_eq!(m.stdin, b"late");
        hub.end();
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        assert!(container_in.recv().await.is_none(), "no second close_stdin");
    }

    #[tokio::test]
    async fn stdin_once_closes_when_the_session_is_dropped() {
        let hub = Arc::new(AttachHub::default());
        let (input, mut container_in) = mpsc::channel(8);
        hub.connect(input);
        let (io, _stdin, _out) = client(true);
        let s = session(&hub, true, io);
        tokio::task::yield_now().await;
        s.abort();
        let m = tokio::time::timeout(WAIT, container_in.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(m.close_stdin);
    }

    #[tokio::test]
    async fn without_stdin_once_the_container_stdin_stays_open() {
        let hub = Arc::new(AttachHub::default());
        let (input, mut container_in) = mpsc::channel(8);
        hub.connect(input);
        let (io, stdin, _out) = client(true);
        let s = session(&hub, false, io);
        drop(stdin);
        hub.end();
        assert!(s.await.unwrap().is_ok());
        assert!(container_in.recv().await.is_none());
    }
}
