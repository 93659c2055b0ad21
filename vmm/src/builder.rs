//! Builds a [`Vm`] from a [`VmConfig`]: KVM, guest memory (fresh, or a snapshot's memory
//! file), the virtio devices of the [device table](crate::device_table) on the MMIO bus,
//! the serial console and legacy ports, the boot structures or the snapshot's state, and
//! the vCPUs. Running it is [`Vm::run`]'s.

use std::io::LineWriter;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use podvisor_common::lock;
use podvisor_vmm_api::config::{SerialOutput, VmConfig};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, cmdline};
use crate::bus::{MmioBus, PortIoBus};
use crate::device_table::{self, DeviceState};
use crate::devices::console_file::{CONSOLE_CAP, CappedFile};
use crate::devices::legacy::{BootTimes, LegacyPorts};
use crate::devices::serial::{ConsoleOut, SerialConsole};
use crate::exit::ExitSignal;
use crate::handle::{Drive, VmHandle};
use crate::layout::{
    KVM_TSS_ADDRESS, SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory;
use crate::snapshot::kvm_state;
use crate::snapshot::{SnapshotError, VmSnapshot, memory_file};
use crate::vcpu::{self, VcpuControl, VcpuRunner};
use crate::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::virtio::{EventRegistrar, Interrupt, VirtioDevice};
use crate::vm::{Cleanup, EXIT_SLOT, Vm, VmError, host_err, kvm_err};

/// How the guest gets going: a kernel boot or a snapshot's state.
enum Start {
    Boot {
        kernel: boot::LoadedKernel,
        initrd: Option<boot::InitrdConfig>,
    },
    Restore {
        snap: Box<VmSnapshot>,
        path: PathBuf,
    },
}

/// What the vCPUs and the event loop share.
struct Shared {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    epoll: Arc<Epoll>,
    exit: Arc<ExitSignal>,
    times: Arc<BootTimes>,
}

/// Builds the VM described by `config` (booting its kernel, or continuing the snapshot it
/// names), ready to [run](Vm::run). `start` is when the VMM process started, for timing.
pub fn build(mut config: VmConfig, start: Instant) -> Result<Vm, VmError> {
    config.validate()?;
    let (kvm, vm) = open_kvm()?;
    crate::snapshot::kvm_state::read_host_caps(&kvm);
    let base_cpuid = vcpu::supported_cpuid(&kvm)?;
    let (mem, start_kind) = guest_memory(&mut config, &base_cpuid)?;
    register_memory(&vm, &mem)?;
    let shared = shared(vm, mem, start)?;

    let attachments = device_table::attach_all(&config)?;
    let cleanup = Cleanup(attachments.remove_on_exit);
    let (devices, device_states): (Vec<_>, Vec<_>) = attachments
        .devices
        .into_iter()
        .map(|a| (a.device, a.state))
        .unzip();
    if let Start::Restore { snap, path } = &start_kind {
        snap.check_devices(path, &device_states)?;
    }
    let (mmio, decls) = mmio_bus(&shared, &devices)?;
    let serial_max = config.serial_max_bytes.unwrap_or(CONSOLE_CAP);
    let pio = port_io(&shared, (&config.serial, serial_max), &start_kind)?;
    let entry = match &start_kind {
        Start::Boot { kernel, initrd } => {
            let line = cmdline::build(&config.cmdline, &decls, cmdline::host_is_pvm())
                .map_err(VmError::Cmdline)?;
            tracing::debug!("kernel command line: {}", line.to_string_lossy());
            boot::configure_system(&shared.mem, kernel, &line, *initrd, config.vcpus)?;
            vcpu::write_boot_tables(&shared.mem, kernel.entry)?;
            Some(kernel.entry)
        }
        Start::Restore { .. } => None,
    };

    vcpu::install_kick_handler().map_err(host_err("install vCPU kick handler"))?;
    let control = Arc::new(VcpuControl::default());
    let mut runners = Vec::new();
    for id in 0..config.vcpus {
        let fd = shared
            .vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create vCPU"))?;
        match entry {
            Some(entry) => vcpu::configure(&fd, &base_cpuid, id, config.vcpus, entry)?,
            None => vcpu::set_cpuid(&fd, &base_cpuid, id, config.vcpus)?,
        }
        runners.push(VcpuRunner {
            vcpu: fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: shared.exit.clone(),
            control: control.clone(),
            times: shared.times.clone(),
        });
    }
    if let Start::Restore { snap, path } = &start_kind {
        restore_state(&shared.vm, snap, path, &runners, &mmio, &device_states)?;
    }

    let handle = Arc::new(VmHandle {
        vm_fd: shared.vm.clone(),
        mem: shared.mem.clone(),
        pio,
        cpuid: kvm_state::cpuid_entries(&vcpu::cpuid_for_vcpu(&base_cpuid, 0, config.vcpus)),
        device_states,
        device_gate: Arc::new(Mutex::new(())),
        snapshot_lock: Mutex::new(()),
        control,
        exit: shared.exit,
        times: shared.times,
        mmio,
        drives: attachments
            .drives
            .into_iter()
            .map(|(id, block, slot)| Drive { id, block, slot })
            .collect(),
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
    });
    Ok(Vm {
        handle,
        runners,
        epoll: shared.epoll,
        devices,
        cleanup,
        mem: shared.mem,
        restored: entry.is_none(),
        start,
        seccomp: config.seccomp,
        serves_share: config.fs.as_ref().is_some_and(|f| f.shared_dir.is_some()),
    })
}

fn open_kvm() -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory regions"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    // Intel needs a TSS region below 4 GiB; failing here is not fatal on
    // hosts (AMD, kvm_pvm) that do not use it.
    if let Err(e) = vm.set_tss_address(KVM_TSS_ADDRESS) {
        tracing::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    Ok((kvm, Arc::new(vm)))
}

/// Guest RAM: a snapshot's memory file (and the snapshot, whose vCPU count and memory size
/// replace the configuration's), or fresh memory with the kernel and initrd loaded.
fn guest_memory(
    config: &mut VmConfig,
    base_cpuid: &CpuId,
) -> Result<(GuestMemoryMmap, Start), VmError> {
    match &config.restore {
        Some(r) => {
            let snap = VmSnapshot::load(&r.state, |vcpus| {
                kvm_state::cpuid_entries(&vcpu::cpuid_for_vcpu(base_cpuid, 0, vcpus))
            })?;
            let (mem_path, path) = (r.mem.clone(), r.state.clone());
            config.vcpus = snap.vcpus;
            config.mem_mib = snap.mem_mib;
            config.validate()?;
            let regions = memory::ram_regions(config.mem_mib)?;
            let mem =
                memory_file::map_memory_file(&mem_path, &regions).map_err(SnapshotError::from)?;
            let snap = Box::new(snap);
            Ok((mem, Start::Restore { snap, path }))
        }
        None => {
            let mem = memory::create_guest_memory(config.mem_mib)?;
            let kernel = boot::load_kernel(&mem, &config.kernel)?;
            let initrd = match &config.initrd {
                Some(p) => Some(boot::load_initrd(
                    &mem,
                    p,
                    memory::low_ram_end(config.mem_mib),
                    kernel.kernel_end,
                )?),
                None => None,
            };
            Ok((mem, Start::Boot { kernel, initrd }))
        }
    }
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::KvmCap("a host mapping of guest memory"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap of `memory_size` bytes owned by
        // `mem`, which the caller keeps alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set user memory region"))?;
    }
    Ok(())
}

/// The event loop's epoll (watching the exit eventfd) and what the threads share.
fn shared(vm: Arc<VmFd>, mem: GuestMemoryMmap, start: Instant) -> Result<Shared, VmError> {
    let epoll = Arc::new(Epoll::new().map_err(host_err("create epoll"))?);
    let exit = Arc::new(ExitSignal::new().map_err(host_err("create exit eventfd"))?);
    epoll
        .ctl(
            ControlOperation::Add,
            exit.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(EXIT_SLOT) << 32),
        )
        .map_err(host_err("watch exit eventfd"))?;
    Ok(Shared {
        vm,
        mem,
        epoll,
        exit,
        times: Arc::new(BootTimes::new(start)),
    })
}

