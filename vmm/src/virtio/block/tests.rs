//! The block device driven through its request queue in test guest memory,
//! with good chains and hostile ones.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tempfile::NamedTempFile;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::virtio::interrupt::{INT_CONFIG, INT_VRING};
use crate::virtio::mmio::tests::{QueueLayout, drive_to_active, notify_queue};
use crate::virtio::mmio::{MmioRestoreError, MmioTransport, TransportSnapshot, TransportState};
use crate::virtio::{
    ActivateContext, ActivateError, EventRegistrar, GuestMemory, Interrupt, MAX_CHAIN_BYTES,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

const MEM_SIZE: u64 = 4 << 20;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADER: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const DATA: u64 = 0x1_0000;
const DATA2: u64 = 0x2_0000;
/// A byte the device never writes as a status, to tell "untouched" apart.
const UNTOUCHED: u8 = 0xee;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One descriptor as the driver writes it: (address, length, device-writable).
type Desc = (u64, u32, bool);

fn readable(addr: u64, len: u32) -> Desc {
    (addr, len, false)
}

fn writable(addr: u64, len: u32) -> Desc {
    (addr, len, true)
}

fn header() -> Desc {
    readable(HEADER, 16)
}

fn status() -> Desc {
    writable(STATUS, 1)
}

/// A file of `sectors` sectors where each byte encodes its sector and offset.
fn pattern(sectors: u64, seed: u8) -> Vec<u8> {
    (0..sectors * SECTOR_SIZE)
        .map(|i| ((i / SECTOR_SIZE) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

fn temp_file(contents: &[u8]) -> NamedTempFile {
    let file = NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), contents).expect("write temp file");
    file
}

/// The driver's side of the request queue laid out at `DESC_TABLE`,
/// `AVAIL_RING` and `USED_RING`.
#[derive(Debug, Default)]
struct Ring {
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn alloc_desc(&mut self) -> u16 {
        let index = self.next_desc;
        self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
        index
    }

    /// Makes `head` available to the device.
    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .expect("avail idx");
    }

    /// Writes a chain into the descriptor table and publishes it.
    fn push(&mut self, mem: &GuestMemory, descs: &[Desc]) -> u16 {
        let indexes: Vec<u16> = descs.iter().map(|_| self.alloc_desc()).collect();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { F_WRITE } else { 0 };
            let next = match indexes.get(i + 1) {
                Some(&next) => {
                    flags |= F_NEXT;
                    next
                }
                None => 0,
            };
            write_desc(mem, indexes[i], addr, len, flags, next);
        }
        self.publish(mem, indexes[0]);
        indexes[0]
    }
}

fn write_desc(mem: &GuestMemory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let base = GuestAddress(DESC_TABLE + 16 * u64::from(index));
    mem.write_obj(addr, base).expect("desc addr");
    mem.write_obj(len, base.unchecked_add(8)).expect("desc len");
    mem.write_obj(flags, base.unchecked_add(12))
        .expect("desc flags");
    mem.write_obj(next, base.unchecked_add(14))
        .expect("desc next");
}

fn used_idx(mem: &GuestMemory) -> u16 {
    mem.read_obj(GuestAddress(USED_RING + 2)).expect("used idx")
}

/// The used element `n`: (head id, length).
fn used_elem(mem: &GuestMemory, n: u16) -> (u32, u32) {
    let elem = USED_RING + 4 + 8 * u64::from(n % QUEUE_SIZE);
    let id = mem.read_obj(GuestAddress(elem)).expect("used id");
    let len = mem.read_obj(GuestAddress(elem + 4)).expect("used len");
    (id, len)
}

/// The driver side: guest memory, a split queue laid out by hand, and the
/// activated device.
struct Harness {
    mem: GuestMemory,
    block: Block,
    interrupt: Arc<Interrupt>,
    epoll: Arc<Epoll>,
    kick: EventFd,
    file: NamedTempFile,
    ring: Ring,
}

impl Harness {
    fn new(contents: &[u8], read_only: bool) -> Self {
        Self::with_features(contents, read_only, VIRTIO_F_VERSION_1)
    }

