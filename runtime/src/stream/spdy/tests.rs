//! Sessions against each other over `tokio::io::duplex`, and against a raw peer.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::frame::{self, FLAG_FIN, Frame, SETTINGS_INITIAL_WINDOW_SIZE, Setting, status};
use super::headers::HeaderEncoder;
use super::{Headers, SpdyError, StreamReader, StreamWriter, client, server};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Deterministic bytes: xorshift from `seed`.
fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Sends `data` in uneven pieces, then FIN.
async fn send_all(w: &StreamWriter, data: Bytes) -> Result<(), SpdyError> {
    let mut rest = data;
    let mut piece = 1000;
    while !rest.is_empty() {
        let n = piece.min(rest.len());
        w.send(rest.split_to(n)).await?;
        piece = piece * 3 % 100_000 + 1;
    }
    w.finish().await
}

/// Reads to FIN; the digest of everything.
async fn recv_all(r: &mut StreamReader) -> (usize, Vec<u8>) {
    let mut h = Sha256::new();
    let mut n = 0;
    while let Some(chunk) = r.recv().await {
        n += chunk.len();
        h.update(&chunk);
    }
    (n, h.finalize().to_vec())
}

async fn with_timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, f).await.expect("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_carry_eight_mib_each_way() {
    // A small pipe: flow control and back-pressure do the pacing.
    let (a, b) = tokio::io::duplex(16 << 10);
    let (client_session, _client_incoming) = client(a);
    let (_server_session, mut server_incoming) = server(b);
    const STREAMS: u64 = 50;
    let per_stream = (8 << 20) / STREAMS as usize;

    let srv = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while let Some(stream) = server_incoming.accept().await {
            let seed: u64 = stream.header("seed").expect("seed").parse().expect("num");
            tasks.push(tokio::spawn(async move {
                let (mut r, w) = stream.split();
                let (got, ()) = tokio::join!(recv_all(&mut r), async {
                    send_all(&w, pattern(seed + 1000, per_stream))
                        .await
                        .expect("server send");
                });
                assert_eq!(got, (per_stream, sha(&pattern(seed, per_stream))));
            }));
            if tasks.len() == STREAMS as usize {
                break;
            }
        }
        for t in tasks {
            t.await.expect("server stream");
        }
    });

    let mut tasks = Vec::new();
    for seed in 0..STREAMS {
        let session = client_session.clone();
        tasks.push(tokio::spawn(async move {
            let headers = Headers::new().with("seed", &seed.to_string());
            let stream = session.open(headers).await.expect("open");
            assert_eq!(stream.id() % 2, 1);
            let (mut r, w) = stream.split();
            let (got, ()) = tokio::join!(recv_all(&mut r), async {
                send_all(&w, pattern(seed, per_stream))
                    .await
                    .expect("client send");
            });
            assert_eq!(got, (per_stream, sha(&pattern(seed + 1000, per_stream))));
        }));
    }
    with_timeout(async {
        for t in tasks {
            t.await.expect("client stream");
        }
        srv.await.expect("server");
    })
    .await;
}

#[tokio::test]
async fn a_half_closed_stream_still_carries_the_other_way() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, _ci) = client(a);
    let (_ss, mut incoming) = server(b);
    let srv = tokio::spawn(async move {
        let stream = incoming.accept().await.expect("stream");
        assert_eq!(stream.header("streamtype"), Some("stdin"));
        let (mut r, w) = stream.split();
        assert_eq!(r.recv().await.as_deref(), Some(&b"hello"[..]));
        assert_eq!(r.recv().await, None, "the client's FIN");
        // After the client's FIN this side still sends, past one window.
        send_all(&w, pattern(7, 200 << 10))
            .await
            .expect("send after peer FIN");
    });
    let stream = session
        .open(Headers::new().with("streamType", "stdin"))
        .await
        .expect("open");
    let (mut r, w) = stream.split();
    w.send(Bytes::from_static(b"hello")).await.expect("send");
    w.finish().await.expect("finish");
    assert!(matches!(
        w.send(Bytes::from_static(b"late")).await,
        Err(SpdyError::Finished(_))
    ));
    let got = with_timeout(recv_all(&mut r)).await;
    assert_eq!(got, (200 << 10, sha(&pattern(7, 200 << 10))));
    srv.await.expect("server");
}

