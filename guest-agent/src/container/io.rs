//! Process I/O: pipes or a pseudo-terminal, output pumps that keep stdout and stderr apart,
//! and the single ProcessIo attachment, which can be made again once the previous one is gone
//! (a restarted host daemon re-attaches to its running containers).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use nix::fcntl::OFlag;
use podvisor_proto::v1::{ProcessOutput, Stream};
use tokio::sync::{mpsc, watch};

use super::spawn::ChildStdio;

/// Output chunks buffered per process before the pumps block (backpressure to the process).
const OUTPUT_QUEUE: usize = 256;
const CHUNK: usize = 32 * 1024;

/// The agent's side of a process's standard I/O.
#[derive(Debug)]
pub struct ProcessIo {
    /// stdin pipe or pty master; None when closed or not requested.
    pub stdin: Mutex<Option<File>>,
    /// pty master for resizing.
    pub pty: Option<OwnedFd>,
    /// Taken by the (single) ProcessIo attachment, put back when it ends early.
    pub output: Mutex<Option<mpsc::Receiver<ProcessOutput>>>,
    /// Number of output streams still open; 0 once all output was drained.
    pub open_streams: watch::Receiver<usize>,
}

fn pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

fn devnull() -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// A pseudo-terminal: the master, a slave and, when the pair comes from a container's own
/// devpts instance, the slave's path inside that container.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    name: Option<CString>,
}

/// Opens a pty pair from the devpts instance mounted at `dev/pts` beneath `root` (a
/// container's rootfs): the container then sees its terminal as `/dev/pts/N` and `ttyname(3)`,
/// `tty(1)` and job control work. The slave is opened from the master (TIOCGPTPEER), never by
/// a path the container could change.
fn container_pty(root: &OwnedFd) -> std::io::Result<Pty> {
    let master = crate::safepath::open_beneath(
        root,
        Path::new("dev/pts/ptmx"),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| std::io::Error::other(podvisor_common::error_chain(&e)))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a valid pointer; the descriptor is our ptmx.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int to a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor we own.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `slave` was just returned by the kernel and is owned by nothing else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty {
        master,
        slave,
        name: Some(pts_name(n)),
    })
}

/// `/dev/pts/<n>`.
pub fn pts_name(n: u32) -> CString {
    CString::new(format!("/dev/pts/{n}")).unwrap_or_default()
}

/// A pty pair from the agent's own /dev/ptmx (no container devpts at hand).
fn agent_pty() -> std::io::Result<Pty> {
    let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(std::io::Error::from)?;
    }
    Ok(Pty {
        master: pty.master,
        slave: pty.slave,
        name: None,
    })
}

/// Creates the descriptors; returns the child's ends and the agent's. With a terminal, the pty
/// comes from the devpts instance beneath `container_root` (the container's rootfs) when given.
pub fn create(
    terminal: bool,
    stdin: bool,
    size: (u16, u16),
    container_root: Option<&OwnedFd>,
) -> std::io::Result<(ChildStdio, ProcessIo)> {
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    if terminal {
        let pty = match container_root {
            Some(root) => container_pty(root)?,
            None => agent_pty()?,
        };
        let ws = libc::winsize {
            ws_row: size.1,
            ws_col: size.0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
        if unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (open_tx, open_rx) = watch::channel(1);
        let reader = File::from(pty.master.try_clone()?);
        pump(reader, Stream::Stdout, tx, open_tx.into());
        let child = ChildStdio {
            stdin: pty.slave.try_clone()?,
            stdout: pty.slave.try_clone()?,
            stderr: pty.slave,
            tty: true,
            tty_name: pty.name,
        };
        let io = ProcessIo {
            stdin: Mutex::new(
                stdin
                    .then(|| pty.master.try_clone().map(File::from))
                    .transpose()?,
            ),
            pty: Some(pty.master),
            output: Mutex::new(Some(rx)),
            open_streams: open_rx,
        };
        return Ok((child, io));
    }
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (child_in, agent_in) = if stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        (devnull()?, None)
    };
    let (open_tx, open_rx) = watch::channel(2);
    let open_tx = std::sync::Arc::new(open_tx);
    pump(
        File::from(out_r),
        Stream::Stdout,
        tx.clone(),
        open_tx.clone(),
    );
    pump(File::from(err_r), Stream::Stderr, tx, open_tx);
    Ok((
        ChildStdio {
            stdin: child_in,
            stdout: out_w,
            stderr: err_w,
            tty: false,
            tty_name: None,
        },
        ProcessIo {
            stdin: Mutex::new(agent_in),
            pty: None,
            output: Mutex::new(Some(rx)),
            open_streams: open_rx,
        },
    ))
}

