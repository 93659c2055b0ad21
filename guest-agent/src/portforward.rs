//! PortForward: a TCP connection dialled from inside the VM to `127.0.0.1:<port>` and relayed
//! over the gRPC stream (CRI PortForward reaches servers that listen on loopback only: the
//! agent's network namespace is the pod's).
//!
//! Hostile by default: the port number is the only input and only IPv4 loopback is dialled
//! (the guest kernel has no IPv6); at most [`MAX_FORWARDS`] forwards at a time; the connect
//! gives up after [`CONNECT_TIMEOUT`]; reads are at most [`CHUNK`] bytes and nothing is
//! buffered beyond one message each way (a slow reader on either side holds the other back);
//! the connection is closed as soon as the call goes away.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use podvisor_proto::v1::{PortForwardInput, PortForwardOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// Forwards open at once; beyond, RESOURCE_EXHAUSTED.
pub const MAX_FORWARDS: usize = 256;
/// How long a connect may take (loopback answers at once unless the listener's backlog is
/// full).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest read from the connection, so the largest output message.
pub const CHUNK: usize = 64 * 1024;
/// Output messages queued before the reading side waits for the client.
const QUEUED: usize = 2;

type OutputStream = Pin<Box<dyn Stream<Item = Result<PortForwardOutput, Status>> + Send>>;
type Sender = mpsc::Sender<Result<PortForwardOutput, Status>>;

/// The agent's port forwards: a count of those open.
#[derive(Debug, Clone)]
pub struct PortForwards {
    slots: Arc<Semaphore>,
}

impl Default for PortForwards {
    fn default() -> Self {
        Self::new(MAX_FORWARDS)
    }
}

impl PortForwards {
    /// At most `max` forwards at a time.
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// Serves one PortForward call: reads the port from the first input, connects and
    /// relays in a task of its own; the returned stream starts with `connected`.
    pub async fn open<S>(&self, mut input: S) -> Result<OutputStream, Status>
    where
        S: Stream<Item = Result<PortForwardInput, Status>> + Send + Unpin + 'static,
    {
        let first = input
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty PortForward stream"))??;
        let port = u16::try_from(first.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {} is not in 1..=65535", first.port))
            })?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("{MAX_FORWARDS} port forwards are open already"))
        })?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let conn = connect(addr).await?;
        tracing::debug!(port, "port forward connected");
        let (tx, rx) = mpsc::channel(QUEUED);
        tx.try_send(Ok(PortForwardOutput {
            connected: true,
            ..Default::default()
        }))
        .map_err(|_| Status::internal("port forward: output queue full at start"))?;
        tokio::spawn(relay(conn, first, input, tx, permit));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// Connects to `addr` within [`CONNECT_TIMEOUT`]; UNAVAILABLE when it is refused or fails.
