//! Pod stop: every container killed at once and the pod's share flushed. Nothing is torn
//! down that the VM's end removes anyway (mounts, cgroups): under an emulated guest kernel
//! each unmount costs milliseconds to seconds.

use std::sync::Arc;
use std::time::Duration;

use podvisor_proto::v1::{KillAllRequest, KillAllResponse};
use tokio::time::Instant;
use tonic::Status;

use super::{Container, Manager, internal, lock};

/// How long KillAll waits for the killed inits when the request names no time.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The longest wait a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

impl Container {
    /// SIGKILLs the container's processes (every one in its cgroup, else its init); a
    /// created container that never started exits once its start pipe is closed.
    pub(super) fn kill(&self) {
        lock(&self.start).take();
        match &self.cgroup {
            Some(cg) => {
                let _ = cg.kill_all();
            }
            None => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.init.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Manager {
    /// KillAll: kills every container whose init still runs, waits for them, flushes the
    /// share (when mounted) so their writes to volumes are on the host.
    pub async fn kill_all(&self, r: &KillAllRequest) -> Result<KillAllResponse, Status> {
        let wait = match r.timeout_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(ms.into()).min(MAX_WAIT),
        };
        let live: Vec<Arc<Container>> = lock(&self.containers)
            .values()
            .filter(|c| c.init.exited().is_none())
            .cloned()
            .collect();
        for c in &live {
            c.kill();
        }
        let deadline = Instant::now() + wait;
        let mut left = 0;
        for c in &live {
            if tokio::time::timeout_at(deadline, c.init.wait())
                .await
                .is_err()
            {
                left += 1;
            }
        }
        if *lock(&self.share_mounted) {
            let share = self.paths.share();
            tokio::task::spawn_blocking(move || {
                let dir = std::fs::File::open(&share)?;
                nix::unistd::syncfs(&dir).map_err(std::io::Error::from)
            })
            .await
            .map_err(|e| internal("sync task", &e))?
            .map_err(|e| internal("sync the pod's share", &e))?;
        }
        tracing::info!(killed = live.len(), left, "pod stopping: containers killed");
        Ok(KillAllResponse {
            killed: live.len() as u32,
            left,
        })
    }
}
