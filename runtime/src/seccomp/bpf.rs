//! A [`Profile`] as one classic-BPF seccomp program.
//!
//! The argument comparisons (64-bit values split into two 32-bit halves, masks) are
//! `seccompiler`'s rules. The layout around them is written here, because `seccompiler` gives a
//! filter one match action and one linear chain of syscall comparisons, and an OCI profile needs
//! an action per rule. The layout also matters for cost: the guest kernel runs the program for
//! every system call that the kernel's per-filter action cache cannot answer, and it builds that
//! cache at install by running the program once per syscall number, so dispatch is a binary
//! search over the syscall numbers (about 20 instructions for a 350-call profile, not 700), which
//! counts under emulated guest kernels.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCondition, SeccompRule, sock_filter};

use super::error::SeccompError;

/// What the kernel does with a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run it.
    Allow,
    /// Fail it with this errno.
    Errno(u32),
    /// Kill the calling thread.
    KillThread,
    /// Kill the process.
    KillProcess,
    /// Send SIGSYS.
    Trap,
    /// Notify a tracer with this value (ENOSYS without one).
    Trace(u32),
    /// Run it and log it.
    Log,
}

impl Action {
    fn ret(self) -> u32 {
        u32::from(match self {
            Action::Allow => SeccompAction::Allow,
            Action::Errno(e) => SeccompAction::Errno(e),
            Action::KillThread => SeccompAction::KillThread,
            Action::KillProcess => SeccompAction::KillProcess,
            Action::Trap => SeccompAction::Trap,
            Action::Trace(v) => SeccompAction::Trace(v),
            Action::Log => SeccompAction::Log,
        })
    }
}

/// One rule of a system call: `action` when every condition holds (always, with none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Conditions on the arguments, all of which must hold.
    pub conditions: Vec<SeccompCondition>,
    /// What happens then.
    pub action: Action,
}

/// A seccomp profile resolved to this architecture's system call numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// For a system call no rule matches.
    pub default: Action,
    /// Rules per system call number, in profile order.
    pub syscalls: BTreeMap<u32, Vec<Rule>>,
    /// Numbers above this one are not system calls this table knows: with an errno default
    /// they fail with ENOSYS (as runc does), so that C libraries fall back to older calls.
    pub max_known: u32,
}

/// The kernel's limit on a program's length (BPF_MAXINSNS).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// Longest linear run of syscall comparisons at a leaf of the dispatch tree.
const LEAF: usize = 4;

// Classic BPF opcodes (linux/bpf_common.h) and `struct seccomp_data` offsets.
// BPF_LD | BPF_W | BPF_ABS
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_JMP_JGT_K: u16 = 0x05 | 0x20;
const BPF_RET_K: u16 = 0x06;
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// AUDIT_ARCH_X86_64 (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret(action: Action) -> sock_filter {
    stmt(BPF_RET_K, action.ret())
}

fn ja(distance: usize) -> Result<sock_filter, SeccompError> {
    let k = u32::try_from(distance).map_err(|_| SeccompError::TooLarge {
        len: distance,
        max: MAX_INSTRUCTIONS,
    })?;
    Ok(stmt(BPF_JMP_JA, k))
}

/// The program: the architecture check, then dispatch on the syscall number. Every path ends
/// in a return.
pub fn compile(profile: &Profile) -> Result<BpfProgram, SeccompError> {
    let mut program = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        // Another ABI (i386, x32 is a bit of the number below) is not this profile's.
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        ret(Action::KillProcess),
        stmt(BPF_LD_W_ABS, DATA_NR),
    ];
    if matches!(profile.default, Action::Errno(_)) {
        program.push(jump(BPF_JMP_JGT_K, profile.max_known, 0, 1));
        program.push(ret(Action::Errno(libc::ENOSYS as u32)));
    }
    let blocks = profile
        .syscalls
        .iter()
        .map(|(nr, rules)| Ok((*nr, syscall_block(rules, profile.default)?)))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    program.extend(dispatch(&blocks, profile.default)?);
    if program.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::TooLarge {
            len: program.len(),
            max: MAX_INSTRUCTIONS,
        });
    }
    Ok(program)
}

/// One system call's rules: conditional rules in order, then the first unconditional one,
/// else the default. Each rule is `seccompiler`'s condition code followed by a return: it
/// falls through to the return on a match and jumps past it otherwise.
fn syscall_block(rules: &[Rule], default: Action) -> Result<Vec<sock_filter>, SeccompError> {
    let mut block = Vec::new();
    for rule in rules.iter().filter(|r| !r.conditions.is_empty()) {
        let compiled: BpfProgram = SeccompRule::new(rule.conditions.clone())
            .map_err(SeccompError::Rule)?
            .into();
        block.extend(compiled);
        block.push(ret(rule.action));
    }
    let last = rules
        .iter()
        .find(|r| r.conditions.is_empty())
        .map_or(default, |r| r.action);
    block.push(ret(last));
    Ok(block)
}

