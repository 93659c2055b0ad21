//! Exit and OOM tracking: a process's exit is published only after its output was drained.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use podvisor_proto::v1::WaitProcessResponse;
use tokio::sync::{oneshot, watch};

use super::cgroup::Cgroup;
use super::io::ProcessIo;
use crate::reaper::ExitStatus;

pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A process started by the agent (a container's init or an exec).
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    pub io: Arc<ProcessIo>,
    pub started_at: std::sync::Mutex<i64>,
    pub exit: watch::Receiver<Option<WaitProcessResponse>>,
}

impl Process {
    /// Starts tracking: when the reaper reports the exit, the cgroup's oom_kill counter is
    /// compared with its value now, the output is drained, and the result is published.
    pub fn track(
        pid: i32,
        io: Arc<ProcessIo>,
        exit: oneshot::Receiver<ExitStatus>,
        cgroup: Option<Cgroup>,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let oom_before = cgroup.as_ref().map_or(0, Cgroup::oom_kills);
        let p = Arc::new(Self {
            pid,
            io: io.clone(),
            started_at: std::sync::Mutex::new(now_nanos()),
            exit: rx,
        });
        let started = p.clone();
        tokio::spawn(async move {
            let status = exit.await.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
            let finished = now_nanos();
            let oom_killed = cgroup.as_ref().is_some_and(|c| c.oom_kills() > oom_before);
            io.drained().await;
            let started_at = *started.started_at.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(Some(WaitProcessResponse {
                exit_code: status.code(),
                signal: status.signal(),
                oom_killed,
                started_at_unix_nanos: started_at,
                finished_at_unix_nanos: finished,
            }));
        });
        p
    }

    pub fn exited(&self) -> Option<WaitProcessResponse> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> WaitProcessResponse {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => (*v).unwrap_or_default(),
            Err(_) => WaitProcessResponse::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exit_codes() {
        use crate::reaper::ExitStatus;
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
        assert_eq!(ExitStatus::Signaled(9).signal(), 9);
        assert_eq!(ExitStatus::Exited(0).signal(), 0);
    }
}
