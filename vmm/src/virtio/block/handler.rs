//! Request queue processing: parse each chain, check it completely, then do
//! the I/O and report the status.

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use super::device::{Block, Disk};
use super::io::FileAt;
use super::{
    MAX_DESCRIPTORS, QUEUE_SIZE, REQUEST_HEADER_LEN, SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::virtio::serve::ServedQueue;
use crate::virtio::{GuestMemory, MAX_CHAIN_BYTES};

/// Chains served per queue event before the device yields the event loop to
/// other devices (it re-kicks its own eventfd to come back).
const CHAINS_PER_EVENT: u32 = 2 * QUEUE_SIZE as u32;

/// Why a chain was dropped without doing any I/O.
#[derive(Debug, thiserror::Error)]
enum Malformed {
    #[error("empty chain")]
    Empty,
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("chain cut short (descriptor loop or index out of the table)")]
    Truncated,
    #[error("chain of one descriptor has no status")]
    NoStatus,
    #[error("status descriptor at {addr:#x} ({len} bytes, writable: {writable}) unusable")]
    BadStatus { addr: u64, len: u32, writable: bool },
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    #[error("header descriptor of {0} bytes, need {REQUEST_HEADER_LEN}")]
    HeaderTooShort(u32),
    #[error("header at {0:#x} outside guest memory")]
    HeaderOutside(u64),
    #[error("data descriptor {index} has the wrong direction for request type {kind}")]
    DataDirection { index: usize, kind: u32 },
    #[error("data descriptor at {addr:#x} ({len} bytes) outside guest memory")]
    DataOutside { addr: u64, len: u32 },
    #[error("request data over {MAX_CHAIN_BYTES} bytes")]
    DataTooLong,
    #[error("request data of {0} bytes is not a whole number of sectors")]
    DataNotSectorMultiple(u32),
}

/// A request whose descriptors passed every structural check. Its data
/// descriptors are `Disk::descriptors[1..status_index]`.
#[derive(Debug)]
struct Request {
    kind: u32,
    sector: u64,
    status: GuestAddress,
    status_index: usize,
    data_len: u32,
}

/// A request's outcome: the status byte and the data bytes written into
/// guest memory.
type Outcome = (u8, u32);

impl Block {
    /// The request queue's eventfd fired.
    pub(super) fn handle_queue_event(&mut self, events: u32) {
        let Some(active) = self.active.as_mut() else {
            tracing::debug!("block: queue event before activation");
            return;
        };
        // Only drain when readable: a read on an empty eventfd could block.
        if events & libc::EPOLLIN as u32 != 0
            && let Err(e) = active.queue_evt.read()
        {
            tracing::debug!("block: drain queue eventfd: {e}");
        }
        self.process_queue();
    }

    /// Serves every available request (up to a budget), then interrupts the
    /// driver if it asked to be told.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let disk = &mut self.disk;
        let mem = &active.mem;
        ServedQueue {
            name: "block",
            mem,
            queue: &mut active.queue,
            evt: &active.queue_evt,
            interrupt: &active.interrupt,
            event_idx: active.event_idx,
        }
        .serve(CHAINS_PER_EVENT, |chain| disk.serve(mem, chain));
    }
}