/// Binary search over `blocks` (sorted by number) with the syscall number in the accumulator;
/// a number no block has gets `default`.
fn dispatch(
    blocks: &[(u32, Vec<sock_filter>)],
    default: Action,
) -> Result<Vec<sock_filter>, SeccompError> {
    if blocks.len() <= LEAF {
        // JEQ nr, 0, 1; JA block — per call — then the default, then the blocks.
        let head_len = 2 * blocks.len() + 1;
        let mut out = Vec::with_capacity(head_len);
        let mut before = 0;
        for (i, (nr, block)) in blocks.iter().enumerate() {
            out.push(jump(BPF_JMP_JEQ_K, *nr, 0, 1));
            out.push(ja(head_len - (2 * i + 2) + before)?);
            before += block.len();
        }
        out.push(ret(default));
        for (_, block) in blocks {
            out.extend_from_slice(block);
        }
        return Ok(out);
    }
    let mid = blocks.len() / 2;
    let left = dispatch(&blocks[..mid], default)?;
    let right = dispatch(&blocks[mid..], default)?;
    let mut out = Vec::with_capacity(2 + left.len() + right.len());
    out.push(jump(BPF_JMP_JGE_K, blocks[mid].0, 0, 1));
    out.push(ja(left.len())?);
    out.extend(left);
    out.extend(right);
    Ok(out)
}

/// The program as the agent takes it: `struct sock_filter` entries, little-endian.
pub fn to_bytes(program: &[sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for f in program {
        out.extend_from_slice(&f.code.to_le_bytes());
        out.push(f.jt);
        out.push(f.jf);
        out.extend_from_slice(&f.k.to_le_bytes());
    }
    out
}

#[cfg(test)]
pub(super) mod interpret {
    //! A classic-BPF interpreter for the subset [`super::compile`] and `seccompiler` emit, so
    //! that tests can run a program against system calls.
    use seccompiler::sock_filter;

    /// `struct seccomp_data` of one call.
    pub fn run(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let word = |off: u32| {
            let o = off as usize;
            u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"))
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let f = &program[pc];
            pc += 1;
            match f.code {
                0x20 => acc = word(f.k),
                0x54 => acc &= f.k,
                0x06 => return f.k,
                0x05 => pc += f.k as usize,
                code => {
                    let taken = match code {
                        0x15 => acc == f.k,
                        0x25 => acc > f.k,
                        0x35 => acc >= f.k,
                        0x45 => acc & f.k != 0,
                        other => panic!("opcode {other:#x} not interpreted"),
                    };
                    pc += usize::from(if taken { f.jt } else { f.jf });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp};

    use super::interpret::run;
    use super::*;

    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0000 | 1;

    fn cond(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
        SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).expect("condition")
    }

    fn allow_list(numbers: impl IntoIterator<Item = u32>) -> Profile {
        Profile {
            default: Action::Errno(1),
            syscalls: numbers
                .into_iter()
                .map(|nr| {
                    (
                        nr,
                        vec![Rule {
                            conditions: vec![],
                            action: Action::Allow,
                        }],
                    )
                })
                .collect(),
            max_known: 466,
        }
    }

    #[test]
    fn dispatch_finds_every_number_and_only_those() {
        let allowed: Vec<u32> = (0..400).filter(|n| n % 3 != 0).collect();
        let program = compile(&allow_list(allowed.iter().copied())).expect("compile");
        for nr in 0..=466 {
            let want = if allowed.contains(&nr) { ALLOW } else { EPERM };
            assert_eq!(
                run(&program, AUDIT_ARCH_X86_64, nr, [0; 6]),
                want,
                "nr {nr}"
            );
        }
        // Unknown numbers: ENOSYS; another architecture: killed.
        assert_eq!(
            run(&program, AUDIT_ARCH_X86_64, 467, [0; 6]),
            0x0005_0000 | 38
        );
        assert_eq!(
            run(&program, AUDIT_ARCH_X86_64, 0x4000_0001, [0; 6]),
            0x0005_0000 | 38
        );
        assert_eq!(run(&program, 0x4000_0003, 1, [0; 6]), 0x8000_0000);
        // A binary search, not a chain: the program stays small.
        assert!(program.len() < 1500, "{} instructions", program.len());
    }

    #[test]
    fn rules_in_order_then_unconditional_then_default() {
        let mut profile = allow_list([]);
        profile.syscalls.insert(
            41,
            vec![
                Rule {
                    conditions: vec![],
                    action: Action::Errno(13),
                },
                Rule {
                    conditions: vec![cond(0, SeccompCmpOp::Eq, 40)],
                    action: Action::Errno(97),
                },
                Rule {
                    conditions: vec![cond(0, SeccompCmpOp::Lt, 40), cond(1, SeccompCmpOp::Ne, 3)],
                    action: Action::Allow,
                },
            ],
        );
        profile.syscalls.insert(
            90,
            vec![Rule {
                conditions: vec![cond(1, SeccompCmpOp::MaskedEq(0o7000), 0)],
                action: Action::Allow,
            }],
        );
        let p = compile(&profile).expect("compile");
        let a = AUDIT_ARCH_X86_64;
        assert_eq!(run(&p, a, 41, [40, 0, 0, 0, 0, 0]), 0x0005_0000 | 97);
        assert_eq!(run(&p, a, 41, [2, 1, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, a, 41, [2, 3, 0, 0, 0, 0]), 0x0005_0000 | 13);
        // A 64-bit argument compares whole: high bits set is not "less than 40".
        assert_eq!(
            run(&p, a, 41, [1 << 32 | 2, 1, 0, 0, 0, 0]),
            0x0005_0000 | 13
        );
        assert_eq!(run(&p, a, 90, [0, 0o644, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, a, 90, [0, 0o4755, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn bytes_are_sock_filter_layout() {
        let b = to_bytes(&[jump(BPF_JMP_JEQ_K, 0x0102_0304, 5, 6)]);
        assert_eq!(b, [0x15, 0, 5, 6, 4, 3, 2, 1]);
    }
}
