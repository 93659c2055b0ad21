//! Namespaces and process creation. The agent is multi-threaded, so the cloned child may only
//! make raw system calls until it execs: everything (C strings, argv/envp arrays, descriptors)
//! is prepared in a [`ChildPlan`] before `clone3`, and the child reports failures as fixed-size
//! records on a pipe. The child is cloned straight into its cgroup (CLONE_INTO_CGROUP) and, for a
//! pod-shared PID namespace, from a short-lived thread that has joined that namespace.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

use super::caps::{self, CapSets, RlimitSpec};
use crate::reaper::{ExitStatus, Reaper};

/// Steps of the child's setup, reported with errno on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    Ready = 0,
    Setns = 1,
    MountPrivate = 2,
    MountProc = 3,
    Sysctl = 4,
    MaskPath = 5,
    ReadonlyPath = 6,
    PivotRoot = 7,
    Hostname = 8,
    Stdio = 9,
    Rlimits = 10,
    Capabilities = 11,
    SetUser = 12,
    Chdir = 13,
    NoNewPrivs = 14,
    WaitStart = 15,
    Exec = 16,
    Unknown = 99,
}

impl Stage {
    fn from_u32(v: u32) -> Self {
        use Stage::*;
        [
            Ready,
            Setns,
            MountPrivate,
            MountProc,
            Sysctl,
            MaskPath,
            ReadonlyPath,
            PivotRoot,
            Hostname,
            Stdio,
            Rlimits,
            Capabilities,
            SetUser,
            Chdir,
            NoNewPrivs,
            WaitStart,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
        .unwrap_or(Unknown)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("container setup failed at {stage:?}{}", item.as_deref().map(|i| format!(" ({i})")).unwrap_or_default())]
    Child {
        stage: Stage,
        item: Option<String>,
        #[source]
        source: nix::Error,
    },
    #[error("the container process died during setup")]
    Died,
    #[error("{0}")]
    Sys(&'static str, #[source] nix::Error),
}

/// Paths inside the rootfs the child handles itself (they need its PID namespace).
#[derive(Debug)]
pub struct RootfsPlan {
    /// Absolute rootfs path in the agent's mount namespace.
    pub rootfs: CString,
    /// `<rootfs>/proc`
    pub proc: CString,
    /// (path relative to the rootfs, absolute path) of masked paths.
    pub masked: Vec<(CString, CString)>,
    pub readonly: Vec<(CString, CString)>,
    /// (`<rootfs>/proc/sys/...`, value)
    pub sysctls: Vec<(CString, CString)>,
}

/// Standard I/O descriptors for the child.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub tty: bool,
    /// The terminal's path inside the container (`/dev/pts/N` of the container's devpts): the
    /// child reopens it there so that the descriptors it execs with name a path it can see
    /// (ttyname(3)). Falls back to the inherited descriptors if that path is not the same
    /// terminal.
    pub tty_name: Option<CString>,
}

/// Everything the child needs, prepared by the agent.
#[derive(Debug)]
pub struct ChildPlan {
    /// Namespace flags for clone3 (CLONE_NEWNS, CLONE_NEWPID, ...).
    pub clone_flags: u64,
    /// Joined before cloning (pod-shared or the container's PID namespace).
    pub pid_ns: Option<OwnedFd>,
    /// Joined by the child (exec into a container: mnt, ipc, uts).
    pub setns: Vec<(OwnedFd, i32)>,
    pub cgroup: Option<OwnedFd>,
    pub rootfs: Option<RootfsPlan>,
    pub hostname: Option<CString>,
    pub rlimits: Vec<RlimitSpec>,
    pub caps: CapSets,
    pub last_cap: u32,
    pub no_new_privs: bool,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub cwd: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Paths to try with execve, in order (PATH search done in advance).
    pub exec_candidates: Vec<CString>,
    pub stdio: ChildStdio,
}

/// The parent's ends of the synchronisation pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    /// Child → agent reports.
    pub sync: std::fs::File,
    /// Agent → child "start" (None for exec: it runs at once).
    pub start: Option<OwnedFd>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Sys("pipe", e))
}

