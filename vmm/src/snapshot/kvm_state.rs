//! Capture and restore of the state KVM keeps for a VM and its vCPUs.
//!
//! KVM's setters check what they are given against state set before them, so a restore must
//! go in an order the kernel accepts:
//!
//! 1. KVM_SET_CPUID2 (the caller, before [`VcpuState::restore`]): CR4 bits, XCR0 and many
//!    MSRs are refused unless the guest's CPUID has the feature.
//! 2. KVM_SET_SREGS: control registers, EFER and the APIC base.
//! 3. KVM_SET_REGS: after sregs; it also drops any pending exception, which step 8 restores.
//! 4. KVM_SET_FPU, then KVM_SET_XCRS and KVM_SET_XSAVE when saved.
//! 5. KVM_SET_DEBUGREGS.
//! 6. KVM_SET_LAPIC: after sregs, whose APIC base selects how the LAPIC registers are read.
//! 7. KVM_SET_MSRS: after CPUID, and after the LAPIC: KVM drops a TSC-deadline write while the
//!    LAPIC timer is not in TSC-deadline mode.
//! 8. KVM_SET_VCPU_EVENTS, then KVM_SET_MP_STATE: last, so nothing set later clears the
//!    pending exceptions, interrupts, NMIs and the run state they carry.
//!
//! A save reads KVM_GET_MP_STATE first (it makes the LAPIC accept a pending INIT/SIPI, which
//! changes what the other getters return) and KVM_GET_VCPU_EVENTS last (it folds pending NMIs
//! and SMIs into what it returns).

use std::sync::OnceLock;

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_APICBASE: u32 = 0x1b;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
/// KVM emulates 8 variable-range MTRRs: base/mask pairs 0x200..=0x20f.
const MSR_MTRR_PHYS_MASK7: u32 = 0x20f;
const MSR_MTRR_FIX64K_00000: u32 = 0x250;
const MSR_MTRR_FIX16K_80000: u32 = 0x258;
const MSR_MTRR_FIX16K_A0000: u32 = 0x259;
const MSR_MTRR_FIX4K_C0000: u32 = 0x268;
const MSR_MTRR_FIX4K_F8000: u32 = 0x26f;
const MSR_IA32_CR_PAT: u32 = 0x277;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// MSRs saved besides KVM_GET_MSR_INDEX_LIST, which leaves out the MTRRs and the segment
/// bases. The paravirtual ones (steal time, async PF, PV EOI, poll control) are saved when
/// KVM lists them: it lists what it implements. The rest are here too so that a host whose
/// list lacks them still saves what its vCPUs accept.
const EXTRA_MSRS: &[u32] = &[
    MSR_IA32_TSC,
    MSR_IA32_APICBASE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_CR_PAT,
    MSR_MTRR_DEF_TYPE,
    MSR_MTRR_FIX64K_00000,
    MSR_MTRR_FIX16K_80000,
    MSR_MTRR_FIX16K_A0000,
    MSR_IA32_TSC_DEADLINE,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME_NEW,
];

/// MSRs per KVM_GET_MSRS/KVM_SET_MSRS call: KVM refuses 256 or more at once.
const MSR_BATCH: usize = 128;
/// A bound on the MSRs a state may carry (KVM lists around a hundred).
pub const MAX_SAVED_MSRS: usize = 1024;

/// Why KVM state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// An ioctl failed.
    #[error("{ioctl}")]
    Ioctl {
        /// The ioctl.
        ioctl: &'static str,
        /// Its errno.
        #[source]
        error: kvm_ioctls::Error,
    },
    /// KVM_GET_MSRS or KVM_SET_MSRS stopped at an MSR.
    #[error("{ioctl} handled {done} of {total} MSRs: MSR {index:#x} refused")]
    MsrRefused {
        /// The ioctl.
        ioctl: &'static str,
        /// The first MSR it did not handle.
        index: u32,
        /// MSRs handled before it.
        done: usize,
        /// MSRs given.
        total: usize,
    },
    /// More MSRs than a state may hold.
    #[error("{count} MSRs, more than {MAX_SAVED_MSRS}")]
    TooManyMsrs {
        /// MSRs given.
        count: usize,
    },
    /// The state holds something this host's KVM cannot restore.
    #[error("the state has {what}, KVM on this host lacks {cap}")]
    MissingCap {
        /// The state part.
        what: &'static str,
        /// The capability.
        cap: &'static str,
    },
    /// The vCPU's XSAVE area does not fit KVM_GET_XSAVE/KVM_SET_XSAVE.
    #[error("the XSAVE area here is {size} bytes, more than the {max} of KVM_GET_XSAVE")]
    XsaveTooLarge {
        /// KVM_CAP_XSAVE2's size.
        size: usize,
        /// `size_of::<kvm_xsave>()`.
        max: usize,
    },
    /// An irqchip state is for another chip than its place in the state.
    #[error("{field} holds irqchip {found}, expected {expected}")]
    WrongChip {
        /// The field of [`VmState`].
        field: &'static str,
        /// Its chip_id.
        found: u32,
        /// The chip it must be.
        expected: u32,
    },
}

