//! A blocking client for the control API, for podvisord and tests.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use podvisor_common::IoError;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or talking to the socket failed ("control socket PATH").
    #[error(transparent)]
    Io(#[from] IoError),
    /// The answer was not HTTP.
    #[error("malformed answer from {0}")]
    Malformed(String),
    /// The VMM answered with an error status.
    #[error("{method} {uri}: HTTP {status}: {body}")]
    Status {
        /// Method.
        method: String,
        /// Path.
        uri: String,
        /// HTTP status.
        status: u16,
        /// Body.
        body: String,
    },
}

/// Sends one request and returns the body of a 2xx answer.
pub fn call(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> Result<String, ClientError> {
    call_with_fd(sock, method, uri, body, None)
}

/// [`call`], with `fd` passed to the VMM (SCM_RIGHTS, on the request's first bytes): how a
/// jailed VMM gets a file it cannot open itself, e.g. a drive swap's image.
pub fn call_with_fd(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
    fd: Option<BorrowedFd<'_>>,
) -> Result<String, ClientError> {
    let io = |source| ClientError::Io(IoError::new("control socket", sock, source));
    let mut s = UnixStream::connect(sock).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut rest = request.as_bytes();
    if let Some(fd) = fd {
        // The descriptor rides on the first byte; the rest follows as plain writes.
        let sent = s
            .send_with_fd(&rest[..1], fd.as_raw_fd())
            .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
        rest = &rest[sent..];
    }
    s.write_all(rest).map_err(io)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(io)?;
    let malformed = || ClientError::Malformed(sock.display().to_string());
    let (head, rest) = answer.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    if !(200..300).contains(&status) {
        return Err(ClientError::Status {
            method: method.into(),
            uri: uri.into(),
            status,
            body: rest.to_string(),
        });
    }
    Ok(rest.to_string())
}
