//! The raw privilege calls: the bounding set, capset(2) and no_new_privs. No allocation and
//! no locks, so the guest agent's child may call them between clone and exec; the VMM drops
//! every capability with them once its VM is built.

use crate::last_errno as errno;

/// Drops every capability up to `last_cap` that is not in `keep` from the calling thread's
/// bounding set (a capability the kernel does not know, or one already dropped, is skipped:
/// dropping needs CAP_SETPCAP, which a process that changed its user has no more).
pub fn drop_bounding(keep: u64, last_cap: u32) -> Result<(), i32> {
    for cap in 0..=last_cap.min(63) {
        // SAFETY: prctl with integer arguments only.
        let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if keep & (1 << cap) == 0 && held == 1 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r < 0 && errno() != libc::EINVAL {
                return Err(errno());
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets the calling thread's effective, permitted and inheritable sets (bit n: capability n).
pub fn set(effective: u64, permitted: u64, inheritable: u64) -> Result<(), i32> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: inheritable as u32,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: capset reads the header and two data structs laid out as the kernel's v3 ABI.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Drops every capability of the calling thread: bounding, ambient, effective, permitted and
/// inheritable. Threads it starts afterwards have none either.
pub fn drop_all() -> Result<(), i32> {
    keep_only(0)
}

/// Keeps only the capabilities in `keep` (bit n: capability n) in the calling thread's
/// bounding, effective and permitted sets; none inheritable or ambient.
pub fn keep_only(keep: u64) -> Result<(), i32> {
    drop_bounding(keep, 63)?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    set(keep, keep, 0)
}

/// Sets no_new_privs for the calling thread (threads it starts afterwards inherit it).
pub fn set_no_new_privs() -> Result<(), i32> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(errno());
    }
    Ok(())
}