    fn with_features(contents: &[u8], read_only: bool, acked_features: u64) -> Self {
        let file = temp_file(contents);
        let mut block = Block::new(BlockConfig {
            path: file.path().to_owned(),
            read_only,
            id: "vda".into(),
        })
        .expect("block device");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");

        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));

        let queue_evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kick = queue_evt.try_clone().expect("clone eventfd");
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                acked_features,
                queues: vec![queue],
                queue_events: vec![queue_evt],
                interrupt: interrupt.clone(),
                events: EventRegistrar::new(epoll.clone(), 0),
            })
            .expect("activate");
        Self {
            mem,
            block,
            interrupt,
            epoll,
            kick,
            file,
            ring: Ring::default(),
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(&self.mem, index, addr, len, flags, next);
    }

    fn alloc_desc(&mut self) -> u16 {
        self.ring.alloc_desc()
    }

    /// Makes `head` available to the device.
    fn publish(&mut self, head: u16) {
        self.ring.publish(&self.mem, head);
    }

    /// Writes a chain into the descriptor table and publishes it.
    fn push(&mut self, descs: &[Desc]) -> u16 {
        self.ring.push(&self.mem, descs)
    }

    fn kick(&mut self) {
        self.kick.write(1).expect("kick");
        self.block
            .handle_event(REQUEST_QUEUE_TOKEN, libc::EPOLLIN as u32);
    }

    fn used_idx(&self) -> u16 {
        used_idx(&self.mem)
    }

    /// The used element `n`: (head id, length).
    fn used(&self, n: u16) -> (u32, u32) {
        used_elem(&self.mem, n)
    }

    fn write_header(&self, kind: u32, sector: u64) {
        self.mem
            .write_obj(kind, GuestAddress(HEADER))
            .expect("header type");
        self.mem
            .write_obj(0u32, GuestAddress(HEADER + 4))
            .expect("header reserved");
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .expect("header sector");
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    /// Sends one chain and returns (status byte, used length).
    fn submit(&mut self, kind: u32, sector: u64, descs: &[Desc]) -> (u8, u32) {
        self.write_header(kind, sector);
        self.mem
            .write_obj(UNTOUCHED, GuestAddress(STATUS))
            .expect("status");
        let before = self.used_idx();
        let head = self.push(descs);
        self.kick();
        assert_eq!(
            self.used_idx(),
            before.wrapping_add(1),
            "chain not returned"
        );
        let (id, len) = self.used(before);
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }

    fn request(&mut self, kind: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
        let mut descs = vec![header()];
        descs.extend_from_slice(data);
        descs.push(status());
        self.submit(kind, sector, &descs)
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest");
        buf
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).expect("read backing")
    }

    fn counters(&self) -> crate::virtio::DeviceCounters {
        self.block.counters()
    }
}

#[test]
fn read_returns_file_bytes() {
    let contents = pattern(8, 0);
    let mut h = Harness::new(&contents, false);
    // Two sectors split over two descriptors in different places.
    let (status, len) = h.request(
        VIRTIO_BLK_T_IN,
        2,
        &[writable(DATA, 512), writable(DATA2, 512)],
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(len, 1024 + 1);
    assert_eq!(h.read_guest(DATA, 512), &contents[1024..1536]);
    assert_eq!(h.read_guest(DATA2, 512), &contents[1536..2048]);
    let c = h.counters();
    assert_eq!((c.completed, c.rx_bytes, c.tx_bytes), (1, 1024, 0));
    assert_eq!(c.malformed_chains, 0);
    assert_ne!(h.interrupt.status() & INT_VRING, 0);
}

#[test]
fn read_of_last_sector_succeeds() {
    // A trailing partial sector is not addressable.
    let mut contents = pattern(4, 3);
    contents.extend_from_slice(&[9u8; 100]);
    let mut h = Harness::new(&contents, false);
    assert_eq!(h.block.capacity_sectors(), 4);
    let (status, len) = h.request(VIRTIO_BLK_T_IN, 3, &[writable(DATA, 512)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(h.read_guest(DATA, 512), &contents[1536..2048]);
}

#[test]
fn write_lands_in_file() {
    let contents = pattern(8, 0);
    let mut h = Harness::new(&contents, false);
    let new: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    h.mem
        .write_slice(&new[..512], GuestAddress(DATA))
        .expect("data");
    h.mem
        .write_slice(&new[512..], GuestAddress(DATA2))
        .expect("data");
    let (status, len) = h.request(
        VIRTIO_BLK_T_OUT,
        5,
        &[readable(DATA, 512), readable(DATA2, 512)],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    let mut expected = contents.clone();
    expected[5 * 512..7 * 512].copy_from_slice(&new);
    assert_eq!(h.file_bytes(), expected);
    let c = h.counters();
    assert_eq!((c.completed, c.rx_bytes, c.tx_bytes), (1, 0, 1024));
}

#[test]
fn flush_succeeds() {
    let mut h = Harness::new(&pattern(2, 0), false);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(h.counters().completed, 1);
}

#[test]
fn get_id_returns_serial() {
    let mut h = Harness::new(&pattern(2, 0), false);
    h.mem
        .write_slice(&[0xaa; 32], GuestAddress(DATA))
        .expect("fill");
    let (status, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, ID_BYTES as u32)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, ID_BYTES as u32 + 1));
    let mut expected = [0u8; ID_BYTES];
    expected[..3].copy_from_slice(b"vda");
    assert_eq!(h.read_guest(DATA, 32)[..ID_BYTES], expected);
    // Nothing past the 20 bytes is touched.
    assert_eq!(h.read_guest(DATA + ID_BYTES as u64, 12), [0xaa; 12]);
}

#[test]
fn get_id_truncates_long_ids() {
    let file = temp_file(&pattern(1, 0));
    let id = "a-drive-id-much-longer-than-twenty-bytes";
    let block = Block::new(BlockConfig {
        path: file.path().to_owned(),
        read_only: false,
        id: id.into(),
    })
    .expect("block");
    assert_eq!(block.id(), id);
    assert_eq!(block.name(), format!("block {id}"));
    assert_eq!(block.disk.serial, id.as_bytes()[..ID_BYTES]);
}

#[test]
fn get_id_into_short_buffer_writes_what_fits() {
    let mut h = Harness::new(&pattern(1, 0), false);
    let (status, len) = h.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[writable(DATA, 2), writable(DATA2, 1)],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 4));
    assert_eq!(h.read_guest(DATA, 2), b"vd");
    assert_eq!(h.read_guest(DATA2, 1), b"a");
}

