//! The cloned child's side of process creation, from `clone3` to `execve`: it shares the
//! agent's address space (see [`super::spawn`]), so it makes raw system calls only, on data
//! the agent prepared in a [`ChildPlan`], and reports a failure as a fixed-size record (stage,
//! item, errno) on the sync pipe before `_exit`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};

use super::caps;
use super::plan::{ChildPlan, ChildStdio, RootfsPlan, Stage};

/// Closes every descriptor from 3 up except `keep` (negative entries are ignored); at most
/// four close_range calls, no allocation.
pub fn close_all_but(keep: &[RawFd; 3]) {
    let mut sorted = *keep;
    sorted.sort_unstable();
    let mut from: libc::c_uint = 3;
    for k in sorted {
        if k < 3 || (k as libc::c_uint) < from {
            continue;
        }
        let k = k as libc::c_uint;
        if k > from {
            // SAFETY: close_range on descriptors of this child's own table (no CLONE_FILES).
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
        }
        from = k + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0) };
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reports a failure and exits; never returns.
fn fail(sync_fd: RawFd, stage: Stage, item: u32, err: i32) -> ! {
    let mut buf = [0u8; 12];
    buf[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&item.to_ne_bytes());
    buf[8..].copy_from_slice(&err.to_ne_bytes());
    // SAFETY: write of a stack buffer, then _exit; no Rust state is touched in the child.
    unsafe {
        libc::write(sync_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

fn check(r: libc::c_int, sync_fd: RawFd, stage: Stage, item: u32) {
    if r < 0 {
        fail(sync_fd, stage, item, errno());
    }
}

const NO_ITEM: u32 = u32::MAX;

/// `/proc/self/fd/<n>` in a stack buffer (no allocation).
struct FdPath([u8; 32]);

impl FdPath {
    fn new(fd: RawFd) -> Self {
        let mut b = [0u8; 32];
        let prefix = b"/proc/self/fd/";
        b[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 12];
        let (mut n, mut len) = (fd.unsigned_abs(), 0);
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in 0..len {
            b[prefix.len() + i] = digits[len - 1 - i];
        }
        FdPath(b)
    }
    fn as_ptr(&self) -> *const libc::c_char {
        self.0.as_ptr().cast()
    }
}

/// Opens `rel` beneath the rootfs without symlinks (O_PATH); -1 with errno on failure.
fn open_beneath_raw(dirfd: RawFd, rel: &CString) -> RawFd {
    // SAFETY: open_how is plain data; zero is the default for all fields.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: openat2 with a valid C string and open_how struct.
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            rel.as_ptr(),
            &mut how as *mut libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as RawFd
    }
}

fn setup_rootfs(r: &RootfsPlan, sync_fd: RawFd) {
    mount_private_and_proc(r, sync_fd);
    // SAFETY: open with a C string prepared by the agent; failures are reported and end the
    // child.
    let root = unsafe {
        // A descriptor of the rootfs as this mount namespace sees it (with /proc mounted): the
        // agent's descriptor resolves in the agent's namespace.
        libc::open(
            r.rootfs.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(root, sync_fd, Stage::MaskPath, NO_ITEM);
    write_sysctls(&r.sysctls, sync_fd);
    mask_paths(root, &r.masked, sync_fd);
    make_readonly(root, &r.readonly, sync_fd);
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(root) };
    pivot_root(&r.rootfs, sync_fd);
}

/// Makes every mount private to the new mount namespace and mounts the container's /proc.
fn mount_private_and_proc(r: &RootfsPlan, sync_fd: RawFd) {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount with C strings prepared by the agent; failures are reported and end the
    // child.
    unsafe {
        check(
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            sync_fd,
            Stage::MountPrivate,
            NO_ITEM,
        );
        check(
            libc::mount(
                c"proc".as_ptr(),
                r.proc.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            sync_fd,
            Stage::MountProc,
            NO_ITEM,
        );
    }
}

/// Writes the container's sysctls (`<rootfs>/proc/sys/...` paths) through its /proc.
fn write_sysctls(sysctls: &[(CString, CString)], sync_fd: RawFd) {
    for (i, (path, value)) in sysctls.iter().enumerate() {
        // SAFETY: open/write/close with a C string and a buffer prepared by the agent;
        // failures are reported and end the child.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            check(fd, sync_fd, Stage::Sysctl, i as u32);
            let len = value.as_bytes().len();
            if libc::write(fd, value.as_ptr().cast(), len) != len as isize {
                fail(sync_fd, Stage::Sysctl, i as u32, errno());
            }
            libc::close(fd);
        }
    }
}

/// Opens `rel` beneath `root` (O_PATH, no symlinks): None when it does not exist; any other
/// failure is reported as `stage`, `item` and ends the child.
fn open_existing(
    root: RawFd,
    rel: &CString,
    sync_fd: RawFd,
    stage: Stage,
    item: u32,
) -> Option<RawFd> {
    let fd = open_beneath_raw(root, rel);
    if fd < 0 {
        if errno() == libc::ENOENT {
            return None;
        }
        fail(sync_fd, stage, item, errno());
    }
    Some(fd)
}

/// Covers each masked path beneath `root` (missing ones are skipped): /dev/null over a file,
/// an empty read-only tmpfs over a directory.
fn mask_paths(root: RawFd, masked: &[(CString, CString)], sync_fd: RawFd) {
    let null = std::ptr::null::<libc::c_char>();
    for (i, (rel, abs)) in masked.iter().enumerate() {
        let Some(fd) = open_existing(root, rel, sync_fd, Stage::MaskPath, i as u32) else {
            continue;
        };
        let target = FdPath::new(fd);
        // SAFETY: mount/close with C strings prepared by the agent and a descriptor opened
        // above; failures are reported and end the child.
        unsafe {
            if libc::mount(
                c"/dev/null".as_ptr(),
                target.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ) < 0
            {
                if errno() != libc::ENOTDIR {
                    fail(sync_fd, Stage::MaskPath, i as u32, errno());
                }
                // A directory: cover it with an empty read-only tmpfs.
                check(
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        abs.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_RDONLY,
                        c"size=0".as_ptr().cast(),
                    ),
                    sync_fd,
                    Stage::MaskPath,
                    i as u32,
                );
            }
            libc::close(fd);
        }
    }
}

/// Bind-mounts each read-only path beneath `root` onto itself and remounts it read-only
/// (missing ones are skipped).
fn make_readonly(root: RawFd, readonly: &[(CString, CString)], sync_fd: RawFd) {
    let null = std::ptr::null::<libc::c_char>();
    for (i, (rel, abs)) in readonly.iter().enumerate() {
        let Some(fd) = open_existing(root, rel, sync_fd, Stage::ReadonlyPath, i as u32) else {
            continue;
        };
        let target = FdPath::new(fd);
        // SAFETY: mount/close with C strings prepared by the agent and a descriptor opened
        // above; failures are reported and end the child.
        unsafe {
            check(
                libc::mount(
                    target.as_ptr(),
                    target.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
                sync_fd,
                Stage::ReadonlyPath,
                i as u32,
            );
            libc::close(fd);
            check(
                libc::mount(
                    null,
                    abs.as_ptr(),
                    null,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                sync_fd,
                Stage::ReadonlyPath,
                i as u32,
            );
        }
    }
}

/// Makes `rootfs` the root (pivot_root onto itself, the old root detached) and enters it.
fn pivot_root(rootfs: &CString, sync_fd: RawFd) {
    // SAFETY: chdir/pivot_root/umount2 with C strings; failures are reported and end the
    // child.
    unsafe {
        check(libc::chdir(rootfs.as_ptr()), sync_fd, Stage::PivotRoot, 0);
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            sync_fd,
            Stage::PivotRoot,
            1,
        );
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            sync_fd,
            Stage::PivotRoot,
            2,
        );
        check(libc::chdir(c"/".as_ptr()), sync_fd, Stage::PivotRoot, 3);
    }
}

/// Opens the terminal `name` (a path in the child's mount namespace) if it is the same device
/// as `inherited`; returns the new descriptor or -1. Raw system calls only (runs in the child).
fn reopen_tty(name: &CString, inherited: RawFd) -> RawFd {
    // SAFETY: open/fstat/close with a valid C string and stack buffers.
    unsafe {
        let fd = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return -1;
        }
        let mut a: libc::stat = std::mem::zeroed();
        let mut b: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut a) == 0
            && libc::fstat(inherited, &mut b) == 0
            && a.st_mode & libc::S_IFMT == libc::S_IFCHR
            && a.st_rdev == b.st_rdev
        {
            return fd;
        }
        libc::close(fd);
        -1
    }
}

