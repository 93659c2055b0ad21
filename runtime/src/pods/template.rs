//! VM templates: per handler, one VM booted until its agent answers, paused and snapshotted.
//! RunPodSandbox restores it (milliseconds of VMM work instead of a kernel boot), then the
//! agent takes on the pod's identity (network and MAC, hostname, DNS, a fresh random seed,
//! the host's clock: see `PodManager::boot`).
//!
//! A template lives in `<root_dir>/templates/<key>/` (`vm.state`, `vm.mem`, `template.json`).
//! The key hashes every input: the VMM executable, kernel and image contents, vCPUs, memory,
//! command line and drive layout; a changed input means a new key, so the next pod builds a
//! new template. The memory file is mapped private copy-on-write by every pod restored from
//! it: pages none of them wrote stay shared in the page cache.
//!
//! The template VM runs in a network namespace of its own with a TAP the VMM creates, the
//! same devices as a pod VM (root image, image slots, NIC, vsock), and the fixed
//! [`TEMPLATE_MAC`] on its NIC.
//!
//! podvisord builds the templates of its handlers when it starts (so the first pod does not
//! wait for a kernel boot) and removes templates no handler has any more. A template VM
//! still building when podvisord stops is killed; one a killed podvisord left behind is
//! found through its `build.json` and killed by the next build or prune.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use podvisor_vmm_api::client::{self, ClientError};
use podvisor_vmm_api::config::{JAIL_POD_DIR, RestoreConfig};
use sha2::{Digest, Sha256};

use podvisor_common::{IoError, error_chain, lock};

use super::agent::{AGENT_BOOT_TIMEOUT, connect_agent};
use super::vm::VMM_STOP_TIMEOUT;
use crate::config::Handler;
use crate::network::netns::{self, NetNs, NetnsError};
use crate::vmm::{self, DriveSpec, JailUser, VmmError, VmmHandle, VmmSpec};

/// The directory of templates under the root directory.
pub const TEMPLATES_DIR: &str = "templates";
/// The guest NIC's MAC in every template; a restored pod's agent replaces it by the pod's.
pub const TEMPLATE_MAC: &str = "02:70:64:76:00:01";
const STATE_FILE: &str = "vm.state";
const MEM_FILE: &str = "vm.mem";
const META_FILE: &str = "template.json";
/// The template VM's own directory while it runs (removed after the snapshot).
const BUILD_DIR: &str = "build";
/// The template VM's [`VmmHandle`] while it runs, for a later podvisord to stop it.
const BUILD_RECORD: &str = "build.json";
/// The template VM's TAP, in the template's own namespace.
const TEMPLATE_TAP: &str = "tap0";
/// Hex digits of the key naming a template directory.
const KEY_LEN: usize = 16;
/// How long podvisord's shutdown waits for a template build to end once its VM is stopped.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a template could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file operation.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Launching or stopping the template VM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The template's network namespace.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The template VM's agent never answered.
    #[error("template VM: {0}")]
    Agent(String),
    /// Pausing or snapshotting through the VMM's API.
    #[error("template VM: {what}")]
    Api {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// A blocking task died.
    #[error("template task: {0}")]
    Task(String),
    /// podvisord is shutting down: no template is built.
    #[error("podvisord is stopping")]
    Stopping,
}

/// What ends the names of the build namespaces and cgroups of the templates under
/// `templates` (a podvisord's `<root_dir>/templates`): 8 hex digits of its path's hash.
fn build_tag(templates: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    hex::encode(&Sha256::digest(templates.as_os_str().as_bytes())[..4])
}

/// The start of a template build namespace's name.
const BUILD_NETNS_PREFIX: &str = "podvisor-tpl-";

/// The network namespace `template`'s VM is built in.
fn build_netns(template: &Template) -> String {
    format!("{BUILD_NETNS_PREFIX}{}", template.build_name())
}