#[test]
fn unsupported_request_type() {
    let mut h = Harness::new(&pattern(1, 0), false);
    // VIRTIO_BLK_T_DISCARD, with a data descriptor the device must ignore.
    let (status, len) = h.request(11, 0, &[readable(DATA, 16)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_UNSUPP, 1));
    assert_eq!(h.counters().completed, 1);
    assert_eq!(h.counters().malformed_chains, 0);
}

#[test]
fn read_only_drive_rejects_writes() {
    let contents = pattern(4, 7);
    let mut h = Harness::new(&contents, true);
    assert!(h.block.read_only());
    assert_ne!(h.block.device_features() & VIRTIO_BLK_F_RO, 0);
    h.mem
        .write_slice(&[0x55; 512], GuestAddress(DATA))
        .expect("data");
    let (status, len) = h.request(VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(h.file_bytes(), contents);
    // Reads and flushes still work.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, &[writable(DATA2, 512)]),
        (VIRTIO_BLK_S_OK, 513)
    );
    assert_eq!(h.read_guest(DATA2, 512), &contents[512..1024]);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    let c = h.counters();
    assert_eq!((c.completed, c.io_errors, c.tx_bytes), (3, 1, 0));
}

#[test]
fn read_only_backing_file_is_opened_read_only() {
    let file = temp_file(&pattern(1, 0));
    let block = Block::new(BlockConfig {
        path: file.path().to_owned(),
        read_only: true,
        id: "ro".into(),
    })
    .expect("block");
    let fd = {
        use std::os::fd::AsRawFd;
        block.disk.backing.file.as_raw_fd()
    };
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    let flags = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .and_then(|octal| i32::from_str_radix(octal.trim(), 8).ok())
        .expect("flags in fdinfo");
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
}

#[test]
fn out_of_range_sector_is_ioerr() {
    let contents = pattern(4, 1);
    let mut h = Harness::new(&contents, false);
    // Starts inside, ends past the end.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 3, &[writable(DATA, 1024)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Starts past the end.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 4, &[writable(DATA, 512)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // sector + count overflows u64.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, u64::MAX, &[writable(DATA, 512)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // sector * 512 overflows u64.
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, u64::MAX / 256, &[readable(DATA, 512)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 3, &[readable(DATA, 1024)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(h.file_bytes(), contents);
    let c = h.counters();
    assert_eq!((c.completed, c.io_errors, c.malformed_chains), (5, 5, 0));
    assert_eq!((c.rx_bytes, c.tx_bytes), (0, 0));
}

/// Sends `descs` (header contents set to `kind`/`sector`), checks the chain
/// comes back with `expected_len`, counted as malformed, then checks a good
/// read is still served.
fn assert_dropped(h: &mut Harness, kind: u32, descs: &[Desc], expected_len: u32) {
    let before = h.counters();
    let file = h.file_bytes();
    let (status, len) = h.submit(kind, 0, descs);
    assert_eq!(len, expected_len, "used length for {descs:?}");
    if expected_len == 1 {
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }
    let after = h.counters();
    assert_eq!(
        after.malformed_chains,
        before.malformed_chains + 1,
        "{descs:?}"
    );
    assert_eq!(after.completed, before.completed);
    assert_eq!(
        (after.rx_bytes, after.tx_bytes),
        (before.rx_bytes, before.tx_bytes)
    );
    assert_eq!(h.file_bytes(), file, "file touched by {descs:?}");

    h.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA2))
        .expect("clear");
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, &[writable(DATA2, 512)]),
        (VIRTIO_BLK_S_OK, 513)
    );
    assert_eq!(h.read_guest(DATA2, 512), &file[512..1024]);
}

#[test]
fn descriptor_outside_guest_memory_is_dropped() {
    let mut h = Harness::new(&pattern(4, 2), false);
    let t_in = VIRTIO_BLK_T_IN;
    let t_out = VIRTIO_BLK_T_OUT;
    // Data straddling the end of memory, entirely past it, wrapping u64.
    for data in [
        (MEM_SIZE - 256, 512, true),
        (MEM_SIZE + 0x1000, 512, true),
        (u64::MAX - 255, 512, true),
    ] {
        assert_dropped(&mut h, t_in, &[header(), data, status()], 1);
        let out = (data.0, data.1, false);
        assert_dropped(&mut h, t_out, &[header(), out, status()], 1);
    }
    // Header outside memory: status still usable.
    assert_dropped(
        &mut h,
        t_in,
        &[readable(MEM_SIZE - 8, 16), writable(DATA, 512), status()],
        1,
    );
    // Status outside memory: nothing can be reported.
    assert_dropped(
        &mut h,
        t_in,
        &[header(), writable(DATA, 512), writable(MEM_SIZE, 1)],
        0,
    );
}

#[test]
fn wrong_direction_is_dropped() {
    let mut h = Harness::new(&pattern(4, 2), false);
    // IN with a device-readable data buffer.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_IN,
        &[header(), readable(DATA, 512), status()],
        1,
    );
    // OUT with a device-writable data buffer.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_OUT,
        &[header(), writable(DATA, 512), status()],
        1,
    );
    // GET_ID into a read-only buffer.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_GET_ID,
        &[header(), readable(DATA, 20), status()],
        1,
    );
    // Device-writable header.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_IN,
        &[writable(HEADER, 16), writable(DATA, 512), status()],
        1,
    );
    // Device-readable status.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_IN,
        &[header(), writable(DATA, 512), readable(STATUS, 1)],
        0,
    );
}

