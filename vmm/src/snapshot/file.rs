//! The state file: a versioned, checksummed container for one serde value.
//!
//! Layout (integers little-endian):
//!
//! | bytes | field                         |
//! |-------|-------------------------------|
//! | 8     | magic `PODVSNAP`              |
//! | 4     | format version                |
//! | 4     | reserved, 0                   |
//! | 8     | body length                   |
//! | 32    | SHA-256 of the body           |
//! | n     | body: the value as JSON       |
//!
//! The file is untrusted input: its size is capped before anything is read, and the body is
//! only decoded once the header and the checksum agree with it.

use podvisor_common::IoError;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Identifies a podvisor state file.
pub const STATE_MAGIC: [u8; 8] = *b"PODVSNAP";
/// The layout this VMM writes and reads.
pub const STATE_FORMAT_VERSION: u32 = 1;
/// Caps what read_state_file loads: a state file is tens of KiB.
pub const MAX_STATE_FILE_BYTES: u64 = 16 << 20;

const CHECKSUM_LEN: usize = 32;
/// Magic, version, reserved, body length, checksum.
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + CHECKSUM_LEN;

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be created, read, written, synced or renamed.
    #[error("state file {}", .0.path.display())]
    Io(#[source] IoError),
    /// The file (or the value to write) is above [`MAX_STATE_FILE_BYTES`].
    #[error("state file {} is {size} bytes, more than the {max}-byte cap", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least this).
        size: u64,
        /// The cap.
        max: u64,
    },
    /// The file ends before its header or before the body its header declares.
    #[error("state file {} is truncated: {got} bytes, expected {expected}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header (or the header's length field) calls for.
        expected: u64,
        /// Bytes there are.
        got: u64,
    },
    /// Bytes follow the body the header declares.
    #[error("state file {} has {got} bytes, its header declares {expected}", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Header plus declared body.
        expected: u64,
        /// Bytes there are.
        got: u64,
    },
    /// The file does not start with [`STATE_MAGIC`].
    #[error("{} is not a podvisor state file (magic {found:02x?})", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Another format version.
    #[error(
        "state file {} has format version {found}, this VMM reads version {supported}",
        path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// [`STATE_FORMAT_VERSION`].
        supported: u32,
    },
    /// The body does not match the header's SHA-256.
    #[error("state file {} is corrupt: body SHA-256 {found}, header says {expected}", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The header's digest, hex.
        expected: String,
        /// The body's digest, hex.
        found: String,
    },
    /// The value could not be turned into JSON.
    #[error("state file {}: encode the state", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// The body is not the JSON of the expected type.
    #[error("state file {}: decode the state", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StateFileError {
    move |source| StateFileError::Io(IoError::new(what, path, source))
}

/// Writes `value` to `path` atomically: the whole file goes to `<path>.tmp`, is synced, then
/// renamed over `path`, so a crash leaves the old file or the new one, never a mix. Returns the
/// bytes written.
pub fn write_state_file<T: serde::Serialize>(
    path: &Path,
    value: &T,
) -> Result<u64, StateFileError> {
    let body = serde_json::to_vec(value).map_err(|source| StateFileError::Encode {
        path: path.to_owned(),
        source,
    })?;
    let total = (HEADER_LEN + body.len()) as u64;
    if total > MAX_STATE_FILE_BYTES {
        // read_state_file would refuse it.
        return Err(StateFileError::TooLarge {
            path: path.to_owned(),
            size: total,
            max: MAX_STATE_FILE_BYTES,
        });
    }
    let mut data = Vec::with_capacity(HEADER_LEN + body.len());
    data.extend_from_slice(&STATE_MAGIC);
    data.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    data.extend_from_slice(&0u32.to_le_bytes());
    data.extend_from_slice(&(body.len() as u64).to_le_bytes());
    data.extend_from_slice(&Sha256::digest(&body));
    data.extend_from_slice(&body);

    let tmp = tmp_path(path);
    let write = || {
        let mut f = create_tmp(&tmp).map_err(io_err(&tmp, "create"))?;
        f.write_all(&data).map_err(io_err(&tmp, "write"))?;
        commit_tmp(&f, &tmp, path).map_err(io_err(path, "commit"))
    };
    write().inspect_err(|_| remove_tmp(&tmp))?;
    Ok(total)
}