fn ioctl_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |error| KvmStateError::Ioctl { ioctl, error }
}

/// One MSR's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// One CPUID leaf as KVM_SET_CPUID2 takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX on input.
    pub function: u32,
    /// ECX on input (the subleaf).
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// The leaves of `cpuid`, for a state file.
pub fn cpuid_entries(cpuid: &CpuId) -> Vec<CpuidEntry> {
    cpuid
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// A vCPU's XSAVE area (KVM_GET_XSAVE's 4 KiB). kvm_xsave is not `Clone`; this is.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct XsaveArea(pub kvm_xsave);

impl Clone for XsaveArea {
    fn clone(&self) -> Self {
        Self(kvm_xsave {
            region: self.0.region,
            ..Default::default()
        })
    }
}

impl std::fmt::Debug for XsaveArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // 4 KiB of registers help no log; the header words say which components are live.
        // XSTATE_BV: bytes 512..520 of the area.
        let xstate_bv = u64::from(self.0.region[128]) | (u64::from(self.0.region[129]) << 32);
        f.debug_struct("XsaveArea")
            .field("xstate_bv", &format_args!("{xstate_bv:#x}"))
            .finish_non_exhaustive()
    }
}

/// Everything KVM holds for one vCPU (its CPUID apart: the caller sets that).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87 and SSE state (kvm-bindings has no serde for it: see `fpu_serde`).
    #[serde(with = "fpu_serde")]
    pub fpu: kvm_fpu,
    /// DR0-3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending and injected exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// XCR0; when KVM has KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// Extended FPU state (AVX...); when KVM has KVM_CAP_XSAVE.
    pub xsave: Option<XsaveArea>,
    /// The MSRs [`msrs_to_save`] chose, in that order.
    pub msrs: Vec<MsrValue>,
}

/// What the host's KVM offers for extended FPU state. Host-wide, so read once.
#[derive(Debug, Clone, Copy)]
struct XstateCaps {
    xsave: bool,
    xcrs: bool,
    /// KVM_CAP_XSAVE2: the XSAVE area size KVM_GET/SET_XSAVE would copy (0: the legacy 4 KiB).
    xsave_size: usize,
}

static XSTATE_CAPS: OnceLock<XstateCaps> = OnceLock::new();

fn caps_of(kvm: &Kvm) -> XstateCaps {
    XstateCaps {
        xsave: kvm.check_extension(Cap::Xsave),
        xcrs: kvm.check_extension(Cap::Xcrs),
        xsave_size: usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
    }
}

/// Reads the host's extended-state capabilities from the VMM's own KVM handle. The builder
/// calls it, so that a vCPU saving its state later (under its seccomp filter) opens nothing.
pub fn read_host_caps(kvm: &Kvm) {
    XSTATE_CAPS.get_or_init(|| caps_of(kvm));
}

fn xstate_caps() -> Result<XstateCaps, KvmStateError> {
    if let Some(caps) = XSTATE_CAPS.get() {
        return Ok(*caps);
    }
    let kvm = Kvm::new().map_err(ioctl_err("open /dev/kvm"))?;
    Ok(*XSTATE_CAPS.get_or_init(|| caps_of(&kvm)))
}

impl XstateCaps {
    /// KVM_SET_XSAVE copies the vCPU's XSAVE size from user memory, which may exceed
    /// `kvm_xsave` once a process enables dynamic features (AMX); this VMM does not, and this
    /// check keeps it that way.
    fn check_xsave_fits(&self) -> Result<(), KvmStateError> {
        let max = std::mem::size_of::<kvm_xsave>();
        if self.xsave_size > max {
            return Err(KvmStateError::XsaveTooLarge {
                size: self.xsave_size,
                max,
            });
        }
        Ok(())
    }
}

