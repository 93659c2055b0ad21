//! KVM state capture and restore on a real /dev/kvm VM, and the serde forms of its
//! binary structures.

use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_segment,
    kvm_userspace_memory_region,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;

/// A VM set up as builder.rs does it, with 2 MiB of RAM at 0 for the MSRs that point into it.
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
    let host = vm_memory::GuestMemory::get_host_address(&mem, GuestAddress(0)).unwrap();
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
