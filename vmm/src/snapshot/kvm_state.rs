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
    #[error("{ioctl}: {error}")]
    Ioctl {
        /// The ioctl.
        ioctl: &'static str,
        /// Its errno.
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

fn xstate_caps() -> Result<XstateCaps, KvmStateError> {
    static CAPS: OnceLock<XstateCaps> = OnceLock::new();
    if let Some(caps) = CAPS.get() {
        return Ok(*caps);
    }
    let kvm = Kvm::new().map_err(ioctl_err("open /dev/kvm"))?;
    let caps = XstateCaps {
        xsave: kvm.check_extension(Cap::Xsave),
        xcrs: kvm.check_extension(Cap::Xcrs),
        xsave_size: usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
    };
    Ok(*CAPS.get_or_init(|| caps))
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
mod tests {
    use kvm_bindings::{
        KVM_MP_STATE_HALTED, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_segment,
        kvm_userspace_memory_region,
    };
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    /// A VM set up as vm.rs does it, with 2 MiB of RAM at 0 for the MSRs that point into it.
    /// Field order: the VM goes before the memory it maps.
    struct TestVm {
        vm: VmFd,
        _mem: GuestMemoryMmap,
    }

    fn test_vm(kvm: &Kvm) -> TestVm {
        let vm = kvm.create_vm().unwrap();
        let _ = vm.set_tss_address(0xfffb_d000);
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        let size = 2 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `mem` maps `size` bytes at `host` and outlives the VM (TestVm's field order).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        TestVm { vm, _mem: mem }
    }

    fn test_vcpu(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        vcpu
    }

    fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
        let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            l.regs[off + i] = b as std::os::raw::c_char;
        }
    }

    const APIC_TPR: usize = 0x80;
    const APIC_LDR: usize = 0xd0;
    const APIC_SPIV: usize = 0xf0;
    const APIC_LVTT: usize = 0x320;
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_LVTERR: usize = 0x370;
    const APIC_TMCCT: usize = 0x390;
    /// Masked, TSC-deadline mode, vector 0xec.
    const LVTT_DEADLINE_MASKED: u32 = (2 << 17) | (1 << 16) | 0xec;

    const TSC: u64 = 0x10_0000_0000;
    /// (MSR, value) set on the source vCPU, all distinct from a fresh vCPU's.
    const DISTINCT_MSRS: &[(u32, u64)] = &[
        (MSR_STAR, 0x0023_0010_0000_0000),
        (MSR_LSTAR, 0xffff_ffff_8180_0000),
        (MSR_CSTAR, 0xffff_ffff_8180_1000),
        (MSR_SYSCALL_MASK, 0x4_7700),
        (MSR_KERNEL_GS_BASE, 0xffff_8880_0abc_0000),
        (MSR_IA32_SYSENTER_EIP, 0xffff_ffff_8180_2000),
        (MSR_IA32_CR_PAT, 0x0007_0106_0007_0106),
        (MSR_MTRR_DEF_TYPE, 0xc06),
        (MSR_MTRR_FIX64K_00000, 0x0606_0606_0606_0606),
        (MSR_IA32_MISC_ENABLE, 0x1801),
        (MSR_IA32_TSC, TSC),
        // Kept only while the LAPIC timer is in deadline mode: restore must set the LAPIC first.
        (MSR_IA32_TSC_DEADLINE, 1 << 62),
        (MSR_KVM_SYSTEM_TIME_NEW, 0x1000 | 1),
        (MSR_KVM_WALL_CLOCK_NEW, 0x2000),
    ];

    fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
        kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: u8::from(!long),
            s: 1,
            l: u8::from(long),
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }

    /// Puts the vCPU in 64-bit mode with distinctive registers everywhere.
    fn make_distinct(vcpu: &VcpuFd) {
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs = segment(0x10, 0xb, true);
        let data = segment(0x18, 0x3, false);
        (sregs.ds, sregs.es, sregs.ss) = (data, data, data);
        sregs.fs = kvm_segment {
            base: 0x7f00_1234_5000,
            ..data
        };
        sregs.gs = kvm_segment {
            base: 0xffff_8880_1234_0000,
            ..data
        };
        sregs.tr = kvm_segment {
            base: 0xffff_fe00_0000_3000,
            limit: 0x67,
            selector: 0x20,
            s: 0,
            db: 0,
            g: 0,
            ..segment(0x20, 0xb, false)
        };
        sregs.gdt.base = 0xffff_fe00_0000_1000;
        sregs.gdt.limit = 0x7f;
        sregs.idt.base = 0xffff_fe00_0000_0000;
        sregs.idt.limit = 0xfff;
        sregs.cr0 = 0x8005_0033; // PG AM WP NE ET MP PE
        sregs.cr2 = 0xdead_b000;
        sregs.cr3 = 0x10_3000;
        sregs.cr4 = 0x6a0; // OSXMMEXCPT OSFXSR PGE PAE
        sregs.efer = 0xd01; // NXE LMA LME SCE
        vcpu.set_sregs(&sregs).unwrap();

        let regs = kvm_regs {
            rax: 0x1111_1111_1111_1111,
            rbx: 0x2222_2222_2222_2222,
            rcx: 0x3333,
            rdx: 0x4444,
            rsi: 0x5555,
            rdi: 0x6666,
            rsp: 0xffff_c900_0000_7ff0,
            rbp: 0xffff_c900_0000_7ff8,
            r8: 8,
            r9: 9,
            r10: 10,
            r11: 11,
            r12: 12,
            r13: 13,
            r14: 14,
            r15: 15,
            rip: 0xffff_ffff_8100_0abc,
            rflags: 0x246,
        };
        vcpu.set_regs(&regs).unwrap();

        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.fcw = 0x27f;
        fpu.xmm[3] = [0x3c; 16];
        fpu.xmm[15] = *b"podvisor-xmm15!!";
        vcpu.set_fpu(&fpu).unwrap();

        let mut dbg = vcpu.get_debug_regs().unwrap();
        dbg.db = [0x1000, 0x2000, 0x3000, 0x4000];
        dbg.dr7 = 0x401;
        vcpu.set_debug_regs(&dbg).unwrap();

        let mut lapic = vcpu.get_lapic().unwrap();
        set_lapic_reg(&mut lapic, APIC_TPR, 0x20);
        set_lapic_reg(&mut lapic, APIC_LDR, 0x0200_0000);
        set_lapic_reg(&mut lapic, APIC_SPIV, 0x1ff);
        set_lapic_reg(&mut lapic, APIC_LVTT, LVTT_DEADLINE_MASKED);
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x700);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x400);
        set_lapic_reg(&mut lapic, APIC_LVTERR, 0xfe);
        vcpu.set_lapic(&lapic).unwrap();

        let entries: Vec<kvm_msr_entry> = DISTINCT_MSRS.iter().map(|&(i, d)| entry(i, d)).collect();
        let n = vcpu
            .set_msrs(&Msrs::from_entries(&entries).unwrap())
            .unwrap();
        assert_eq!(n, entries.len(), "MSR {:#x} refused", entries[n].index);

        let mut events = vcpu.get_vcpu_events().unwrap();
        events.nmi.masked = 1;
        vcpu.set_vcpu_events(&events).unwrap();
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        })
        .unwrap();
    }

    fn msr(state: &VcpuState, index: u32) -> u64 {
        state
            .msrs
            .iter()
            .find(|m| m.index == index)
            .unwrap_or_else(|| panic!("MSR {index:#x} not saved"))
            .data
    }

    fn json_round_trip<T: Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
        serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
    }

    #[test]
    fn msrs_to_save_has_what_a_linux_guest_needs() {
        let kvm = Kvm::new().unwrap();
        let started = std::time::Instant::now();
        let msrs = msrs_to_save(&kvm).unwrap();
        println!(
            "{} MSRs to save, found in {:?}: {msrs:x?}",
            msrs.len(),
            started.elapsed()
        );
        for needed in [
            MSR_IA32_TSC,
            MSR_IA32_TSC_DEADLINE,
            MSR_IA32_APICBASE,
            MSR_IA32_CR_PAT,
            MSR_IA32_MISC_ENABLE,
            MSR_MTRR_DEF_TYPE,
            MSR_MTRR_PHYS_BASE0,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_FS_BASE,
            MSR_GS_BASE,
            MSR_KVM_SYSTEM_TIME_NEW,
            MSR_KVM_WALL_CLOCK_NEW,
        ] {
            assert!(msrs.contains(&needed), "MSR {needed:#x} missing");
        }
        let listed = kvm.get_msr_index_list().unwrap();
        for pv in [0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04] {
            if listed.as_slice().contains(&pv) {
                assert!(msrs.contains(&pv), "listed PV MSR {pv:#x} dropped");
            }
        }
        // Read-only MSRs (MTRRcap) would fail every restore.
        assert!(!msrs.contains(&0xfe));
        let mut unique = msrs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), msrs.len(), "duplicates");
    }

    #[test]
    fn vcpu_state_survives_json_and_a_new_vm() {
        let kvm = Kvm::new().unwrap();
        let msrs = msrs_to_save(&kvm).unwrap();
        let a = test_vm(&kvm);
        let vcpu_a = test_vcpu(&kvm, &a.vm);
        make_distinct(&vcpu_a);
        let saved = VcpuState::save(&vcpu_a, &msrs).unwrap();
        for &(index, data) in DISTINCT_MSRS {
            if index != MSR_IA32_TSC {
                assert_eq!(msr(&saved, index), data, "MSR {index:#x}");
            }
        }
        assert_eq!(saved.regs.rip, 0xffff_ffff_8100_0abc);
        assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_HALTED);
        assert_eq!(saved.msrs.len(), msrs.len());
        let json = serde_json::to_string(&saved).unwrap();
        println!(
            "vCPU state: {} bytes of JSON, xsave {}, xcrs {}",
            json.len(),
            saved.xsave.is_some(),
            saved.xcrs.is_some()
        );
        let loaded: VcpuState = serde_json::from_str(&json).unwrap();

        let b = test_vm(&kvm);
        let vcpu_b = test_vcpu(&kvm, &b.vm);
        loaded.restore(&vcpu_b).unwrap();
        let back = VcpuState::save(&vcpu_b, &msrs).unwrap();

        assert_eq!(back.regs, saved.regs);
        assert_eq!(back.sregs, saved.sregs);
        assert_eq!(back.fpu, saved.fpu);
        assert_eq!(back.debugregs, saved.debugregs);
        assert_eq!(back.mp_state, saved.mp_state);
        assert_eq!(back.vcpu_events, saved.vcpu_events);
        assert_eq!(back.xcrs, saved.xcrs);
        assert_eq!(
            back.xsave.as_ref().map(|x| x.0.region.to_vec()),
            saved.xsave.as_ref().map(|x| x.0.region.to_vec())
        );
        // The LAPIC, but its timer's current count, which runs.
        let (mut l1, mut l2) = (saved.lapic, back.lapic);
        set_lapic_reg(&mut l1, APIC_TMCCT, 0);
        set_lapic_reg(&mut l2, APIC_TMCCT, 0);
        assert_eq!(l1, l2);
        assert_eq!(lapic_reg(&back.lapic, APIC_LVTT), LVTT_DEADLINE_MASKED);
        // The MSRs, but the TSC, which runs on from the saved value.
        let khz = u64::from(vcpu_b.get_tsc_khz().unwrap_or(10_000_000));
        for (s, b) in saved.msrs.iter().zip(&back.msrs) {
            assert_eq!(s.index, b.index);
            if s.index == MSR_IA32_TSC {
                assert!(
                    b.data >= s.data && b.data - s.data < khz * 1000 * 10,
                    "TSC {:#x} restored as {:#x}",
                    s.data,
                    b.data
                );
            } else {
                assert_eq!(s.data, b.data, "MSR {:#x}", s.index);
            }
        }
    }

    #[test]
    fn state_without_xsave_restores() {
        // As on a host without KVM_CAP_XSAVE/KVM_CAP_XCRS: the FPU comes from KVM_SET_FPU.
        let kvm = Kvm::new().unwrap();
        let msrs = msrs_to_save(&kvm).unwrap();
        let a = test_vm(&kvm);
        let vcpu_a = test_vcpu(&kvm, &a.vm);
        make_distinct(&vcpu_a);
        let mut saved = VcpuState::save(&vcpu_a, &msrs).unwrap();
        saved.xsave = None;
        saved.xcrs = None;
        let b = test_vm(&kvm);
        let vcpu_b = test_vcpu(&kvm, &b.vm);
        json_round_trip(&saved).restore(&vcpu_b).unwrap();
        let back = VcpuState::save(&vcpu_b, &msrs).unwrap();
        assert_eq!(back.fpu, saved.fpu);
        assert_eq!(back.regs, saved.regs);
    }

    #[test]
    fn refused_msr_is_named() {
        let kvm = Kvm::new().unwrap();
        let a = test_vm(&kvm);
        let vcpu = test_vcpu(&kvm, &a.vm);
        let mut state = VcpuState::save(&vcpu, &[MSR_STAR, MSR_LSTAR]).unwrap();
        state.msrs.insert(
            1,
            MsrValue {
                index: 0xdead_beef,
                data: 1,
            },
        );
        let b = test_vm(&kvm);
        let e = state.restore(&test_vcpu(&kvm, &b.vm)).unwrap_err();
        assert!(
            matches!(
                e,
                KvmStateError::MsrRefused {
                    ioctl: "KVM_SET_MSRS",
                    index: 0xdead_beef,
                    done: 1,
                    total: 3
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("0xdeadbeef"), "{e}");

        let e = VcpuState::save(&vcpu, &[MSR_STAR, 0xdead_beef]).unwrap_err();
        assert!(
            matches!(
                e,
                KvmStateError::MsrRefused {
                    ioctl: "KVM_GET_MSRS",
                    index: 0xdead_beef,
                    ..
                }
            ),
            "{e}"
        );
    }

    fn pit_without_load_times(mut p: kvm_pit_state2) -> kvm_pit_state2 {
        // When a count was loaded: host time, set anew by every KVM_SET_PIT2.
        for c in &mut p.channels {
            c.count_load_time = 0;
        }
        p
    }

    #[test]
    fn vm_state_survives_json_and_a_new_vm() {
        let kvm = Kvm::new().unwrap();
        let a = test_vm(&kvm);
        let mut state = VmState::save(&a.vm).unwrap();
        state.pic_master.chip.pic.irq_base = 0x20;
        state.pic_master.chip.pic.imr = 0xfa;
        state.pic_master.chip.pic.elcr = 0x08;
        state.pic_slave.chip.pic.irq_base = 0x28;
        state.pic_slave.chip.pic.imr = 0x3f;
        // SAFETY: chip 2 is the IOAPIC, so `ioapic` is the union member KVM filled (and
        // every byte of the union is initialized: it started zeroed).
        let redirtbl = unsafe { &mut state.ioapic.chip.ioapic.redirtbl };
        redirtbl[4].bits = 0x24 | (1 << 16);
        redirtbl[9].bits = (3u64 << 56) | (1 << 15) | 0x29;
        // Channel 0 in mode 4 runs no timer, so no tick changes the PIC under the test.
        state.pit.channels[0].mode = 4;
        state.pit.channels[0].count = 0x1234;
        state.pit.channels[2].mode = 3;
        state.pit.channels[2].count = 0x0533;
        state.restore(&a.vm).unwrap();
        a.vm.set_clock(&kvm_clock_data {
            clock: 1_000_000_000_000,
            ..Default::default()
        })
        .unwrap();
        let saved = VmState::save(&a.vm).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        println!("VM state: {} bytes of JSON", json.len());
        let loaded: VmState = serde_json::from_str(&json).unwrap();

        let b = test_vm(&kvm);
        loaded.restore(&b.vm).unwrap();
        let back = VmState::save(&b.vm).unwrap();
        for (x, y) in [
            (&saved.pic_master, &back.pic_master),
            (&saved.pic_slave, &back.pic_slave),
            (&saved.ioapic, &back.ioapic),
        ] {
            assert_eq!(
                serde_json::to_value(x).unwrap(),
                serde_json::to_value(y).unwrap(),
                "irqchip {}",
                x.chip_id
            );
        }
        assert_ne!(
            serde_json::to_value(back.pic_master).unwrap(),
            serde_json::to_value(VmState::save(&test_vm(&kvm).vm).unwrap().pic_master).unwrap(),
            "the test set nothing a fresh PIC lacks"
        );
        assert_eq!(
            pit_without_load_times(back.pit),
            pit_without_load_times(saved.pit)
        );
        assert_eq!(back.pit.channels[0].count, 0x1234);
        // The clock goes on from the saved value: not back, not by wall time.
        assert!(
            back.clock.clock >= saved.clock.clock
                && back.clock.clock - saved.clock.clock < 5_000_000_000,
            "clock {} restored as {}",
            saved.clock.clock,
            back.clock.clock
        );
    }

    #[test]
    fn vm_state_with_swapped_chips_is_refused() {
        let kvm = Kvm::new().unwrap();
        let a = test_vm(&kvm);
        let mut state = VmState::save(&a.vm).unwrap();
        std::mem::swap(&mut state.pic_master, &mut state.ioapic);
        let e = state.restore(&a.vm).unwrap_err();
        assert!(
            matches!(
                e,
                KvmStateError::WrongChip {
                    field: "pic_master",
                    found: KVM_IRQCHIP_IOAPIC,
                    expected: KVM_IRQCHIP_PIC_MASTER
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn cpuid_entries_keep_every_leaf() {
        let kvm = Kvm::new().unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let entries = cpuid_entries(&cpuid);
        assert_eq!(entries.len(), cpuid.as_slice().len());
        let leaf0 = entries.iter().find(|e| e.function == 0).unwrap();
        // Leaf 0: the highest basic leaf, and the vendor in EBX EDX ECX.
        assert!(leaf0.eax >= 1);
        assert_ne!(leaf0.ebx, 0);
        assert_eq!(json_round_trip(&entries), entries);
    }
}
