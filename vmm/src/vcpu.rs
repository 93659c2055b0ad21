//! vCPU setup (CPUID, MSRs, registers, LAPIC) and the per-vCPU run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryPoint;
use crate::bus::{MmioBus, PortIoBus};
use crate::devices::legacy::BootTimes;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::snapshot::kvm_state::{KvmStateError, VcpuState, msrs_to_save};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without it a guest may map all
/// of RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_HTT: u32 = 1 << 28;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {id}: {what}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("write boot page tables or GDT")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Why the vCPUs' state could not be saved for a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Which MSRs to save could not be found out.
    #[error("probe the MSRs to save")]
    Msrs(#[source] Arc<MsrProbeError>),
    /// Not every vCPU is parked.
    #[error("the VM is not paused")]
    NotPaused,
    /// The parked vCPUs did not all answer in time (or the VM is ending).
    #[error("{saved} of {total} vCPUs saved their state in {SAVE_TIMEOUT:?}")]
    Timeout {
        /// vCPUs that saved.
        saved: usize,
        /// vCPUs in the VM.
        total: usize,
    },
    /// One vCPU could not save its state.
    #[error("vCPU {id}")]
    Vcpu {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: VcpuSaveError,
    },
}

/// Why one parked vCPU could not save its state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSaveError {
    /// The MSRs to save could not be found out (the probe runs once per process).
    #[error("find the MSRs to save")]
    Msrs(#[source] Arc<MsrProbeError>),
    /// The run that completes a pending MMIO or port I/O exit failed.
    #[error("KVM_RUN to finish pending I/O")]
    FinishIo(#[source] kvm_ioctls::Error),
    /// The run that completes a pending exit returned another exit.
    #[error("KVM_RUN with immediate_exit returned an exit: {0}")]
    UnexpectedExit(String),
    /// A KVM getter failed.
    #[error(transparent)]
    State(#[from] KvmStateError),
}

/// Why the MSRs a snapshot saves could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum MsrProbeError {
    /// /dev/kvm could not be opened.
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The probe failed.
    #[error(transparent)]
    Probe(#[from] KvmStateError),
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

/// The CPUID KVM supports, adjusted per vCPU below.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VcpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(0, "KVM_GET_SUPPORTED_CPUID"))
}

/// The CPUID vCPU `id` of `count` runs with.
pub fn cpuid_for_vcpu(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // APIC id and logical CPU count per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                if count > 1 {
                    e.edx |= CPUID_HTT;
                }
            }
            // Extended topology: x2APIC id of this vCPU.
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    #[allow(clippy::unwrap_used)] // A fixed list far below the FAM limit.
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ])
    .unwrap()
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long || type_ & 0x8 == 0),
        s: 1,
        l: u8::from(long && type_ & 0x8 != 0),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT (and for 64-bit boot, identity page tables).
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), VcpuError> {
    let code = match entry {
        EntryPoint::Pvh { .. } => 0x00cf_9b00_0000_ffffu64,
        EntryPoint::Linux64 { .. } => 0x00af_9b00_0000_ffffu64,
    };
    let gdt: [u64; 4] = [0, code, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];
    for (i, g) in gdt.iter().enumerate() {
        mem.write_obj(*g, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(VcpuError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(VcpuError::Memory)?;
    if let EntryPoint::Linux64 { .. } = entry {
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
            .map_err(VcpuError::Memory)?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
            .map_err(VcpuError::Memory)?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
                .map_err(VcpuError::Memory)?;
        }
    }
    Ok(())
}

/// Gives vCPU `id` of `count` its CPUID (a restore's first step; MSRs depend on it).
pub fn set_cpuid(vcpu: &VcpuFd, base_cpuid: &CpuId, id: u8, count: u8) -> Result<(), VcpuError> {
    vcpu.set_cpuid2(&cpuid_for_vcpu(base_cpuid, id, count))
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))
}