#[test]
fn missing_or_short_header_and_status_are_dropped() {
    let mut h = Harness::new(&pattern(4, 2), false);
    // Header alone: no status.
    assert_dropped(&mut h, VIRTIO_BLK_T_FLUSH, &[header()], 0);
    // OUT without status: the last descriptor is the readable data.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_OUT,
        &[header(), readable(DATA, 512)],
        0,
    );
    // Zero-length status.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_FLUSH,
        &[header(), writable(STATUS, 0)],
        0,
    );
    // Header too short, and empty.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_IN,
        &[readable(HEADER, 8), writable(DATA, 512), status()],
        1,
    );
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_FLUSH,
        &[readable(HEADER, 0), status()],
        1,
    );
}

#[test]
fn data_not_a_multiple_of_512_is_dropped() {
    let mut h = Harness::new(&pattern(4, 2), false);
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_IN,
        &[header(), writable(DATA, 100), status()],
        1,
    );
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_OUT,
        &[header(), readable(DATA, 512), readable(DATA2, 1), status()],
        1,
    );
}

#[test]
fn chain_over_the_cap_is_dropped() {
    // Large enough that a capped request would be in range.
    let mut h = Harness::new(&pattern(4096, 2), false);
    let half = MAX_CHAIN_BYTES / 2;
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_IN,
        &[
            header(),
            writable(0x10_0000, half),
            writable(0x10_0000 + u64::from(half), half),
            writable(0x10_0000 + 2 * u64::from(half), 512),
            status(),
        ],
        1,
    );
    // One huge descriptor, far beyond guest memory.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_OUT,
        &[header(), readable(DATA, u32::MAX - 511), status()],
        1,
    );
    // Lengths that overflow u32 when summed: the chain walk stops there, so
    // no status descriptor is ever seen.
    assert_dropped(
        &mut h,
        VIRTIO_BLK_T_OUT,
        &[
            header(),
            readable(DATA, u32::MAX - 511),
            readable(DATA2, 1024),
            status(),
        ],
        0,
    );
    // Exactly the cap is served.
    let (status, len) = h.request(
        VIRTIO_BLK_T_IN,
        0,
        &[
            writable(0x10_0000, half),
            writable(0x10_0000 + u64::from(half), half),
        ],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, MAX_CHAIN_BYTES + 1));
}

#[test]
fn descriptor_loops_and_bad_indexes_are_dropped() {
    let mut h = Harness::new(&pattern(4, 2), false);
    h.write_header(VIRTIO_BLK_T_IN, 0);

    // A descriptor whose NEXT points at itself.
    let head = h.alloc_desc();
    h.write_desc(head, HEADER, 16, F_NEXT, head);
    h.publish(head);
    // A NEXT index outside the table.
    let head2 = h.alloc_desc();
    h.write_desc(head2, HEADER, 16, F_NEXT, 300);
    h.publish(head2);
    // A head index outside the table.
    h.publish(QUEUE_SIZE + 7);
    h.kick();
    assert_eq!(h.used_idx(), 2, "out-of-table head cannot be returned");
    assert_eq!(h.used(0), (u32::from(head), 0));
    assert_eq!(h.used(1), (u32::from(head2), 0));
    let c = h.counters();
    assert_eq!((c.malformed_chains, c.completed), (3, 0));

    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, &[writable(DATA, 512)]),
        (VIRTIO_BLK_S_OK, 513)
    );
}

#[test]
fn too_many_descriptors_are_dropped() {
    // An indirect table (the library follows it even though we never offer
    // the feature) can be far longer than the queue.
    let mut h = Harness::new(&pattern(4, 2), false);
    const TABLE: u64 = 0x20_0000;
    const ENTRIES: u16 = 1024;
    for i in 0..ENTRIES {
        let base = GuestAddress(TABLE + 16 * u64::from(i));
        let last = i == ENTRIES - 1;
        let (addr, len, flags): (u64, u32, u16) = match i {
            0 => (HEADER, 16, F_NEXT),
            _ if last => (STATUS, 1, F_WRITE),
            _ => (DATA, 0, F_NEXT | F_WRITE),
        };
        h.mem.write_obj(addr, base).expect("addr");
        h.mem.write_obj(len, base.unchecked_add(8)).expect("len");
        h.mem
            .write_obj(flags, base.unchecked_add(12))
            .expect("flags");
        h.mem
            .write_obj(i + 1, base.unchecked_add(14))
            .expect("next");
    }
    h.write_header(VIRTIO_BLK_T_IN, 0);
    let head = h.alloc_desc();
    const F_INDIRECT: u16 = 4;
    h.write_desc(head, TABLE, 16 * u32::from(ENTRIES), F_INDIRECT, 0);
    h.publish(head);
    h.kick();
    assert_eq!(h.used(0), (u32::from(head), 0));
    assert_eq!(h.counters().malformed_chains, 1);
}

#[test]
fn broken_avail_index_does_not_hang() {
    let mut h = Harness::new(&pattern(4, 2), false);
    // The driver claims far more chains than the queue holds.
    h.mem
        .write_obj(QUEUE_SIZE + 100, GuestAddress(AVAIL_RING + 2))
        .expect("avail idx");
    h.kick();
    assert_eq!(h.used_idx(), 0);
    assert_eq!(h.counters().completed, 0);
}