#[tokio::test]
async fn a_reset_ends_the_stream_both_ways() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, _ci) = client(a);
    let (_ss, mut incoming) = server(b);
    let (stream, accepted) = tokio::join!(session.open(Headers::new()), incoming.accept());
    let (stream, accepted) = (stream.expect("open"), accepted.expect("accepted"));
    let (mut cr, cw) = stream.split();
    let (mut sr, sw) = accepted.split();
    cw.reset();
    assert_eq!(with_timeout(sr.recv()).await, None);
    let err = loop {
        // The RST may still be in flight for the first sends.
        match sw.send(Bytes::from_static(b"x")).await {
            Err(e) => break e,
            Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    assert!(
        matches!(
            err,
            SpdyError::Reset {
                status: status::CANCEL,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cr.recv().await, None);
    assert!(matches!(
        cw.send(Bytes::from_static(b"x")).await,
        Err(SpdyError::Reset { .. })
    ));
}

#[tokio::test]
async fn pings_are_answered() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, _ci) = client(a);
    let (server_session, _si) = server(b);
    with_timeout(session.ping()).await.expect("client ping");
    with_timeout(server_session.ping())
        .await
        .expect("server ping");
}

#[tokio::test]
async fn goaway_refuses_new_streams_and_lets_open_ones_finish() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, _ci) = client(a);
    let (server_session, mut incoming) = server(b);
    let (stream, accepted) = tokio::join!(session.open(Headers::new()), incoming.accept());
    let (stream, accepted) = (stream.expect("open"), accepted.expect("accepted"));
    server_session.goaway();
    // The client learns of the GOAWAY and stops opening.
    with_timeout(async {
        loop {
            match session.open(Headers::new()).await {
                Err(SpdyError::GoingAway) => break,
                // Opened before the GOAWAY arrived: refused.
                Err(SpdyError::Reset {
                    status: status::REFUSED_STREAM,
                    ..
                }) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("{e}"),
                Ok(s) => panic!("stream {} opened after GOAWAY", s.id()),
            }
        }
    })
    .await;
    // The open stream still works both ways.
    let (mut cr, cw) = stream.split();
    let (mut sr, sw) = accepted.split();
    cw.send(Bytes::from_static(b"ping")).await.expect("send");
    cw.finish().await.expect("fin");
    assert_eq!(sr.recv().await.as_deref(), Some(&b"ping"[..]));
    sw.send(Bytes::from_static(b"pong")).await.expect("send");
    sw.finish().await.expect("fin");
    assert_eq!(cr.recv().await.as_deref(), Some(&b"pong"[..]));
    assert_eq!(sr.recv().await, None);
    assert_eq!(cr.recv().await, None);
    // With no stream left, both sessions end.
    with_timeout(server_session.closed()).await;
    with_timeout(session.closed()).await;
}

#[tokio::test]
async fn dropping_every_handle_closes_the_session() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, incoming) = client(a);
    let (server_session, mut server_incoming) = server(b);
    let (stream, accepted) = tokio::join!(session.open(Headers::new()), server_incoming.accept());
    let (stream, _accepted) = (stream.expect("open"), accepted.expect("accepted"));
    drop((session, incoming));
    // A stream keeps the session up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1), server_session.closed())
            .await
            .is_err()
    );
    drop(stream);
    with_timeout(server_session.closed()).await;
    assert!(server_incoming.accept().await.is_none());
}

/// The far end of a duplex, speaking frames by hand.
struct RawPeer {
    io: DuplexStream,
    buf: BytesMut,
    headers: HeaderEncoder,
}

