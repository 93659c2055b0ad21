//! The block device: backing file, features, config space, activation.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::virtio_blk_config;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ID_BYTES, MAX_DESCRIPTORS, QUEUE_SIZE, REQUEST_QUEUE_TOKEN, SECTOR_SHIFT, SEG_MAX, SIZE_MAX,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use crate::virtio::{
    ActivateContext, ActivateError, DeviceCounters, EventRegistrar, EventToken, GuestMemory,
    Interrupt, QueueSnapshot, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};

/// Size of the config space (`struct virtio_blk_config`).
const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// How a block device is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw disk image (a regular file or a block device).
    pub path: PathBuf,
    /// Open the image read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Drive id; also the serial the guest reads with `VIRTIO_BLK_T_GET_ID`
    /// (truncated to 20 bytes).
    pub id: String,
}

/// Why a backing file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("open block backing {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The size of the file could not be determined.
    #[error("size of block backing {}", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The path names a directory.
    #[error("block backing {} is a directory", path.display())]
    Directory {
        /// The path.
        path: PathBuf,
    },
    /// The file holds no whole sector, so the disk would have no capacity.
    #[error("block backing {} is empty ({len} bytes, less than one 512-byte sector)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
}

/// The file behind the disk and what the guest may do with it.
#[derive(Debug)]
pub(super) struct Backing {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    /// Whole 512-byte sectors; a trailing partial sector is not addressable.
    pub(super) capacity: u64,
}

impl Backing {
    fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path, read_only)
    }

    /// A backing on `file`, opened by the caller (`path` names it in logs and errors); it
    /// must be open for writing unless `read_only`.
    fn from_file(mut file: File, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let size_err = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        if !read_only {
            // SAFETY: F_GETFL on a descriptor this function owns; no memory is passed.
            let flags =
                unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
            if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
                return Err(BlockError::Open {
                    path: path.to_owned(),
                    source: std::io::Error::from_raw_os_error(libc::EBADF),
                });
            }
        }
        if file.metadata().map_err(size_err)?.is_dir() {
            return Err(BlockError::Directory {
                path: path.to_owned(),
            });
        }
        // Seeking to the end works for block devices too, whose metadata
        // length is 0. Requests use positioned I/O, so the position is moot.
        let len = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let capacity = len >> SECTOR_SHIFT;
        if capacity == 0 {
            return Err(BlockError::Empty {
                path: path.to_owned(),
                len,
            });
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            read_only,
            capacity,
        })
    }
}

/// Everything request handling needs apart from the queue: the backing, the
/// serial, the counters and a fixed scratch table for the chain being parsed.
#[derive(Debug)]
pub(super) struct Disk {
    pub(super) backing: Backing,
    pub(super) serial: [u8; ID_BYTES],
    pub(super) counters: DeviceCounters,
    /// Descriptors of the chain being parsed; owned here so that a request
    /// allocates nothing.
    pub(super) descriptors: Box<[virtio_queue::desc::split::Descriptor; MAX_DESCRIPTORS]>,
}

/// What the device holds between DRIVER_OK and reset.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemory,
    pub(super) queue: Queue,
    pub(super) queue_evt: EventFd,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) events: EventRegistrar,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub(super) event_idx: bool,
}

/// A virtio-blk device backed by a raw file.
#[derive(Debug)]
pub struct Block {
    id: String,
    pub(super) disk: Disk,
    pub(super) active: Option<Active>,
}