/// Clones the child. `wait_for_start`: the child stops before exec until [`start`] is called.
/// Returns once the child has reported its setup finished (or failed).
pub fn spawn(
    plan: ChildPlan,
    reaper: &Reaper,
    wait_for_start: bool,
) -> Result<Spawned, SpawnError> {
    let (sync_r, sync_w) = pipe()?;
    let (start_r, start_w) = if wait_for_start {
        let (r, w) = pipe()?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let reaper = reaper.clone();
    // A fresh thread: joining a PID namespace changes the thread's pid_for_children for good.
    let (pid, exit) = std::thread::spawn(move || -> Result<_, SpawnError> {
        if let Some(ns) = &plan.pid_ns {
            // SAFETY: setns on a valid namespace descriptor; affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(SpawnError::Sys("join PID namespace", nix::Error::last()));
            }
        }
        let argv = ptr_array(&plan.argv);
        let envp = ptr_array(&plan.envp);
        let start_fd = start_r.as_ref().map_or(-1, |f| f.as_raw_fd());
        let sync_fd = sync_w.as_raw_fd();
        let _keep = (&start_r, &sync_w);
        reaper.spawn(|| {
            let mut args = clone_args(
                plan.clone_flags,
                plan.cgroup.as_ref().map(|f| f.as_raw_fd()),
            );
            // SAFETY: clone3 without a new stack behaves like fork: the child continues here on
            // a copy of this thread's stack. It then only runs `child_main`, which makes raw
            // system calls on memory prepared above and never returns.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &mut args as *mut libc::clone_args,
                    std::mem::size_of::<libc::clone_args>(),
                )
            };
            if r == 0 {
                child_main(&plan, &argv, &envp, start_fd, sync_fd);
            }
            if r < 0 {
                return Err(SpawnError::Sys("clone3", nix::Error::last()));
            }
            Ok(Pid::from_raw(r as i32))
        })
    })
    .join()
    .map_err(|_| SpawnError::Sys("spawn thread panicked", nix::Error::EIO))??;
    // The plan and the child's ends of the pipes were dropped with the thread.
    let mut sync = std::fs::File::from(sync_r);
    match read_report(&mut sync)? {
        Some((Stage::Ready, _, _)) => Ok(Spawned {
            pid,
            exit,
            sync,
            start: start_w,
        }),
        Some((stage, item, errno)) => Err(child_error(stage, item, errno)),
        None => Err(SpawnError::Died),
    }
}

/// Releases a child created with `wait_for_start` and waits until it has exec'd (or failed to).
pub fn start(start: OwnedFd, sync: &mut std::fs::File) -> Result<(), SpawnError> {
    // SAFETY: writing one byte from a valid buffer to a descriptor we own.
    if unsafe { libc::write(start.as_raw_fd(), b"s".as_ptr().cast(), 1) } != 1 {
        return Err(SpawnError::Sys("signal start", nix::Error::last()));
    }
    wait_exec(sync)
}

/// Waits for the exec: EOF (close-on-exec) means success.
pub fn wait_exec(sync: &mut std::fs::File) -> Result<(), SpawnError> {
    match read_report(sync)? {
        None => Ok(()),
        Some((stage, item, errno)) => Err(child_error(stage, item, errno)),
    }
}

fn child_error(stage: Stage, item: u32, errno: i32) -> SpawnError {
    SpawnError::Child {
        stage,
        item: (item != u32::MAX).then(|| format!("item {item}")),
        source: nix::Error::from_raw(errno),
    }
}

