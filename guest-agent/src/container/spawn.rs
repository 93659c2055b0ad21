//! Namespaces and process creation. The agent is multi-threaded, so the cloned child may only
//! make raw system calls until it execs: everything (C strings, argv/envp arrays, descriptors)
//! is prepared in a [`ChildPlan`] before `clone3`, and the child reports failures as fixed-size
//! records on a pipe. The child is cloned straight into its cgroup (CLONE_INTO_CGROUP).
//!
//! The child shares the agent's address space (CLONE_VM) and runs on a stack of its own until
//! it execs, as posix_spawn does. A fork-style copy of the agent's page tables, and the
//! copy-on-write faults that follow on both sides, cost seconds per container on a kvm_pvm host
//! where every guest page fault is emulated. Sharing memory means the child's stack and the plan
//! it reads must outlive it: a dedicated "spawner" thread owns them, clones the child (having
//! first joined a pod-shared PID namespace, which changes that thread for good), and frees them
//! only once the child has exec'd or exited (EOF on a close-on-exec pipe only the child holds:
//! the kernel releases the old address space before it closes those descriptors). The child
//! also runs on that thread's TLS (errno), which stays valid because the thread lives on
//! meanwhile, blocked in `read` with every signal masked.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;
use podvisor_common::last_errno as errno;

use super::caps::{self, CapSets, RlimitSpec};
use super::seccomp;
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
    Seccomp = 17,
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
            Seccomp,
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
    /// Installed just before execve with no_new_privs; otherwise before the user and
    /// capabilities change, while the child may still install it (as runc does).
    pub seccomp: Vec<libc::sock_filter>,
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

/// The child's stack: 1 MiB reserved, touched lazily, a guard page below it.
const CHILD_STACK_SIZE: usize = 1 << 20;
const GUARD_SIZE: usize = 4096;

/// An anonymous mapping the child runs on until it execs.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by one thread at a time; the raw pointer is only an address.
unsafe impl Send for ChildStack {}

