//! Logging a guest can trigger, rate-limited per call site (as Firecracker limits its
//! guest-triggered errors): a guest that makes a device complain in a loop must not fill
//! the host's disk through `vmm.log`. Each call site of [`warn_limited!`](crate::warn_limited)
//! logs at most [`BURST`] lines per [`WINDOW`]; the next line after a quiet spell says how
//! many were dropped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget.
#[derive(Debug)]
pub struct Site {
    state: Mutex<Option<SiteState>>,
}

#[derive(Debug)]
struct SiteState {
    window_start: Instant,
    logged: u32,
    dropped: u64,
}

impl Site {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(None),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the lines dropped since the last
    /// one logged, or None (this one is dropped and counted).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = guard.get_or_insert(SiteState {
            window_start: now,
            logged: 0,
            dropped: 0,
        });
        if now.saturating_duration_since(st.window_start) >= WINDOW {
            st.window_start = now;
            st.logged = 0;
        }
        if st.logged < BURST {
            st.logged += 1;
            Some(std::mem::take(&mut st.dropped))
        } else {
            st.dropped += 1;
            None
        }
    }
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for what a guest can cause, limited per call site (see [`crate::logger`]).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static SITE: $crate::logger::Site = $crate::logger::Site::new();
        if let Some(dropped) = SITE.admit(std::time::Instant::now()) {
            if dropped > 0 {
                tracing::warn!(dropped, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_a_burst_per_window_and_counts_the_rest() {
        let site = Site::new();
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..1000).filter_map(|_| site.admit(t0)).collect();
        assert_eq!(admitted, vec![0; BURST as usize]);
        // Within the window nothing more; after it, the first line reports the drops.
        assert_eq!(site.admit(t0 + WINDOW / 2), None);
        assert_eq!(site.admit(t0 + WINDOW), Some(1000 - u64::from(BURST) + 1));
        assert_eq!(site.admit(t0 + WINDOW), Some(0));
    }
}
