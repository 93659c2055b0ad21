//! Fuzzes the virtio-blk request path: the fuzzer owns the descriptor table,
//! the available ring and the buffers, and the device serves whatever it finds
//! there against a small raw file. It must never panic or hang.
//!
//! Input layout: byte 0 picks the queue size, byte 1 the features (EVENT_IDX,
//! read-only backing), byte 2 how many chains the avail index announces; the
//! rest is copied over guest memory from the descriptor table on, so it
//! supplies descriptors, avail ring entries, request headers and data alike.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::virtio::block::{Block, BlockConfig, REQUEST_QUEUE_TOKEN};
use podvisor_vmm::virtio::{
    ActivateContext, EventRegistrar, GuestMemory, Interrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_SIZE: usize = 0x2_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// 64 sectors: small enough to stay fast, big enough for in-range I/O.
const DISK_SIZE: usize = 64 * 512;

/// One backing file for the whole run; fuzzed writes land in it, which is fine.
fn backing() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("podvisor-fuzz-block-{}.img", std::process::id()));
        std::fs::write(&path, vec![0x5a; DISK_SIZE]).expect("create fuzz backing file");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let [size_sel, flags, announced, rest @ ..] = data else {
        return;
    };
    let queue_size = 1u16 << (size_sel % 9); // 1..=256, a power of two
    let read_only = flags & 1 != 0;
    let mut acked = VIRTIO_F_VERSION_1;
    if flags & 2 != 0 {
        acked |= VIRTIO_RING_F_EVENT_IDX;
    }

    let Ok(mut block) = Block::new(BlockConfig {
        path: backing().clone(),
        read_only,
        id: "fuzz".into(),
    }) else {
        return;
    };
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
    // The ring header is ours so that chains actually get popped; the
    // entries, descriptors and buffers are the fuzzer's.
    let avail_idx = u16::from(*announced) % (queue_size + 1);
    let _ = mem.write_obj(0u16, GuestAddress(AVAIL_RING));
    let _ = mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2));
    let _ = mem.write_obj(0u32, GuestAddress(USED_RING));

    let Ok(mut queue) = Queue::new(256) else {
        return;
    };
    queue.set_size(queue_size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);

    let (Ok(queue_evt), Ok(irq), Ok(epoll)) = (
        EventFd::new(EFD_NONBLOCK),
        EventFd::new(EFD_NONBLOCK),
        Epoll::new(),
    ) else {
        return;
    };
    let Ok(kick) = queue_evt.try_clone() else {
        return;
    };
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues: vec![queue],
        queue_events: vec![queue_evt],
        interrupt: Arc::new(Interrupt::new(irq)),
        events: EventRegistrar::new(Arc::new(epoll), 0),
    };
    if block.activate(ctx).is_err() {
        return;
    }

    // Serve, then serve again: the second pass sees the device's own updates.
    for _ in 0..2 {
        let _ = kick.write(1);
        block.handle_event(REQUEST_QUEUE_TOKEN, EventSet::IN.bits());
    }

    // Config space at fuzzer-chosen offsets.
    let offset = rest
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .unwrap_or_default();
    let mut buf = [0u8; 8];
    block.read_config(offset, &mut buf);
    block.read_config(offset % 64, &mut buf);

    block.reset();
});
