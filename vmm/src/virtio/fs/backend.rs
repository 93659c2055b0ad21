//! What answers the guest's FUSE requests: `fuse-backend-rs`'s server over its passthrough
//! file system rooted at the shared directory, or nothing (every request gets `ENODEV`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, Writer};
use vm_memory::ByteValued;

use super::share::Share;

/// How long the guest may trust a name or an attribute before asking again. Short, so that
/// what the host changes (kubelet's atomic `..data` swap of configMaps and secrets, files a
/// host process writes) is seen in the guest within a second: at most this long for the
/// cached `..data` entry, the rest of the second for the guest's own path walk, which costs
/// a FUSE round trip per component on a slow (emulated) guest kernel.
const CACHE_TIMEOUT: Duration = Duration::from_millis(250);

// FUSE opcodes that get no reply (the Linux FUSE protocol, `enum fuse_opcode`).
const FUSE_FORGET: u32 = 2;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;

/// Why the shared directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The passthrough file system could not be set up (it opens `/proc/self/fd`).
    #[error("set up the passthrough file system for {}", dir.display())]
    Passthrough {
        /// The shared directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The shared directory could not be opened.
    #[error("open the shared directory {}", dir.display())]
    Open {
        /// The shared directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is not valid UTF-8 (the passthrough file system takes a string).
    #[error("shared directory {} is not valid UTF-8", dir.display())]
    Path {
        /// The shared directory.
        dir: PathBuf,
    },
}

/// The FUSE side of the device.
pub struct Backend {
    server: Option<Server<Arc<Share>>>,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A backend that serves nothing: every request is answered with `ENODEV`.
    pub fn none() -> Self {
        Self {
            server: None,
            dir: None,
        }
    }

    /// Serves `dir`, which must be a directory. The passthrough file system opens
    /// `/proc/self/fd` here and keeps it, and clears the process's umask (the guest's
    /// modes are applied as the guest asks).
    pub fn passthrough(dir: &Path) -> Result<Self, FsError> {
        let root = dir.to_str().ok_or_else(|| FsError::Path {
            dir: dir.to_owned(),
        })?;
        let config = Config {
            root_dir: root.to_string(),
            entry_timeout: CACHE_TIMEOUT,
            attr_timeout: CACHE_TIMEOUT,
            cache_policy: CachePolicy::Auto,
            // The guest's page cache gathers small writes into large requests (each request
            // costs a guest exit); the kernel writes a file's dirty pages back before the
            // FLUSH of its close, so what a container wrote is on the host once closed.
            writeback: true,
            xattr: false,
            do_import: true,
            ..Config::default()
        };
        let fs: PassthroughFs<()> =
            PassthroughFs::new(config).map_err(|source| FsError::Passthrough {
                dir: dir.to_owned(),
                source,
            })?;
        fs.import().map_err(|source| FsError::Open {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            server: Some(Server::new(Arc::new(Share::new(fs)))),
            dir: Some(dir.to_owned()),
        })
    }

    /// The directory served, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Answers the request `reader` holds into `writer`; returns the bytes written. An
    /// error means the request could not be decoded or answered at all.
    pub fn answer(&self, reader: Reader<'_, ()>, writer: Writer<'_, ()>) -> io::Result<usize> {
        match &self.server {
            Some(server) => server
                .handle_message(reader, writer, None, None)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            None => refuse(reader, writer),
        }
    }
}

/// The reply of a device without a share: `ENODEV` for every request that wants one.
fn refuse(mut reader: Reader<'_, ()>, mut writer: Writer<'_, ()>) -> io::Result<usize> {
    let header: InHeader = reader.read_obj()?;
    if matches!(
        header.opcode,
        FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT
    ) {
        return Ok(0);
    }
    error_reply(&mut writer, header.unique, libc::ENODEV)
}

/// Writes a bare FUSE error reply (`-errno`) for request `unique`.
pub(super) fn error_reply(
    writer: &mut Writer<'_, ()>,
    unique: u64,
    errno: i32,
) -> io::Result<usize> {
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    std::io::Write::write_all(writer, out.as_slice())?;
    writer.commit(None)?;
    Ok(std::mem::size_of::<OutHeader>())
}
