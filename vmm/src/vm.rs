//! A built VM ([`Vm`], made by [`crate::builder`]) and running it to its end: the vCPU
//! threads, then the device event loop on the calling thread.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use podvisor_common::{error_chain, lock};
use podvisor_vmm_api::config::SeccompLevel;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use crate::device_table::DeviceError;
use crate::exit::{ExitReason, ExitSignal};
use crate::handle::VmHandle;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::SnapshotError;
use crate::vcpu::{self, VcpuRunner};
use crate::virtio::mmio::MmioError;
use crate::virtio::{EventRegistrar, VirtioDevice};
use crate::{boot, memory};

/// The event-loop slot of the exit eventfd (devices use 0..n).
pub const EXIT_SLOT: u32 = u32::MAX;

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VMM's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] podvisor_vmm_api::config::ConfigError),
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
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A device's MMIO transport could not be created.
    #[error("device {name}")]
    Transport {
        /// The device.
        name: String,
        /// What failed.
        #[source]
        source: MmioError,
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

impl From<SnapshotError> for VmError {
    fn from(e: SnapshotError) -> Self {
        Self::Snapshot(Box::new(e))
    }
}

/// A `map_err` for a failed VM-level KVM call.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A `map_err` for a host resource that could not be created.
pub fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

/// Host paths to remove when the VMM ends.
#[derive(Debug, Default)]
pub struct Cleanup(pub Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A VM built and restored (or ready to boot), its vCPUs not yet running.
pub struct Vm {
    /// What the control API reaches.
    pub(crate) handle: Arc<VmHandle>,
    /// One per vCPU.
    pub(crate) runners: Vec<VcpuRunner>,
    /// The device event loop's epoll.
    pub(crate) epoll: Arc<Epoll>,
    /// The virtio devices in MMIO order (event-loop slot = index).
    pub(crate) devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// Host files removed when the VMM ends.
    pub(crate) cleanup: Cleanup,
    /// Guest RAM: mapped until the process exits.
    pub(crate) mem: GuestMemoryMmap,
    /// Continued from a snapshot rather than booted.
    pub(crate) restored: bool,
    /// When the VMM process started.
    pub(crate) start: Instant,
    /// The threads' seccomp filters.
    pub(crate) seccomp: SeccompLevel,
    /// A virtio-fs device serves a shared directory from the event loop.
    pub(crate) serves_share: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("handle", &self.handle)
            .field("devices", &self.devices.len())
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// The handle the control API works through.
    pub fn handle(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// Removes `path` when the VMM ends (a control socket bound for this VM).
    pub fn remove_on_exit(&mut self, path: PathBuf) {
        self.cleanup.0.push(path);
    }

    /// Starts the vCPUs and dispatches device events until the VM ends.
    pub fn run(self) -> Result<ExitReason, VmError> {
        let Self {
            handle,
            runners,
            epoll,
            devices,
            cleanup,
            mem,
            restored,
            start,
            seccomp: level,
            serves_share,
        } = self;
        for r in runners {
            let name = format!("vcpu{}", r.id);
            let exit = handle.exit.clone();
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || match seccomp::install(ThreadKind::Vcpu, level) {
                    Ok(()) => r.run(),
                    Err(e) => exit.trigger(ExitReason::Fault(error_chain(&e))),
                })
                .map_err(host_err("spawn vCPU thread"))?;
            handle.control.register_thread(t.as_pthread_t());
        }
        // Every thread is started: from here the event loop needs no new thread, file or
        // mapping of its own.
        let kind = if serves_share {
            ThreadKind::EventLoopFs
        } else {
            ThreadKind::EventLoop
        };
        seccomp::install(kind, level)?;
        tracing::info!(
            vcpus = handle.vcpus,
            mem_mib = handle.mem_mib,
            devices = devices.len(),
            "microVM {} in {:.1} ms",
            if restored { "restored" } else { "started" },
            start.elapsed().as_secs_f64() * 1000.0
        );
        let reason = event_loop(&epoll, &handle.exit, &devices, &handle.device_gate);
        handle.control.exit();
        // Keep guest memory mapped until here: vCPU threads may still be inside
        // KVM_RUN until the process exits.
        drop(cleanup);
        std::mem::forget(mem);
        Ok(reason)
    }
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
                None => crate::warn_limited!("event for unknown device slot {slot}"),
            }
        }
    }
}
