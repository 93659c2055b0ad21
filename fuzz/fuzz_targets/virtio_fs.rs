//! Fuzzes the virtio-fs request path: the fuzzer owns the descriptor table, the available
//! ring and the buffers (FUSE headers and bodies alike), and the device serves whatever it
//! finds there against a small shared directory. It must never panic, hang, or touch
//! anything outside that directory.
//!
//! Input layout: byte 0 picks the queue size, byte 1 the features (EVENT_IDX) and the
//! queue (high-priority or request), byte 2 how many chains the avail index announces;
//! the rest is copied over guest memory from the descriptor table on.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::virtio::fs::{Backend, Fs, HIPRIO_QUEUE_TOKEN, QUEUE_SIZES, REQUEST_QUEUE_TOKEN};
use podvisor_vmm::virtio::{
    ActivateContext, EventRegistrar, GuestMemory, Interrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_SIZE: usize = 0x4_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// One shared directory for the whole run, with a file and a subdirectory to find.
fn share() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("podvisor-fuzz-fs-{}", std::process::id()));
        std::fs::create_dir_all(path.join("dir")).expect("create the fuzz share");
        std::fs::write(path.join("file"), b"podvisor").expect("create a file in it");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let [size_sel, flags, announced, rest @ ..] = data else {
        return;
    };
    let q = usize::from(flags & 4 != 0);
    let queue_size = 1u16 << (size_sel % 8); // 1..=128, fits both queues
    let mut acked = VIRTIO_F_VERSION_1;
    if flags & 2 != 0 {
        acked |= VIRTIO_RING_F_EVENT_IDX;
    }
    let Ok(backend) = Backend::passthrough(share()) else {
        return;
    };
    let mut fs = Fs::new("fuzz", backend);
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let len = rest.len().min(MEM_SIZE);
    if mem
        .write_slice(&rest[..len], GuestAddress(DESC_TABLE))
        .is_err()
    {
        return;
    }
    let avail_idx = u16::from(*announced) % (queue_size + 1);
    let _ = mem.write_obj(0u16, GuestAddress(AVAIL_RING));
    let _ = mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2));
    let _ = mem.write_obj(0u32, GuestAddress(USED_RING));

    let mut queues = Vec::new();
    let mut events = Vec::new();
    let mut kicks = Vec::new();
    for (i, max) in QUEUE_SIZES.iter().enumerate() {
        let Ok(mut queue) = Queue::new(*max) else {
            return;
        };
        if i == q {
            queue.set_size(queue_size);
            queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
            queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
            queue.set_ready(true);
        }
        let (Ok(evt), Ok(kick)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) else {
            return;
        };
        let Ok(kick_clone) = evt.try_clone() else {
            return;
        };
        drop(kick);
        queues.push(queue);
        events.push(evt);
        kicks.push(kick_clone);
    }
    let (Ok(irq), Ok(epoll)) = (EventFd::new(EFD_NONBLOCK), Epoll::new()) else {
        return;
    };
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues,
        queue_events: events,
        interrupt: Arc::new(Interrupt::new(irq)),
        events: EventRegistrar::new(Arc::new(epoll), 0),
    };
    if fs.activate(ctx).is_err() {
        return;
    }
    let token = if q == 0 {
        HIPRIO_QUEUE_TOKEN
    } else {
        REQUEST_QUEUE_TOKEN
    };
    for _ in 0..2 {
        let _ = kicks[q].write(1);
        fs.handle_event(token, EventSet::IN.bits());
    }
    let mut buf = [0u8; 8];
    let offset = rest
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .unwrap_or_default();
    fs.read_config(offset, &mut buf);
    fs.reset();
});