/// The kernel's `struct sigaction` (x86_64): all zero is SIG_DFL with no flags.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

pub fn child_main(
    plan: &ChildPlan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    start_fd: RawFd,
    sync_fd: RawFd,
    held_fd: RawFd,
) -> ! {
    reset_signals();
    for (i, (fd, nstype)) in plan.setns.iter().enumerate() {
        check(
            // SAFETY: setns on a namespace descriptor the agent opened.
            unsafe { libc::setns(fd.as_raw_fd(), *nstype) },
            sync_fd,
            Stage::Setns,
            i as u32,
        );
    }
    if let Some(r) = &plan.rootfs {
        setup_rootfs(r, sync_fd);
    }
    if let Some(h) = &plan.hostname {
        check(
            // SAFETY: sethostname with a buffer and its length.
            unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) },
            sync_fd,
            Stage::Hostname,
            NO_ITEM,
        );
    }
    setup_stdio(&plan.stdio, sync_fd);
    // Drop every descriptor inherited from the agent (other containers' pipes, sockets) so
    // that this child, while it waits for StartContainer, holds nothing but its own.
    close_all_but(&[sync_fd, start_fd, held_fd]);
    drop_privileges(plan, sync_fd);
    let ready = [0u8; 12];
    // SAFETY: write of a stack buffer to the report pipe.
    unsafe { libc::write(sync_fd, ready.as_ptr().cast(), ready.len()) };
    if start_fd >= 0 {
        wait_for_start(start_fd);
    }
    exec(plan, argv, envp, sync_fd)
}

