//! Single flight: concurrent requests for the same key run once; every caller gets the
//! first one's result. The work runs in its own task, so a caller that gives up (a
//! cancelled CRI request) does not cancel it for the others, and a retry joins it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use podvisor_common::lock;
use tokio::sync::watch;

use super::error::ImageError;

type Outcome<T> = Option<Result<T, ImageError>>;

/// Requests in flight, by key.
pub(crate) struct SingleFlight<T> {
    calls: Arc<Mutex<HashMap<String, watch::Receiver<Outcome<T>>>>>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight {
            calls: Arc::default(),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// Runs `work()` for `key` unless a run for `key` is in flight, and returns that run's
    /// result either way. `work` is only called by the first caller.
    pub(crate) async fn run<F>(&self, key: &str, work: impl FnOnce() -> F) -> Result<T, ImageError>
    where
        F: Future<Output = Result<T, ImageError>> + Send + 'static,
    {
        let mut rx = {
            let mut calls = lock(&self.calls);
            match calls.get(key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    calls.insert(key.to_string(), rx.clone());
                    let fut = work();
                    let done = Forget {
                        calls: Arc::clone(&self.calls),
                        key: key.to_string(),
                    };
                    tokio::spawn(async move {
                        let result = fut.await;
                        // Result first, then forget the key: a caller arriving in between
                        // still gets this result instead of starting over.
                        let _ = tx.send(Some(result));
                        drop(done);
                    });
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err(ImageError::Internal(format!("{key}: no result")))),
            Err(_) => Err(ImageError::Internal(format!(
                "{key}: the task doing it ended without a result"
            ))),
        }
    }
}

/// Removes a key when its task ends, even by panic.
struct Forget<T> {
    calls: Arc<Mutex<HashMap<String, watch::Receiver<Outcome<T>>>>>,
    key: String,
}

impl<T> Drop for Forget<T> {
    fn drop(&mut self) {
        lock(&self.calls).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // current_thread runtime: the spawned run cannot start before every caller below has
    // been polled once, so all four join the same run.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_callers_share_one_run() {
        let flight = SingleFlight::<usize>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let callers = (0..4).map(|_| {
            let runs = Arc::clone(&runs);
            flight.run("key", move || async move {
                tokio::task::yield_now().await;
                Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
            })
        });
        for result in futures::future::join_all(callers).await {
            assert_eq!(result.expect("result"), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // Once done, the key runs again.
        let again = flight.run("key", || async { Ok(7) }).await.expect("run");
        assert_eq!(again, 7);
    }

    #[tokio::test]
    async fn errors_are_shared_and_a_panic_frees_the_key() {
        let flight = SingleFlight::<u32>::default();
        let err = flight
            .run("k", || async { Err(ImageError::NotFound("x".into())) })
            .await
            .expect_err("error");
        assert!(matches!(err, ImageError::NotFound(_)));

        let err = flight
            .run("k", || async { panic!("boom") })
            .await
            .expect_err("panicked");
        assert!(matches!(err, ImageError::Internal(_)), "{err}");
        assert_eq!(flight.run("k", || async { Ok(1) }).await.expect("run"), 1);
    }
}
