//! A process's seccomp program: checked in the agent, installed by the child just before
//! execve (see `spawn`). The host compiles the program from the container's profile; the agent
//! only checks its shape, and the kernel verifies it again when it is installed.

use tonic::Status;

/// The kernel's limit on a program's length (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;

/// The program in `bytes` (`struct sock_filter` entries, little-endian); empty for none.
pub fn parse(bytes: &[u8]) -> Result<Vec<libc::sock_filter>, Status> {
    if !bytes.len().is_multiple_of(8) || bytes.len() / 8 > MAX_INSTRUCTIONS {
        return Err(Status::invalid_argument(format!(
            "seccomp program of {} bytes: not 8-byte instructions, at most {MAX_INSTRUCTIONS}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// Installs `program` on the calling thread (no allocation: runs in the child). Needs
/// no_new_privs or CAP_SYS_ADMIN.
pub fn install(program: &[libc::sock_filter]) -> Result<(), i32> {
    let prog = libc::sock_fprog {
        // At most MAX_INSTRUCTIONS, checked by `parse`.
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        return Err(podvisor_common::last_errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(parse(&[]).expect("empty").is_empty());
        assert!(parse(&[0; 7]).is_err());
        assert!(parse(&vec![0; 8 * (MAX_INSTRUCTIONS + 1)]).is_err());
        let p = parse(&[0x15, 0, 5, 6, 4, 3, 2, 1]).expect("one");
        assert_eq!(
            (p[0].code, p[0].jt, p[0].jf, p[0].k),
            (0x15, 5, 6, 0x0102_0304)
        );
    }
}
