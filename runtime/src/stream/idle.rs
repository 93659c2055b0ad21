//! A session's idle clock: every byte moved either way touches it; a session that moved
//! nothing for the configured idle timeout is closed (containerd's `stream_idle_timeout`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When a session last moved data. Cheap to clone; clones share the clock.
#[derive(Debug, Clone)]
pub struct Idle {
    start: Instant,
    /// Milliseconds from `start` to the last activity.
    last_ms: Arc<AtomicU64>,
    timeout: Duration,
}

impl Idle {
    /// A clock started now, expiring after `timeout` without activity.
    pub fn new(timeout: Duration) -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
            timeout,
        }
    }

    /// Notes activity now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Completes once the session has been idle for the timeout.
    pub async fn expired(&self) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + self.timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A spawned task aborted when this is dropped: a session's helper task ends with it.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn activity_postpones_the_end() {
        // Only lower bounds: a timer never fires early, however loaded the host.
        let idle = Idle::new(Duration::from_millis(200));
        let watch = idle.clone();
        let t0 = Instant::now();
        let ended = tokio::spawn(async move {
            watch.expired().await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        idle.touch();
        let at = ended.await.expect("task");
        assert!(at - t0 >= Duration::from_millis(350), "{:?}", at - t0);
    }
}