/// The agent's handlers (and its ignored SIGPIPE) are not the container's: default
/// dispositions, then unblock (the spawner thread cloned with every signal blocked).
fn reset_signals() {
    let dfl = KernelSigaction::default();
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: the raw system call with a valid kernel sigaction (glibc's sigaction
            // refuses the signals it reserves for itself).
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
    // SAFETY: plain sigset manipulation and sigprocmask on this (single-threaded) child.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Makes the prepared descriptors (or the terminal reopened by its container path) the
/// child's 0, 1 and 2; with a terminal, a new session with it as the controlling one.
fn setup_stdio(s: &ChildStdio, sync_fd: RawFd) {
    if s.tty {
        // SAFETY: setsid takes no arguments.
        check(unsafe { libc::setsid() }, sync_fd, Stage::Stdio, 0);
    }
    let reopened = s
        .tty_name
        .as_ref()
        .map_or(-1, |name| reopen_tty(name, s.stdout.as_raw_fd()));
    for (i, (fd, target)) in [(&s.stdin, 0), (&s.stdout, 1), (&s.stderr, 2)]
        .into_iter()
        .enumerate()
    {
        let src = if reopened >= 0 {
            reopened
        } else {
            fd.as_raw_fd()
        };
        // SAFETY: dup2 of a descriptor this child holds onto 0, 1 or 2.
        check(
            unsafe { libc::dup2(src, target) },
            sync_fd,
            Stage::Stdio,
            i as u32 + 1,
        );
    }
    if s.tty {
        // SAFETY: TIOCSCTTY on descriptor 0 (the terminal), argument 0.
        check(
            unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) },
            sync_fd,
            Stage::Stdio,
            4,
        );
    }
}