impl Block {
    /// Opens the backing file of `cfg` (read-only when `cfg.read_only`).
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        let backing = Backing::open(&cfg.path, cfg.read_only)?;
        tracing::info!(
            id = %cfg.id,
            path = %cfg.path.display(),
            read_only = cfg.read_only,
            sectors = backing.capacity,
            "block device created"
        );
        let mut serial = [0u8; ID_BYTES];
        for (dst, src) in serial.iter_mut().zip(cfg.id.as_bytes()) {
            *dst = *src;
        }
        Ok(Self {
            id: cfg.id,
            disk: Disk {
                backing,
                serial,
                counters: DeviceCounters::default(),
                descriptors: Box::new([Default::default(); MAX_DESCRIPTORS]),
            },
            active: None,
        })
    }

    /// Replaces the backing file while the guest may be running. The new file
    /// is opened first, so on error the old backing stays in place. When the
    /// device is active the guest is told through a config-change interrupt
    /// and re-reads the capacity.
    ///
    /// The read-only feature bit cannot change once negotiated: a drive swapped
    /// to read-only after the guest negotiated read-write fails every write
    /// with `VIRTIO_BLK_S_IOERR`.
    pub fn swap_backing(
        &mut self,
        path: &Path,
        file: Option<File>,
        read_only: bool,
    ) -> Result<(), BlockError> {
        let backing = match file {
            Some(f) => Backing::from_file(f, path, read_only)?,
            None => Backing::open(path, read_only)?,
        };
        tracing::info!(
            id = %self.id,
            old = %self.disk.backing.path.display(),
            new = %path.display(),
            read_only,
            sectors = backing.capacity,
            "block backing swapped"
        );
        self.disk.backing = backing;
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// The drive id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current backing file.
    pub fn path(&self) -> &Path {
        &self.disk.backing.path
    }

    /// Whether the current backing is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.backing.read_only
    }

    /// Capacity of the current backing in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.backing.capacity
    }

    /// The config space as the driver sees it (little endian).
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let fields: [(usize, &[u8]); 3] = [
            (
                offset_of!(virtio_blk_config, capacity),
                &self.disk.backing.capacity.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, size_max),
                &SIZE_MAX.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, seg_max),
                &SEG_MAX.to_le_bytes(),
            ),
        ];
        for (offset, bytes) in fields {
            if let Some(dst) = config.get_mut(offset..offset + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        }
        config
    }

    fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            active.events.remove(active.queue_evt.as_raw_fd());
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_SIZE_MAX;
        if self.disk.backing.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field we expose is read-only (no VIRTIO_BLK_F_CONFIG_WCE).
        tracing::debug!(
            id = %self.id,
            offset,
            len = data.len(),
            "ignored write to block config space"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: ctx.queues.len(),
            });
        }
        if ctx.queue_events.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: ctx.queue_events.len(),
            });
        }
        // A second activation without reset would leak the first
        // registration; start from a clean slate instead.
        self.deactivate();

        let event_idx = ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let (Some(mut queue), Some(queue_evt)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_events.into_iter().next(),
        ) else {
            // Unreachable: both lengths were checked above.
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        queue.set_event_idx(event_idx);

        let fd = queue_evt.as_raw_fd();
        ctx.events
            .add(fd, REQUEST_QUEUE_TOKEN, EventSet::IN)
            .map_err(|source| ActivateError::Register { fd, source })?;
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            queue_evt,
            interrupt: ctx.interrupt,
            events: ctx.events,
            event_idx,
        });
        tracing::debug!(id = %self.id, event_idx, "block device activated");
        Ok(())
    }

    fn handle_event(&mut self, token: EventToken, events: u32) {
        if token != REQUEST_QUEUE_TOKEN {
            tracing::debug!(id = %self.id, token, "block: unknown event token");
            return;
        }
        self.handle_queue_event(events);
    }

    fn reset(&mut self) {
        self.deactivate();
        tracing::debug!(id = %self.id, "block device reset");
    }

    fn name(&self) -> String {
        format!("block {}", self.id)
    }

    fn counters(&self) -> DeviceCounters {
        self.disk.counters.clone()
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        // Requests are served to completion within one event, so the ring
        // positions are all there is: nothing is in flight.
        self.active
            .iter()
            .map(|active| QueueSnapshot::from(&active.queue))
            .collect()
    }

    /// The drive file need not be the one the guest saw before the
    /// snapshot, nor of the same size: the driver re-reads the capacity, as
    /// after [`Block::swap_backing`].
    fn restored(&mut self) {
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change();
        }
    }
}
