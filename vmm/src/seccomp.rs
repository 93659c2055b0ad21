//! The VMM's own seccomp filters, one per thread kind, as Firecracker has them: the event
//! loop (the main thread, after it has started the others), each vCPU, and the control API.
//! Everything the VMM opens, maps and registers with KVM is done before the filters go on;
//! what is left is I/O on descriptors it holds, guest exits, and the API's files (snapshots,
//! drive swaps). A system call outside a thread's list ends the VMM (`SeccompLevel::Kill`,
//! the default), or is allowed and written to the kernel's audit log (`Log`), for finding
//! what a new code path needs.
//!
//! The lists are system calls without argument checks, except `socket` (AF_UNIX only: the
//! vsock device's connections to the host). Filters are built with `seccompiler` (rust-vmm).

use std::collections::BTreeMap;

use podvisor_vmm_api::config::SeccompLevel;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: device event loop.
    EventLoop,
    /// The event loop of a VM whose virtio-fs device serves a share: the file system
    /// calls of the passthrough file system too.
    EventLoopFs,
    /// A vCPU thread: KVM_RUN and the exits it handles (MMIO, port I/O).
    Vcpu,
    /// The control API thread: snapshots, drive swaps, pause, stop.
    Api,
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `seccompiler` refused the filter.
    #[error("build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused it.
    #[error("install the {0:?} seccomp filter")]
    Install(ThreadKind, #[source] seccompiler::Error),
    /// no_new_privs could not be set.
    #[error("set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// Every thread: memory, locks, time, signals used by the runtime, logging, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    // The log (every thread logs) and the console file start over at their caps
    // (devices/console_file.rs).
    libc::SYS_ftruncate,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_fcntl,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_ioctl,
    // Files: drives, snapshot files, the console file.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// The event loop: virtio-blk files, the TAP, the vsock device's Unix sockets, cleanup at
/// exit.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fallocate,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // The vsock device's deadline timer, armed after each event (virtio/vsock/timer.rs);
    // the timerfd itself is created with the device, before the filters.
    libc::SYS_timerfd_settime,
];

/// A vCPU: KVM_RUN (ioctl), MMIO and port I/O handled in place (serial output, virtio
/// notifications), pausing for snapshots.
/// What the passthrough file system calls on top of [`EVENT_LOOP`] (fuse-backend-rs's
/// `PassthroughFs`, the calls of every FUSE request it serves; no xattrs, no file handles).
const FS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_linkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_copy_file_range,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_dup,
    libc::SYS_flock,
    libc::SYS_syncfs,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

const VCPU: &[i64] = &[];

/// The control API: its socket, snapshot files, drive swaps, stop.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    // A request's first bytes, with the descriptor a drive swap may carry.
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let (own, fs): (&[i64], &[i64]) = match kind {
        ThreadKind::EventLoop => (EVENT_LOOP, &[]),
        ThreadKind::EventLoopFs => (EVENT_LOOP, FS),
        ThreadKind::Vcpu => (VCPU, &[]),
        ThreadKind::Api => (API, &[]),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(own)
        .chain(fs)
        .map(|nr| (*nr, Vec::new()))
        .collect();
    if matches!(kind, ThreadKind::EventLoop | ThreadKind::EventLoopFs) {
        // Unix sockets only (the vsock device connecting a guest to `<uds>_<port>`).
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    Ok(rules)
}

/// The filter for `kind`; `None` with `SeccompLevel::Off`.
pub fn filter(kind: ThreadKind, level: SeccompLevel) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match level {
        SeccompLevel::Off => return Ok(None),
        SeccompLevel::Kill => SeccompAction::KillProcess,
        SeccompLevel::Log => SeccompAction::Log,
    };
    let build = |e| SeccompError::Build(kind, e);
    let filter = SeccompFilter::new(
        rules(kind).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    Ok(Some(filter.try_into().map_err(build)?))
}

/// Sets no_new_privs for the process (its threads started later inherit it).
pub fn no_new_privs() -> Result<(), SeccompError> {
    podvisor_common::caps::set_no_new_privs()
        .map_err(|e| SeccompError::NoNewPrivs(std::io::Error::from_raw_os_error(e)))
}

/// Installs the filter for `kind` on the calling thread.
pub fn install(kind: ThreadKind, level: SeccompLevel) -> Result<(), SeccompError> {
    if let Some(program) = filter(kind, level)? {
        seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(kind, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_for_every_kind() {
        for kind in [
            ThreadKind::EventLoop,
            ThreadKind::EventLoopFs,
            ThreadKind::Vcpu,
            ThreadKind::Api,
        ] {
            for level in [SeccompLevel::Kill, SeccompLevel::Log] {
                assert!(filter(kind, level).expect("build").is_some());
            }
            assert!(filter(kind, SeccompLevel::Off).expect("build").is_none());
        }
    }

    /// A forked child installs a filter and makes a call outside it: the kernel kills it
    /// with SIGSYS.
    #[test]
    fn a_call_outside_the_filter_kills() {
        let program = filter(ThreadKind::Vcpu, SeccompLevel::Kill)
            .expect("build")
            .expect("program");
        // SAFETY: the child only makes raw system calls and exits.
        match unsafe { libc::fork() } {
            0 => {
                if no_new_privs().is_err() || seccompiler::apply_filter(&program).is_err() {
                    // SAFETY: leaving the forked child.
                    unsafe { libc::_exit(3) };
                }
                // Allowed: the child is still alive after it.
                // SAFETY: getpid takes no arguments.
                unsafe { libc::syscall(libc::SYS_getpid) };
                // Not in any VMM list.
                // SAFETY: execve of a null path; it must never return.
                unsafe { libc::syscall(libc::SYS_execve, 0, 0, 0) };
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(0) };
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waiting for our own child with a valid status pointer.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFSIGNALED(status), "status {status:#x}");
                assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
            }
            _ => panic!("fork failed"),
        }
    }

    /// The vsock deadline timer under the event loop's filter: made before it, then
    /// armed, waited on and disarmed (virtio/vsock/timer.rs) without being killed.
    #[test]
    fn event_loop_arms_a_timer_made_before_its_filter() {
        let program = filter(ThreadKind::EventLoop, SeccompLevel::Kill)
            .expect("build")
            .expect("program");
        // SAFETY: the child only makes system calls on its own descriptor and exits.
        match unsafe { libc::fork() } {
            0 => {
                let code = match vmm_sys_util::timerfd::TimerFd::new() {
                    Ok(mut timer) if no_new_privs().is_ok() => {
                        if seccompiler::apply_filter(&program).is_err() {
                            3
                        } else {
                            let armed = timer.reset(std::time::Duration::from_millis(1), None);
                            let fired = armed.and_then(|()| timer.wait());
                            match fired.and_then(|_| timer.clear()) {
                                Ok(()) => 0,
                                Err(_) => 4,
                            }
                        }
                    }
                    _ => 3,
                };
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(code) };
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waiting for our own child with a valid status pointer.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status:#x}");
                assert_eq!(libc::WEXITSTATUS(status), 0);
            }
            _ => panic!("fork failed"),
        }
    }
}
