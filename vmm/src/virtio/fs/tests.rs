//! The virtio-fs device driven through its queues in test guest memory: FUSE requests
//! answered from a temporary directory, a device without a share, and hostile chains.

use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    Attr, EntryOut, InHeader, InitIn, InitOut, OpenIn, OpenOut, OutHeader, ReadIn, WriteIn,
    WriteOut,
};
use fuse_backend_rs::api::filesystem::FsOptions;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::virtio::{
    ActivateContext, EventRegistrar, GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
};

const MEM_SIZE: u64 = 8 << 20;
/// Ring areas of the high-priority queue (0) and the request queue (1).
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x4000, 0x6000, 0x7000)];
const REQUEST: u64 = 0x1_0000;
const REPLY: u64 = 0x2_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_READLINK: u32 = 5;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_INIT: u32 = 26;
const ROOT: u64 = 1;

struct Harness {
    mem: GuestMemory,
    fs: Fs,
    kicks: Vec<EventFd>,
    next_desc: [u16; 2],
    avail: [u16; 2],
    unique: u64,
    _epoll: Arc<Epoll>,
}

impl Harness {
    fn new(backend: Backend) -> Self {
        let mut fs = Fs::new("podvisor", backend);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let mut queues = Vec::new();
        let mut events = Vec::new();
        let mut kicks = Vec::new();
        for (i, &(desc, avail, used)) in RINGS.iter().enumerate() {
            let size = QUEUE_SIZES[i];
            let mut q = Queue::new(size).expect("queue");
            q.set_size(size);
            q.set_desc_table_address(Some(desc as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            assert!(q.is_valid(&mem));
            queues.push(q);
            let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            kicks.push(evt.try_clone().expect("clone"));
            events.push(evt);
        }
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        fs.activate(ActivateContext {
            mem: mem.clone(),
            acked_features: VIRTIO_F_VERSION_1,
            queues,
            queue_events: events,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq"))),
            events: EventRegistrar::new(epoll.clone(), 0),
        })
        .expect("activate");
        Self {
            mem,
            fs,
            kicks,
            next_desc: [0; 2],
            avail: [0; 2],
            unique: 0,
            _epoll: epoll,
        }
    }

    fn passthrough(dir: &std::path::Path) -> Self {
        Self::new(Backend::passthrough(dir).expect("passthrough"))
    }

    /// Publishes a chain of (address, length, writable) on queue `q`, kicks the device and
    /// returns the used length (None: the chain was not returned).
    fn send(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> Option<u32> {
        let (desc_table, avail_ring, used_ring) = RINGS[q];
        let size = QUEUE_SIZES[q];
        let indexes: Vec<u16> = descs
            .iter()
            .map(|_| {
                let i = self.next_desc[q];
                self.next_desc[q] = (i + 1) % size;
                i
            })
            .collect();
        for (n, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { F_WRITE } else { 0 };
            let next = indexes.get(n + 1).copied().unwrap_or(0);
            if n + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let base = GuestAddress(desc_table + 16 * u64::from(indexes[n]));
            self.mem.write_obj(addr, base).expect("addr");
            self.mem.write_obj(len, base.unchecked_add(8)).expect("len");
            self.mem
                .write_obj(flags, base.unchecked_add(12))
                .expect("flags");
            self.mem
                .write_obj(next, base.unchecked_add(14))
                .expect("next");
        }
        let slot = u64::from(self.avail[q] % size);
        self.mem
            .write_obj(indexes[0], GuestAddress(avail_ring + 4 + 2 * slot))
            .expect("avail");
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(avail_ring + 2))
            .expect("avail idx");
        let before: u16 = self
            .mem
            .read_obj(GuestAddress(used_ring + 2))
            .expect("used");
        self.kicks[q].write(1).expect("kick");
        let token = if q == 0 {
            HIPRIO_QUEUE_TOKEN
        } else {
            REQUEST_QUEUE_TOKEN
        };
        self.fs.handle_event(token, libc::EPOLLIN as u32);
        let after: u16 = self
            .mem
            .read_obj(GuestAddress(used_ring + 2))
            .expect("used");
        if after == before {
            return None;
        }
        let elem = used_ring + 4 + 8 * u64::from(before % size);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).expect("id");
        assert_eq!(id, u32::from(indexes[0]));
        Some(self.mem.read_obj(GuestAddress(elem + 4)).expect("len"))
    }

    /// Sends a FUSE request (header + `body`) with `reply_len` bytes of reply space;
    /// returns the reply header and the bytes after it.
    fn request(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_len: u32,
    ) -> (OutHeader, Vec<u8>) {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut msg = header.as_slice().to_vec();
        msg.extend_from_slice(body);
        self.mem
            .write_slice(&msg, GuestAddress(REQUEST))
            .expect("request");
        self.mem
            .write_slice(&vec![0u8; reply_len as usize], GuestAddress(REPLY))
            .expect("clear reply");
        let used = self
            .send(
                1,
                &[(REQUEST, msg.len() as u32, false), (REPLY, reply_len, true)],
            )
            .expect("request returned");
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).expect("out header");
        assert_eq!(out.unique, self.unique, "reply to another request");
        assert_eq!(used, out.len, "used length and reply length differ");
        let mut rest = vec![0u8; out.len as usize - std::mem::size_of::<OutHeader>()];
        self.mem
            .read_slice(&mut rest, GuestAddress(REPLY + 16))
            .expect("reply body");
        (out, rest)
    }

