//! Fuzzes the vsock device's queue handling: the fuzzer's bytes are the
//! guest memory image that holds all three virtqueues (descriptor tables,
//! rings) and the packet buffers, while a host client and a host service
//! give the device connections to work on.
//!
//! The device must never panic or hang, whatever the rings say.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use podvisor_vmm::virtio::vsock::{NUM_QUEUES, Vsock, VsockConfig};
use podvisor_vmm::virtio::{
    ActivateContext, EventRegistrar, GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory: two regions with a hole between them, so buffers can
/// straddle the end of memory or fall into the gap.
const LOW_SIZE: usize = 0x4_0000;
const HIGH_BASE: u64 = 0x10_0000;
const HIGH_SIZE: usize = 0x1_0000;
/// Small queues so the fuzzer reaches ring indices and wrap-around.
const QUEUE_SIZE: u16 = 16;
/// The guest port host services listen on (`<uds>_1024`) and the host
/// client asks for.
const SERVICE_PORT: u32 = 1024;

fn queue_at(base: u64) -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_ready(true);
    Some(q)
}

/// Dispatches ready events until the loop goes idle (bounded: a device
/// that keeps itself busy is a bug the fuzzer should see as a hang).
fn pump(epoll: &Epoll, dev: &mut Vsock) {
    let mut events = [EpollEvent::default(); 16];
    for _ in 0..64 {
        let n = match epoll.wait(0, &mut events) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for ev in events.iter().take(n) {
            let (_, token) = EventRegistrar::decode(ev.data());
            dev.handle_event(token, ev.events());
        }
    }
}

fn run(data: &[u8]) -> Option<()> {
    let uds = std::env::temp_dir().join(format!("podvisor-fuzz-vsock-{}", std::process::id()));
    let service_path = PathBuf::from(format!("{}_{SERVICE_PORT}", uds.display()));
    // Leftovers of a run that crashed.
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&service_path);

    let mut dev = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    })
    .ok()?;
    let service = UnixListener::bind(&service_path).ok()?;
    service.set_nonblocking(true).ok()?;

    let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_SIZE),
        (GuestAddress(HIGH_BASE), HIGH_SIZE),
    ])
    .ok()?;
    let image = data.get(..data.len().min(LOW_SIZE))?;
    mem.write_slice(image, GuestAddress(0)).ok()?;

    let epoll = Arc::new(Epoll::new().ok()?);
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).ok()?));
    let mut queues = Vec::new();
    let mut queue_events = Vec::new();
    let mut kicks = Vec::new();
    for i in 0..NUM_QUEUES as u64 {
        queues.push(queue_at(0x1000 * i)?);
        let evt = EventFd::new(EFD_NONBLOCK).ok()?;
        kicks.push(evt.try_clone().ok()?);
        queue_events.push(evt);
    }
    dev.activate(ActivateContext {
        mem,
        acked_features: VIRTIO_F_VERSION_1,
        queues,
        queue_events,
        interrupt: irq,
        events: EventRegistrar::new(epoll.clone(), 0),
    })
    .ok()?;

    // A host client asking for the service port gives the RX path an
    // OP_REQUEST to deliver; a guest REQUEST to that port reaches `service`.
    let mut client = UnixStream::connect(&uds).ok()?;
    let _ = client.write_all(format!("CONNECT {SERVICE_PORT}\nhello").as_bytes());
    pump(&epoll, &mut dev);

    for round in 0..3 {
        for kick in &kicks {
            let _ = kick.write(1);
        }
        pump(&epoll, &mut dev);
        // Host services accept whatever the guest connected, and talk.
        while let Ok((mut stream, _)) = service.accept() {
            let _ = stream.set_nonblocking(true);
            let _ = stream.write_all(b"from the host");
        }
        pump(&epoll, &mut dev);
        if round == 1 {
            dev.send_transport_reset();
        }
    }
    let _ = dev.counters();
    dev.reset();
    drop(dev);
    let _ = std::fs::remove_file(&service_path);
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