/// One MMIO window, IRQ and ioeventfd per device, in order; and the windows for the kernel
/// command line.
fn mmio_bus(
    shared: &Shared,
    devices: &[Arc<Mutex<dyn VirtioDevice>>],
) -> Result<(Arc<MmioBus>, Vec<cmdline::MmioDeclaration>), VmError> {
    let mut mmio = MmioBus::default();
    let mut decls = Vec::new();
    for (slot, dev) in devices.iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + slot as u32;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(host_err("create irq eventfd"))?;
        shared
            .vm
            .register_irqfd(&irq_evt, irq)
            .map_err(kvm_err("register irqfd"))?;
        let interrupt = Arc::new(Interrupt::new(irq_evt));
        let transport = MmioTransport::new(
            dev.clone(),
            shared.mem.clone(),
            interrupt,
            EventRegistrar::new(shared.epoll.clone(), slot as u32),
        )
        .map_err(|source| VmError::Transport {
            name: lock(dev).name(),
            source,
        })?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            shared
                .vm
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(kvm_err("register ioeventfd"))?;
        }
        mmio.add(base, transport);
        decls.push(cmdline::MmioDeclaration { base, irq });
    }
    Ok((Arc::new(mmio), decls))
}

/// Where the serial console writes; a file holds at most `max_bytes`.
fn serial_out(s: &SerialOutput, max_bytes: u64) -> Result<ConsoleOut, VmError> {
    Ok(match s {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(p) => {
            let f = CappedFile::open(p, max_bytes).map_err(|source| VmError::Serial {
                path: p.display().to_string(),
                source,
            })?;
            Box::new(LineWriter::new(f))
        }
    })
}