impl ChildStack {
    fn new() -> Result<Self, nix::Error> {
        let len = CHILD_STACK_SIZE + GUARD_SIZE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(nix::Error::last());
        }
        let stack = Self { base, len };
        // SAFETY: the lowest page of the mapping made above becomes the guard.
        if unsafe { libc::mprotect(base, GUARD_SIZE, libc::PROT_NONE) } < 0 {
            return Err(nix::Error::last());
        }
        Ok(stack)
    }

    /// The lowest usable address and the usable size (what clone3 wants).
    fn usable(&self) -> (u64, u64) {
        (
            self.base as u64 + GUARD_SIZE as u64,
            CHILD_STACK_SIZE as u64,
        )
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the child that ran on it has
        // exec'd or exited (see the module documentation).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// What the child's entry point receives (a pointer into the spawner thread's frame).
struct ChildArgs<'a> {
    plan: &'a ChildPlan,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    start_fd: RawFd,
    sync_fd: RawFd,
    held_fd: RawFd,
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` points to the `ChildArgs` in the spawner thread's frame, which stays alive
    // (and unmodified) until this child has exec'd or exited.
    let a = unsafe { &*(arg as *const ChildArgs<'_>) };
    child_main(a.plan, a.argv, a.envp, a.start_fd, a.sync_fd, a.held_fd)
}

/// clone3 with a new stack: the child starts on `args.stack` and calls `entry(arg)`, which never
/// returns. Returns the child's pid (or -errno) in the parent.
///
/// # Safety
/// `args` must describe a valid stack that outlives the child's use of it, and `entry` must
/// not return; with CLONE_VM the child shares every page of the caller.
unsafe fn clone3_on_stack(
    args: &mut libc::clone_args,
    entry: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: the raw clone3 system call. In the parent it behaves as any syscall (rax = result,
    // rcx and r11 clobbered). The child resumes at the next instruction on the new stack (the
    // kernel set rsp to its top, 16-byte aligned as a page-aligned mapping), never returns into
    // this frame: it clears the frame pointer and calls `entry` with `arg`; `ud2` traps should
    // it ever come back.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut libc::clone_args,
            in("rsi") std::mem::size_of::<libc::clone_args>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Blocks every signal in the calling thread; returns the previous mask.
fn block_all_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation and pthread_sigmask on this thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
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
    // Only the child keeps the write end: EOF tells the spawner thread the child let go of the
    // shared address space.
    let (held_r, held_w) = pipe()?;
    let reaper = reaper.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            // Everything the child reads lives in this frame until it has let go of it.
            let argv = ptr_array(&plan.argv);
            let envp = ptr_array(&plan.envp);
            let child = ChildArgs {
                plan: &plan,
                argv: &argv,
                envp: &envp,
                start_fd: start_r.as_ref().map_or(-1, |f| f.as_raw_fd()),
                sync_fd: sync_w.as_raw_fd(),
                held_fd: held_w.as_raw_fd(),
            };
            let stack = ChildStack::new();
            let cloned = stack
                .as_ref()
                .map_err(|e| SpawnError::Sys("map child stack", *e))
                .and_then(|stack| clone_child(&child, stack, &reaper));
            let ok = cloned.is_ok();
            let _ = tx.send(cloned);
            // The child has its own copies of these.
            drop((start_r, sync_w, held_w));
            if ok {
                // Blocks until the child exec'd or exited; signals are blocked in this thread.
                let mut held = std::fs::File::from(held_r);
                let mut b = [0u8; 1];
                loop {
                    match held.read(&mut b) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // Cannot tell when the child is done: leak its memory rather than
                        // free what it may still run on.
                        Err(_) => {
                            std::mem::forget((stack, argv, envp, plan));
                            return;
                        }
                    }
                }
            }
            // `child`, `argv`, `envp` and `plan` go out of scope with this closure, after this.
            drop(stack);
        })
        .map_err(|_| SpawnError::Sys("start the spawner thread", nix::Error::EAGAIN))?;
    let (pid, exit) = rx
        .recv()
        .map_err(|_| SpawnError::Sys("spawner thread died", nix::Error::EIO))??;
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

/// The spawner thread's half: joins the PID namespace, clones the child onto `stack` and
/// registers it with the reaper.
fn clone_child(
    child: &ChildArgs<'_>,
    stack: &ChildStack,
    reaper: &Reaper,
) -> Result<(Pid, tokio::sync::oneshot::Receiver<ExitStatus>), SpawnError> {
    if let Some(ns) = &child.plan.pid_ns {
        // SAFETY: setns on a valid namespace descriptor; affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            return Err(SpawnError::Sys("join PID namespace", nix::Error::last()));
        }
    }
    // The child starts with this mask: no agent signal handler may run in it before it has
    // reset them all.
    block_all_signals();
    reaper.spawn(|| {
        let mut args = clone_args(
            child.plan.clone_flags | libc::CLONE_VM as u64,
            child.plan.cgroup.as_ref().map(|f| f.as_raw_fd()),
        );
        let (lo, size) = stack.usable();
        args.stack = lo;
        args.stack_size = size;
        // SAFETY: the stack and everything `child` points to live in the spawner thread until
        // the child has exec'd or exited (it waits on the `held` pipe before dropping them);
        // `child_entry` never returns.
        let r = unsafe {
            clone3_on_stack(
                &mut args,
                child_entry,
                child as *const ChildArgs<'_> as *mut libc::c_void,
            )
        };
        if r < 0 {
            return Err(SpawnError::Sys("clone3", nix::Error::from_raw(-r as i32)));
        }
        Ok(Pid::from_raw(r as i32))
    })
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

// The child's side between clone and exec is one straight sequence of raw system calls on
// a borrowed stack (no allocation, no locks): kept in one piece so it can be read and
// audited top to bottom, rather than split under the 100-line limit.
#[allow(clippy::too_many_lines)]
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

/// The kernel's `struct sigaction` (x86_64): all zero is SIG_DFL with no flags.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

// The child's side between clone and exec is one straight sequence of raw system calls on
// a borrowed stack (no allocation, no locks): kept in one piece so it can be read and
// audited top to bottom, rather than split under the 100-line limit.
#[allow(clippy::too_many_lines)]
fn child_main(
    plan: &ChildPlan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    start_fd: RawFd,
    sync_fd: RawFd,
    held_fd: RawFd,
) -> ! {
    // SAFETY: only raw system calls on data prepared before the clone; every
    // path ends in execve or _exit.
    unsafe {
        // The agent's handlers (and its ignored SIGPIPE) are not the container's: default
        // dispositions, then unblock (the spawner thread cloned with every signal blocked).
        // The raw system call: glibc's sigaction refuses the signals it reserves for itself.
        let dfl = KernelSigaction::default();
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
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
        close_all_but(&[sync_fd, start_fd, held_fd]);
        if let Err(e) = caps::apply_rlimits(&plan.rlimits) {
            fail(sync_fd, Stage::Rlimits, NO_ITEM, e);
        }
        if let Err(e) = podvisor_common::caps::drop_bounding(plan.caps.bounding, plan.last_cap) {
            fail(sync_fd, Stage::Capabilities, 0, e);
        }
        if let Err(e) = caps::keep_caps(true) {
            fail(sync_fd, Stage::Capabilities, 1, e);
        }
        if !plan.no_new_privs
            && !plan.seccomp.is_empty()
            && let Err(e) = seccomp::install(&plan.seccomp)
        {
            fail(sync_fd, Stage::Seccomp, 0, e);
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
            && let Err(e) = podvisor_common::caps::set_no_new_privs()
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
        if plan.no_new_privs
            && !plan.seccomp.is_empty()
            && let Err(e) = seccomp::install(&plan.seccomp)
        {
            fail(sync_fd, Stage::Seccomp, 1, e);
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