#[test]
fn swap_backing_changes_capacity_and_data() {
    let mut h = Harness::new(&pattern(4, 0), false);
    let new_contents = pattern(16, 0x5a);
    let new_file = temp_file(&new_contents);
    h.interrupt.ack(u32::MAX);

    h.block
        .swap_backing(new_file.path(), None, true)
        .expect("swap backing");
    assert_eq!(h.block.capacity_sectors(), 16);
    assert_eq!(h.block.path(), new_file.path());
    assert!(h.block.read_only());
    assert_ne!(h.interrupt.status() & INT_CONFIG, 0, "no config interrupt");
    let mut capacity = [0u8; 8];
    h.block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 16);

    // Past the old end, from the new file.
    let (status, len) = h.request(VIRTIO_BLK_T_IN, 10, &[writable(DATA, 1024)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(h.read_guest(DATA, 1024), &new_contents[10 * 512..12 * 512]);

    // The guest negotiated read-write, the new backing is read-only.
    let (status, _) = h.request(VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::read(new_file.path()).expect("read"), new_contents);
}

#[test]
fn swap_backing_before_activation_raises_no_interrupt() {
    let old = temp_file(&pattern(2, 0));
    let new = temp_file(&pattern(3, 0));
    let mut block = Block::new(BlockConfig {
        path: old.path().to_owned(),
        read_only: true,
        id: "stub".into(),
    })
    .expect("block");
    block.swap_backing(new.path(), None, false).expect("swap");
    assert_eq!(block.capacity_sectors(), 3);
    assert!(!block.read_only());
    assert_eq!(block.device_features() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn failed_swap_keeps_old_backing() {
    let contents = pattern(4, 9);
    let mut h = Harness::new(&contents, false);
    let old_path = h.block.path().to_owned();
    h.interrupt.ack(u32::MAX);

    let missing = Path::new("/nonexistent/podvisor-block-test.img");
    let err = h
        .block
        .swap_backing(missing, None, false)
        .expect_err("swap to a missing file");
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains(&missing.display().to_string()));

    let empty = temp_file(&[]);
    let err = h
        .block
        .swap_backing(empty.path(), None, false)
        .expect_err("swap to an empty file");
    assert!(matches!(err, BlockError::Empty { len: 0, .. }));

    // A descriptor passed in: read-only while the swap asks for writes is refused.
    let other = temp_file(&pattern(8, 1));
    let ro = std::fs::File::open(other.path()).unwrap();
    let err = h
        .block
        .swap_backing(other.path(), Some(ro), false)
        .expect_err("a read-only descriptor for a writable drive");
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
    assert_eq!(h.block.path(), old_path);
    assert_eq!(h.block.capacity_sectors(), 4);
    assert!(!h.block.read_only());
    assert_eq!(h.interrupt.status() & INT_CONFIG, 0);
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 3, &[writable(DATA, 512)]),
        (VIRTIO_BLK_S_OK, 513)
    );
    assert_eq!(h.read_guest(DATA, 512), &contents[1536..]);
}

#[test]
fn new_rejects_missing_empty_and_directory() {
    let cfg = |path: &Path| BlockConfig {
        path: path.to_owned(),
        read_only: false,
        id: "x".into(),
    };
    let missing = Path::new("/nonexistent/disk.img");
    let err = Block::new(cfg(missing)).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");

    let empty = temp_file(&[]);
    let err = Block::new(cfg(empty.path())).expect_err("empty");
    assert!(
        err.to_string()
            .contains(&empty.path().display().to_string()),
        "{err}"
    );
    let tiny = temp_file(&[1u8; 100]);
    assert!(matches!(
        Block::new(cfg(tiny.path())),
        Err(BlockError::Empty { len: 100, .. })
    ));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut ro = cfg(dir.path());
    ro.read_only = true;
    assert!(matches!(Block::new(ro), Err(BlockError::Directory { .. })));
}

#[test]
fn features_and_queues() {
    let file = temp_file(&pattern(1, 0));
    let block = Block::new(BlockConfig {
        path: file.path().to_owned(),
        read_only: false,
        id: "vda".into(),
    })
    .expect("block");
    assert_eq!(block.device_type(), TYPE_BLOCK);
    assert_eq!(block.queue_max_sizes(), &[256]);
    let f = block.device_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} missing");
    }
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        u64::from(SEG_MAX) * u64::from(SIZE_MAX),
        u64::from(MAX_CHAIN_BYTES)
    );
    assert!(SEG_MAX + 2 <= u32::from(QUEUE_SIZE));
}

