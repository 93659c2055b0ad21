//! Building a VM from a [`VmConfig`] and running it to its end.

use std::fs::OpenOptions;
use std::io::LineWriter;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, cmdline};
use crate::bus::{MmioBus, PortIoBus};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::legacy::{BootTimes, LegacyPorts};
use crate::devices::serial::{ConsoleOut, SerialConsole};
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{
    KVM_TSS_ADDRESS, SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory;
use crate::snapshot::kvm_state::{self, CpuidEntry, VmState};
use crate::snapshot::{self, DeviceSnapshot, SnapshotError, VmSnapshot, memory_file};
use crate::vcpu::{self, VcpuControl, VcpuRunner};
use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY, lock};
use crate::virtio::net::{Net, NetConfig};
use crate::virtio::vsock::{Vsock, VsockConfig};
use crate::virtio::{EventRegistrar, Interrupt, TYPE_BLOCK, TYPE_NET, TYPE_VSOCK, VirtioDevice};

/// The event-loop slot of the exit eventfd (devices use 0..n).
const EXIT_SLOT: u32 = u32::MAX;

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// /dev/kvm could not be opened.
    #[error("open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something we need.
    #[error("KVM lacks {0}")]
    KvmCap(&'static str),
    /// A VM-level KVM ioctl failed.
    #[error("KVM {what}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel, initrd, boot structures.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// A device could not be created.
    #[error("device {name}: {message}")]
    Device {
        /// The device.
        name: String,
        /// What failed.
        message: String,
    },
    /// The serial output file.
    #[error("serial output {path}")]
    Serial {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The control socket.
    #[error("control socket {path}")]
    Api {
        /// The socket path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot could not be restored.
    #[error("restore")]
    Snapshot(#[source] Box<SnapshotError>),
    /// Host resources (eventfd, epoll, threads, signals).
    #[error("{what}")]
    Host {
        /// What was being created.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

/// What the control API can reach of a running VM.
pub struct VmHandle {
    /// The VM, for its irqchip/PIT/clock state.
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM, for the memory file.
    pub mem: GuestMemoryMmap,
    /// Port I/O devices (the UART's state).
    pub pio: Arc<PortIoBus>,
    /// vCPU 0's CPUID, recorded in snapshots.
    pub cpuid: Vec<CpuidEntry>,
    /// Device kinds in MMIO order ([`snapshot::device_kind`]).
    pub device_kinds: Vec<String>,
    /// Held by the event loop while it runs device handlers, and by a snapshot while it
    /// saves devices and memory: no device touches guest memory while they are copied.
    pub device_gate: Arc<Mutex<()>>,
    /// One snapshot at a time.
    pub snapshot_lock: Mutex<()>,
    /// Pause/resume.
    pub control: Arc<VcpuControl>,
    /// Stop.
    pub exit: Arc<ExitSignal>,
    /// Boot timing.
    pub times: Arc<BootTimes>,
    /// Devices, for counters.
    pub mmio: Arc<MmioBus>,
    /// Drives by id, for swaps.
    pub drives: Vec<(String, Arc<Mutex<Block>>)>,
    /// vCPU count.
    pub vcpus: u8,
    /// Memory size.
    pub mem_mib: u64,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vcpus", &self.vcpus)
            .field("mem_mib", &self.mem_mib)
            .finish_non_exhaustive()
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Length of the memory file.
    pub mem_file_bytes: u64,
    /// Bytes of it that hold data (the rest are holes).
    pub mem_data_bytes: u64,
    /// Wall time of the whole snapshot.
    pub elapsed: std::time::Duration,
}

impl VmHandle {
    /// Writes a snapshot of the paused VM: the state file at `state_path`, guest RAM at
    /// `mem_path`. The VM stays paused.
    pub fn snapshot(
        &self,
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<SnapshotStats, snapshot::SnapshotError> {
        let _one = lock(&self.snapshot_lock);
        let started = Instant::now();
        if !self.control.is_paused() {
            return Err(snapshot::SnapshotError::NotReady(
                "pause the VM before a snapshot".into(),
            ));
        }
        let vcpu_states = self
            .control
            .save_vcpus()
            .map_err(snapshot::SnapshotError::NotReady)?;
        let vm = VmState::save(&self.vm_fd)?;
        let _gate = lock(&self.device_gate);
        let devices = self
            .mmio
            .transports()
            .zip(&self.device_kinds)
            .map(|(t, kind)| DeviceSnapshot {
                kind: kind.clone(),
                transport: lock(t).snapshot(),
            })
            .collect();
        let serial = lock(&self.pio.serial).snapshot();
        let mem_stats = memory_file::write_memory_file(&self.mem, mem_path)?;
        let state = VmSnapshot {
            vmm_version: snapshot::VMM_VERSION.into(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            cpuid: self.cpuid.clone(),
            vm,
            vcpu_states,
            serial,
            devices,
        };
        let state_bytes = snapshot::file::write_state_file(state_path, &state)?;
        let stats = SnapshotStats {
            state_bytes,
            mem_file_bytes: mem_stats.file_len,
            mem_data_bytes: mem_stats.data_bytes,
            elapsed: started.elapsed(),
        };
        tracing::info!(
            state = %state_path.display(),
            mem = %mem_path.display(),
            state_bytes,
            mem_data_bytes = stats.mem_data_bytes,
            "snapshot written in {:.1} ms",
            stats.elapsed.as_secs_f64() * 1000.0
        );
        Ok(stats)
    }
}

/// Host paths to remove when the VMM ends.
#[derive(Debug, Default)]
struct Cleanup(Vec<std::path::PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn open_kvm() -> Result<(Kvm, VmFd), VmError> {
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
    Ok((kvm, vm))
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

fn serial_out(s: &SerialOutput) -> Result<ConsoleOut, VmError> {
    Ok(match s {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::Serial {
                    path: p.display().to_string(),
                    source,
                })?;
            Box::new(LineWriter::new(f))
        }
    })
}

/// How the guest gets going: a kernel boot or a snapshot's state.
enum Start {
    Boot {
        kernel: boot::LoadedKernel,
        initrd: Option<boot::InitrdConfig>,
    },
    Restore {
        snap: Box<VmSnapshot>,
        path: std::path::PathBuf,
    },
}

/// Builds the VM described by `config` (booting its kernel, or continuing the snapshot it
/// names) and runs it until it ends. `start` is when the VMM process started, for timing.
pub fn run(mut config: VmConfig, start: Instant) -> Result<ExitReason, VmError> {
    config.validate()?;
    let mut cleanup = Cleanup::default();
    let (kvm, vm) = open_kvm()?;
    let vm = Arc::new(vm);
    let base_cpuid = vcpu::supported_cpuid(&kvm)?;

    let (mem, start_kind) = match &config.restore {
        Some(r) => {
            let snap = VmSnapshot::load(&r.state, |vcpus| {
                kvm_state::cpuid_entries(&vcpu::cpuid_for_vcpu(&base_cpuid, 0, vcpus))
            })
            .map_err(snapshot_err)?;
            config.vcpus = snap.vcpus;
            config.mem_mib = snap.mem_mib;
            config.validate()?;
            let regions = memory::ram_regions(config.mem_mib)?;
            let mem = memory_file::map_memory_file(&r.mem, &regions)
                .map_err(|e| snapshot_err(e.into()))?;
            let path = r.state.clone();
            (
                mem,
                Start::Restore {
                    snap: Box::new(snap),
                    path,
                },
            )
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
            (mem, Start::Boot { kernel, initrd })
        }
    };
    register_memory(&vm, &mem)?;

    let epoll = Arc::new(Epoll::new().map_err(host_err("create epoll"))?);
    let exit = Arc::new(ExitSignal::new().map_err(host_err("create exit eventfd"))?);
    epoll
        .ctl(
            ControlOperation::Add,
            exit.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(EXIT_SLOT) << 32),
        )
        .map_err(host_err("watch exit eventfd"))?;
    let times = Arc::new(BootTimes::new(start));

    // Devices, in MMIO order: drives, net, vsock.
    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
    let mut device_kinds = Vec::new();
    let mut drives = Vec::new();
    for d in &config.drives {
        let block = Block::new(BlockConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            id: d.id.clone(),
        })
        .map_err(|e| VmError::Device {
            name: format!("drive {}", d.id),
            message: e.to_string(),
        })?;
        let block = Arc::new(Mutex::new(block));
        drives.push((d.id.clone(), block.clone()));
        devices.push(block);
        device_kinds.push(snapshot::device_kind(TYPE_BLOCK, Some(&d.id)));
    }
    if let Some(n) = &config.net {
        let net = Net::new(NetConfig {
            tap_name: n.tap.clone(),
            mac: n.mac,
        })
        .map_err(|e| VmError::Device {
            name: format!("net {}", n.tap),
            message: e.to_string(),
        })?;
        devices.push(Arc::new(Mutex::new(net)));
        device_kinds.push(snapshot::device_kind(TYPE_NET, None));
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(VsockConfig {
            guest_cid: v.cid,
            uds_path: v.uds.clone(),
        })
        .map_err(|e| VmError::Device {
            name: format!("vsock {}", v.uds.display()),
            message: e.to_string(),
        })?;
        cleanup.0.push(v.uds.clone());
        devices.push(Arc::new(Mutex::new(vsock)));
        device_kinds.push(snapshot::device_kind(TYPE_VSOCK, None));
    }
    if let Start::Restore { snap, path } = &start_kind {
        snap.check_devices(path, &device_kinds)
            .map_err(snapshot_err)?;
    }

    let mut mmio = MmioBus::default();
    let mut decls = Vec::new();
    for (slot, dev) in devices.iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + slot as u32;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(host_err("create irq eventfd"))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(kvm_err("register irqfd"))?;
        let interrupt = Arc::new(Interrupt::new(irq_evt));
        let transport = MmioTransport::new(
            dev.clone(),
            mem.clone(),
            interrupt,
            EventRegistrar::new(epoll.clone(), slot as u32),
        )
        .map_err(|e| VmError::Device {
            name: lock(dev).name(),
            message: e.to_string(),
        })?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(kvm_err("register ioeventfd"))?;
        }
        mmio.add(base, transport);
        decls.push(cmdline::MmioDeclaration { base, irq });
    }
    let mmio = Arc::new(mmio);

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("create serial eventfd"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("register serial irqfd"))?;
    let serial_out = serial_out(&config.serial)?;
    let serial = match &start_kind {
        Start::Restore { snap, path } => {
            SerialConsole::from_snapshot(serial_irq, serial_out, &snap.serial).map_err(
                |detail| {
                    snapshot_err(SnapshotError::Mismatch {
                        path: path.display().to_string(),
                        detail,
                    })
                },
            )?
        }
        Start::Boot { .. } => SerialConsole::new(serial_irq, serial_out),
    };
    let pio = Arc::new(PortIoBus {
        serial: Mutex::new(serial),
        legacy: LegacyPorts::new(exit.clone(), times.clone()),
    });

    let entry = match &start_kind {
        Start::Boot { kernel, initrd } => {
            let line = cmdline::build(&config.cmdline, &decls, cmdline::host_is_pvm())
                .map_err(VmError::Cmdline)?;
            tracing::debug!("kernel command line: {}", line.to_string_lossy());
            boot::configure_system(&mem, kernel, &line, *initrd, config.vcpus)?;
            vcpu::write_boot_tables(&mem, kernel.entry)?;
            Some(kernel.entry)
        }
        Start::Restore { .. } => None,
    };

    vcpu::install_kick_handler().map_err(host_err("install vCPU kick handler"))?;
    let control = Arc::new(VcpuControl::default());
    let mut runners = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
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
            exit: exit.clone(),
            control: control.clone(),
            times: times.clone(),
        });
    }
    if let Start::Restore { snap, path } = &start_kind {
        // The interrupt controllers first: a device's restored interrupt must reach the
        // guest's IOAPIC, not a fresh one the restore then overwrites.
        snap.vm.restore(&vm).map_err(|e| snapshot_err(e.into()))?;
        for (r, state) in runners.iter().zip(&snap.vcpu_states) {
            state.restore(&r.vcpu).map_err(|e| snapshot_err(e.into()))?;
        }
        for ((t, saved), kind) in mmio.transports().zip(&snap.devices).zip(&device_kinds) {
            lock(t).restore(&saved.transport).map_err(|e| {
                snapshot_err(SnapshotError::Mismatch {
                    path: path.display().to_string(),
                    detail: format!("device {kind}: {}", crate::error_chain(&e)),
                })
            })?;
        }
    }

    let handle = Arc::new(VmHandle {
        vm_fd: vm.clone(),
        mem: mem.clone(),
        pio: pio.clone(),
        cpuid: kvm_state::cpuid_entries(&vcpu::cpuid_for_vcpu(&base_cpuid, 0, config.vcpus)),
        device_kinds,
        device_gate: Arc::new(Mutex::new(())),
        snapshot_lock: Mutex::new(()),
        control: control.clone(),
        exit: exit.clone(),
        times: times.clone(),
        mmio: mmio.clone(),
        drives,
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
    });
    if let Some(path) = &config.api_sock {
        let listener = UnixListener::bind(path).map_err(|source| VmError::Api {
            path: path.display().to_string(),
            source,
        })?;
        cleanup.0.push(path.clone());
        let h = handle.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || crate::api::server::serve(listener, h))
            .map_err(host_err("spawn API thread"))?;
    }

    for r in runners {
        let name = format!("vcpu{}", r.id);
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || r.run())
            .map_err(host_err("spawn vCPU thread"))?;
        control.register_thread(t.as_pthread_t());
    }
    tracing::info!(
        vcpus = config.vcpus,
        mem_mib = config.mem_mib,
        devices = devices.len(),
        "microVM {} in {:.1} ms",
        if entry.is_some() {
            "started"
        } else {
            "restored"
        },
        start.elapsed().as_secs_f64() * 1000.0
    );

    let reason = event_loop(&epoll, &exit, &devices, &handle.device_gate);
    control.exit();
    // Keep guest memory mapped until here: vCPU threads may still be inside
    // KVM_RUN until the process exits.
    drop(cleanup);
    std::mem::forget(mem);
    Ok(reason)
}

fn snapshot_err(e: SnapshotError) -> VmError {
    VmError::Snapshot(Box::new(e))
}

/// Dispatches device events until the VM ends.
fn event_loop(
    epoll: &Epoll,
    exit: &ExitSignal,
    devices: &[Arc<Mutex<dyn VirtioDevice>>],
    gate: &Mutex<()>,
) -> ExitReason {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return ExitReason::Fault(format!("epoll wait: {e}")),
        };
        let _gate = lock(gate);
        for ev in &events[..n] {
            let (slot, token) = EventRegistrar::decode(ev.data());
            if slot == EXIT_SLOT {
                if let Some(r) = exit.reason() {
                    return r;
                }
                let _ = exit.eventfd().read();
                continue;
            }
            match devices.get(slot as usize) {
                Some(d) => lock(d).handle_event(token, ev.events()),
                None => tracing::warn!("event for unknown device slot {slot}"),
            }
        }
    }
}
