//! SPDY/3 frames on the wire: incremental decoding and encoding.
//!
//! Header blocks stay compressed here ([`Frame::SynStream`] and friends carry the raw
//! block); [`super::headers`] owns the session's zlib contexts. Decoding never allocates
//! more than what is already buffered, and refuses lengths over [`MAX_DATA_LEN`] and
//! [`MAX_CONTROL_LEN`] before waiting for the bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::FrameError;

/// The SPDY version this module speaks.
pub const VERSION: u16 = 3;
/// Every frame starts with 8 bytes: the control bit, version/type or stream id, flags,
/// and a 24-bit length.
pub const HEADER_LEN: usize = 8;
/// The largest data frame payload accepted from the peer.
pub const MAX_DATA_LEN: usize = 1 << 20;
/// The largest control frame payload (and so compressed header block) accepted.
pub const MAX_CONTROL_LEN: usize = 256 << 10;

/// FLAG_FIN on SYN_STREAM, SYN_REPLY, HEADERS and data frames.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM: the sender will not receive on the stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// FLAG_SETTINGS_CLEAR_SETTINGS on SETTINGS.
pub const FLAG_CLEAR_SETTINGS: u8 = 0x01;

/// SETTINGS id: the sender's initial per-stream receive window.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
/// SETTINGS id: how many streams the sender lets its peer open.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u32 = 4;

/// RST_STREAM status codes (SPDY/3 §2.4.2).
pub mod status {
    /// A generic protocol error.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A frame for a stream that is not active.
    pub const INVALID_STREAM: u32 = 2;
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: u32 = 3;
    /// The SPDY version is not supported.
    pub const UNSUPPORTED_VERSION: u32 = 4;
    /// The sender no longer wants the stream.
    pub const CANCEL: u32 = 5;
    /// An internal error in the sender.
    pub const INTERNAL_ERROR: u32 = 6;
    /// The peer broke flow control.
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    /// A SYN_REPLY for a stream already replied to.
    pub const STREAM_IN_USE: u32 = 8;
    /// Data or a SYN_REPLY after the stream was half-closed.
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    /// A frame over the receiver's size limit.
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status: a normal session teardown.
pub const GOAWAY_OK: u32 = 0;
/// GOAWAY status: the peer broke the protocol.
pub const GOAWAY_PROTOCOL_ERROR: u32 = 1;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Per-entry flags (persist value, persisted).
    pub flags: u8,
    /// The 24-bit setting id.
    pub id: u32,
    /// The value.
    pub value: u32,
}

/// A decoded SPDY/3 frame. Header blocks are still compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// The new stream's id (odd from a client, even from a server).
        stream_id: u32,
        /// The stream this one is associated with, or 0.
        associated_id: u32,
        /// Priority, 0 (highest) to 7.
        priority: u8,
        /// [`FLAG_FIN`], [`FLAG_UNIDIRECTIONAL`].
        flags: u8,
        /// The compressed header block.
        header_block: Bytes,
    },
    /// Accepts a stream opened by the peer.
    SynReply {
        /// The stream replied to.
        stream_id: u32,
        /// [`FLAG_FIN`].
        flags: u8,
        /// The compressed header block.
        header_block: Bytes,
    },
    /// Ends a stream abnormally, both ways.
    RstStream {
        /// The stream reset.
        stream_id: u32,
        /// One of [`status`].
        status: u32,
    },
    /// Session settings.
    Settings {
        /// [`FLAG_CLEAR_SETTINGS`].
        flags: u8,
        /// The entries.
        entries: Vec<Setting>,
    },
    /// A liveness probe; the receiver echoes pings it did not send.
    Ping {
        /// Odd from clients, even from servers.
        id: u32,
    },
    /// The sender takes no more streams.
    GoAway {
        /// The last stream the sender accepted.
        last_good_stream_id: u32,
        /// [`GOAWAY_OK`] or an error.
        status: u32,
    },
    /// More headers for a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// [`FLAG_FIN`].
        flags: u8,
        /// The compressed header block.
        header_block: Bytes,
    },
    /// Flow control credit; stream 0 is the session window (SPDY/3.1).
    WindowUpdate {
        /// The stream, or 0 for the session.
        stream_id: u32,
        /// Bytes added to the window (1 to 2^31-1).
        delta: u32,
    },
    /// Stream payload.
    Data {
        /// The stream.
        stream_id: u32,
        /// [`FLAG_FIN`].
        flags: u8,
        /// The payload.
        data: Bytes,
    },
    /// A control frame of a type this module does not know, skipped per the spec.
    Unknown {
        /// Its type.
        frame_type: u16,
    },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one frame from the front of `buf`: `Ok(None)` until the whole frame is
