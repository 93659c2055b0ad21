//! Fuzzes the hybrid vsock `CONNECT <port>\n` parser: the input is fed in
//! fuzzer-chosen pieces and must give the same answer as feeding it whole,
//! never consume past the newline and never hold more than the fixed
//! buffer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::virtio::vsock::connect::parse_connect_line;
use podvisor_vmm::virtio::vsock::{CONNECT_LINE_MAX, ConnectParser, ConnectStatus};

fuzz_target!(|data: &[u8]| {
    let Some((&split_seed, line)) = data.split_first() else {
        return;
    };

    // Whole input at once.
    let mut whole = ConnectParser::new();
    let whole_result = whole.feed(line);

    // The same bytes in pieces of 1..=8 bytes, the sizes taken from the seed.
    let mut pieces = ConnectParser::new();
    let mut seed = split_seed;
    let mut offset = 0usize;
    let mut piece_result = Ok((ConnectStatus::Incomplete, 0));
    while offset < line.len() {
        let size = usize::from(seed % 8) + 1;
        seed = seed.rotate_left(3) ^ 0x5b;
        let end = (offset + size).min(line.len());
        match pieces.feed(&line[offset..end]) {
            Ok((ConnectStatus::Incomplete, used)) => {
                assert_eq!(used, end - offset);
                offset = end;
                piece_result = Ok((ConnectStatus::Incomplete, offset));
            }
            Ok((ConnectStatus::Done(port), used)) => {
                assert!(used >= 1 && used <= end - offset);
                assert_eq!(line[offset + used - 1], b'\n');
                piece_result = Ok((ConnectStatus::Done(port), offset + used));
                break;
            }
            Err(e) => {
                piece_result = Err(e);
                break;
            }
        }
    }
    assert_eq!(whole_result, piece_result);
    assert!(whole.buffered() <= CONNECT_LINE_MAX);

    if let Ok((ConnectStatus::Done(port), used)) = whole_result {
        // Only `connect <digits>\n`, within the buffer, is accepted.
        assert!(used <= CONNECT_LINE_MAX);
        let text = std::str::from_utf8(&line[..used]).expect("accepted lines are ASCII");
        assert!(text.to_ascii_lowercase().starts_with("connect "));
        let digits = text[8..used - 1].trim_start_matches('0');
        assert_eq!(digits.parse::<u32>().unwrap_or(0), port);
        assert_eq!(parse_connect_line(&line[..used]), Ok(port));
    }
});