/// Whether `netns` names a namespace a template of `templates` (a podvisord's templates
/// directory) is built in; other podvisords on the host build in their own.
pub fn is_build_netns_of(netns: &str, templates: &Path) -> bool {
    netns
        .strip_prefix(BUILD_NETNS_PREFIX)
        .and_then(|rest| rest.strip_suffix(&format!("-{}", build_tag(templates))))
        .is_some_and(|key| key.len() == 8 && key.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `name` can be a template directory's name (a key).
fn is_key(name: &str) -> bool {
    name.len() == KEY_LEN && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A built template.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its key.
    pub key: String,
    /// Its directory.
    pub dir: PathBuf,
}

impl Template {
    /// What the VMM's `--restore` needs.
    pub fn restore_config(&self) -> RestoreConfig {
        RestoreConfig {
            state: self.dir.join(STATE_FILE),
            mem: self.dir.join(MEM_FILE),
        }
    }

    /// The name of this template's build VM, its network namespace and cgroup: the key's
    /// first 8 digits, then the [`build_tag`] of the templates directory. Two podvisords
    /// with their own root directories on one host (tests run several) may build the same
    /// template at once; neither may take the other's namespace or cgroup (removing a
    /// cgroup another VMM runs in fails, and a "leftover" namespace would be deleted under
    /// it).
    fn build_name(&self) -> String {
        let templates = self.dir.parent().unwrap_or(&self.dir);
        format!(
            "{}-{}",
            &self.key[..8.min(self.key.len())],
            build_tag(templates)
        )
    }

    fn is_complete(&self) -> bool {
        self.dir.join(STATE_FILE).is_file() && self.dir.join(MEM_FILE).is_file()
    }

    /// Removes the template (a restore from it failed): the next pod builds a new one.
    pub fn discard(&self) {
        if let Err(e) = vmm::remove_pod_dir(&self.dir) {
            tracing::warn!(template = %self.key, "{e}");
        }
    }
}

/// What identifies a file's content cheaply: hashing it again only when this changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Stamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Result<Stamp, TemplateError> {
    let m = std::fs::metadata(path).map_err(IoError::at("inspect", path))?;
    Ok(Stamp {
        path: path.to_path_buf(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The templates of all handlers.
#[derive(Debug)]
pub struct Templates {
    root: PathBuf,
    /// SHA-256 of file contents by stamp.
    digests: Arc<Mutex<HashMap<Stamp, String>>>,
    /// One build at a time: two pods of a new handler wait for the same template.
    build: tokio::sync::Mutex<()>,
    /// The template VM being built, killed by [`Templates::shutdown`].
    building: Arc<Mutex<Option<(Template, VmmHandle)>>>,
    /// Set by [`Templates::shutdown`]: a build that fails now failed because of it.
    stopping: AtomicBool,
}

/// Everything a template depends on.
#[derive(Debug, Clone)]
pub struct TemplateInputs {
    /// The handler (kernel, image, vCPUs, memory, command line).
    pub handler: Handler,
    /// The VMM executable: its device state layout is part of the snapshot.
    pub vmm_binary: PathBuf,
    /// The drives after the root drive, as pods get them.
    pub drives: Vec<DriveSpec>,
    /// The template VM's jail (not part of the key: the snapshot is the same).
    pub jail: Option<JailUser>,
}

impl Templates {
    /// Templates under `<root_dir>/templates`.
    pub fn new(root_dir: &Path) -> Self {
        Self {
            root: root_dir.join(TEMPLATES_DIR),
            digests: Arc::new(Mutex::new(HashMap::new())),
            build: tokio::sync::Mutex::new(()),
            building: Arc::new(Mutex::new(None)),
            stopping: AtomicBool::new(false),
        }
    }

    /// Whether [`Templates::shutdown`] ran.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// For podvisord's shutdown: kills the template VM being built, if any, removes what it
    /// left (its template directory and network namespace), and waits (at most
    /// [`SHUTDOWN_WAIT`]) until no build runs, so that a VM still being launched is not left
    /// behind: its build sees the stop flag and stops it. No build starts afterwards.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let building = lock(&self.building).take();
        if let Some((template, handle)) = building {
            tracing::info!(template = %template.key, "stopping the template VM being built");
            let killed = tokio::task::spawn_blocking(move || match handle.kill() {
                Ok(()) => {
                    if let Err(e) = handle.remove_cgroup() {
                        tracing::warn!(template = %template.key, "{}", error_chain(&e));
                    }
                    template.discard();
                    delete_build_netns(&template);
                }
                // The directory keeps its build record: the next podvisord kills it.
                Err(e) => {
                    tracing::warn!(template = %template.key, "kill template VM {}: {e}", handle.pid)
                }
            })
            .await;
            if let Err(e) = killed {
                tracing::warn!("template kill task: {e}");
            }
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, self.build.lock())
            .await
            .is_err()
        {
            tracing::warn!("a template build did not end within {SHUTDOWN_WAIT:?} of the stop");
        }
    }

    /// Removes every template whose key is not in `keep` (made by an earlier VMM, kernel,
    /// image or handler configuration), stopping a template VM left building there. Entries
    /// that are no template directory are left alone. Blocking.
    pub fn prune(&self, keep: &[String]) -> Vec<String> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!("read {}: {e}", self.root.display());
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir || !is_key(&name) || keep.contains(&name) {
                continue;
            }
            let template = Template {
                dir: entry.path(),
                key: name.clone(),
            };
            if let Err(e) = stop_leftover_build(&template) {
                tracing::warn!(template = %name, "old template kept: {e}");
                continue;
            }
            template.discard();
            tracing::info!(template = %name, "removed a template no handler uses");
            removed.push(name);
        }
        removed
    }

    /// The key of the template for `inputs` (hashes files it has not seen: blocking).
    pub fn key(&self, inputs: &TemplateInputs) -> Result<String, TemplateError> {
        template_key(&self.digests, inputs)
    }

    /// The template for `inputs`, built now when there is none. Errors are the caller's to
    /// log: pods then boot cold.
    pub async fn get(&self, inputs: &TemplateInputs) -> Result<Template, TemplateError> {
        let (digests, owned) = (self.digests.clone(), inputs.clone());
        let key = tokio::task::spawn_blocking(move || template_key(&digests, &owned))
            .await
            .map_err(|e| TemplateError::Task(e.to_string()))??;
        let template = Template {
            dir: self.root.join(&key),
            key,
        };
        if template.is_complete() && !template.dir.join(BUILD_RECORD).exists() {
            return Ok(template);
        }
        let _one = self.build.lock().await;
        if self.stopping() {
            return Err(TemplateError::Stopping);
        }
        // No build of this podvisord runs now: a build record is an earlier podvisord's,
        // which may have died after the snapshot, before it stopped the template VM.
        let leftover = template.clone();
        tokio::task::spawn_blocking(move || stop_leftover_build(&leftover))
            .await
            .map_err(|e| TemplateError::Task(e.to_string()))??;
        if template.is_complete() {
            return Ok(template);
        }
        let started = Instant::now();
        tracing::info!(template = %template.key, handler = %inputs.handler.name, "building a VM template");
        match build(&template, inputs, &self.building, &self.stopping).await {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                let meta = serde_json::json!({
                    "key": template.key,
                    "handler": inputs.handler.name,
                    "build_secs": secs,
                });
                let meta_path = template.dir.join(META_FILE);
                std::fs::write(&meta_path, meta.to_string())
                    .map_err(IoError::at("write", &meta_path))?;
                tracing::info!(template = %template.key, handler = %inputs.handler.name, secs, "VM template built");
                Ok(template)
            }
            Err(e) => {
                template.discard();
                Err(e)
            }
        }
    }
}

/// SHA-256 of `path`'s content, remembered by its stamp.
fn digest(digests: &Mutex<HashMap<Stamp, String>>, path: &Path) -> Result<String, TemplateError> {
    let st = stamp(path)?;
    if let Some(d) = lock(digests).get(&st) {
        return Ok(d.clone());
    }
    let mut f = std::fs::File::open(path).map_err(IoError::at("open", path))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(IoError::at("read", path))?;
    let d = hex::encode(h.finalize());
    lock(digests).insert(st, d.clone());
    Ok(d)
}

fn template_key(
    digests: &Mutex<HashMap<Stamp, String>>,
    inputs: &TemplateInputs,
) -> Result<String, TemplateError> {
    let h = &inputs.handler;
    let mut hasher = Sha256::new();
    hasher.update(b"podvisor-template-1\n");
    for (name, path) in [
        ("vmm", &inputs.vmm_binary),
        ("kernel", &h.kernel),
        ("image", &h.image),
    ] {
        hasher.update(format!("{name} {}\n", digest(digests, path)?));
    }
    hasher.update(format!(
        "vcpus {}\nmemory {}\ncmdline {:?}\nmac {TEMPLATE_MAC}\n",
        h.vcpus, h.memory_mib, h.kernel_cmdline_extra
    ));
    for d in &inputs.drives {
        hasher.update(format!("drive {} ro={}\n", d.id, d.read_only));
    }
    let mut key = hex::encode(hasher.finalize());
    key.truncate(KEY_LEN);
    Ok(key)
}

/// Deletes the build namespace of `key`; one already gone is fine.
fn delete_build_netns(template: &Template) {
    match netns::delete(&build_netns(template)) {
        Ok(()) | Err(NetnsError::NotFound(_)) => {}
        Err(e) => tracing::warn!(template = %template.key, "delete template namespace: {e}"),
    }
}

/// Kills the template VM a podvisord that died during a build left running (named by the
/// build record) and deletes its namespace. Blocking.
fn stop_leftover_build(template: &Template) -> Result<(), TemplateError> {
    let record = template.dir.join(BUILD_RECORD);
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IoError::new("read", &record, e).into()),
    };
    match serde_json::from_str::<VmmHandle>(&text) {
        Ok(handle) => {
            if handle.is_alive() {
                tracing::warn!(template = %template.key, pid = handle.pid, "killing a template VM an earlier podvisord left");
            }
            handle.kill()?;
            handle.remove_cgroup()?;
        }
        // Cut short while being written: the VMM was launched a moment before, so a
        // previous podvisord died right then; its VM is not findable.
        Err(e) => tracing::warn!(template = %template.key, "unreadable {}: {e}", record.display()),
    }
    delete_build_netns(template);
    std::fs::remove_file(&record).map_err(IoError::at("remove", &record))?;
    Ok(())
}