/// Rlimits, the capability bounding set, the user and groups, the working directory, the
/// capability sets and no_new_privs, in the order that keeps the capabilities each step needs.
fn drop_privileges(plan: &ChildPlan, sync_fd: RawFd) {
    if let Err(e) = caps::apply_rlimits(&plan.rlimits) {
        fail(sync_fd, Stage::Rlimits, NO_ITEM, e);
    }
    if let Err(e) = caps::apply_bounding(plan.caps.bounding, plan.last_cap) {
        fail(sync_fd, Stage::Capabilities, 0, e);
    }
    if let Err(e) = caps::keep_caps(true) {
        fail(sync_fd, Stage::Capabilities, 1, e);
    }
    // Raw system calls: glibc's set*id would try to synchronise threads that only exist in
    // the parent.
    // SAFETY: setgroups/setresgid/setresuid with values and a buffer prepared by the agent.
    unsafe {
        check(
            libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr())
                as libc::c_int,
            sync_fd,
            Stage::SetUser,
            0,
        );
        check(
            libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) as libc::c_int,
            sync_fd,
            Stage::SetUser,
            1,
        );
        check(
            libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) as libc::c_int,
            sync_fd,
            Stage::SetUser,
            2,
        );
    }
    if let Err(e) = caps::keep_caps(false) {
        fail(sync_fd, Stage::Capabilities, 2, e);
    }
    check(
        // SAFETY: chdir with a C string prepared by the agent.
        unsafe { libc::chdir(plan.cwd.as_ptr()) },
        sync_fd,
        Stage::Chdir,
        NO_ITEM,
    );
    if let Err(e) = caps::apply_sets(&plan.caps) {
        fail(sync_fd, Stage::Capabilities, 3, e);
    }
    if plan.no_new_privs
        && let Err(e) = caps::apply_no_new_privs()
    {
        fail(sync_fd, Stage::NoNewPrivs, NO_ITEM, e);
    }
}

/// Blocks until the agent's StartContainer byte; exits if the agent gave up instead.
fn wait_for_start(start_fd: RawFd) {
    let mut b = [0u8; 1];
    // SAFETY: read into a stack buffer, close of the start pipe, _exit.
    unsafe {
        let n = libc::read(start_fd, b.as_mut_ptr().cast(), 1);
        if n != 1 {
            // The agent gave up on this container.
            libc::_exit(1);
        }
        libc::close(start_fd);
    }
}

/// Tries each exec candidate in turn; reports the most telling error if none runs.
fn exec(
    plan: &ChildPlan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    sync_fd: RawFd,
) -> ! {
    let mut err = libc::ENOENT;
    for c in &plan.exec_candidates {
        // SAFETY: execve with a C string and NULL-terminated pointer arrays prepared by the
        // agent; it returns only on failure.
        unsafe { libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let e = errno();
        // Like execvp: keep looking after ENOENT, remember more telling errors.
        if e != libc::ENOENT && e != libc::ENOTDIR {
            err = e;
        }
    }
    fail(sync_fd, Stage::Exec, NO_ITEM, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_paths_are_formatted_without_allocation() {
        for fd in [0, 7, 10, 123, 65535] {
            let p = FdPath::new(fd);
            // SAFETY: FdPath is NUL-terminated within its buffer.
            let s = unsafe { std::ffi::CStr::from_ptr(p.as_ptr()) };
            assert_eq!(s.to_str().expect("utf8"), format!("/proc/self/fd/{fd}"));
        }
    }
}
