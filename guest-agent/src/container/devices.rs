//! Which devices a container may open: a cgroup v2 device program (BPF) attached to the
//! container's cgroup, as runc and crun attach one. Without it, a container with the
//! default CAP_MKNOD could make a node for the VM's disks (the agent's root, the pod's image
//! drives) in its /dev or its rootfs and read them. A container may make any node but open
//! only the standard ones; a privileged container gets no program (every device of its VM).
//!
//! Written by hand: no kept crate assembles cgroup device programs (runc and crun emit these
//! few instructions themselves); the program is a list of compares, checked by the kernel's
//! verifier when it is loaded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Why the device program could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// BPF_PROG_LOAD failed (the verifier's log, if any, follows).
    #[error("load the cgroup device program: {log}")]
    Load {
        #[source]
        source: std::io::Error,
        log: String,
    },
    /// The cgroup could not be opened.
    #[error("open cgroup {path}")]
    Open {
        path: String,
        #[source]
        source: nix::Error,
    },
    /// BPF_PROG_ATTACH failed.
    #[error("attach the device program to {path}")]
    Attach {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// `BPF_DEVCG_DEV_*`: the device type in the low half of `access_type`.
const BLOCK: i32 = 1;
const CHAR: i32 = 2;
/// `BPF_DEVCG_ACC_*`: the access in the high half.
const MKNOD: i32 = 1;
const READ: i32 = 2;
const WRITE: i32 = 4;
const RWM: i32 = READ | WRITE | MKNOD;

/// A device rule: type, major and minor (None: any), the accesses allowed.
struct Rule(i32, Option<i32>, Option<i32>, i32);

/// What every container may do (runc's default list): make any node; open the standard
/// character devices and terminals.
const RULES: &[Rule] = &[
    Rule(CHAR, None, None, MKNOD),
    Rule(BLOCK, None, None, MKNOD),
    Rule(CHAR, Some(1), Some(3), RWM),    // null
    Rule(CHAR, Some(1), Some(5), RWM),    // zero
    Rule(CHAR, Some(1), Some(7), RWM),    // full
    Rule(CHAR, Some(1), Some(8), RWM),    // random
    Rule(CHAR, Some(1), Some(9), RWM),    // urandom
    Rule(CHAR, Some(5), Some(0), RWM),    // tty
    Rule(CHAR, Some(5), Some(1), RWM),    // console
    Rule(CHAR, Some(5), Some(2), RWM),    // ptmx
    Rule(CHAR, Some(136), None, RWM),     // pts/*
    Rule(CHAR, Some(10), Some(200), RWM), // net/tun
];

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes used (linux/bpf.h, bpf_common.h).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND64_IMM: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH64_IMM: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_IMM: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The program for `rules`: r1 is `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major;
/// u32 minor; }`; it returns 1 (allow) at the first rule that matches, else 0.
fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),          // r2 = access_type
        insn(MOV64_REG, 3, 2, 0, 0),      // r3 = r2
        insn(AND64_IMM, 3, 0, 0, 0xffff), // r3 = device type
        insn(MOV64_REG, 4, 2, 0, 0),      // r4 = r2
        insn(RSH64_IMM, 4, 0, 0, 16),     // r4 = access asked
        insn(LDX_W, 5, 1, 4, 0),          // r5 = major
        insn(LDX_W, 6, 1, 8, 0),          // r6 = minor
    ];
    for Rule(kind, major, minor, access) in rules {
        let mut body = vec![insn(JNE_IMM, 3, 0, 0, *kind)];
        if *access != RWM {
            // Every access asked must be allowed: (asked & !allowed) == 0.
            body.push(insn(MOV64_REG, 7, 4, 0, 0));
            body.push(insn(AND64_IMM, 7, 0, 0, !access & RWM));
            body.push(insn(JNE_IMM, 7, 0, 0, 0));
        }
        if let Some(m) = major {
            body.push(insn(JNE_IMM, 5, 0, 0, *m));
        }
        if let Some(m) = minor {
            body.push(insn(JNE_IMM, 6, 0, 0, *m));
        }
        body.push(insn(MOV64_IMM, 0, 0, 0, 1));
        body.push(insn(EXIT, 0, 0, 0, 0));
        // Each jump skips to the end of this rule's body.
        let len = body.len();
        for (i, ins) in body.iter_mut().enumerate() {
            if ins.code == JNE_IMM {
                ins.off = i16::try_from(len - i - 1).unwrap_or(i16::MAX);
            }
        }
        p.extend(body);
    }
    p.push(insn(MOV64_IMM, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// `union bpf_attr` for BPF_PROG_LOAD, the fields up to `kern_version`; the rest zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    _rest: [u32; 27],
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    _rest: [u32; 28],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// Loads the program for `rules`; when the kernel refuses it, loads it again with the
/// verifier's log on, for the error.
fn load(rules: &[Rule]) -> Result<OwnedFd, DevicesError> {
    let insns = program(rules);
    match prog_load(&insns, &mut []) {
        Ok(fd) => Ok(fd),
        Err(source) => {
            let mut log = vec![0u8; VERIFIER_LOG_BYTES];
            let _ = prog_load(&insns, &mut log);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Err(DevicesError::Load {
                source,
                log: String::from_utf8_lossy(&log[..end]).trim().to_owned(),
            })
        }
    }
}

/// Room for the verifier's log of a refused program.
const VERIFIER_LOG_BYTES: usize = 256 * 1024;

/// BPF_PROG_LOAD of `insns` as a cgroup device program, the verifier logging into `log`
/// when it is not empty.
fn prog_load(insns: &[Insn], log: &mut [u8]) -> Result<OwnedFd, std::io::Error> {
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: u32::try_from(log.len()).unwrap_or(0),
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        ..Default::default()
    };
    // SAFETY: `attr` is a bpf_attr prefix with zeroed tail, of the size passed; the
    // pointers in it (instructions, license, log buffer of log_size bytes) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Lets processes in the cgroup `dir` open only the standard devices (and make any node).
pub fn restrict(dir: &Path) -> Result<(), DevicesError> {
    let prog = load(RULES)?;
    let cgroup: OwnedFd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| DevicesError::Open {
        path: dir.display().to_string(),
        source,
    })?;
    let attr = ProgAttachAttr {
        target_fd: u32::try_from(cgroup.as_raw_fd()).unwrap_or(0),
        attach_bpf_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(0),
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: `attr` is a bpf_attr prefix with zeroed tail, of the size passed; both
    // descriptors in it are open for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if r < 0 {
        return Err(DevicesError::Attach {
            path: dir.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // The attachment holds the program; both descriptors close here.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_on_the_next_rule_or_the_end() {
        let p = program(RULES);
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
        for (i, ins) in p.iter().enumerate() {
            if ins.code == JNE_IMM {
                let target = i + 1 + usize::try_from(ins.off).unwrap();
                assert!(target < p.len(), "jump at {i} leaves the program");
                // A rule starts with the type compare, or the target is the final deny.
                let t = p[target];
                assert!(
                    (t.code == JNE_IMM && t.regs == 3) || (t.code == MOV64_IMM && t.imm == 0),
                    "jump at {i} lands inside a rule"
                );
            }
        }
    }
}
