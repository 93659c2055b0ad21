//! Fuzzes the SPDY/3 frame decoder and the header block decompressor: arbitrary
//! bytes are decoded frame by frame (every prefix of a frame must be "incomplete",
//! never a panic), and every header block found goes through one shared
//! decompression context, as in a session. Lengths over the caps must be errors,
//! and no block may inflate past `MAX_BLOCK_LEN` or `MAX_HEADERS`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use podvisor_runtime::stream::spdy::frame::{self, Frame, MAX_CONTROL_LEN, MAX_DATA_LEN};
use podvisor_runtime::stream::spdy::headers::{HeaderDecoder, MAX_HEADERS};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderDecoder::new();
    let mut at = 0;
    while at < data.len() {
        let rest = &data[at..];
        // A prefix one byte short is never a whole frame.
        let (frame, used) = match frame::decode(rest) {
            Ok(Some(found)) => found,
            Ok(None) | Err(_) => break,
        };
        assert!(used >= frame::HEADER_LEN && used <= rest.len());
        assert!(used - frame::HEADER_LEN <= MAX_DATA_LEN.max(MAX_CONTROL_LEN));
        if let Ok(Some((_, shorter))) = frame::decode(&rest[..used - 1]) {
            panic!("a frame decoded from a prefix ({shorter} of {used} bytes)");
        }
        let block = match &frame {
            Frame::SynStream { header_block, .. }
            | Frame::SynReply { header_block, .. }
            | Frame::Headers { header_block, .. } => Some(header_block),
            _ => None,
        };
        if let Some(block) = block {
            match headers.decode(block) {
                Ok(h) => assert!(h.len() <= MAX_HEADERS),
                // The context is out of step after an error: a session ends here.
                Err(_) => break,
            }
        }
        // Whatever decodes encodes back to the same bytes.
        if !matches!(frame, Frame::Unknown { .. }) {
            let mut out = bytes::BytesMut::new();
            frame::encode(&frame, &mut out);
            assert_eq!(frame::decode(&out).ok().flatten().map(|(f, _)| f), Some(frame));
        }
        at += used;
    }
    // Bare header blocks, without framing.
    let _ = HeaderDecoder::new().decode(data);
});
