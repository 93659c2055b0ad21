//! Container logs in the CRI format kubelet reads (`kubectl logs`, rotation):
//!
//! ```text
//! 2024-05-01T12:00:00.123456789Z stdout F a whole line
//! 2024-05-01T12:00:00.223456789Z stderr P the first part of a long line
//! 2024-05-01T12:00:00.223456789Z stderr F and its end
//! ```
//!
//! One entry per line of output, tagged `F` (full) or `P` (partial: the line goes on in the
//! next entry of the same stream). A line longer than [`MAX_LINE_BYTES`] is cut into `P`
//! entries, as containerd does; output without a final newline is written as `P` when the
//! writer is flushed or closed, so nothing is lost when a container ends right after writing.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// The longest entry; longer lines are split (containerd's default `max_container_log_line_size`).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The timestamp format: RFC 3339 with nanoseconds, in UTC.
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.9fZ";

/// Why a log file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Opening the log file failed (its directory is missing, it is a symlink, ...).
    #[error("open container log {path}")]
    Open {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its directory could not be created.
    #[error("create container log directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing to it failed.
    #[error("write container log {path}")]
    Write {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A container output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`, as in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Writes one container's stdout and stderr to its CRI log file.
#[derive(Debug)]
pub struct CriLogWriter {
    path: PathBuf,
    file: File,
    /// Per stream, the start of a line not yet ended by a newline.
    pending: [Vec<u8>; 2],
}

/// Opens `path` for appending, creating it with mode 0640; a symlink is refused. The
/// directory is kubelet's to create.
fn open_log(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Appends one entry to `out`.
fn entry(out: &mut Vec<u8>, timestamp: &str, stream: Stream, partial: bool, text: &[u8]) {
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(text);
    out.push(b'\n');
}

impl CriLogWriter {
    /// CreateContainer's log: creates the directories above `path` that do not exist yet
    /// (mode 0755, as containerd's MkdirAll; kubelet's log paths are trusted), then opens
    /// or creates the file.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, LogError> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| LogError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Self::open(path)
    }

    /// Opens (or creates) the log file at `path`, whose directory must exist.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, LogError> {
        let path = path.into();
        let file = open_log(&path)?;
        Ok(Self {
            path,
            file,
            pending: [Vec::new(), Vec::new()],
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs a chunk of `stream`'s output: each line it completes becomes an `F` entry; the
    /// rest waits for the next chunk unless it reaches [`MAX_LINE_BYTES`].
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> Result<(), LogError> {
        let timestamp = Utc::now().format(TIMESTAMP_FORMAT).to_string();
        let pending = &mut self.pending[stream.index()];
        let mut out = Vec::with_capacity(data.len() + 64);
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            pending.extend_from_slice(&rest[..nl]);
            rest = &rest[nl + 1..];
            while pending.len() > MAX_LINE_BYTES {
                entry(
                    &mut out,
                    &timestamp,
                    stream,
                    true,
                    &pending[..MAX_LINE_BYTES],
                );
                pending.drain(..MAX_LINE_BYTES);
            }
            entry(&mut out, &timestamp, stream, false, pending);
            pending.clear();
        }
        pending.extend_from_slice(rest);
        while pending.len() >= MAX_LINE_BYTES {
            entry(
                &mut out,
                &timestamp,
                stream,
                true,
                &pending[..MAX_LINE_BYTES],
            );
            pending.drain(..MAX_LINE_BYTES);
        }
        self.append(&out)
    }

    /// Writes out what is pending of an unfinished line, per stream, as a `P` entry.
    pub fn flush_partial(&mut self) -> Result<(), LogError> {
        let timestamp = Utc::now().format(TIMESTAMP_FORMAT).to_string();
        let mut out = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let pending = &mut self.pending[stream.index()];
            if !pending.is_empty() {
                entry(&mut out, &timestamp, stream, true, pending);
                pending.clear();
            }
        }
        self.append(&out)
    }

    /// Opens the log path again (kubelet renamed the file to rotate it: ReopenContainerLog).
    /// On failure the writer keeps writing to the file it had.
    pub fn reopen(&mut self) -> Result<(), LogError> {
        self.file = open_log(&self.path)?;
        Ok(())
    }

    /// Flushes pending partial lines and closes the file.
    pub fn close(mut self) -> Result<(), LogError> {
        self.flush_partial()
    }

    /// One write(2) per batch of entries: with O_APPEND, entries never interleave with
    /// another writer's.
    fn append(&mut self, out: &[u8]) -> Result<(), LogError> {
        if out.is_empty() {
            return Ok(());
        }
        self.file.write_all(out).map_err(|source| LogError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for CriLogWriter {
    fn drop(&mut self) {
        if let Err(e) = self.flush_partial() {
            tracing::warn!("flush partial lines: {}", podvisor_common::error_chain(&e));
        }
    }
}

/// One parsed log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry<'a> {
    /// When the line was logged.
    pub timestamp: DateTime<Utc>,
    /// Which stream.
    pub stream: Stream,
    /// `P`: the line goes on in the next entry of the stream.
    pub partial: bool,
    /// The text, without the newline.
    pub text: &'a str,
}

/// Parses one line of a CRI log (with or without its newline); `None` if it is not one.
pub fn parse_line(line: &str) -> Option<LogEntry<'_>> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let mut parts = line.splitn(4, ' ');
    let timestamp = DateTime::parse_from_rfc3339(parts.next()?)
        .ok()?
        .with_timezone(&Utc);
    let stream = match parts.next()? {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        "F" => false,
        "P" => true,
        _ => return None,
    };
    Some(LogEntry {
        timestamp,
        stream,
        partial,
        text: parts.next().unwrap_or(""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        (dir, path)
    }

    /// The entries of a log file as (stream, partial, text).
    fn entries(path: &Path) -> Vec<(Stream, bool, String)> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        text.lines()
            .map(|l| {
                let e = parse_line(l).unwrap_or_else(|| panic!("not a CRI log line: {l:?}"));
                (e.stream, e.partial, e.text.to_string())
            })
            .collect()
    }

    fn f(stream: Stream, text: &str) -> (Stream, bool, String) {
        (stream, false, text.to_string())
    }

    fn p(stream: Stream, text: &str) -> (Stream, bool, String) {
        (stream, true, text.to_string())
    }

    use Stream::{Stderr, Stdout};

    #[test]
    fn full_lines_are_f_entries_with_utc_nanosecond_timestamps() {
        let (_d, path) = setup();
        let before = Utc::now();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stdout, b"hello world\n\nlast one\n").unwrap();
        assert_eq!(
            entries(&path),
            [
                f(Stdout, "hello world"),
                f(Stdout, ""),
                f(Stdout, "last one")
            ]
        );
        let raw = std::fs::read_to_string(&path).unwrap();
        let first = raw.lines().next().unwrap();
        let ts = first.split(' ').next().unwrap();
        // 2024-05-01T12:00:00.123456789Z
        assert_eq!(ts.len(), 30, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        assert!(ts[20..29].bytes().all(|b| b.is_ascii_digit()), "{ts}");
        let t = parse_line(first).unwrap().timestamp;
        assert!(t >= before && t <= Utc::now());
        assert_eq!(first, format!("{ts} stdout F hello world"));
        assert_eq!(
            path.metadata().unwrap().mode() & 0o777,
            0o640 & !current_umask()
        );
    }

    fn current_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
    }

    #[test]
    fn a_line_split_across_writes_is_one_entry() {
        let (_d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stdout, b"hel").unwrap();
        assert_eq!(entries(&path), [], "nothing until the line ends");
        w.write(Stdout, b"lo\nwor").unwrap();
        w.write(Stdout, b"").unwrap();
        w.write(Stdout, b"ld\n").unwrap();
        assert_eq!(entries(&path), [f(Stdout, "hello"), f(Stdout, "world")]);
    }

    #[test]
    fn stdout_and_stderr_keep_their_own_partial_lines() {
        let (_d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stdout, b"out-").unwrap();
        w.write(Stderr, b"err-").unwrap();
        w.write(Stderr, b"line\nerr-").unwrap();
        w.write(Stdout, b"line\n").unwrap();
        w.write(Stderr, b"two\n").unwrap();
        assert_eq!(
            entries(&path),
            [
                f(Stderr, "err-line"),
                f(Stdout, "out-line"),
                f(Stderr, "err-two")
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_into_p_entries_at_the_cap() {
        let (_d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        let cap = MAX_LINE_BYTES;
        // No newline: a P entry as soon as the cap is reached, the rest stays pending.
        w.write(Stdout, "a".repeat(cap + 10).as_bytes()).unwrap();
        assert_eq!(entries(&path), [p(Stdout, &"a".repeat(cap))]);
        w.write(Stdout, b"\n").unwrap();
        // A whole line of more than two caps in one write.
        let long = format!("{}{}{}\n", "b".repeat(cap), "c".repeat(cap), "d".repeat(5));
        w.write(Stderr, long.as_bytes()).unwrap();
        // Exactly the cap, with its newline: one F entry.
        w.write(Stdout, format!("{}\n", "e".repeat(cap)).as_bytes())
            .unwrap();
        assert_eq!(
            entries(&path),
            [
                p(Stdout, &"a".repeat(cap)),
                f(Stdout, &"a".repeat(10)),
                p(Stderr, &"b".repeat(cap)),
                p(Stderr, &"c".repeat(cap)),
                f(Stderr, "ddddd"),
                f(Stdout, &"e".repeat(cap)),
            ]
        );
    }

    #[test]
    fn close_and_drop_flush_the_partial_line() {
        let (_d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stdout, b"done\nno newline").unwrap();
        w.write(Stderr, b"oops").unwrap();
        w.close().unwrap();
        assert_eq!(
            entries(&path),
            [
                f(Stdout, "done"),
                p(Stdout, "no newline"),
                p(Stderr, "oops")
            ]
        );

        let (_d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stderr, b"dropped").unwrap();
        drop(w);
        assert_eq!(entries(&path), [p(Stderr, "dropped")]);

        let (_d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stdout, b"abc").unwrap();
        w.flush_partial().unwrap();
        w.flush_partial().unwrap();
        w.write(Stdout, b"def\n").unwrap();
        assert_eq!(entries(&path), [p(Stdout, "abc"), f(Stdout, "def")]);
    }

    #[test]
    fn reopen_after_rename_writes_a_new_file() {
        let (d, path) = setup();
        let mut w = CriLogWriter::open(&path).unwrap();
        w.write(Stdout, b"one\ntw").unwrap();
        let rotated = d.path().join("0.log.20240501-120000");
        std::fs::rename(&path, &rotated).unwrap();
        w.write(Stdout, b"o\n").unwrap();
        assert_eq!(entries(&rotated), [f(Stdout, "one"), f(Stdout, "two")]);
        w.reopen().unwrap();
        w.write(Stdout, b"three\n").unwrap();
        assert_eq!(entries(&rotated), [f(Stdout, "one"), f(Stdout, "two")]);
        assert_eq!(entries(&path), [f(Stdout, "three")]);

        // Reopening fails (the directory is gone): the old file keeps the output.
        let sub = d.path().join("subdir");
        std::fs::create_dir(&sub).unwrap();
        let mut w2 = CriLogWriter::open(sub.join("0.log")).unwrap();
        std::fs::rename(sub.join("0.log"), d.path().join("moved.log")).unwrap();
        std::fs::remove_dir(&sub).unwrap();
        assert!(matches!(w2.reopen(), Err(LogError::Open { .. })));
        w2.write(Stdout, b"still here\n").unwrap();
        assert_eq!(
            entries(&d.path().join("moved.log")),
            [f(Stdout, "still here")]
        );
    }

    #[test]
    fn open_refuses_symlinks_and_missing_directories() {
        let (d, path) = setup();
        let target = d.path().join("target");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(
            CriLogWriter::open(&path),
            Err(LogError::Open { .. })
        ));
        assert!(matches!(
            CriLogWriter::open(d.path().join("missing/0.log")),
            Err(LogError::Open { .. })
        ));
        assert!(
            !d.path().join("missing").exists(),
            "kubelet makes the directory"
        );
    }

    #[test]
    fn create_makes_the_missing_directories() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ns_pod_uid/app/0.log");
        let mut w = CriLogWriter::create(&path).unwrap();
        w.write(Stdout, b"hi\n").unwrap();
        assert_eq!(entries(&path), [f(Stdout, "hi")]);
        let mode = std::fs::metadata(d.path().join("ns_pod_uid/app"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o755
        );
        // A file where a directory should be: a clear error, nothing written.
        std::fs::write(d.path().join("file"), "").unwrap();
        assert!(matches!(
            CriLogWriter::create(d.path().join("file/0.log")),
            Err(LogError::CreateDir { .. })
        ));
    }

    #[test]
    fn parse_line_reads_what_kubelet_reads() {
        let e = parse_line("2024-05-01T12:00:00.123456789Z stderr P a b  c\n").unwrap();
        assert_eq!(e.stream, Stderr);
        assert!(e.partial);
        assert_eq!(e.text, "a b  c");
        assert_eq!(
            e.timestamp.format(TIMESTAMP_FORMAT).to_string(),
            "2024-05-01T12:00:00.123456789Z"
        );
        // Other RFC 3339 offsets are accepted and turned into UTC.
        let e = parse_line("2024-05-01T14:00:00+02:00 stdout F ").unwrap();
        assert_eq!(e.timestamp.to_rfc3339(), "2024-05-01T12:00:00+00:00");
        assert_eq!(e.text, "");
        assert_eq!(
            parse_line("2024-05-01T12:00:00Z stdout F").map(|e| e.text),
            Some("")
        );
        for bad in [
            "",
            "hello",
            "2024-05-01 stdout F x",
            "2024-05-01T12:00:00Z stdin F x",
            "2024-05-01T12:00:00Z stdout X x",
            "2024-05-01T12:00:00Z stdout",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }
}