impl Disk {
    /// Serves one chain and returns the used length: the bytes written into
    /// guest memory, status included.
    fn serve(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let request = match self.parse(mem, chain) {
            Ok(request) => request,
            Err((why, status)) => {
                self.counters.malformed_chains += 1;
                tracing::debug!("block: dropped malformed chain: {why}");
                // Where the status byte is usable, fail the request properly
                // so the driver does not read a stale status.
                return match status {
                    Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };

        let (status, written) = match request.kind {
            VIRTIO_BLK_T_IN => self.read(mem, &request),
            VIRTIO_BLK_T_OUT => self.write(mem, &request),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, &request),
            kind => {
                tracing::debug!("block: unsupported request type {kind}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        };
        self.counters.completed += 1;
        if status == VIRTIO_BLK_S_IOERR {
            self.counters.io_errors += 1;
        }
        match mem.write_obj(status, request.status) {
            Ok(()) => written.saturating_add(1),
            // Checked in `parse`; cannot fail unless memory was unmapped.
            Err(e) => {
                tracing::debug!("block: write status: {e}");
                written
            }
        }
    }

    /// Copies the chain's descriptors into the scratch table and checks all
    /// of them before anything is read or written. On error, returns the
    /// status address too when the status descriptor itself is sound.
    fn parse(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<Request, (Malformed, Option<GuestAddress>)> {
        let mut count = 0usize;
        for desc in chain {
            let Some(slot) = self.descriptors.get_mut(count) else {
                return Err((Malformed::TooManyDescriptors, None));
            };
            *slot = desc;
            count += 1;
        }
        let descs: &[Descriptor] = self.descriptors.get(..count).unwrap_or_default();
        let (Some(header), Some(last)) = (descs.first(), descs.last()) else {
            return Err((Malformed::Empty, None));
        };
        // The iterator stops quietly on a loop or an index outside the table;
        // the last descriptor still carrying NEXT gives that away.
        if last.has_next() {
            return Err((Malformed::Truncated, None));
        }
        if count < 2 {
            return Err((Malformed::NoStatus, None));
        }
        if !last.is_write_only() || last.len() == 0 || !mem.check_range(last.addr(), 1) {
            return Err((
                Malformed::BadStatus {
                    addr: last.addr().0,
                    len: last.len(),
                    writable: last.is_write_only(),
                },
                None,
            ));
        }
        let status = last.addr();
        let fail = |why| Err((why, Some(status)));

        if header.is_write_only() {
            return fail(Malformed::HeaderWritable);
        }
        if header.len() < REQUEST_HEADER_LEN {
            return fail(Malformed::HeaderTooShort(header.len()));
        }
        let mut raw = [0u8; REQUEST_HEADER_LEN as usize];
        if mem.read_slice(&mut raw, header.addr()).is_err() {
            return fail(Malformed::HeaderOutside(header.addr().0));
        }
        // struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
        let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = raw;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(sector);

        let status_index = count - 1;
        let data = descs.get(1..status_index).unwrap_or_default();
        // Which way the data flows; other types ignore their data descriptors.
        let device_writes = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => Some(true),
            VIRTIO_BLK_T_OUT => Some(false),
            _ => None,
        };
        let mut data_len = 0u32;
        if let Some(device_writes) = device_writes {
            for (index, desc) in data.iter().enumerate() {
                if desc.is_write_only() != device_writes {
                    return fail(Malformed::DataDirection {
                        index: index + 1,
                        kind,
                    });
                }
                data_len = match data_len.checked_add(desc.len()) {
                    Some(len) if len <= MAX_CHAIN_BYTES => len,
                    _ => return fail(Malformed::DataTooLong),
                };
                if !mem.check_range(desc.addr(), desc.len() as usize) {
                    return fail(Malformed::DataOutside {
                        addr: desc.addr().0,
                        len: desc.len(),
                    });
                }
            }
            if kind != VIRTIO_BLK_T_GET_ID && u64::from(data_len) % SECTOR_SIZE != 0 {
                return fail(Malformed::DataNotSectorMultiple(data_len));
            }
        }

        Ok(Request {
            kind,
            sector,
            status,
            status_index,
            data_len,
        })
    }

    /// The request's data descriptors (checked by `parse`).
    fn data(&self, request: &Request) -> &[Descriptor] {
        self.descriptors
            .get(1..request.status_index)
            .unwrap_or_default()
    }

    /// The byte offset of a request, if all of its sectors are on the disk.
    fn offset(&self, request: &Request) -> Option<u64> {
        let sectors = u64::from(request.data_len) >> SECTOR_SHIFT;
        let end = request.sector.checked_add(sectors)?;
        if end > self.backing.capacity {
            return None;
        }
        request.sector.checked_mul(SECTOR_SIZE)
    }

    /// VIRTIO_BLK_T_IN: file to guest.
    fn read(&mut self, mem: &GuestMemory, request: &Request) -> Outcome {
        let Some(offset) = self.offset(request) else {
            tracing::debug!(
                "block: read of {} bytes at sector {} beyond {} sectors",
                request.data_len,
                request.sector,
                self.backing.capacity
            );
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut file = FileAt::new(&self.backing.file, offset);
        for desc in self.data(request) {
            if let Err(e) = file.read_to_guest(mem, desc.addr(), desc.len() as usize) {
                crate::warn_limited!(
                    "block: read {} at offset {offset}: {e}",
                    self.backing.path.display()
                );
                return (VIRTIO_BLK_S_IOERR, 0);
            }
        }
        self.counters.rx_bytes += u64::from(request.data_len);
        (VIRTIO_BLK_S_OK, request.data_len)
    }

    /// VIRTIO_BLK_T_OUT: guest to file.
    fn write(&mut self, mem: &GuestMemory, request: &Request) -> Outcome {
        // Also covers a drive swapped to read-only after the driver
        // negotiated it read-write: the feature bit cannot change any more.
        if self.backing.read_only {
            tracing::debug!("block: write to read-only drive");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let Some(offset) = self.offset(request) else {
            tracing::debug!(
                "block: write of {} bytes at sector {} beyond {} sectors",
                request.data_len,
                request.sector,
                self.backing.capacity
            );
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut file = FileAt::new(&self.backing.file, offset);
        for desc in self.data(request) {
            if let Err(e) = file.write_from_guest(mem, desc.addr(), desc.len() as usize) {
                crate::warn_limited!(
                    "block: write {} at offset {offset}: {e}",
                    self.backing.path.display()
                );
                return (VIRTIO_BLK_S_IOERR, 0);
            }
        }
        self.counters.tx_bytes += u64::from(request.data_len);
        (VIRTIO_BLK_S_OK, 0)
    }

    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    fn flush(&mut self) -> Outcome {
        if self.backing.read_only {
            return (VIRTIO_BLK_S_OK, 0);
        }
        match self.backing.file.sync_data() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => {
                crate::warn_limited!("block: flush {}: {e}", self.backing.path.display());
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    /// VIRTIO_BLK_T_GET_ID: the serial, as much of it as the buffers hold.
    fn get_id(&self, mem: &GuestMemory, request: &Request) -> Outcome {
        let mut rest: &[u8] = &self.serial;
        let mut written = 0u32;
        for desc in self.data(request) {
            let len = rest.len().min(desc.len() as usize);
            let Some((chunk, tail)) = rest.split_at_checked(len) else {
                break;
            };
            if let Err(e) = mem.write_slice(chunk, desc.addr()) {
                tracing::debug!("block: write serial: {e}");
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            // At most ID_BYTES in total.
            written = written.saturating_add(len as u32);
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        (VIRTIO_BLK_S_OK, written)
    }
}
