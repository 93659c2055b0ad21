//! Fuzzes the virtio-mmio transport: the fuzzer is a driver issuing any
//! sequence of register reads and writes (any offset, size and value) to a
//! window in front of a real virtio-blk device. The transport must never
//! panic, must keep its state machine consistent, and must never hand the
//! device queues the guest can still change.
//!
//! Input: a stream of 7-byte operations `[kind, offset_lo, offset_hi, v0..v3]`;
//! kind's low bit picks read or write, bits 1-2 the access size (1, 2, 4, 8).

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::virtio::block::{Block, BlockConfig};
use podvisor_vmm::virtio::mmio::MmioTransport;
use podvisor_vmm::virtio::{EventRegistrar, GuestMemory, Interrupt, VirtioDevice};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_SIZE: usize = 0x4_0000;

fn backing() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("podvisor-fuzz-mmio-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 512]).expect("create fuzz backing file");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let block = Block::new(BlockConfig {
        path: backing().clone(),
        read_only: false,
        id: "fuzz".into(),
    })
    .expect("block device");
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(block));
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let events = EventRegistrar::new(Arc::new(Epoll::new().expect("epoll")), 0);
    let mut transport =
        MmioTransport::new(device, mem, interrupt, events).expect("transport");

    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) & 0x1fff;
        let size = 1usize << ((op[0] >> 1) & 3);
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&op[3..7]);
        if op[0] & 1 == 0 {
            transport.read(offset, &mut buf[..size]);
        } else {
            transport.write(offset, &buf[..size]);
        }
    }
    // Reset from whatever state the fuzzer left: must always work.
    transport.write(0x70, &0u32.to_le_bytes());
});