/// Sets up vCPU `id` of `count` to enter the kernel at `entry`.
pub fn configure(
    vcpu: &VcpuFd,
    base_cpuid: &CpuId,
    id: u8,
    count: u8,
    entry: EntryPoint,
) -> Result<(), VcpuError> {
    set_cpuid(vcpu, base_cpuid, id, count)?;
    vcpu.set_msrs(&boot_msrs())
        .map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let long = matches!(entry, EntryPoint::Linux64 { .. });
    sregs.cs = segment(0x08, 0xb, long);
    let data = segment(0x10, 0x3, long);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        l: 0,
        limit: 0xfffff,
        ..segment(0x18, 0xb, false)
    };
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = PVH_INFO_START;
        }
        EntryPoint::Linux64 { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;

    // LINT0 delivers the legacy PIC (ExtINT), LINT1 NMIs, as on a PC.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Run state shared by the vCPU threads and the control API.
#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    parked: usize,
    /// Bumped for every snapshot; a parked vCPU saves its state once per bump.
    save_generation: u64,
    /// The states saved for the current generation, by vCPU index.
    saved: Vec<(u8, Result<VcpuState, VcpuSaveError>)>,
}

/// How long a snapshot waits for the parked vCPUs to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pauses, resumes and stops the vCPU threads.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<RunState>,
    cv: Condvar,
    exiting: AtomicBool,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; KVM_RUN returns EINTR on delivery.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl VcpuControl {
    /// Records a vCPU thread so it can be kicked.
    pub fn register_thread(&self, t: libc::pthread_t) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
    }

    fn kick_all(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: `t` is a live vCPU thread (they only end with the
            // process), and the signal has a handler installed.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are parked.
    pub fn pause(&self) {
        let n = self.threads.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.paused = true;
        // A kick can land just before a vCPU enters KVM_RUN and be lost, so
        // kick again until every vCPU has parked.
        while st.parked < n && !self.exiting.load(Ordering::SeqCst) {
            drop(st);
            self.kick_all();
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.paused = false;
        self.cv.notify_all();
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).paused
    }

    /// Tells vCPU threads to stop for good.
    pub fn exit(&self) {
        self.exiting.store(true, Ordering::SeqCst);
        self.resume();
        self.kick_all();
    }

    /// Saves the state of every vCPU of a paused VM (each parked vCPU thread saves its own:
    /// a vCPU's ioctls belong to its thread). Results are in vCPU order.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, SaveError> {
        probe_msrs().map_err(SaveError::Msrs)?;
        let n = self.threads.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.paused || st.parked < n {
            return Err(SaveError::NotPaused);
        }
        st.save_generation += 1;
        st.saved.clear();
        self.cv.notify_all();
        let deadline = std::time::Instant::now() + SAVE_TIMEOUT;
        while st.saved.len() < n {
            let now = std::time::Instant::now();
            if now >= deadline || self.exiting.load(Ordering::SeqCst) {
                return Err(SaveError::Timeout {
                    saved: st.saved.len(),
                    total: n,
                });
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut saved = std::mem::take(&mut st.saved);
        saved.sort_by_key(|(id, _)| *id);
        saved
            .into_iter()
            .map(|(id, r)| r.map_err(|source| SaveError::Vcpu { id, source }))
            .collect()
    }

    /// Parks the caller while paused, saving its state with `save` whenever a snapshot asks.
    /// Returns false when exiting.
    fn wait_if_paused(
        &self,
        id: u8,
        save: &mut dyn FnMut() -> Result<VcpuState, VcpuSaveError>,
    ) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.paused {
            st.parked += 1;
            let mut seen = st.save_generation;
            self.cv.notify_all();
            while st.paused && !self.exiting.load(Ordering::SeqCst) {
                if st.save_generation != seen {
                    seen = st.save_generation;
                    drop(st);
                    let state = save();
                    st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.saved.push((id, state));
                    self.cv.notify_all();
                    continue;
                }
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.parked -= 1;
        }
        !self.exiting.load(Ordering::SeqCst)
    }
}

/// What a vCPU thread needs.
pub struct VcpuRunner {
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// Its index.
    pub id: u8,
    /// Port I/O devices.
    pub pio: Arc<PortIoBus>,
    /// MMIO devices.
    pub mmio: Arc<MmioBus>,
    /// Where the end of the VM is reported.
    pub exit: Arc<ExitSignal>,
    /// Pause and exit control.
    pub control: Arc<VcpuControl>,
    /// Boot timing.
    pub times: Arc<BootTimes>,
}

impl VcpuRunner {
    /// Runs the vCPU until the VM ends.
    pub fn run(mut self) {
        loop {
            let vcpu = &mut self.vcpu;
            let mut save = || save_state(vcpu);
            if !self.control.wait_if_paused(self.id, &mut save) {
                return;
            }
            if self.id == 0 {
                self.times.mark_first_vcpu_entry();
            }
            match self.vcpu.run() {
                Ok(exit) => {
                    if let Some(reason) = handle_exit(exit, &self.pio, &self.mmio) {
                        self.exit.trigger(reason);
                        return;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    self.exit
                        .trigger(ExitReason::Fault(format!("vCPU {} KVM_RUN: {e}", self.id)));
                    return;
                }
            }
        }
    }
}

/// The MSRs that round-trip on this host. Probing takes a throwaway VM (~15 ms): only once,
/// and only for a VM that is actually snapshotted, on the thread that asks for the snapshot
/// ([`VcpuControl::save_vcpus`], the control API's), so that vCPUs saving their state under
/// their seccomp filter open nothing.
fn probe_msrs() -> Result<&'static [u32], Arc<MsrProbeError>> {
    static MSRS: std::sync::OnceLock<Result<Vec<u32>, Arc<MsrProbeError>>> =
        std::sync::OnceLock::new();
    MSRS.get_or_init(|| {
        let kvm = Kvm::new().map_err(MsrProbeError::OpenKvm)?;
        Ok(msrs_to_save(&kvm).map_err(MsrProbeError::from)?)
    })
    .as_deref()
    .map_err(Arc::clone)
}

/// Saves a parked vCPU. An exit to user space (MMIO, port I/O) is only complete once KVM_RUN
/// is entered again: one run with immediate_exit set finishes the instruction and returns at
/// once, so the saved registers are past it.
fn save_state(vcpu: &mut VcpuFd) -> Result<VcpuState, VcpuSaveError> {
    let msrs = probe_msrs().map_err(VcpuSaveError::Msrs)?;
    vcpu.set_kvm_immediate_exit(1);
    let finished = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(VcpuSaveError::FinishIo(e)),
        Ok(exit) => Err(VcpuSaveError::UnexpectedExit(format!("{exit:?}"))),
    };
    vcpu.set_kvm_immediate_exit(0);
    finished?;
    Ok(VcpuState::save(vcpu, msrs)?)
}

fn handle_exit(exit: VcpuExit<'_>, pio: &PortIoBus, mmio: &MmioBus) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => pio.read(port, data),
        VcpuExit::IoOut(port, data) => pio.write(port, data),
        VcpuExit::MmioRead(addr, data) => mmio.read(addr, data),
        VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data),
        // A triple fault: a reboot, which ends a microVM.
        VcpuExit::Shutdown => return Some(ExitReason::Reset),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => ExitReason::Panic,
                _ => ExitReason::Reset,
            });
        }
        VcpuExit::Hlt => {}
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(ExitReason::Fault(format!(
                "KVM entry failed on CPU {cpu}: hardware reason {reason:#x}"
            )));
        }
        VcpuExit::InternalError => {
            return Some(ExitReason::Fault("KVM internal error".into()));
        }
        other => tracing::debug!("unhandled vCPU exit {other:?}"),
    }
    None
}