/// Boots the template VM, waits for its agent, snapshots it and cleans up after it. The VM
/// is in `building` (and its handle in the build record) while it runs.
async fn build(
    template: &Template,
    inputs: &TemplateInputs,
    building: &Mutex<Option<(Template, VmmHandle)>>,
    stopping: &AtomicBool,
) -> Result<(), TemplateError> {
    let dir = &template.dir;
    std::fs::create_dir_all(dir).map_err(IoError::at("create", dir))?;
    let ns_name = build_netns(template);
    // A namespace left by a crashed build.
    match netns::delete(&ns_name) {
        Ok(()) | Err(NetnsError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let ns = NetNs::create(&ns_name)?;
    let handle = match launch(template, inputs, &ns).await {
        Ok(h) => h,
        Err(e) => {
            let _ = ns.delete();
            return Err(e);
        }
    };
    let record = dir.join(BUILD_RECORD);
    let recorded = serde_json::to_vec(&handle)
        .map_err(io::Error::other)
        .and_then(|json| std::fs::write(&record, json))
        .map_err(IoError::at("write", &record));
    *lock(building) = Some((template.clone(), handle.clone()));
    // Shutdown sets `stopping` before it looks at `building`: if it looked before the VM
    // was in there, this sees the flag and stops the VM itself.
    let stopped = stopping.load(Ordering::SeqCst);
    let snapshot = async {
        recorded?;
        if stopped {
            return Err(TemplateError::Stopping);
        }
        snapshot_vm(template, &handle, inputs.jail.is_some()).await
    };
    let result = snapshot.await;
    let (h2, into) = (handle.clone(), dir.clone());
    let snapshot_taken = result.is_ok();
    let cleanup = tokio::task::spawn_blocking(move || -> Result<(), TemplateError> {
        h2.stop(VMM_STOP_TIMEOUT)?;
        // Written in the VM's own directory (all a jailed VMM can write); taken over once
        // the VMM has ended.
        let adopted = if snapshot_taken {
            adopt_snapshot(&h2.dir, &into)
        } else {
            Ok(())
        };
        h2.remove_dir()?;
        adopted
    })
    .await
    .map_err(|e| TemplateError::Task(e.to_string()));
    if matches!(cleanup, Ok(Ok(()))) {
        lock(building).take();
        if let Err(e) = std::fs::remove_file(&record)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(template = %template.key, "remove {}: {e}", record.display());
        }
    }
    let ns_deleted = ns.delete();
    let answer = result?;
    tracing::debug!(template = %template.key, "snapshot: {answer}");
    cleanup??;
    ns_deleted?;
    Ok(())
}

/// Launches the template VM of `inputs` in the namespace `ns` (booting the kernel).
async fn launch(
    template: &Template,
    inputs: &TemplateInputs,
    ns: &NetNs,
) -> Result<VmmHandle, TemplateError> {
    let h = &inputs.handler;
    let spec = VmmSpec {
        sandbox_id: format!("template-{}", template.key),
        dir: template.dir.join(BUILD_DIR),
        kernel: h.kernel.clone(),
        rootfs: h.image.clone(),
        cmdline_extra: h.kernel_cmdline_extra.clone(),
        vcpus: h.vcpus,
        mem_mib: h.memory_mib,
        drives: inputs.drives.clone(),
        tap: Some(TEMPLATE_TAP.into()),
        mac: Some(TEMPLATE_MAC.into()),
        netns: Some(ns.path().to_path_buf()),
        restore: None,
        jail: inputs.jail,
        cgroup: Some(vmm::CgroupPath::podvisor(&format!(
            "template-{}",
            template.build_name()
        ))?),
        console_max_bytes: h.console_max_bytes,
        share: false,
    };
    let binary = inputs.vmm_binary.clone();
    let handle = tokio::task::spawn_blocking(move || vmm::launch(&binary, &spec))
        .await
        .map_err(|e| TemplateError::Task(e.to_string()))??;
    Ok(handle)
}

/// Moves the snapshot files the template VM wrote in `vm_dir` into the template's `dir`,
/// root's and owner-only from then on: pods' VMMs open them before they drop to their
/// user. A file that is not a regular file (the VM's user owned the directory) is refused.
fn adopt_snapshot(vm_dir: &Path, dir: &Path) -> Result<(), TemplateError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for name in [STATE_FILE, MEM_FILE] {
        let (from, to) = (vm_dir.join(name), dir.join(name));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&from)
            .map_err(IoError::at("open snapshot file", &from))?;
        let meta = f.metadata().map_err(IoError::at("inspect", &from))?;
        if !meta.is_file() {
            let e = io::Error::new(io::ErrorKind::InvalidData, "not a regular file");
            return Err(IoError::new("adopt snapshot file", &from, e).into());
        }
        std::os::unix::fs::fchown(&f, Some(0), Some(0))
            .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .map_err(IoError::at("take over", &from))?;
        std::fs::rename(&from, &to).map_err(IoError::at("move snapshot file", &from))?;
    }
    Ok(())
}