    fn init(&mut self) {
        self.init_offering(FsOptions::empty());
    }

    /// FUSE_INIT with the guest offering `flags`; returns the server's answer.
    fn init_offering(&mut self, flags: FsOptions) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 20,
            flags: u32::try_from(flags.bits()).expect("flags of the first word"),
        };
        let (out, rest) = self.request(FUSE_INIT, 0, init.as_slice(), 4096);
        assert_eq!(out.error, 0, "FUSE_INIT failed");
        *InitOut::from_slice(&rest[..std::mem::size_of::<InitOut>()]).expect("init out")
    }

    /// FUSE_OPEN of `nodeid` with `flags`; returns the file handle.
    fn open(&mut self, nodeid: u64, flags: i32) -> u64 {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let (out, rest) = self.request(FUSE_OPEN, nodeid, open.as_slice(), 4096);
        assert_eq!(out.error, 0, "FUSE_OPEN failed");
        OpenOut::from_slice(&rest[..std::mem::size_of::<OpenOut>()])
            .expect("open out")
            .fh
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (out, rest) = self.request(FUSE_LOOKUP, parent, &body, 4096);
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(*EntryOut::from_slice(&rest[..std::mem::size_of::<EntryOut>()]).expect("entry"))
    }

    fn read_file(&mut self, nodeid: u64, len: u32) -> Result<Vec<u8>, i32> {
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let (out, rest) = self.request(FUSE_OPEN, nodeid, open.as_slice(), 4096);
        if out.error != 0 {
            return Err(-out.error);
        }
        let fh = OpenOut::from_slice(&rest[..std::mem::size_of::<OpenOut>()])
            .expect("open out")
            .fh;
        let read = ReadIn {
            fh,
            offset: 0,
            size: len,
            ..Default::default()
        };
        let (out, data) = self.request(FUSE_READ, nodeid, read.as_slice(), len + 16);
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(data)
    }
}

