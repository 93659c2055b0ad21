//! Exec and attach sessions (kubelet's "remotecommand" protocols): the subprotocol versions,
//! the options a session runs with, the backend call on the pod manager, and the final
//! status the client reads on the error stream. [`spdy`] and [`ws`] carry them.

mod spdy;
mod ws;

use bytes::Bytes;
use k8s_cri::v1 as cri;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::request::StreamRequest;
use crate::pods::{ClientIo, PodError, PodManager, TermSize};

pub(super) use spdy::spdy;
pub(super) use ws::websocket;

/// How long a client may take to open the streams its request needs (kubelet's
/// `StreamCreationTimeout`).
pub(super) const STREAM_CREATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Chunks queued between a client stream and the backend, each way.
const CHANNEL_DEPTH: usize = 16;
/// The most bytes of resize messages buffered before one is complete.
const MAX_RESIZE_BYTES: usize = 4096;

/// A remotecommand protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Version {
    /// `channel.k8s.io`: no resize, errors as text.
    V1,
    /// `v2.channel.k8s.io`.
    V2,
    /// `v3.channel.k8s.io`: adds the resize stream.
    V3,
    /// `v4.channel.k8s.io`: the exit status as a metav1.Status on the error stream.
    V4,
    /// `v5.channel.k8s.io` (WebSocket only): adds the close signal.
    V5,
}

impl Version {
    pub(super) fn from_name(name: &str) -> Option<Version> {
        Some(match name {
            "channel.k8s.io" => Version::V1,
            "v2.channel.k8s.io" => Version::V2,
            "v3.channel.k8s.io" => Version::V3,
            "v4.channel.k8s.io" => Version::V4,
            "v5.channel.k8s.io" => Version::V5,
            _ => return None,
        })
    }

    fn resizes(self) -> bool {
        self >= Version::V3
    }
}

/// What a session carries: which of the client's streams exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Options {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Options {
    fn of(request: &StreamRequest) -> Options {
        match request {
            StreamRequest::Exec(e) => Options {
                stdin: e.stdin,
                stdout: e.stdout,
                stderr: e.stderr,
                tty: e.tty,
            },
            StreamRequest::Attach(a) => Options {
                stdin: a.stdin,
                stdout: a.stdout,
                stderr: a.stderr,
                tty: a.tty,
            },
            StreamRequest::PortForward(_) => Options {
                stdin: false,
                stdout: false,
                stderr: false,
                tty: false,
            },
        }
    }
}

/// The backend's ends of a session's channels, and the client's.
pub(super) struct Channels {
    /// Handed to the backend.
    pub io: ClientIo,
    /// Fed from the client's stdin.
    pub stdin: Option<mpsc::Sender<Bytes>>,
    /// Drained to the client.
    pub stdout: Option<mpsc::Receiver<Bytes>>,
    pub stderr: Option<mpsc::Receiver<Bytes>>,
    /// Fed from the client's resize messages.
    pub resize: Option<mpsc::Sender<TermSize>>,
}

impl Channels {
    /// Channels for `opts`; resizes only with a terminal on a version that has them.
    pub(super) fn new(opts: Options, version: Version) -> Channels {
        fn pair<T>(on: bool) -> (Option<mpsc::Sender<T>>, Option<mpsc::Receiver<T>>) {
            if on {
                let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
                (Some(tx), Some(rx))
            } else {
                (None, None)
            }
        }
        let (stdin_tx, stdin_rx) = pair(opts.stdin);
        let (stdout_tx, stdout_rx) = pair(opts.stdout);
        let (stderr_tx, stderr_rx) = pair(opts.stderr && !opts.tty);
        let (resize_tx, resize_rx) = pair(opts.tty && version.resizes());
        Channels {
            io: ClientIo {
                stdin: stdin_rx,
                stdout: stdout_tx,
                stderr: stderr_tx,
                resize: resize_rx,
            },
            stdin: stdin_tx,
            stdout: stdout_rx,
            stderr: stderr_rx,
            resize: resize_tx,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The exec's process exited with this code.
    Exited(i32),
    /// The attached container's output ended.
    Detached,
    /// The backend failed.
    Failed(PodError),
    /// The session passed no data for the idle timeout.
    Idle,
}

/// How long a terminal session waits for the client's first size before its process
/// starts without one. Clients send it right after opening their streams; a process that
/// starts first would see no size (`stty size` answers `0 0`).
const INITIAL_SIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits (briefly) for the first terminal size, so the backend starts the process with it;
/// the sizes then flow on unchanged.
async fn with_initial_size(io: &mut ClientIo) {
    let Some(mut rx) = io.resize.take() else {
        return;
    };
    let first = tokio::time::timeout(INITIAL_SIZE_WAIT, rx.recv()).await;
    let (tx, forwarded) = mpsc::channel(CHANNEL_DEPTH);
    if let Ok(Some(size)) = first {
        let _ = tx.try_send(size);
    }
    tokio::spawn(async move {
        while let Some(size) = rx.recv().await {
            if tx.send(size).await.is_err() {
                return;
            }
        }
    });
    io.resize = Some(forwarded);
}

/// Runs the request's backend on `io`.
pub(super) async fn run(pods: &PodManager, request: &StreamRequest, mut io: ClientIo) -> Outcome {
    with_initial_size(&mut io).await;
    let result = match request {
        StreamRequest::Exec(e) => pods
            .exec_stream(&e.container_id, e.cmd.clone(), e.tty, io)
            .await
            .map(Outcome::Exited),
        StreamRequest::Attach(a) => pods
            .attach(&a.container_id, io)
            .await
            .map(|()| Outcome::Detached),
        StreamRequest::PortForward(_) => Err(PodError::InvalidArgument(
            "a port-forward request on an exec URL".into(),
        )),
    };
    result.unwrap_or_else(Outcome::Failed)
}

fn command_of(request: &StreamRequest) -> String {
    match request {
        StreamRequest::Exec(cri::ExecRequest { cmd, .. }) => format!("{cmd:?}"),
        _ => String::new(),
    }
}

/// What the error stream carries at the end: `None` for success before v4 (nothing is
/// written), text before v4, a metav1.Status JSON from v4 on.
pub(super) fn final_status(
    version: Version,
    request: &StreamRequest,
    outcome: &Outcome,
) -> Option<Bytes> {
    let failure = match outcome {
        Outcome::Exited(0) | Outcome::Detached => None,
        Outcome::Exited(code) => Some((
            format!(
                "command terminated with non-zero exit code: error executing command {}, exit code {code}",
                command_of(request)
            ),
            Some(*code),
        )),
        Outcome::Failed(e) => Some((podvisor_common::error_chain(e), None)),
        Outcome::Idle => Some(("the session was idle for too long".to_string(), None)),
    };
    if version < Version::V4 {
        return failure.map(|(message, _)| Bytes::from(message));
    }
    let status = match failure {
        None => serde_json::json!({"metadata": {}, "status": "Success"}),
        Some((message, Some(code))) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Some((message, None)) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
            "details": {"causes": [{"message": message}]},
        }),
    };
    Some(Bytes::from(status.to_string()))
}