#[test]
fn config_space_reads() {
    let file = temp_file(&pattern(0x1234, 0));
    let block = Block::new(BlockConfig {
        path: file.path().to_owned(),
        read_only: false,
        id: "vda".into(),
    })
    .expect("block");
    let read = |offset: u64, len: usize| {
        let mut buf = vec![0xffu8; len];
        block.read_config(offset, &mut buf);
        buf
    };
    assert_eq!(read(0, 8), 0x1234u64.to_le_bytes());
    // Split 32-bit reads, as drivers do.
    assert_eq!(read(0, 4), 0x1234u32.to_le_bytes());
    assert_eq!(read(4, 4), [0; 4]);
    assert_eq!(read(8, 4), SIZE_MAX.to_le_bytes());
    assert_eq!(read(12, 4), SEG_MAX.to_le_bytes());
    assert_eq!(read(1, 1), [0x12]);
    // Unset fields, past the end, straddling the end, absurd offsets.
    assert_eq!(read(20, 4), [0; 4]);
    let len = std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_config>() as u64;
    assert_eq!(read(len - 2, 8), [0; 8]);
    assert_eq!(read(len, 4), [0; 4]);
    assert_eq!(read(0x1000, 4), [0; 4]);
    assert_eq!(read(u64::MAX, 8), [0; 8]);
    assert_eq!(read(u64::MAX - 3, 0), Vec::<u8>::new());
    // A read bigger than the whole space.
    let all = read(0, 4096);
    assert_eq!(all[..8], 0x1234u64.to_le_bytes());
    assert!(all[len as usize..].iter().all(|&b| b == 0));
}

#[test]
fn config_writes_are_ignored() {
    let mut h = Harness::new(&pattern(4, 0), false);
    h.block.write_config(0, &[0xff; 8]);
    h.block.write_config(u64::MAX, &[0xff; 8]);
    let mut capacity = [0u8; 8];
    h.block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 4);
}

#[test]
fn several_chains_in_one_kick() {
    let contents = pattern(8, 4);
    let mut h = Harness::new(&contents, false);
    h.write_header(VIRTIO_BLK_T_IN, 0);
    // Same header (sector 0) for all; each reads into its own buffer.
    let heads: Vec<u16> = (0..4u64)
        .map(|i| {
            h.push(&[
                header(),
                writable(DATA + i * 0x1000, 512),
                writable(STATUS + 16 * i, 1),
            ])
        })
        .collect();
    h.kick();
    assert_eq!(h.used_idx(), 4);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(h.used(i as u16), (u32::from(*head), 513));
        assert_eq!(
            h.read_guest(DATA + i as u64 * 0x1000, 512),
            &contents[..512]
        );
    }
    assert_eq!(h.counters().completed, 4);
}

#[test]
fn queue_wraps_around() {
    let contents = pattern(4, 8);
    let mut h = Harness::new(&contents, false);
    for i in 0..(3 * u32::from(QUEUE_SIZE) / 2) {
        let sector = u64::from(i % 4);
        let (status, len) = h.request(VIRTIO_BLK_T_IN, sector, &[writable(DATA, 512)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 513));
        let start = sector as usize * 512;
        assert_eq!(h.read_guest(DATA, 512), &contents[start..start + 512]);
    }
}

#[test]
fn event_idx_suppresses_and_requests_interrupts() {
    let mut h = Harness::with_features(
        &pattern(4, 0),
        false,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
    );
    let used_event = GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE));
    let avail_event = GuestAddress(USED_RING + 4 + 8 * u64::from(QUEUE_SIZE));

    // The driver wants an interrupt only after used index 5.
    h.mem.write_obj(5u16, used_event).expect("used_event");
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(
        h.interrupt.status() & INT_VRING,
        0,
        "interrupt not suppressed"
    );
    // The device asks to be kicked for the next chain.
    assert_eq!(h.mem.read_obj::<u16>(avail_event).expect("avail_event"), 1);

    // Now it wants one as soon as the used index moves past 1.
    h.mem.write_obj(1u16, used_event).expect("used_event");
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_ne!(h.interrupt.status() & INT_VRING, 0, "interrupt missing");
    assert_eq!(h.mem.read_obj::<u16>(avail_event).expect("avail_event"), 2);
}

#[test]
fn without_event_idx_every_completion_interrupts() {
    let mut h = Harness::new(&pattern(4, 0), false);
    for _ in 0..3 {
        h.interrupt.ack(u32::MAX);
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_ne!(h.interrupt.status() & INT_VRING, 0);
    }
}

#[test]
fn reset_unregisters_and_drops_queue() {
    let mut h = Harness::new(&pattern(4, 0), false);
    let mut events = [EpollEvent::default(); 4];
    h.kick.write(1).expect("kick");
    assert_eq!(h.epoll.wait(0, &mut events).expect("wait"), 1);
    assert_eq!(events[0].data(), u64::from(REQUEST_QUEUE_TOKEN));
    let _ = h.kick.read();

    h.block.reset();
    h.kick.write(1).expect("kick");
    assert_eq!(h.epoll.wait(0, &mut events).expect("wait"), 0);

    // A chain published after reset is not served.
    h.write_header(VIRTIO_BLK_T_FLUSH, 0);
    h.push(&[header(), status()]);
    h.block
        .handle_event(REQUEST_QUEUE_TOKEN, libc::EPOLLIN as u32);
    assert_eq!(h.used_idx(), 0);
    // Reset twice is harmless; swapping while inactive raises nothing.
    h.block.reset();
    h.interrupt.ack(u32::MAX);
    let other = temp_file(&pattern(2, 0));
    h.block
        .swap_backing(other.path(), None, false)
        .expect("swap");
    assert_eq!(h.interrupt.status(), 0);
}