/// Reads and checks the state file at `path`, then decodes its body as `T`.
pub fn read_state_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let f = File::open(path).map_err(io_err(path, "open"))?;
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    let too_large = |size| StateFileError::TooLarge {
        path: path.to_owned(),
        size,
        max: MAX_STATE_FILE_BYTES,
    };
    if len > MAX_STATE_FILE_BYTES {
        return Err(too_large(len));
    }
    // Bounded by the cap even if the file grows after the stat.
    let mut data = Vec::with_capacity(len as usize);
    f.take(MAX_STATE_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(io_err(path, "read"))?;
    let got = data.len() as u64;
    if got > MAX_STATE_FILE_BYTES {
        return Err(too_large(got));
    }
    let truncated = |expected| StateFileError::Truncated {
        path: path.to_owned(),
        expected,
        got,
    };
    let Some((header, rest)) = data.split_first_chunk::<HEADER_LEN>() else {
        return Err(truncated(HEADER_LEN as u64));
    };
    let (magic, header) = split::<8>(header);
    if magic != STATE_MAGIC {
        return Err(StateFileError::BadMagic {
            path: path.to_owned(),
            found: magic,
        });
    }
    let (version, header) = split::<4>(header);
    let version = u32::from_le_bytes(version);
    if version != STATE_FORMAT_VERSION {
        return Err(StateFileError::Version {
            path: path.to_owned(),
            found: version,
            supported: STATE_FORMAT_VERSION,
        });
    }
    let (_reserved, header) = split::<4>(header);
    let (body_len, header) = split::<8>(header);
    let (expected_sum, _) = split::<CHECKSUM_LEN>(header);
    // The length field only ever indexes into what was read, which the cap bounds.
    let declared = u64::from_le_bytes(body_len);
    let expected = declared.saturating_add(HEADER_LEN as u64);
    if expected > got {
        return Err(truncated(expected));
    }
    if expected < got {
        return Err(StateFileError::TrailingBytes {
            path: path.to_owned(),
            expected,
            got,
        });
    }
    let body = rest;
    let sum: [u8; CHECKSUM_LEN] = Sha256::digest(body).into();
    if sum != expected_sum {
        return Err(StateFileError::Checksum {
            path: path.to_owned(),
            expected: hex(&expected_sum),
            found: hex(&sum),
        });
    }
    serde_json::from_slice(body).map_err(|source| StateFileError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// The first `N` bytes of `bytes` and the rest; callers stay within the fixed-size header.
fn split<const N: usize>(bytes: &[u8]) -> ([u8; N], &[u8]) {
    let (head, rest) = bytes.split_at(N);
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    (out, rest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<path>.tmp`: where a file is written before it replaces `path`.
pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

/// Creates (or empties) the temporary file, owner-only: a snapshot holds guest secrets.
pub(super) fn create_tmp(tmp: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
}

/// Removes what is left of a failed write (nothing if the rename happened).
pub(super) fn remove_tmp(tmp: &Path) {
    if let Err(e) = std::fs::remove_file(tmp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("remove {}: {e}", tmp.display());
    }
}

/// Makes `tmp` (written through `f`) durable and renames it over `path`, then syncs the
/// directory so the rename itself survives a crash.
pub(super) fn commit_tmp(f: &File, tmp: &Path, path: &Path) -> std::io::Result<()> {
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "pod-a".into(),
            values: vec![1, 2, u64::MAX],
        }
    }

    fn written(dir: &tempfile::TempDir) -> (PathBuf, Vec<u8>) {
        let path = dir.path().join("state");
        let n = write_state_file(&path, &sample()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(n, bytes.len() as u64);
        (path, bytes)
    }

    #[test]
    fn round_trip_is_atomic_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = written(&dir);
        assert!(!tmp_path(&path).exists(), "the temporary file was renamed");
        assert_eq!(&bytes[..8], b"PODVSNAP");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        let back: Sample = read_state_file(&path).unwrap();
        assert_eq!(back, sample());
        // Rewriting replaces the file.
        let other = Sample {
            name: "pod-b".into(),
            values: vec![],
        };
        write_state_file(&path, &other).unwrap();
        assert_eq!(read_state_file::<Sample>(&path).unwrap(), other);
    }

    #[test]
    fn failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory where the file goes: the rename fails.
        let path = dir.path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), b"x").unwrap();
        let e = write_state_file(&path, &sample()).unwrap_err();
        assert!(
            matches!(e, StateFileError::Io(IoError { what: "commit", .. })),
            "{e}"
        );
        assert!(!tmp_path(&path).exists());
        assert!(path.join("x").exists());
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::Io(_)), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = written(&dir);
        std::fs::write(&path, &bytes[..20]).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(
            matches!(
                e,
                StateFileError::Truncated {
                    expected: 56,
                    got: 20,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        match e {
            StateFileError::Truncated { expected, got, .. } => {
                assert_eq!(expected, bytes.len() as u64);
                assert_eq!(got, bytes.len() as u64 - 1);
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(&dir);
        bytes.push(b' ');
        std::fs::write(&path, &bytes).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::TrailingBytes { .. }), "{e}");
    }

    #[test]
    fn bad_magic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(&dir);
        bytes[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        std::fs::write(&path, &bytes).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("not a podvisor state file"), "{e}");
    }

    #[test]
    fn other_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(&dir);
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(
            matches!(
                e,
                StateFileError::Version {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn flipped_body_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(&dir);
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::Checksum { .. }), "{e}");
    }

    #[test]
    fn huge_length_field_is_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(&dir);
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(
            matches!(
                e,
                StateFileError::Truncated {
                    expected: u64::MAX,
                    ..
                }
            ),
            "{e}"
        );
        bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::Truncated { .. }), "{e}");
    }

    #[test]
    fn files_above_the_cap_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let f = File::create(&path).unwrap();
        // Sparse: no data is written, only the length.
        f.set_len(MAX_STATE_FILE_BYTES + 1).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn a_body_of_another_type_is_a_decode_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_state_file(&path, &vec!["not", "a", "sample"]).unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::Decode { .. }), "{e}");
    }
}