/// Reads `r` until EOF on a blocking thread, forwarding chunks (dropped once nobody listens),
/// then sends the stream's eof and counts it closed.
fn pump(
    mut r: File,
    stream: Stream,
    tx: mpsc::Sender<ProcessOutput>,
    open: std::sync::Arc<watch::Sender<usize>>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut listening = true;
        loop {
            match r.read(&mut buf) {
                // EIO: the pty's last slave was closed.
                Ok(0) => break,
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("read process output: {e}");
                    break;
                }
                Ok(n) if listening => {
                    let msg = ProcessOutput {
                        stream: stream as i32,
                        data: buf[..n].to_vec(),
                        eof: false,
                    };
                    listening = tx.blocking_send(msg).is_ok();
                }
                Ok(_) => {}
            }
        }
        let _ = tx.blocking_send(ProcessOutput {
            stream: stream as i32,
            data: Vec::new(),
            eof: true,
        });
        open.send_modify(|n| *n = n.saturating_sub(1));
    });
}

impl ProcessIo {
    /// Waits until every output stream reached EOF.
    pub async fn drained(&self) {
        let mut rx = self.open_streams.clone();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn resize(&self, width: u16, height: u16) -> nix::Result<()> {
        let Some(pty) = &self.pty else {
            return Err(nix::Error::ENOTTY);
        };
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(nix::Error::last());
        }
        Ok(())
    }
}

/// The output side of one ProcessIo attachment. If the host goes away before the output
/// ended, the receiver goes back to [`ProcessIo::output`] so that a later attachment gets the
/// rest (a chunk tonic had already taken for sending is lost with the connection).
#[derive(Debug)]
pub struct Attachment {
    io: std::sync::Arc<ProcessIo>,
    rx: Option<mpsc::Receiver<ProcessOutput>>,
}

impl Attachment {
    /// Takes the output of `io`; None if another attachment holds it.
    pub fn take(io: std::sync::Arc<ProcessIo>) -> Option<Self> {
        let rx = lock(&io.output).take()?;
        Some(Self { io, rx: Some(rx) })
    }
}

impl tokio_stream::Stream for Attachment {
    type Item = ProcessOutput;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ProcessOutput>> {
        let Some(rx) = self.rx.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let next = rx.poll_recv(cx);
        if let std::task::Poll::Ready(None) = next {
            // Every pump is done: nothing left for a later attachment.
            self.rx = None;
        }
        next
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            *lock(&self.io.output) = Some(rx);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn chunk(text: &str) -> ProcessOutput {
        ProcessOutput {
            stream: Stream::Stdout as i32,
            data: text.as_bytes().to_vec(),
            eof: false,
        }
    }

    #[tokio::test]
    async fn a_dropped_attachment_leaves_the_rest_to_the_next() {
        let (tx, rx) = mpsc::channel(4);
        let (_streams_tx, streams_rx) = watch::channel(1);
        let io = std::sync::Arc::new(ProcessIo {
            stdin: Mutex::new(None),
            pty: None,
            output: Mutex::new(Some(rx)),
            open_streams: streams_rx,
        });
        tx.send(chunk("one")).await.expect("send");
        tx.send(chunk("two")).await.expect("send");

        let mut first = Attachment::take(io.clone()).expect("first attachment");
        assert!(Attachment::take(io.clone()).is_none(), "only one at a time");
        assert_eq!(first.next().await.expect("one").data, b"one");
        drop(first);

        let mut second = Attachment::take(io.clone()).expect("re-attach after a drop");
        assert_eq!(second.next().await.expect("two").data, b"two");
        drop(tx);
        assert!(second.next().await.is_none(), "output ended");
        drop(second);
        assert!(
            lock(&io.output).is_none(),
            "an attachment that saw the end gives nothing back"
        );
    }
}
