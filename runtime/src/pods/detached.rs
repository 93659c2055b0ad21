//! Requests that create something (RunPodSandbox, CreateContainer) must not be cut short
//! when their caller goes away: kubelet cancels a call whose deadline passed, and a future
//! dropped half-way through would leave a VMM, a namespace, a TAP or an IP lease that no
//! record names. Such work runs on a task of its own ([`finish_or_undo`]) and always
//! finishes; when nobody is left to take its result, what it made is removed again.

use std::future::Future;

use tokio::sync::oneshot;

use super::error::PodError;
use super::{ContainerSpec, PodManager, SandboxSpec};

impl PodManager {
    /// [`PodManager::run_sandbox`] for a CRI request: finished even if the request is
    /// cancelled, and then stopped and removed.
    pub async fn run_sandbox_detached(&self, spec: SandboxSpec) -> Result<String, PodError> {
        let this = self.clone();
        self.finish_or_undo(
            "RunPodSandbox",
            async move { this.run_sandbox(spec).await },
            |pods, id| async move {
                pods.stop_sandbox(&id).await?;
                pods.remove_sandbox(&id).await
            },
        )
        .await
    }

    /// [`PodManager::create_container`] for a CRI request: finished even if the request is
    /// cancelled, and then removed.
    pub async fn create_container_detached(
        &self,
        sandbox_id: &str,
        spec: ContainerSpec,
    ) -> Result<String, PodError> {
        let (this, sandbox) = (self.clone(), sandbox_id.to_string());
        self.finish_or_undo(
            "CreateContainer",
            async move { this.create_container(&sandbox, spec).await },
            |pods, id| async move { pods.remove_container(&id).await },
        )
        .await
    }

    /// Runs `work` (on a task of its own) to its end, and returns its result if the caller
    /// is still there. If the caller was dropped before the result reached it, `undo` runs
    /// with the id `work` made (and is logged), so a cancelled request leaves nothing.
    pub(super) async fn finish_or_undo<W, U, UF>(
        &self,
        what: &'static str,
        work: W,
        undo: U,
    ) -> Result<String, PodError>
    where
        W: Future<Output = Result<String, PodError>> + Send + 'static,
        U: FnOnce(PodManager, String) -> UF + Send + 'static,
        UF: Future<Output = Result<(), PodError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let result = work.await;
            // The send fails only when the receiver is gone: the request was cancelled.
            if let Err(Ok(id)) = tx.send(result) {
                tracing::warn!(id = %id, "{what} was cancelled by its caller; removing what it made");
                if let Err(e) = undo(this, id.clone()).await {
                    tracing::warn!(
                        id = %id,
                        "undo of a cancelled {what}: {}",
                        podvisor_common::error_chain(&e)
                    );
                }
            }
        });
        rx.await
            .map_err(|_| PodError::Internal(format!("{what}: its task ended without a result")))?
    }
}