/// Waits for the template VM's agent, then pauses the VM and snapshots it into the
/// template's directory. Returns the VMM's answer.
async fn snapshot_vm(
    template: &Template,
    handle: &VmmHandle,
    jailed: bool,
) -> Result<String, TemplateError> {
    let client = connect_agent(
        &format!("template-{}", template.key),
        handle,
        AGENT_BOOT_TIMEOUT,
    )
    .await
    .map_err(|e| TemplateError::Agent(e.to_string()))?;
    // The agent's end of this connection is reset in every restored copy.
    drop(client);
    let api = handle.api_sock.clone();
    // The VM's own directory, as the VMM sees it.
    let vm_dir = match jailed {
        true => PathBuf::from(JAIL_POD_DIR),
        false => handle.dir.clone(),
    };
    let body = serde_json::json!({
        "state_path": vm_dir.join(STATE_FILE),
        "mem_path": vm_dir.join(MEM_FILE),
    })
    .to_string();
    tokio::task::spawn_blocking(move || {
        client::call(&api, "PUT", "/vm/pause", None).map_err(|source| TemplateError::Api {
            what: "pause",
            source,
        })?;
        client::call(&api, "PUT", "/vm/snapshot", Some(&body)).map_err(|source| {
            TemplateError::Api {
                what: "snapshot",
                source,
            }
        })
    })
    .await
    .map_err(|e| TemplateError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn build_names_differ_between_root_directories_and_stay_put_in_one() {
        let key = "cc081fc7032994fd".to_string();
        let at = |dir: &str| Template {
            key: key.clone(),
            dir: PathBuf::from(dir).join(&key),
        };
        let (a, b) = (at("/tmp/a/templates"), at("/tmp/b/templates"));
        assert_ne!(a.build_name(), b.build_name());
        assert_eq!(a.build_name(), at("/tmp/a/templates").build_name());
        let templates = Path::new("/tmp/a/templates");
        assert!(is_build_netns_of(&build_netns(&a), templates));
        assert!(!is_build_netns_of(&build_netns(&b), templates));
        assert!(!is_build_netns_of("podvisor-tpl-cc081fc7", templates));
        assert!(
            a.build_name().starts_with("cc081fc7-"),
            "{}",
            a.build_name()
        );
        assert_ne!(build_netns(&a), build_netns(&b));
        let tag = build_tag(Path::new("/tmp/a/templates"));
        assert_eq!(build_netns(&a), format!("podvisor-tpl-cc081fc7-{tag}"));
    }

    #[test]
    fn prune_removes_only_stale_templates_and_kills_their_build_vm() {
        let root = tempfile::tempdir().expect("tempdir");
        let templates = Templates::new(root.path());
        let dir = root.path().join(TEMPLATES_DIR);
        let (stale, kept) = (dir.join("0123456789abcdef"), dir.join("fedcba9876543210"));
        for d in [&stale, &kept, &dir.join("not-a-key")] {
            std::fs::create_dir_all(d).expect("mkdir");
            std::fs::write(d.join(STATE_FILE), b"state").expect("write");
        }
        std::fs::write(dir.join("aaaaaaaaaaaaaaaa"), b"a file, not a template").expect("write");
        // The template VM a killed podvisord left: any process stands in for it.
        let mut vm = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let build = stale.join(BUILD_DIR);
        let handle = VmmHandle {
            pid: vm.id(),
            start_time: vmm::process_start_time(vm.id())
                .expect("read /proc stat")
                .expect("sleep runs"),
            api_sock: build.join("api.sock"),
            vsock_uds: build.join("vsock.sock"),
            console_log: build.join("console.log"),
            vmm_log: build.join("vmm.log"),
            cgroup: None,
            dir: build,
        };
        std::fs::write(
            stale.join(BUILD_RECORD),
            serde_json::to_vec(&handle).expect("json"),
        )
        .expect("write record");

        let removed = templates.prune(&["fedcba9876543210".to_string()]);
        // prune returns once the process has exited.
        let status = vm.try_wait().expect("try_wait");
        if status.is_none() {
            let _ = vm.kill();
            let _ = vm.wait();
        }
        assert_eq!(removed, ["0123456789abcdef"]);
        let status = status.expect("the left-over template VM still runs");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(!stale.exists());
        assert!(kept.join(STATE_FILE).exists());
        assert!(dir.join("not-a-key").exists());
        assert!(dir.join("aaaaaaaaaaaaaaaa").is_file());
    }
}
