//! The console's host file, capped: a guest writing to its console forever costs the host
//! at most [`CONSOLE_CAP`] bytes of disk. When a write would pass the cap the file starts
//! over, with a line saying so, and keeps the newest output (what explains a failure).
//! Truncating in place, not renaming: the vCPU thread that writes needs no new file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Most bytes the console file holds.
pub const CONSOLE_CAP: u64 = 8 << 20;

/// The line a restarted console file begins with.
const RESTARTED: &[u8] =
    b"[podvisor-vmm: console output reached its cap; earlier output dropped]\n";
/// The line a restarted log file begins with.
pub const LOG_RESTARTED: &[u8] =
    b"[podvisor-vmm: the log reached its cap; earlier lines dropped]\n";

/// An append-only file of at most `cap` bytes.
#[derive(Debug)]
pub struct CappedFile {
    file: File,
    len: u64,
    cap: u64,
    note: &'static [u8],
}

impl CappedFile {
    /// Opens (creates) `path` for appending; what it holds already counts.
    pub fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Self::from_file(file, cap, RESTARTED)
    }

    /// A file opened for appending elsewhere (the VMM's stderr); a restart begins with
    /// `note`.
    pub fn from_file(file: File, cap: u64, note: &'static [u8]) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            cap,
            note,
        })
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.cap.saturating_sub(self.note.len() as u64).max(1);
        let buf = &buf[..buf.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
        if self.len.saturating_add(buf.len() as u64) > self.cap {
            self.file.set_len(0)?;
            self.file.write_all(self.note)?;
            self.len = self.note.len() as u64;
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_stays_under_its_cap_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "from before\n").unwrap();
        let cap = 4096;
        let mut f = io::LineWriter::new(CappedFile::open(&path, cap).unwrap());
        for i in 0..2000 {
            writeln!(f, "guest line {i}").unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= cap);
        }
        f.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(std::str::from_utf8(RESTARTED).unwrap()),
            "{text}"
        );
        assert!(text.ends_with("guest line 1999\n"), "{text}");
        assert!(!text.contains("from before"));
        // One write larger than the cap is cut to fit.
        let mut f = CappedFile::open(&path, cap).unwrap();
        let n = f.write(&vec![b'x'; 10_000]).unwrap();
        assert!(n < 10_000);
        assert!(std::fs::metadata(&path).unwrap().len() <= cap);
    }

    #[test]
    fn a_file_opened_elsewhere_gets_its_own_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut f = CappedFile::from_file(file, 1024, LOG_RESTARTED).unwrap();
        for i in 0..200 {
            writeln!(f, "log line {i}").unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 1024);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("[podvisor-vmm: the log reached its cap"),
            "{text}"
        );
        assert!(text.ends_with("log line 199\n"), "{text}");
    }
}