/// buffered, then the frame and how many bytes it took. Lengths over the caps are
/// errors as soon as the 8-byte header is in, so a hostile length costs nothing.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let first = be32(&buf[0..4]);
    let flags = buf[4];
    let len = (be32(&buf[4..8]) & 0x00ff_ffff) as usize;
    let control = first & 0x8000_0000 != 0;
    let cap = if control {
        MAX_CONTROL_LEN
    } else {
        MAX_DATA_LEN
    };
    if len > cap {
        let kind = if control { "control" } else { "data" };
        return Err(FrameError::TooLarge { kind, len, cap });
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..HEADER_LEN + len];
    let frame = if control {
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        decode_control((first & 0xffff) as u16, flags, body)?
    } else {
        let stream_id = first & 0x7fff_ffff;
        if stream_id == 0 {
            return Err(FrameError::ZeroStreamId("data"));
        }
        Frame::Data {
            stream_id,
            flags,
            data: Bytes::copy_from_slice(body),
        }
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

fn stream_id_of(kind: &'static str, body: &[u8]) -> Result<u32, FrameError> {
    let id = be32(body) & 0x7fff_ffff;
    if id == 0 {
        return Err(FrameError::ZeroStreamId(kind));
    }
    Ok(id)
}

fn need(kind: &'static str, body: &[u8], min: usize, exact: bool) -> Result<(), FrameError> {
    let bad = if exact {
        body.len() != min
    } else {
        body.len() < min
    };
    if bad {
        return Err(FrameError::Length {
            kind,
            len: body.len(),
        });
    }
    Ok(())
}

fn decode_control(frame_type: u16, flags: u8, body: &[u8]) -> Result<Frame, FrameError> {
    Ok(match frame_type {
        TYPE_SYN_STREAM => {
            need("SYN_STREAM", body, 10, false)?;
            Frame::SynStream {
                stream_id: stream_id_of("SYN_STREAM", body)?,
                associated_id: be32(&body[4..8]) & 0x7fff_ffff,
                priority: body[8] >> 5,
                flags,
                header_block: Bytes::copy_from_slice(&body[10..]),
            }
        }
        TYPE_SYN_REPLY | TYPE_HEADERS => {
            let kind = if frame_type == TYPE_SYN_REPLY {
                "SYN_REPLY"
            } else {
                "HEADERS"
            };
            need(kind, body, 4, false)?;
            let stream_id = stream_id_of(kind, body)?;
            let header_block = Bytes::copy_from_slice(&body[4..]);
            if frame_type == TYPE_SYN_REPLY {
                Frame::SynReply {
                    stream_id,
                    flags,
                    header_block,
                }
            } else {
                Frame::Headers {
                    stream_id,
                    flags,
                    header_block,
                }
            }
        }
        TYPE_RST_STREAM => {
            need("RST_STREAM", body, 8, true)?;
            Frame::RstStream {
                stream_id: stream_id_of("RST_STREAM", body)?,
                status: be32(&body[4..8]),
            }
        }
        TYPE_SETTINGS => decode_settings(flags, body)?,
        TYPE_PING => {
            need("PING", body, 4, true)?;
            Frame::Ping { id: be32(body) }
        }
        TYPE_GOAWAY => {
            need("GOAWAY", body, 8, true)?;
            Frame::GoAway {
                last_good_stream_id: be32(body) & 0x7fff_ffff,
                status: be32(&body[4..8]),
            }
        }
        TYPE_WINDOW_UPDATE => {
            need("WINDOW_UPDATE", body, 8, true)?;
            Frame::WindowUpdate {
                stream_id: be32(body) & 0x7fff_ffff,
                delta: be32(&body[4..8]) & 0x7fff_ffff,
            }
        }
        frame_type => Frame::Unknown { frame_type },
    })
}

fn decode_settings(flags: u8, body: &[u8]) -> Result<Frame, FrameError> {
    need("SETTINGS", body, 4, false)?;
    let count = be32(body) as usize;
    // The count must match the length: never trust it for an allocation.
    if count.checked_mul(8).and_then(|n| n.checked_add(4)) != Some(body.len()) {
        return Err(FrameError::Length {
            kind: "SETTINGS",
            len: body.len(),
        });
    }
    let entries = body[4..]
        .chunks_exact(8)
        .map(|e| {
            let word = be32(e);
            Setting {
                flags: (word >> 24) as u8,
                id: word & 0x00ff_ffff,
                value: be32(&e[4..8]),
            }
        })
        .collect();
    Ok(Frame::Settings { flags, entries })
}

fn control_header(out: &mut BytesMut, frame_type: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(frame_type);
    out.put_u32((u32::from(flags) << 24) | (len as u32 & 0x00ff_ffff));
}

/// Appends `frame` to `out`. Lengths must fit in 24 bits (the session never builds
/// bigger frames); [`Frame::Unknown`] encodes as nothing.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::SynStream {
            stream_id,
            associated_id,
            priority,
            flags,
            header_block,
        } => {
            control_header(out, TYPE_SYN_STREAM, *flags, 10 + header_block.len());
            out.put_u32(*stream_id);
            out.put_u32(*associated_id);
            out.put_u8(priority << 5);
            out.put_u8(0);
            out.put_slice(header_block);
        }
        Frame::SynReply {
            stream_id,
            flags,
            header_block,
        }
        | Frame::Headers {
            stream_id,
            flags,
            header_block,
        } => {
            let frame_type = if matches!(frame, Frame::SynReply { .. }) {
                TYPE_SYN_REPLY
            } else {
                TYPE_HEADERS
            };
            control_header(out, frame_type, *flags, 4 + header_block.len());
            out.put_u32(*stream_id);
            out.put_slice(header_block);
        }
        Frame::RstStream { stream_id, status } => {
            control_header(out, TYPE_RST_STREAM, 0, 8);
            out.put_u32(*stream_id);
            out.put_u32(*status);
        }
        Frame::Settings { flags, entries } => {
            control_header(out, TYPE_SETTINGS, *flags, 4 + 8 * entries.len());
            out.put_u32(entries.len() as u32);
            for e in entries {
                out.put_u32((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff));
                out.put_u32(e.value);
            }
        }
        Frame::Ping { id } => {
            control_header(out, TYPE_PING, 0, 4);
            out.put_u32(*id);
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            control_header(out, TYPE_GOAWAY, 0, 8);
            out.put_u32(*last_good_stream_id);
            out.put_u32(*status);
        }
        Frame::WindowUpdate { stream_id, delta } => {
            control_header(out, TYPE_WINDOW_UPDATE, 0, 8);
            out.put_u32(*stream_id);
            out.put_u32(*delta);
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32((u32::from(*flags) << 24) | (data.len() as u32 & 0x00ff_ffff));
            out.put_slice(data);
        }
        Frame::Unknown { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        let block = Bytes::from_static(b"\x78\x9c opaque");
        vec![
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 7,
                flags: FLAG_FIN | FLAG_UNIDIRECTIONAL,
                header_block: block.clone(),
            },
            Frame::SynReply {
                stream_id: 3,
                flags: FLAG_FIN,
                header_block: block.clone(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: status::CANCEL,
            },
            Frame::Settings {
                flags: FLAG_CLEAR_SETTINGS,
                entries: vec![Setting {
                    flags: 1,
                    id: SETTINGS_INITIAL_WINDOW_SIZE,
                    value: 1 << 20,
                }],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 9,
                status: GOAWAY_PROTOCOL_ERROR,
            },
            Frame::Headers {
                stream_id: 11,
                flags: 0,
                header_block: block,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536,
            },
            Frame::Data {
                stream_id: 13,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 15,
                flags: 0,
                data: Bytes::new(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in all_frames() {
            encode(&f, &mut wire);
        }
        let mut got = Vec::new();
        let mut at = 0;
        // Feed growing prefixes: every incomplete prefix is Ok(None).
        let mut end = at;
        while at < wire.len() {
            match decode(&wire[at..end]).expect("decode") {
                Some((f, n)) => {
                    got.push(f);
                    at += n;
                }
                None => end += 1,
            }
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn oversized_lengths_fail_before_the_bytes_arrive() {
        // A data frame claiming 16 MiB - 1: only its 8-byte header is given.
        let hdr = [0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode(&hdr),
            Err(FrameError::TooLarge { kind: "data", .. })
        ));
        let ctl = [0x80, 3, 0, 1, 0, 0x10, 0, 1];
        assert!(matches!(
            decode(&ctl),
            Err(FrameError::TooLarge {
                kind: "control",
                ..
            })
        ));
    }

    #[test]
    fn unknown_control_frames_are_skipped_and_bad_ones_refused() {
        let mut wire = vec![0x80, 3, 0, 0x42, 0, 0, 0, 3, 1, 2, 3];
        let (f, n) = decode(&wire).expect("ok").expect("complete");
        assert_eq!((f, n), (Frame::Unknown { frame_type: 0x42 }, 11));
        // SPDY/2 frames are refused.
        wire[1] = 2;
        assert!(matches!(decode(&wire), Err(FrameError::Version(2))));
        // A SETTINGS count that disagrees with the length.
        let s = [0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode(&s), Err(FrameError::Length { .. })));
        // RST_STREAM on stream 0.
        let r = [0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1];
        assert!(matches!(decode(&r), Err(FrameError::ZeroStreamId(_))));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap stand-in for the fuzz target: xorshift bytes, some made to look
        // like SPDY/3 control frames, through the decoder and one header context.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..3000 {
            let mut buf = Vec::new();
            for _ in 0..(round % 97) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.extend_from_slice(&x.to_le_bytes());
            }
            if round % 2 == 0 && buf.len() >= 8 {
                buf[0] = 0x80;
                buf[1] = 3;
                buf[2] = 0;
                buf[3] = (round % 10) as u8;
                buf[5] = 0;
            }
            let mut headers = super::super::headers::HeaderDecoder::new();
            let mut at = 0;
            while let Ok(Some((f, n))) = decode(&buf[at..]) {
                at += n;
                if let Frame::SynStream { header_block, .. }
                | Frame::SynReply { header_block, .. }
                | Frame::Headers { header_block, .. } = f
                {
                    let _ = headers.decode(&header_block);
                }
            }
        }
    }
}
