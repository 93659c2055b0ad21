//! The `CONNECT <port>\n` line a host client sends on the hybrid vsock Unix
//! socket before its stream is forwarded to a guest port.
//!
//! The client is only as trusted as the host user that can reach the socket,
//! and the bytes can arrive in any split: the parser is fed incrementally,
//! keeps them in a fixed buffer, rejects garbage as early as it can and never
//! holds more than [`CONNECT_LINE_MAX`] bytes.

/// The longest line accepted, newline included. `CONNECT 4294967295\n` is 19
/// bytes; the slack admits leading zeros.
pub const CONNECT_LINE_MAX: usize = 32;

/// The command, matched case-insensitively, and the one space after it.
const PREFIX: &[u8] = b"connect ";

/// Why a CONNECT line was refused. The caller closes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// No newline within the first [`CONNECT_LINE_MAX`] bytes.
    #[error("CONNECT line longer than {CONNECT_LINE_MAX} bytes")]
    TooLong,
    /// The byte at `offset` does not fit `CONNECT <port>\n`.
    #[error("CONNECT line: unexpected byte {byte:#04x} at offset {offset}")]
    Malformed {
        /// Position of the byte in the line.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// The line ended before any port digit.
    #[error("CONNECT line has no port")]
    MissingPort,
    /// The port does not fit in 32 bits.
    #[error("CONNECT port does not fit in u32")]
    PortOverflow,
    /// The input ended before the newline.
    #[error("CONNECT line ended before the newline")]
    Unterminated,
    /// A byte was pushed after the parser already finished or failed.
    #[error("CONNECT parser already finished")]
    Finished,
}

/// Progress of a [`ConnectParser`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectStatus {
    /// More bytes are needed.
    Incomplete,
    /// A full line was read; the client wants this guest port.
    Done(u32),
}

/// Incremental parser for `CONNECT <port>\n` (command case-insensitive,
/// exactly one space, a decimal `u32`, a newline).
#[derive(Debug, Clone)]
pub struct ConnectParser {
    buf: [u8; CONNECT_LINE_MAX],
    len: usize,
    finished: bool,
}

impl Default for ConnectParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectParser {
    /// An empty parser.
    pub fn new() -> Self {
        Self {
            buf: [0; CONNECT_LINE_MAX],
            len: 0,
            finished: false,
        }
    }

    /// Bytes held so far.
    pub fn buffered(&self) -> usize {
        self.len
    }

    /// Feeds one byte. After `Done` or an error the parser refuses more
    /// input: the caller must not read past the newline, since what follows
    /// belongs to the forwarded stream.
    pub fn push(&mut self, byte: u8) -> Result<ConnectStatus, ConnectError> {
        if self.finished {
            return Err(ConnectError::Finished);
        }
        let result = self.push_inner(byte);
        if !matches!(result, Ok(ConnectStatus::Incomplete)) {
            self.finished = true;
        }
        result
    }

    fn push_inner(&mut self, byte: u8) -> Result<ConnectStatus, ConnectError> {
        let offset = self.len;
        if byte == b'\n' {
            return self.finish(offset);
        }
        let Some(slot) = self.buf.get_mut(offset) else {
            return Err(ConnectError::TooLong);
        };
        // Check each byte as it arrives so garbage is refused without
        // waiting for a newline that may never come.
        let fits = match PREFIX.get(offset) {
            Some(expected) => byte.to_ascii_lowercase() == *expected,
            None => byte.is_ascii_digit(),
        };
        if !fits {
            return Err(ConnectError::Malformed { offset, byte });
        }
        *slot = byte;
        self.len += 1;
        // A full buffer without a newline can only end too long.
        if self.len == CONNECT_LINE_MAX {
            return Err(ConnectError::TooLong);
        }
        Ok(ConnectStatus::Incomplete)
    }

    /// Feeds bytes until the line completes or fails; returns the status and
    /// how many bytes of `bytes` were consumed (never past the newline).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(ConnectStatus, usize), ConnectError> {
        for (i, byte) in bytes.iter().enumerate() {
            if let ConnectStatus::Done(port) = self.push(*byte)? {
                return Ok((ConnectStatus::Done(port), i + 1));
            }
        }
        Ok((ConnectStatus::Incomplete, bytes.len()))
    }

    /// The newline arrived at `offset`: the prefix is complete and digits
    /// follow, or the line is refused.
    fn finish(&self, offset: usize) -> Result<ConnectStatus, ConnectError> {
        if offset < PREFIX.len() {
            return Err(ConnectError::Malformed {
                offset,
                byte: b'\n',
            });
        }
        let digits = self
            .buf
            .get(PREFIX.len()..self.len)
            .ok_or(ConnectError::MissingPort)?;
        if digits.is_empty() {
            return Err(ConnectError::MissingPort);
        }
        let port = digits.iter().try_fold(0u32, |acc, d| {
            acc.checked_mul(10)
                .and_then(|v| v.checked_add(u32::from(d.wrapping_sub(b'0'))))
                .ok_or(ConnectError::PortOverflow)
        })?;
        Ok(ConnectStatus::Done(port))
    }
}

/// Parses a complete line in one go (tests and fuzzing cross-check the
/// incremental path against it).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectError> {
    let mut parser = ConnectParser::new();
    match parser.feed(line)? {
        (ConnectStatus::Done(port), used) if used == line.len() => Ok(port),
        (ConnectStatus::Done(_), used) => Err(ConnectError::Malformed {
            offset: used,
            byte: line.get(used).copied().unwrap_or(0),
        }),
        (ConnectStatus::Incomplete, _) => Err(ConnectError::Unterminated),
    }
}