/// A resize message as clients send them: `{"Width":80,"Height":24}`.
#[derive(Debug, Deserialize)]
struct Resize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// Splits a byte stream of concatenated JSON resize messages.
#[derive(Debug, Default)]
pub(super) struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    /// Adds `data`; the complete sizes it finishes. Err when the messages are not resize
    /// messages or one grows past [`MAX_RESIZE_BYTES`].
    pub(super) fn push(&mut self, data: &[u8]) -> Result<Vec<TermSize>, String> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Resize>();
        let mut used = 0;
        loop {
            match stream.next() {
                Some(Ok(r)) => {
                    used = stream.byte_offset();
                    sizes.push(TermSize {
                        width: r.width,
                        height: r.height,
                    });
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(format!("bad resize message: {e}")),
                None => {
                    used = stream.byte_offset();
                    break;
                }
            }
        }
        self.buf.drain(..used);
        if self.buf.len() > MAX_RESIZE_BYTES {
            return Err(format!("a resize message over {MAX_RESIZE_BYTES} bytes"));
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> StreamRequest {
        StreamRequest::Exec(cri::ExecRequest {
            cmd: vec!["sh".into()],
            ..Default::default()
        })
    }

    #[test]
    fn statuses_per_version() {
        let json = |o: &Outcome| -> serde_json::Value {
            serde_json::from_slice(&final_status(Version::V4, &exec(), o).expect("status"))
                .expect("json")
        };
        assert_eq!(json(&Outcome::Exited(0))["status"], "Success");
        let s = json(&Outcome::Exited(7));
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "7");
        let s = json(&Outcome::Failed(PodError::NotFound("container x".into())));
        assert_eq!(s["reason"], "InternalError");
        assert!(
            s["message"]
                .as_str()
                .is_some_and(|m| m.contains("container x"))
        );

        assert_eq!(
            final_status(Version::V2, &exec(), &Outcome::Exited(0)),
            None
        );
        let text = final_status(Version::V3, &exec(), &Outcome::Exited(3)).expect("text");
        assert!(String::from_utf8_lossy(&text).contains("exit code 3"));
    }

    #[test]
    fn resize_messages_split_anywhere() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.push(b"{\"Width\":80,").unwrap(), vec![]);
        let sizes = d
            .push(b"\"Height\":24}{\"Width\":100,\"Height\":40}{\"Wi")
            .unwrap();
        assert_eq!(
            sizes,
            vec![
                TermSize {
                    width: 80,
                    height: 24
                },
                TermSize {
                    width: 100,
                    height: 40
                }
            ]
        );
        assert_eq!(
            d.push(b"dth\":1,\"Height\":2}").unwrap(),
            vec![TermSize {
                width: 1,
                height: 2
            }]
        );
        assert!(d.push(b"\"text\"").is_err());
        let mut d = ResizeDecoder::default();
        assert!(d.push(&[b'{'; 5000]).is_err());
        let mut d = ResizeDecoder::default();
        let mut huge = b"{\"Width\":1,\"Height\":2,\"x\":\"".to_vec();
        huge.resize(MAX_RESIZE_BYTES + 10, b'a');
        assert!(d.push(&huge).is_err(), "an endless message is refused");
    }

    #[test]
    fn versions_parse() {
        assert_eq!(Version::from_name("v4.channel.k8s.io"), Some(Version::V4));
        assert_eq!(Version::from_name("channel.k8s.io"), Some(Version::V1));
        assert_eq!(Version::from_name("v9.channel.k8s.io"), None);
        let c = Channels::new(
            Options {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: true,
            },
            Version::V4,
        );
        assert!(c.io.stderr.is_none(), "a terminal has no stderr");
        assert!(c.io.resize.is_some());
        let c = Channels::new(
            Options {
                stdin: false,
                stdout: true,
                stderr: false,
                tty: true,
            },
            Version::V2,
        );
        assert!(c.io.resize.is_none() && c.io.stdin.is_none());
    }
}