/// The UART (fresh, or in its saved state) and the legacy ports.
fn port_io(
    shared: &Shared,
    output: (&SerialOutput, u64),
    start_kind: &Start,
) -> Result<Arc<PortIoBus>, VmError> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("create serial eventfd"))?;
    shared
        .vm
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("register serial irqfd"))?;
    let serial_out = serial_out(output.0, output.1)?;
    let serial = match start_kind {
        Start::Restore { snap, path } => {
            SerialConsole::from_snapshot(serial_irq, serial_out, &snap.serial).map_err(
                |source| SnapshotError::Serial {
                    path: path.display().to_string(),
                    source,
                },
            )?
        }
        Start::Boot { .. } => SerialConsole::new(serial_irq, serial_out),
    };
    Ok(Arc::new(PortIoBus {
        serial: Mutex::new(serial),
        legacy: LegacyPorts::new(shared.exit.clone(), shared.times.clone()),
    }))
}

/// Puts the snapshot's state into the new VM: interrupt controllers, vCPUs, then devices.
fn restore_state(
    vm: &VmFd,
    snap: &VmSnapshot,
    path: &std::path::Path,
    runners: &[VcpuRunner],
    mmio: &MmioBus,
    device_states: &[DeviceState],
) -> Result<(), VmError> {
    // The interrupt controllers first: a device's restored interrupt must reach the
    // guest's IOAPIC, not a fresh one the restore then overwrites.
    snap.vm.restore(vm).map_err(SnapshotError::from)?;
    for (r, state) in runners.iter().zip(&snap.vcpu_states) {
        state.restore(&r.vcpu).map_err(SnapshotError::from)?;
    }
    for ((t, saved), state) in mmio.transports().zip(&snap.devices).zip(device_states) {
        lock(t)
            .restore(&saved.transport)
            .map_err(|source| SnapshotError::Device {
                path: path.display().to_string(),
                device: state.to_string(),
                source,
            })?;
    }
    Ok(())
}
