//! Child reaping. As PID 1 the agent inherits every orphan of the guest; a SIGCHLD-driven
//! `waitpid(-1)` loop collects them all and hands the statuses of processes the agent started
//! (registered with [`Reaper::spawn`]) to their waiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// Shell-style exit code: the status, or 128+n for death by signal n.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }
    /// The terminating signal, 0 for a normal exit.
    pub fn signal(self) -> i32 {
        match self {
            ExitStatus::Exited(_) => 0,
            ExitStatus::Signaled(s) => s,
        }
    }
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
}

/// Registry of processes whose exit status someone waits for.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Runs `spawn` (which creates a child and returns its pid) while the reap loop is held
    /// off, and registers the child, so that its exit cannot be collected before the waiter
    /// exists.
    pub fn spawn<E>(
        &self,
        spawn: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, oneshot::Receiver<ExitStatus>), E> {
        let mut inner = self.lock();
        let pid = spawn()?;
        let (tx, rx) = oneshot::channel();
        inner.waiters.insert(pid.as_raw(), tx);
        Ok((pid, rx))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (single inserts/removes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Collects every exited child without blocking and dispatches registered ones.
    /// Returns the number of children reaped.
    pub fn reap_all(&self) -> usize {
        let mut inner = self.lock();
        let mut n = 0;
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => break,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
                Ok(s) => s,
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, ExitStatus::Exited(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, ExitStatus::Signaled(sig as i32)),
                _ => continue,
            };
            n += 1;
            match inner.waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => tracing::debug!(pid = pid.as_raw(), ?exit, "reaped orphan"),
            }
        }
        n
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = signal(SignalKind::child())?;
        loop {
            self.reap_all();
            sigchld.recv().await;
        }
    }
}