#[test]
fn config_space_names_the_tag_and_one_request_queue() {
    let fs = Fs::new("podvisor", Backend::none());
    assert_eq!(fs.device_type(), TYPE_FS);
    assert_eq!(fs.queue_max_sizes().len(), 2);
    let mut config = [0xffu8; 40];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..8], b"podvisor");
    assert!(config[8..36].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes(config[36..40].try_into().unwrap()), 1);
    let mut past = [0xffu8; 4];
    fs.read_config(40, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn files_of_the_share_are_looked_up_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    std::fs::write(dir.path().join("sub/hello"), b"hello from the host\n").expect("write");
    let mut h = Harness::passthrough(dir.path());
    h.init();
    let sub = h.lookup(ROOT, "sub").expect("lookup sub");
    assert_eq!(sub.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let file = h.lookup(sub.nodeid, "hello").expect("lookup hello");
    assert_eq!(file.attr.size, 20);
    assert_eq!(
        h.read_file(file.nodeid, 4096).expect("read"),
        b"hello from the host\n"
    );
    assert_eq!(h.lookup(ROOT, "missing").unwrap_err(), libc::ENOENT);
    assert_eq!(h.fs.counters().malformed_chains, 0);
}

#[test]
fn the_guest_cannot_walk_out_of_the_share() {
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret"), b"host secret").expect("write");
    let share = tempfile::tempdir().expect("tempdir");
    std::fs::write(share.path().join("inside"), b"ok").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret"), share.path().join("abs"))
        .expect("symlink");
    std::os::unix::fs::symlink("../../../../../../etc/passwd", share.path().join("rel"))
        .expect("symlink");
    let mut h = Harness::passthrough(share.path());
    h.init();
    // `..` at the root is the root itself.
    let up = h.lookup(ROOT, "..").expect("lookup ..");
    let inside_via_up = h.lookup(up.nodeid, "inside").expect("root's file");
    assert_eq!(inside_via_up.attr.size, 2);
    assert!(h.lookup(up.nodeid, "secret").is_err());
    // A name with a slash is refused.
    let with_slash = format!("{}/secret", outside.path().display());
    assert_eq!(h.lookup(ROOT, &with_slash).unwrap_err(), libc::EINVAL);
    // Symlinks are entries of their own, never followed by the host.
    for link in ["abs", "rel"] {
        let entry = h.lookup(ROOT, link).expect("lookup link");
        assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{link}");
        let read = h.read_file(entry.nodeid, 4096);
        assert!(
            read.as_deref() != Ok(b"host secret".as_slice()),
            "{link} was followed"
        );
        let (out, target) = h.request(FUSE_READLINK, entry.nodeid, &[], 4096);
        assert_eq!(out.error, 0);
        assert!(!target.starts_with(b"host secret"), "{link}");
    }
}

#[test]
fn a_device_without_a_share_answers_enodev() {
    let mut h = Harness::new(Backend::none());
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let (out, _) = h.request(FUSE_INIT, 0, init.as_slice(), 4096);
    assert_eq!(out.error, -libc::ENODEV);
    // FORGET on the high-priority queue gets no reply, and the chain comes back.
    let header = InHeader {
        len: 48,
        opcode: FUSE_FORGET,
        unique: 99,
        nodeid: 5,
        ..Default::default()
    };
    let mut msg = header.as_slice().to_vec();
    msg.extend_from_slice(&1u64.to_le_bytes());
    h.mem
        .write_slice(&msg, GuestAddress(REQUEST))
        .expect("write");
    assert_eq!(h.send(0, &[(REQUEST, 48, false)]), Some(0));
}

#[test]
fn malformed_chains_are_dropped_and_the_device_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), b"x").expect("write");
    let mut h = Harness::passthrough(dir.path());
    h.init();
    let header = InHeader {
        len: 40,
        opcode: FUSE_LOOKUP,
        unique: 1000,
        nodeid: ROOT,
        ..Default::default()
    };
    h.mem
        .write_slice(header.as_slice(), GuestAddress(REQUEST))
        .expect("write");
    let bad: [&[(u64, u32, bool)]; 5] = [
        // Reply space before the request.
        &[(REPLY, 4096, true), (REQUEST, 40, false)],
        // Outside guest memory.
        &[(MEM_SIZE - 8, 40, false), (REPLY, 4096, true)],
        // Over the size limit.
        &[(REQUEST, 40, false), (REPLY, MAX_REQUEST_BYTES + 1, true)],
        // Too short for a FUSE header.
        &[(REQUEST, 8, false), (REPLY, 4096, true)],
        // No request at all.
        &[(REPLY, 4096, true)],
    ];
    for (n, chain) in bad.iter().enumerate() {
        assert_eq!(h.send(1, chain), Some(0), "bad chain {n}");
    }
    assert_eq!(h.fs.counters().malformed_chains, bad.len() as u64);
    // A request whose reply space is too small for the answer still ends.
    let mut body = b"f".to_vec();
    body.push(0);
    let lookup = InHeader {
        len: 42,
        opcode: FUSE_LOOKUP,
        unique: 1001,
        nodeid: ROOT,
        ..Default::default()
    };
    let mut msg = lookup.as_slice().to_vec();
    msg.extend_from_slice(&body);
    h.mem
        .write_slice(&msg, GuestAddress(REQUEST))
        .expect("write");
    assert!(
        h.send(1, &[(REQUEST, 42, false), (REPLY, 16, true)])
            .is_some()
    );
    // And the device serves on.
    let entry = h.lookup(ROOT, "f").expect("lookup after the bad chains");
    let attr: Attr = entry.attr;
    assert_eq!(attr.size, 1);
}