impl RawPeer {
    fn new(io: DuplexStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            headers: HeaderEncoder::new().expect("encoder"),
        }
    }

    async fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        frame::encode(f, &mut out);
        self.io.write_all(&out).await.expect("write");
    }

    async fn syn_stream(&mut self, stream_id: u32, headers: &Headers) {
        let header_block = self.headers.encode(headers).expect("encode");
        self.send(&Frame::SynStream {
            stream_id,
            associated_id: 0,
            priority: 0,
            flags: 0,
            header_block,
        })
        .await;
    }

    /// The next frame, `None` at EOF.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some((f, n)) = frame::decode(&self.buf).expect("decode") {
                let _ = self.buf.split_to(n);
                return Some(f);
            }
            if with_timeout(self.io.read_buf(&mut self.buf))
                .await
                .expect("read")
                == 0
            {
                return None;
            }
        }
    }

    /// Skips frames until one `want` accepts.
    async fn until(&mut self, want: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let f = self.next().await.expect("a frame before EOF");
            if want(&f) {
                return f;
            }
        }
    }
}

fn settings() -> Frame {
    Frame::Settings {
        flags: 0,
        entries: vec![Setting {
            flags: 0,
            id: SETTINGS_INITIAL_WINDOW_SIZE,
            value: 65536,
        }],
    }
}

#[tokio::test]
async fn a_raw_ping_is_echoed_and_unknown_frames_skipped() {
    let (a, b) = tokio::io::duplex(4096);
    let (_s, _i) = server(b);
    let mut peer = RawPeer::new(a);
    // An unknown control frame type, then a client PING (odd id).
    peer.io
        .write_all(&[0x80, 3, 0, 0x33, 0, 0, 0, 2, 9, 9])
        .await
        .expect("write");
    peer.send(&Frame::Ping { id: 1 }).await;
    let f = peer.until(|f| matches!(f, Frame::Ping { .. })).await;
    assert_eq!(f, Frame::Ping { id: 1 });
}

#[tokio::test]
async fn data_beyond_the_window_resets_the_stream() {
    let (a, b) = tokio::io::duplex(256 << 10);
    let (_s, mut incoming) = server(b);
    let mut peer = RawPeer::new(a);
    peer.send(&settings()).await;
    peer.syn_stream(1, &Headers::new()).await;
    let _unread = with_timeout(incoming.accept()).await.expect("stream");
    // Nobody reads: 64 KiB fit, the next KiB does not.
    for _ in 0..65 {
        peer.send(&Frame::Data {
            stream_id: 1,
            flags: 0,
            data: pattern(1, 1024),
        })
        .await;
    }
    let f = peer.until(|f| matches!(f, Frame::RstStream { .. })).await;
    assert_eq!(
        f,
        Frame::RstStream {
            stream_id: 1,
            status: status::FLOW_CONTROL_ERROR
        }
    );
}