fn read_report(sync: &mut std::fs::File) -> Result<Option<(Stage, u32, i32)>, SpawnError> {
    let mut buf = [0u8; 12];
    let mut got = 0;
    while got < buf.len() {
        match sync.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(SpawnError::Sys("read child report", nix::Error::last())),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got < buf.len() {
        return Err(SpawnError::Died);
    }
    let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
    Ok(Some((
        Stage::from_u32(u32::from_ne_bytes(word(0))),
        u32::from_ne_bytes(word(4)),
        i32::from_ne_bytes(word(8)),
    )))
}

fn ptr_array(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// clone3 flag (libc's constant is an overflowing c_int).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn clone_args(flags: u64, cgroup: Option<RawFd>) -> libc::clone_args {
    // SAFETY: clone_args is plain data; all-zero is its documented default.
    let mut a: libc::clone_args = unsafe { std::mem::zeroed() };
    a.flags = flags;
    a.exit_signal = libc::SIGCHLD as u64;
    if let Some(fd) = cgroup {
        a.flags |= CLONE_INTO_CGROUP;
        a.cgroup = fd as u64;
    }
    a
}

// ---- child side ------------------------------------------------------------------------------

/// Closes every descriptor from 3 up except `keep` (negative entries are ignored); at most
/// three close_range calls.
pub fn close_all_but(keep: &[RawFd; 2]) {
    let (mut a, mut b) = (keep[0], keep[1]);
    if a > b {
        std::mem::swap(&mut a, &mut b);
    }
    let mut from: libc::c_uint = 3;
    for k in [a, b] {
        if k < 3 {
            continue;
        }
        let k = k as libc::c_uint;
        if k > from {
            // SAFETY: close_range on descriptors of this (single-threaded) child only.
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
    // SAFETY: write of a stack buffer, then _exit; no Rust state is touched after fork.
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
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount/chdir/pivot_root/umount/open/write/close with C strings and
    // descriptors prepared by the agent; failures are reported and end the child.
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
        // A descriptor of the rootfs as this mount namespace sees it (with /proc mounted): the
        // agent's descriptor resolves in the agent's namespace.
        let root = libc::open(
            r.rootfs.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        check(root, sync_fd, Stage::MaskPath, NO_ITEM);
        for (i, (path, value)) in r.sysctls.iter().enumerate() {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            check(fd, sync_fd, Stage::Sysctl, i as u32);
            let len = value.as_bytes().len();
            if libc::write(fd, value.as_ptr().cast(), len) != len as isize {
                fail(sync_fd, Stage::Sysctl, i as u32, errno());
            }
            libc::close(fd);
        }
        for (i, (rel, abs)) in r.masked.iter().enumerate() {
            let fd = open_beneath_raw(root, rel);
            if fd < 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                fail(sync_fd, Stage::MaskPath, i as u32, errno());
            }
            let target = FdPath::new(fd);
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
        for (i, (rel, abs)) in r.readonly.iter().enumerate() {
            let fd = open_beneath_raw(root, rel);
            if fd < 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                fail(sync_fd, Stage::ReadonlyPath, i as u32, errno());
            }
            let target = FdPath::new(fd);
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
        libc::close(root);
        check(libc::chdir(r.rootfs.as_ptr()), sync_fd, Stage::PivotRoot, 0);
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

fn child_main(
    plan: &ChildPlan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    start_fd: RawFd,
    sync_fd: RawFd,
) -> ! {
    // SAFETY: only raw system calls on data prepared before the clone; every
    // path ends in execve or _exit.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

        for (i, (fd, nstype)) in plan.setns.iter().enumerate() {
            check(
                libc::setns(fd.as_raw_fd(), *nstype),
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
                libc::sethostname(h.as_ptr(), h.as_bytes().len()),
                sync_fd,
                Stage::Hostname,
                NO_ITEM,
            );
        }
        let s = &plan.stdio;
        if s.tty {
            check(libc::setsid(), sync_fd, Stage::Stdio, 0);
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
            check(libc::dup2(src, target), sync_fd, Stage::Stdio, i as u32 + 1);
        }
        if s.tty {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0), sync_fd, Stage::Stdio, 4);
        }
        // Drop every descriptor inherited from the agent (other containers' pipes, sockets) so
        // that this child, while it waits for StartContainer, holds nothing but its own.
        close_all_but(&[sync_fd, start_fd]);
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
        if let Err(e) = caps::keep_caps(false) {
            fail(sync_fd, Stage::Capabilities, 2, e);
        }
        check(
            libc::chdir(plan.cwd.as_ptr()),
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
        let ready = [0u8; 12];
        libc::write(sync_fd, ready.as_ptr().cast(), ready.len());
        if start_fd >= 0 {
            let mut b = [0u8; 1];
            let n = libc::read(start_fd, b.as_mut_ptr().cast(), 1);
            if n != 1 {
                // The agent gave up on this container.
                libc::_exit(1);
            }
            libc::close(start_fd);
        }
        let mut err = libc::ENOENT;
        for c in &plan.exec_candidates {
            libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let e = errno();
            // Like execvp: keep looking after ENOENT, remember more telling errors.
            if e != libc::ENOENT && e != libc::ENOTDIR {
                err = e;
            }
        }
        fail(sync_fd, Stage::Exec, NO_ITEM, err)
    }
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

    #[test]
    fn stages_round_trip() {
        for s in [Stage::Ready, Stage::PivotRoot, Stage::Exec] {
            assert_eq!(Stage::from_u32(s as u32), s);
        }
        assert_eq!(Stage::from_u32(12345), Stage::Unknown);
    }
}
