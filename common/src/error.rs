//! The one error-chain printer and the one shape of a failed file operation.

use std::path::PathBuf;

/// `e` and its sources joined by ": " — a message that says why, not only what. A cause
/// whose text the chain already shows (tonic's and reqwest's errors repeat their I/O error)
/// is left out.
///
/// For an `anyhow::Error`, pass `err.as_ref()`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !message.is_empty() && !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// A file operation that failed: what was done, on which path, and the OS error as the
/// source. Error enums carry it as a variant (`Io(#[from] IoError)`) instead of repeating
/// the three fields.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct IoError {
    /// What was being done ("create", "read state record", ...).
    pub what: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// An `IoError` for `what` on `path`.
    pub fn new(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self {
            what,
            path: path.into(),
            source,
        }
    }

    /// A closure for `map_err`: `fs::read(&p).map_err(IoError::at("read", &p))?`.
    pub fn at(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self { what, path, source }
    }

    /// The OS error's kind, for callers that branch on it (NotFound, AlreadyExists).
    pub fn kind(&self) -> std::io::ErrorKind {
        self.source.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("start pod")]
    struct Outer(#[source] IoError);

    #[test]
    fn chain_shows_every_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let e = Outer(IoError::new("open", "/x/y", io));
        assert_eq!(error_chain(&e), format!("start pod: open /x/y: {text}"));
    }

    #[test]
    fn repeated_causes_are_left_out() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error: connection refused")]
        struct Repeats(#[source] std::io::Error);
        let e = Repeats(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&e), "transport error: connection refused");
    }

    #[test]
    fn io_error_at_maps_and_keeps_kind() {
        let r: Result<(), IoError> = Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists))
            .map_err(IoError::at("mkdir", "/a"));
        let e = r.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(e.to_string().starts_with("mkdir /a"));
    }
}
