//! Name reservation, as kubelet relies on it: a pod's metadata (name, namespace, uid,
//! attempt) belongs to one sandbox, and a container's (name, attempt) to one container of
//! its pod, from the request that creates it until its removal. A RunPodSandbox or
//! CreateContainer that kubelet retries after a timeout then gets AlreadyExists instead of
//! making a second pod or container. The sandboxes and containers in memory (recovered from
//! their records after a restart) hold the names of those that exist; [`PendingNames`]
//! holds those of sandboxes still being created. The checks are the manager's, in
//! [`super::sandbox`] and [`super::container`].

use std::collections::HashSet;
use std::sync::Mutex;

use podvisor_common::lock;

use super::error::PodError;

/// The key containerd reserves a pod's name under: `name_namespace_uid_attempt`.
pub(super) fn sandbox_key(name: &str, namespace: &str, uid: &str, attempt: u32) -> String {
    format!("{name}_{namespace}_{uid}_{attempt}")
}

/// The names of sandboxes whose RunPodSandbox is running.
#[derive(Debug, Default)]
pub(super) struct PendingNames(Mutex<HashSet<String>>);

/// A pending sandbox name; released when dropped (the request ended, failed or was
/// cancelled). By then a sandbox that was made holds its name itself.
#[derive(Debug)]
pub(super) struct Reservation<'a> {
    names: &'a PendingNames,
    key: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.names.0).remove(&self.key);
    }
}

impl PendingNames {
    /// Reserves `key` unless `owner` (called under the reservation lock, so that no
    /// request can slip between the check and the reservation) names the sandbox that has
    /// it or another request is creating one with it.
    pub(super) fn reserve(
        &self,
        key: String,
        owner: impl FnOnce(&str) -> Option<String>,
    ) -> Result<Reservation<'_>, PodError> {
        let mut pending = lock(&self.0);
        if let Some(id) = owner(&key) {
            return Err(PodError::AlreadyExists(format!(
                "pod name {key:?} is reserved for sandbox {id}; remove it first"
            )));
        }
        if !pending.insert(key.clone()) {
            return Err(PodError::AlreadyExists(format!(
                "pod name {key:?} is reserved for a sandbox being created"
            )));
        }
        Ok(Reservation { names: self, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_reserved_once_until_released() {
        let names = PendingNames::default();
        let key = sandbox_key("web", "default", "uid-1", 0);
        assert_eq!(key, "web_default_uid-1_0");
        {
            let _r = names.reserve(key.clone(), |_| None).expect("free");
            let e = names.reserve(key.clone(), |_| None).unwrap_err();
            assert!(
                matches!(&e, PodError::AlreadyExists(m) if m.contains("being created")),
                "{e}"
            );
        }
        assert!(
            lock(&names.0).is_empty(),
            "a dropped reservation frees the name"
        );
        let e = names
            .reserve(key.clone(), |k| (k == key).then(|| "abc".to_string()))
            .unwrap_err();
        assert!(
            matches!(&e, PodError::AlreadyExists(m) if m.contains("sandbox abc")),
            "{e}"
        );
        assert!(lock(&names.0).is_empty(), "a refused name is not reserved");
        assert_ne!(
            sandbox_key("web", "default", "uid-1", 0),
            sandbox_key("web", "default", "uid-1", 1),
            "another attempt is another name"
        );
    }
}
