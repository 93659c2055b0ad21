//! A pod VM's process as the pod manager sees it: blocking calls on its VMM, how long it
//! may take to stop, and whether it has ended.

use std::time::{Duration, Instant};

use super::error::PodError;
use crate::vmm::{VmmError, VmmHandle};

/// How long a VMM may take to stop before it is killed.
pub(super) const VMM_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a broken agent connection waits for the VMM to show as ended.
const VMM_END_GRACE: Duration = Duration::from_secs(2);

/// Whether the VMM has ended or ends within [`VMM_END_GRACE`]: a killed VMM's sockets close
/// a moment before `/proc` shows it gone.
pub(super) async fn vmm_ended(handle: &VmmHandle) -> bool {
    let until = Instant::now() + VMM_END_GRACE;
    loop {
        if !handle.is_alive() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `f`, a blocking call on the VMM of sandbox `sandbox`, on a blocking thread. `what`
/// names the task when the task itself fails.
pub(super) async fn blocking<T: Send + 'static>(
    sandbox: &str,
    what: &str,
    f: impl FnOnce() -> Result<T, VmmError> + Send + 'static,
) -> Result<T, PodError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PodError::Internal(format!("{what} task: {e}")))?
        .map_err(|source| PodError::Vmm {
            sandbox: sandbox.to_string(),
            source,
        })
}