async fn connect(addr: SocketAddr) -> Result<TcpStream, Status> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(Status::unavailable(format!(
            "connect {addr}: {}",
            io_message(&e)
        ))),
        Err(_) => Err(Status::unavailable(format!(
            "connect {addr}: no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// An I/O error's text without Rust's " (os error N)" suffix.
fn io_message(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

/// Relays until both directions are done or either side fails or goes away; then the
/// connection is closed and the slot freed.
async fn relay<S>(
    conn: TcpStream,
    first: PortForwardInput,
    input: S,
    tx: Sender,
    _permit: OwnedSemaphorePermit,
) where
    S: Stream<Item = Result<PortForwardInput, Status>> + Send + Unpin + 'static,
{
    let (reader, writer) = conn.into_split();
    let up = upstream(first, input, writer, tx.clone());
    let down = downstream(reader, tx);
    // The first failure ends both directions (the other future is dropped).
    match tokio::try_join!(up, down) {
        Ok(_) => tracing::debug!("port forward done"),
        Err(why) => tracing::debug!("port forward ended: {why}"),
    }
}

/// Client to server: writes each input's data; shuts down the write side on close_write or
/// at the end of the input. Err when the call went away or a write failed.
async fn upstream<S>(
    first: PortForwardInput,
    mut input: S,
    mut writer: OwnedWriteHalf,
    tx: Sender,
) -> Result<(), String>
where
    S: Stream<Item = Result<PortForwardInput, Status>> + Send + Unpin,
{
    let mut next = Some(first);
    loop {
        let m = match next.take() {
            Some(m) => m,
            None => {
                let m = tokio::select! {
                    m = input.next() => m,
                    () = tx.closed() => return Err("the call went away".into()),
                };
                match m {
                    Some(Ok(m)) => m,
                    Some(Err(s)) => return Err(format!("input: {}", s.message())),
                    None => break,
                }
            }
        };
        if !m.data.is_empty() {
            let written = tokio::select! {
                r = writer.write_all(&m.data) => r,
                () = tx.closed() => return Err("the call went away".into()),
            };
            if let Err(e) = written {
                let msg = format!("write: {}", io_message(&e));
                let _ = tx.send(Err(Status::unavailable(msg.clone()))).await;
                return Err(msg);
            }
        }
        if m.close_write {
            break;
        }
    }
    // shutdown(SHUT_WR): the server reads EOF; its replies still come.
    if let Err(e) = writer.shutdown().await {
        tracing::debug!("port forward: shutdown(write): {e}");
    }
    Ok(())
}

/// Server to client: chunks of at most [`CHUNK`] bytes, then `eof`. Err when the call went
/// away or a read failed.
async fn downstream(mut reader: OwnedReadHalf, tx: Sender) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            r = reader.read(&mut buf) => r,
            () = tx.closed() => return Err("the call went away".into()),
        };
        let m = match n {
            Ok(0) => PortForwardOutput {
                eof: true,
                ..Default::default()
            },
            Ok(n) => PortForwardOutput {
                data: buf[..n].to_vec(),
                ..Default::default()
            },
            Err(e) => {
                let msg = format!("read: {}", io_message(&e));
                let _ = tx.send(Err(Status::unavailable(msg.clone()))).await;
                return Err(msg);
            }
        };
        let eof = m.eof;
        if tx.send(Ok(m)).await.is_err() {
            return Err("the call went away".into());
        }
        if eof {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn input(port: u32, data: &[u8], close_write: bool) -> PortForwardInput {
        PortForwardInput {
            port,
            data: data.to_vec(),
            close_write,
        }
    }

    type Input = Result<PortForwardInput, Status>;

    /// An input stream fed by the returned sender.
    fn feed() -> (
        mpsc::Sender<Input>,
        tokio_stream::wrappers::ReceiverStream<Input>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn listener() -> (TcpListener, u16) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    /// Reads the output to its end: (connected, data, eof seen).
    async fn collect(mut out: OutputStream) -> (bool, Vec<u8>, bool) {
        let mut connected = false;
        let mut data = Vec::new();
        let mut eof = false;
        while let Some(m) = out.next().await {
            let m = m.unwrap();
            assert!(!eof, "a message after eof");
            connected |= m.connected;
            assert!(m.data.len() <= CHUNK);
            data.extend_from_slice(&m.data);
            eof |= m.eof;
        }
        (connected, data, eof)
    }

    #[tokio::test]
    async fn bad_ports_and_empty_streams_are_invalid() {
        let f = PortForwards::default();
        for port in [0, 65536, u32::MAX] {
            let (tx, rx) = feed();
            tx.send(Ok(input(port, b"", false))).await.unwrap();
            let e = f.open(rx).await.err().unwrap();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{port}: {e:?}");
        }
        let (tx, rx) = feed();
        drop(tx);
        let e = f.open(rx).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_closed_port_is_unavailable_at_once() {
        let (l, port) = listener().await;
        drop(l);
        let (tx, rx) = feed();
        tx.send(Ok(input(port.into(), b"", false))).await.unwrap();
        let e = PortForwards::default().open(rx).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(
            e.message(),
            format!("connect 127.0.0.1:{port}: Connection refused")
        );
    }

    #[tokio::test]
    async fn echo_with_half_close_from_the_client() {
        let (l, port) = listener().await;
        // Replies only after the client's EOF: the reply must still reach it.
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.write_all(b"|done").await.unwrap();
        });
        let (tx, rx) = feed();
        tx.send(Ok(input(port.into(), b"hello ", false)))
            .await
            .unwrap();
        let out = PortForwards::default().open(rx).await.unwrap();
        tx.send(Ok(input(0, b"world", true))).await.unwrap();
        let (connected, data, eof) = collect(out).await;
        assert!(connected && eof);
        assert_eq!(data, b"hello world|done");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn half_close_from_the_server_still_takes_input() {
        let (l, port) = listener().await;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"greeting").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            done_tx.send(got).unwrap();
        });
        let (tx, rx) = feed();
        tx.send(Ok(input(port.into(), b"", false))).await.unwrap();
        let mut out = PortForwards::default().open(rx).await.unwrap();
        assert!(out.next().await.unwrap().unwrap().connected);
        let mut data = Vec::new();
        loop {
            let m = out.next().await.unwrap().unwrap();
            data.extend_from_slice(&m.data);
            if m.eof {
                break;
            }
        }
        assert_eq!(data, b"greeting");
        // The server's side is closed; ours is not: input still reaches it.
        tx.send(Ok(input(0, b"late data", false))).await.unwrap();
        drop(tx);
        assert_eq!(done_rx.await.unwrap(), b"late data");
        // Both directions done: the output ends.
        assert!(out.next().await.is_none());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn large_transfers_keep_chunks_small() {
        let (l, port) = listener().await;
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        let payload: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let (tx, rx) = feed();
        tx.send(Ok(input(port.into(), b"", false))).await.unwrap();
        let out = PortForwards::default().open(rx).await.unwrap();
        let sent = payload.clone();
        let sender = tokio::spawn(async move {
            for c in sent.chunks(100_000) {
                tx.send(Ok(input(0, c, false))).await.unwrap();
            }
        });
        let (_, data, eof) = collect(out).await;
        assert!(eof);
        assert_eq!(data.len(), payload.len());
        assert!(data == payload);
        sender.await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_limit_is_enforced_and_slots_come_back() {
        let (l, port) = listener().await;
        let f = PortForwards::new(1);
        let (tx, rx) = feed();
        tx.send(Ok(input(port.into(), b"", false))).await.unwrap();
        let out = f.open(rx).await.unwrap();
        let (conn, _) = l.accept().await.unwrap();
        let (tx2, rx2) = feed();
        tx2.send(Ok(input(port.into(), b"", false))).await.unwrap();
        let e = f.open(rx2).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // The call goes away: the connection is closed and the slot freed.
        drop(out);
        let mut conn = conn;
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        for _ in 0..100 {
            if f.slots.available_permits() == 1 {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(f.slots.available_permits(), 1);
        drop(tx);
    }
}