#[test]
fn activate_rejects_wrong_queue_count() {
    let file = temp_file(&pattern(1, 0));
    let mut block = Block::new(BlockConfig {
        path: file.path().to_owned(),
        read_only: false,
        id: "vda".into(),
    })
    .expect("block");
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
    let ctx = |queues: usize| ActivateContext {
        mem: mem.clone(),
        acked_features: VIRTIO_F_VERSION_1,
        queues: (0..queues)
            .map(|_| Queue::new(QUEUE_SIZE).expect("queue"))
            .collect(),
        queue_events: (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq"))),
        events: EventRegistrar::new(Arc::new(Epoll::new().expect("epoll")), 0),
    };
    assert!(matches!(
        block.activate(ctx(2)),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 2
        })
    ));
    assert!(matches!(
        block.activate(ctx(0)),
        Err(ActivateError::QueueCount { .. })
    ));
    // Events before activation are ignored.
    block.handle_event(REQUEST_QUEUE_TOKEN, libc::EPOLLIN as u32);
    block.handle_event(99, libc::EPOLLIN as u32);
    assert_eq!(block.counters(), Default::default());
}

// ------------------------------------------------------- snapshot/restore

/// A block device behind a real MMIO transport and event loop registration,
/// as the VMM builds it.
struct Window {
    block: Arc<Mutex<Block>>,
    transport: MmioTransport,
    interrupt: Arc<Interrupt>,
    epoll: Arc<Epoll>,
}

impl Window {
    fn new(mem: GuestMemory, path: &Path, read_only: bool) -> Self {
        let block = Arc::new(Mutex::new(
            Block::new(BlockConfig {
                path: path.to_owned(),
                read_only,
                id: "vda".into(),
            })
            .expect("block device"),
        ));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        let transport = MmioTransport::new(
            block.clone(),
            mem.clone(),
            interrupt.clone(),
            EventRegistrar::new(epoll.clone(), 0),
        )
        .expect("transport");
        Self {
            block,
            transport,
            interrupt,
            epoll,
        }
    }

    /// The driver brings the device up on the queue at `DESC_TABLE`.
    fn bring_up(&mut self, features: u64) {
        let layout = QueueLayout {
            size: QUEUE_SIZE,
            desc: DESC_TABLE,
            avail: AVAIL_RING,
            used: USED_RING,
        };
        drive_to_active(&mut self.transport, features, &[layout]);
        assert_eq!(self.transport.state(), TransportState::Active);
    }

    /// Dispatches what the event loop has ready; returns how many events.
    fn run_events(&self) -> usize {
        let mut events = [EpollEvent::default(); 8];
        let n = self.epoll.wait(0, &mut events).expect("epoll wait");
        for ev in &events[..n] {
            let (_, token) = EventRegistrar::decode(ev.data());
            self.block
                .lock()
                .expect("block")
                .handle_event(token, ev.events());
        }
        n
    }
}

/// Publishes a request whose header and status live in their own `slot`,
/// so that several can be in flight. Returns (head, status address).
fn queue_request(
    mem: &GuestMemory,
    ring: &mut Ring,
    slot: u64,
    kind: u32,
    sector: u64,
    data: &[Desc],
) -> (u16, u64) {
    let header = HEADER + 0x100 * slot;
    let status = STATUS + slot;
    mem.write_obj(kind, GuestAddress(header)).expect("type");
    mem.write_obj(0u32, GuestAddress(header + 4))
        .expect("reserved");
    mem.write_obj(sector, GuestAddress(header + 8))
        .expect("sector");
    mem.write_obj(UNTOUCHED, GuestAddress(status))
        .expect("status");
    let mut descs = vec![readable(header, 16)];
    descs.extend_from_slice(data);
    descs.push(writable(status, 1));
    (ring.push(mem, &descs), status)
}

/// Guest memory as a new process gets it back from the memory file.
fn copy_memory(mem: &GuestMemory) -> GuestMemory {
    let mut image = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut image, GuestAddress(0))
        .expect("read guest memory");
    let copy =
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
    copy.write_slice(&image, GuestAddress(0))
        .expect("write guest memory");
    copy
}