#[tokio::test]
async fn a_peer_without_flow_control_is_paced_not_reset() {
    // Like Go's spdystream: no SETTINGS, no WINDOW_UPDATE, data as fast as TCP goes.
    let (a, b) = tokio::io::duplex(8 << 10);
    let (_s, mut incoming) = server(b);
    let mut peer = RawPeer::new(a);
    peer.syn_stream(1, &Headers::new().with("streamtype", "stdin"))
        .await;
    let data = pattern(3, 512 << 10);
    let sender = {
        let data = data.clone();
        tokio::spawn(async move {
            for chunk in data.chunks(32 << 10) {
                peer.send(&Frame::Data {
                    stream_id: 1,
                    flags: 0,
                    data: Bytes::copy_from_slice(chunk),
                })
                .await;
            }
            peer.send(&Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await;
            // Drain what the session sends so it never blocks on us.
            while peer.next().await.is_some() {}
        })
    };
    let stream = with_timeout(incoming.accept()).await.expect("stream");
    let (mut r, w) = stream.split();
    let mut got = Vec::new();
    while let Some(chunk) = with_timeout(r.recv()).await {
        got.extend_from_slice(&chunk);
        // A slow reader.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(sha(&got), sha(&data));
    drop((r, w, _s, incoming));
    with_timeout(sender).await.expect("sender");
}

#[tokio::test]
async fn an_oversized_frame_ends_the_session() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, _i) = server(b);
    let mut peer = RawPeer::new(a);
    // A data frame claiming 16 MiB: refused from its header alone.
    peer.io
        .write_all(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let f = peer.until(|f| matches!(f, Frame::GoAway { .. })).await;
    assert!(matches!(f, Frame::GoAway { status: 1, .. }), "{f:?}");
    with_timeout(session.closed()).await;
}

#[tokio::test]
async fn a_header_bomb_ends_the_session() {
    let (a, b) = tokio::io::duplex(64 << 10);
    let (session, mut incoming) = server(b);
    let mut peer = RawPeer::new(a);
    // One header with a 1 MiB value of one repeated byte: a few KiB compressed.
    let big = "a".repeat(1 << 20);
    peer.syn_stream(1, &Headers::new().with("x", &big)).await;
    let f = peer.until(|f| matches!(f, Frame::GoAway { .. })).await;
    assert!(matches!(f, Frame::GoAway { status: 1, .. }), "{f:?}");
    with_timeout(session.closed()).await;
    assert!(incoming.accept().await.is_none());
}

#[tokio::test]
async fn streams_past_the_cap_are_refused() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (_s, _incoming) = server(b);
    let mut peer = RawPeer::new(a);
    let cap = super::state::MAX_STREAMS as u32;
    for i in 0..=cap {
        peer.syn_stream(2 * i + 1, &Headers::new()).await;
    }
    let f = peer.until(|f| matches!(f, Frame::RstStream { .. })).await;
    assert_eq!(
        f,
        Frame::RstStream {
            stream_id: 2 * cap + 1,
            status: status::REFUSED_STREAM
        }
    );
}

#[tokio::test]
async fn an_open_given_up_on_resets_its_stream() {
    let (a, b) = tokio::io::duplex(4096);
    let (session, _ci) = client(a);
    let (_ss, mut incoming) = server(b);
    let gave_up = tokio::time::timeout(Duration::from_millis(50), session.open(Headers::new()));
    assert!(gave_up.await.is_err(), "nobody accepted yet");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The abandoned stream 1 was reset: accept skips it.
    let (opened, accepted) = tokio::join!(session.open(Headers::new()), incoming.accept());
    assert_eq!(opened.expect("open").id(), 3);
    assert_eq!(accepted.expect("accept").id(), 3);
}

/// kubelet's streaming servers write the exec status, then reset every stream: what came
/// before the peer's RST_STREAM stays readable.
#[tokio::test]
async fn data_before_a_peer_reset_is_still_read() {
    let (a, b) = tokio::io::duplex(64 << 10);
    let (_s, mut incoming) = server(b);
    let mut peer = RawPeer::new(a);
    peer.send(&settings()).await;
    peer.syn_stream(1, &Headers::new()).await;
    let (mut r, _w) = with_timeout(incoming.accept())
        .await
        .expect("stream")
        .split();
    peer.send(&Frame::Data {
        stream_id: 1,
        flags: 0,
        data: Bytes::from_static(b"status"),
    })
    .await;
    peer.send(&Frame::RstStream {
        stream_id: 1,
        status: status::CANCEL,
    })
    .await;
    // Frames are handled in order: the PING's answer means the reset was handled.
    peer.send(&Frame::Ping { id: 1 }).await;
    peer.until(|f| matches!(f, Frame::Ping { .. })).await;
    assert_eq!(
        with_timeout(r.recv()).await,
        Some(Bytes::from_static(b"status"))
    );
    assert_eq!(with_timeout(r.recv()).await, None);
}
