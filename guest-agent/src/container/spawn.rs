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
//!
//! This module is the agent's side; the child's is [`super::child`], the plan both read is
//! in [`super::plan`].

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

use super::child;
use super::plan::{ChildPlan, Stage};
use crate::reaper::{ExitStatus, Reaper};

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
    child::child_main(a.plan, a.argv, a.envp, a.start_fd, a.sync_fd, a.held_fd)
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