#[test]
fn restore_serves_requests_queued_before_the_snapshot() {
    let file = temp_file(&pattern(16, 7));
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
    let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    let mut old = Window::new(mem.clone(), file.path(), false);
    old.bring_up(features);
    let mut ring = Ring::default();

    // Two writes served before the snapshot.
    let written = vec![0x5au8; 2 * SECTOR_SIZE as usize];
    mem.write_slice(&written, GuestAddress(DATA)).expect("data");
    let mut statuses = Vec::new();
    for (slot, sector) in [(0, 2), (1, 4)] {
        let (_, status) = queue_request(
            &mem,
            &mut ring,
            slot,
            VIRTIO_BLK_T_OUT,
            sector,
            &[readable(DATA, 2 * SECTOR_SIZE as u32)],
        );
        statuses.push(status);
    }
    notify_queue(&mut old.transport, 0);
    assert_eq!(old.run_events(), 1);
    assert_eq!(used_idx(&mem), 2);
    // The driver consumed both, acknowledged the interrupt and asked for
    // the next one after used index 2.
    old.interrupt.ack(u32::MAX);
    mem.write_obj(
        2u16,
        GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE)),
    )
    .expect("used_event");

    // Two more queued, the kick lost with the old process: a read of what
    // was written and a write of sector 9.
    let (read_head, read_status) = queue_request(
        &mem,
        &mut ring,
        2,
        VIRTIO_BLK_T_IN,
        2,
        &[writable(DATA2, 2 * SECTOR_SIZE as u32)],
    );
    let (write_head, write_status) = queue_request(
        &mem,
        &mut ring,
        3,
        VIRTIO_BLK_T_OUT,
        9,
        &[readable(DATA, SECTOR_SIZE as u32)],
    );
    let snap = old.transport.snapshot();
    let json = serde_json::to_vec(&snap).expect("serialize");
    let snap: TransportSnapshot = serde_json::from_slice(&json).expect("deserialize");
    assert_eq!(snap.state, TransportState::Active);
    assert_eq!(snap.interrupt_status, 0);
    assert_eq!(
        (snap.queues[0].next_avail, snap.queues[0].next_used),
        (2, 2)
    );
    assert!(snap.queues[0].event_idx_enabled);

    // A new process: new device on the same file, memory from the file.
    let mem = copy_memory(&mem);
    drop(old);
    let mut new = Window::new(mem.clone(), file.path(), false);
    new.transport.restore(&snap).expect("restore");
    assert_eq!(new.transport.state(), TransportState::Active);
    assert_eq!(
        used_idx(&mem),
        2,
        "nothing served before the event loop runs"
    );
    assert_eq!(new.interrupt.status(), INT_CONFIG, "re-read the capacity");
    assert_eq!(new.run_events(), 1, "restore kicked the queue");

    assert_eq!(used_idx(&mem), 4, "the used index continues from 2");
    assert_eq!(
        used_elem(&mem, 2),
        (u32::from(read_head), 2 * SECTOR_SIZE as u32 + 1)
    );
    assert_eq!(used_elem(&mem, 3), (u32::from(write_head), 1));
    for status in statuses.iter().chain([&read_status, &write_status]) {
        let byte: u8 = mem.read_obj(GuestAddress(*status)).expect("status");
        assert_eq!(byte, VIRTIO_BLK_S_OK);
    }
    let mut read = vec![0u8; written.len()];
    mem.read_slice(&mut read, GuestAddress(DATA2))
        .expect("read data");
    assert_eq!(read, written);
    let on_disk = std::fs::read(file.path()).expect("read backing");
    let sector9 = 9 * SECTOR_SIZE as usize;
    assert!(on_disk[sector9..sector9 + SECTOR_SIZE as usize] == written[..SECTOR_SIZE as usize]);
    assert_eq!(
        new.interrupt.status(),
        INT_CONFIG | INT_VRING,
        "used_event 2 was crossed"
    );
    assert_eq!(new.interrupt.irq_fd().read().expect("irq"), 2);

    // The driver carries on through the new window.
    queue_request(&mem, &mut ring, 4, VIRTIO_BLK_T_FLUSH, 0, &[]);
    notify_queue(&mut new.transport, 0);
    assert_eq!(new.run_events(), 1);
    assert_eq!(used_idx(&mem), 5);
    assert_eq!(new.block.lock().expect("block").counters().completed, 3);
}

#[test]
fn restore_refuses_features_the_new_drive_does_not_offer() {
    let file = temp_file(&pattern(4, 0));
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
    let mut old = Window::new(mem.clone(), file.path(), true);
    old.bring_up(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO);
    let snap = old.transport.snapshot();
    drop(old);

    // The drive came back read-write: the driver's RO is not offered.
    let mut new = Window::new(mem.clone(), file.path(), false);
    match new.transport.restore(&snap) {
        Err(MmioRestoreError::Features { acked, offered }) => {
            assert_eq!(acked, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO);
            assert_eq!(offered & VIRTIO_BLK_F_RO, 0);
        }
        other => panic!("expected a features error, got {other:?}"),
    }
    assert_eq!(new.transport.state(), TransportState::Reset);
    assert_eq!(new.run_events(), 0, "the device was not activated");

    // Read-only again, on a bigger file, it restores and the driver is
    // told to re-read the capacity.
    let bigger = temp_file(&pattern(12, 0));
    let mut new = Window::new(mem, bigger.path(), true);
    new.transport.restore(&snap).expect("restore");
    assert_eq!(
        new.block.lock().expect("block").queue_snapshots(),
        snap.queues
    );
    assert_eq!(new.interrupt.status(), INT_CONFIG);
    let mut capacity = [0u8; 8];
    new.transport.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 12);
}

#[test]
fn queue_snapshots_follow_activation() {
    let mut h = Harness::new(&pattern(8, 0), false);
    let before = h.block.queue_snapshots();
    assert_eq!(before.len(), 1);
    assert_eq!((before[0].next_avail, before[0].next_used), (0, 0));
    assert_eq!(before[0].desc_table, DESC_TABLE);
    assert_eq!(before[0].used_ring, USED_RING);
    h.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let after = h.block.queue_snapshots();
    assert_eq!((after[0].next_avail, after[0].next_used), (1, 1));
    h.block.reset();
    assert!(h.block.queue_snapshots().is_empty());
}

#[test]
fn swap_backing_takes_a_passed_descriptor() {
    let mut h = Harness::new(&pattern(4, 0), false);
    let new_file = temp_file(&pattern(16, 0x33));
    let fd = std::fs::File::open(new_file.path()).unwrap();
    // The name is only for logs: the descriptor is what is read.
    let name = Path::new("/jail/has/no/such/file");
    h.block
        .swap_backing(name, Some(fd), true)
        .expect("swap to a passed descriptor");
    assert_eq!(h.block.capacity_sectors(), 16);
    assert_eq!(h.block.path(), name);
    assert!(h.block.read_only());
}