impl VcpuState {
    /// The vCPU must be out of KVM_RUN (paused) and must have completed any pending MMIO/PIO
    /// (the caller runs KVM_RUN once with immediate_exit set before this).
    pub fn save(vcpu: &VcpuFd, msr_indexes: &[u32]) -> Result<Self, KvmStateError> {
        let caps = xstate_caps()?;
        let mp_state = vcpu.get_mp_state().map_err(ioctl_err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))?;
        let xcrs = if caps.xcrs {
            Some(vcpu.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let xsave = if caps.xsave {
            caps.check_xsave_fits()?;
            Some(XsaveArea(
                vcpu.get_xsave().map_err(ioctl_err("KVM_GET_XSAVE"))?,
            ))
        } else {
            None
        };
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(ioctl_err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        let msrs = get_msrs(vcpu, msr_indexes)?;
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            regs,
            sregs,
            fpu,
            debugregs,
            lapic,
            mp_state,
            vcpu_events,
            xcrs,
            xsave,
            msrs,
        })
    }

    /// On a fresh vCPU whose CPUID the caller already set (KVM_SET_CPUID2 first), of a VM
    /// whose guest memory is already registered (the kvmclock, steal-time and async-PF MSRs
    /// point into it). The order is the module's.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), KvmStateError> {
        let caps = xstate_caps()?;
        if self.msrs.len() > MAX_SAVED_MSRS {
            return Err(KvmStateError::TooManyMsrs {
                count: self.msrs.len(),
            });
        }
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs)
            .map_err(ioctl_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(ioctl_err("KVM_SET_FPU"))?;
        if let Some(xcrs) = &self.xcrs {
            if !caps.xcrs {
                return Err(KvmStateError::MissingCap {
                    what: "XCRs",
                    cap: "KVM_CAP_XCRS",
                });
            }
            vcpu.set_xcrs(xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
        }
        if let Some(xsave) = &self.xsave {
            if !caps.xsave {
                return Err(KvmStateError::MissingCap {
                    what: "an XSAVE area",
                    cap: "KVM_CAP_XSAVE",
                });
            }
            caps.check_xsave_fits()?;
            // SAFETY: KVM reads the vCPU's XSAVE size from the pointer, and check_xsave_fits
            // just confirmed that size is at most size_of::<kvm_xsave>(), all of which `xsave`
            // owns.
            unsafe { vcpu.set_xsave(&xsave.0) }.map_err(ioctl_err("KVM_SET_XSAVE"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(ioctl_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(ioctl_err("KVM_SET_LAPIC"))?;
        set_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

fn msr_batch(entries: &[kvm_msr_entry]) -> Result<Msrs, KvmStateError> {
    // Batches are at most MSR_BATCH, below the FAM limit; this stays an error, not a panic.
    Msrs::from_entries(entries).map_err(|_| KvmStateError::TooManyMsrs {
        count: entries.len(),
    })
}

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Reads `indexes`; every one must be readable.
fn get_msrs(vcpu: &VcpuFd, indexes: &[u32]) -> Result<Vec<MsrValue>, KvmStateError> {
    if indexes.len() > MAX_SAVED_MSRS {
        return Err(KvmStateError::TooManyMsrs {
            count: indexes.len(),
        });
    }
    let mut out = Vec::with_capacity(indexes.len());
    for batch in indexes.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch.iter().map(|&i| entry(i, 0)).collect();
        let mut msrs = msr_batch(&entries)?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(ioctl_err("KVM_GET_MSRS"))?;
        if n < batch.len() {
            return Err(KvmStateError::MsrRefused {
                ioctl: "KVM_GET_MSRS",
                index: batch[n],
                done: out.len() + n,
                total: indexes.len(),
            });
        }
        out.extend(msrs.as_slice().iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
    }
    Ok(out)
}

/// Writes `values` in order; every one must be accepted.
fn set_msrs(vcpu: &VcpuFd, values: &[MsrValue]) -> Result<(), KvmStateError> {
    let mut done = 0;
    for batch in values.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch.iter().map(|m| entry(m.index, m.data)).collect();
        let n = vcpu
            .set_msrs(&msr_batch(&entries)?)
            .map_err(ioctl_err("KVM_SET_MSRS"))?;
        if n < batch.len() {
            return Err(KvmStateError::MsrRefused {
                ioctl: "KVM_SET_MSRS",
                index: batch[n].index,
                done: done + n,
                total: values.len(),
            });
        }
        done += n;
    }
    Ok(())
}

/// The MSRs worth saving: KVM_GET_MSR_INDEX_LIST (Kvm::get_msr_index_list) filtered to those a
/// fresh vCPU of this host can actually read (probe on a throwaway VM+vCPU, or read in one
/// get_msrs call and keep the prefix that succeeded, retrying past the failing one).
///
/// Also added: the MTRRs, the segment bases and the other MSRs a Linux guest sets that the
/// list may lack. An MSR is kept only if the probe vCPU both reads it and takes the value
/// back, since [`VcpuState::restore`] writes every saved MSR. Takes a few milliseconds (a VM
/// and a vCPU are created): call it once per process.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates: Vec<u32> = listed.as_slice().to_vec();
    let mtrrs = (MSR_MTRR_PHYS_BASE0..=MSR_MTRR_PHYS_MASK7)
        .chain(MSR_MTRR_FIX4K_C0000..=MSR_MTRR_FIX4K_F8000);
    for index in EXTRA_MSRS.iter().copied().chain(mtrrs) {
        if !candidates.contains(&index) {
            candidates.push(index);
        }
    }
    if candidates.len() > MAX_SAVED_MSRS {
        return Err(KvmStateError::TooManyMsrs {
            count: candidates.len(),
        });
    }

    // The probe vCPU is set up like a real one where it matters to MSRs: an in-kernel LAPIC
    // (TSC_DEADLINE, APIC base) and the host's CPUID (KVM refuses MSRs of features the
    // guest's CPUID lacks).
    let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
    vm.create_irq_chip()
        .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
    let vcpu = vm.create_vcpu(0).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(ioctl_err("KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = candidates.iter().map(|&i| entry(i, 0)).collect();
    let readable = probe_msrs(&entries, "KVM_GET_MSRS", |msrs| vcpu.get_msrs(msrs))?;
    let writable = probe_msrs(&readable, "KVM_SET_MSRS", |msrs| vcpu.set_msrs(msrs))?;
    let kept: Vec<u32> = writable.iter().map(|e| e.index).collect();
    tracing::debug!(
        listed = listed.as_slice().len(),
        saved = kept.len(),
        "MSRs to save"
    );
    Ok(kept)
}

/// Runs `op` (KVM_GET_MSRS or KVM_SET_MSRS) over `entries` in batches. KVM stops at the first
/// MSR it refuses and returns how many it handled: keep those, drop the refused one, go on
/// after it. Returns the entries kept, as `op` left them (read values for KVM_GET_MSRS).
fn probe_msrs(
    entries: &[kvm_msr_entry],
    ioctl: &'static str,
    mut op: impl FnMut(&mut Msrs) -> Result<usize, kvm_ioctls::Error>,
) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut kept = Vec::with_capacity(entries.len());
    let mut rest = entries;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let mut msrs = msr_batch(batch)?;
        let n = op(&mut msrs).map_err(ioctl_err(ioctl))?.min(batch.len());
        kept.extend_from_slice(&msrs.as_slice()[..n]);
        if n < batch.len() {
            tracing::debug!("{ioctl} refuses MSR {:#x}: not saved", batch[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(kept)
}

/// The VM-wide state KVM emulates: the interrupt controllers, the PIT and the kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock at the save.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip is a union without Debug; the PIT and the clock say enough.
        f.debug_struct("VmState")
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

const CHIPS: [(&str, u32); 3] = [
    ("pic_master", KVM_IRQCHIP_PIC_MASTER),
    ("pic_slave", KVM_IRQCHIP_PIC_SLAVE),
    ("ioapic", KVM_IRQCHIP_IOAPIC),
];

impl VmState {
    /// Reads the VM's state; its vCPUs must be paused.
    pub fn save(vm: &VmFd) -> Result<Self, KvmStateError> {
        let chip = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
            Ok::<_, KvmStateError>(c)
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Sets the state into a VM created like the saved one (irqchip and PIT created).
    ///
    /// The interrupt controllers go first, so the PIT's first tick lands in them. The clock is
    /// set to the saved value with no flags: KVM_SET_CLOCK refuses flags it does not know, and
    /// KVM_CLOCK_REALTIME would advance the clock by the time the snapshot sat on disk. The
    /// guest's clocks go on from where they stopped.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        let chips = [&self.pic_master, &self.pic_slave, &self.ioapic];
        for ((field, expected), chip) in CHIPS.into_iter().zip(chips) {
            if chip.chip_id != expected {
                return Err(KvmStateError::WrongChip {
                    field,
                    found: chip.chip_id,
                    expected,
                });
            }
        }
        for chip in chips {
            vm.set_irqchip(chip).map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(ioctl_err("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

/// serde for kvm_fpu, which kvm-bindings leaves out of its serde impls. Its fields by name,
/// without the padding.
mod fpu_serde {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Fpu {
        fpr: [[u8; 16]; 8],
        fcw: u16,
        fsw: u16,
        ftwx: u8,
        last_opcode: u16,
        last_ip: u64,
        last_dp: u64,
        xmm: [[u8; 16]; 16],
        mxcsr: u32,
    }

    pub fn serialize<S: Serializer>(fpu: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        Fpu {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let f = Fpu::deserialize(d)?;
        Ok(kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests;