#[test]
fn large_requests_are_offered_and_a_one_mib_write_arrives_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("big"), b"").expect("write");
    let mut h = Harness::passthrough(dir.path());
    // A guest that offers neither keeps FUSE's 4 KiB writes.
    let plain = h.init_offering(FsOptions::empty());
    assert_eq!(plain.max_write, 4096);
    let mut h = Harness::passthrough(dir.path());
    let init = h.init_offering(FsOptions::BIG_WRITES | FsOptions::MAX_PAGES);
    let enabled = FsOptions::from_bits_truncate(u64::from(init.flags));
    assert!(enabled.contains(FsOptions::MAX_PAGES | FsOptions::BIG_WRITES));
    assert_eq!((init.max_pages, init.max_write), (256, 1 << 20));

    let nodeid = h.lookup(ROOT, "big").expect("lookup big").nodeid;
    let fh = h.open(nodeid, libc::O_RDWR);
    // The guest's chain: FUSE header and WriteIn, one descriptor per page of data, reply.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    const DATA: u64 = 0x40_0000;
    h.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    h.unique += 1;
    let write = WriteIn {
        fh,
        offset: 0,
        size: 1 << 20,
        ..Default::default()
    };
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<WriteIn>() + data.len()) as u32,
        opcode: FUSE_WRITE,
        unique: h.unique,
        nodeid,
        ..Default::default()
    };
    let mut msg = header.as_slice().to_vec();
    msg.extend_from_slice(write.as_slice());
    h.mem
        .write_slice(&msg, GuestAddress(REQUEST))
        .expect("request");
    let mut chain = vec![(REQUEST, msg.len() as u32, false)];
    chain.extend((0..256).map(|page| (DATA + page * 4096, 4096, false)));
    chain.push((REPLY, 4096, true));
    let used = h.send(1, &chain).expect("write returned");
    let out: OutHeader = h.mem.read_obj(GuestAddress(REPLY)).expect("out header");
    assert_eq!((out.error, out.len), (0, used));
    let written: WriteOut = h.mem.read_obj(GuestAddress(REPLY + 16)).expect("write out");
    assert_eq!(written.size, 1 << 20);
    assert_eq!(std::fs::read(dir.path().join("big")).expect("read"), data);

    // One descriptor more than the device walks: dropped, counted, and the device serves on.
    let mut long = vec![(REQUEST, msg.len() as u32, false)];
    long.extend((0..MAX_DESCRIPTORS as u64).map(|page| (DATA + (page % 256) * 4096, 4096, false)));
    long.push((REPLY, 4096, true));
    assert_eq!(long.len(), MAX_DESCRIPTORS + 2);
    assert_eq!(h.send(1, &long), Some(0));
    assert_eq!(h.fs.counters().malformed_chains, 1);
    assert!(h.lookup(ROOT, "big").is_ok());
}
