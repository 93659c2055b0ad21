//! RunPodSandbox, StopPodSandbox and RemovePodSandbox: a pod's VM from its network and
//! launch (restored from a VM template or booting the kernel) through the agent's setup,
//! the watcher that notices the VM's end, and its stop and removal. Also the VM templates'
//! preparation at start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podvisor_common::{error_chain, lock, now_ns};
use podvisor_proto::AgentClient;
use podvisor_proto::v1 as agent;
use tonic::transport::Channel;

use super::agent::{
    AGENT_BOOT_TIMEOUT, AGENT_CALL_TIMEOUT, AGENT_RESTORE_TIMEOUT, call, connect_agent,
};
use super::error::PodError;
use super::image_slots::slot_drives;
use super::names::sandbox_key;
use super::sizing::{self, PodAsk};
use super::spec::{SandboxSpec, resolv_conf};
use super::template::{self, Template};
use super::vm::{self, VMM_STOP_TIMEOUT};
use super::{
    Container, KILL_WAIT, LOST_EXIT_CODE, POD_DIR_NAME_LEN, PODS_DIR, PodManager, Sandbox,
    VM_EXITED, new_id, random_bytes,
};
use crate::config::Handler;
use crate::network::cni::PodRef;
use crate::network::{self, PodNetwork};
use crate::state::{ContainerState, SandboxRecord, SandboxState};
use crate::vmm::{self, VmmHandle, VmmSpec};

/// Host random bytes a new VM's agent mixes into its RNG.
const RANDOM_SEED_BYTES: usize = 64;
/// How long StopPodSandbox waits for killed containers to report their exit codes.
const POD_KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a running sandbox's VMM is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(3);

impl PodManager {
    /// RunPodSandbox: boots the pod's VM, waits for its agent and sets the pod up. Returns
    /// the sandbox id. On failure nothing of the sandbox is left.
    pub async fn run_sandbox(&self, mut spec: SandboxSpec) -> Result<String, PodError> {
        let handler = self
            .inner
            .config
            .handler(&spec.runtime_handler)
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        // The pod's size: the handler's, grown to its limits and overhead; its template is
        // that size class's.
        let size = sizing::vm_size(handler, PodAsk::new(&spec.resources, &spec.overhead)).map_err(
            |e| match e {
                PodError::InvalidArgument(m) => {
                    PodError::InvalidArgument(format!("RunPodSandbox: {m}"))
                }
                other => other,
            },
        )?;
        let handler = Handler {
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            ..handler.clone()
        };
        let key = sandbox_key(&spec.name, &spec.namespace, &spec.uid, spec.attempt);
        let _name = self
            .inner
            .pending_names
            .reserve(key, |key| self.sandbox_named(key))?;
        if spec.hostname.is_empty() {
            spec.hostname = node_hostname()?;
        }
        let id = new_id()?;
        // Kubelet's cgroup parent in the form of podvisord's driver, or nothing is made.
        let cgroup =
            vmm::CgroupPath::for_sandbox(self.inner.config.cgroup_driver, &spec.cgroup_parent, &id)
                .map_err(|e| PodError::InvalidArgument(format!("RunPodSandbox: {e}")))?;
        let dir = self.new_pod_dir(&id)?;
        // The network first: the VMM starts inside its namespace, on its TAP.
        let net = self.setup_network(&id, &dir, &spec).await?;
        let template = self.template_for(&id, &handler).await;
        let vmm_spec = self.vmm_spec(&id, &dir, &handler, &net, template.as_ref(), cgroup);
        let started = Instant::now();
        let handle = match self.launch(&id, &vmm_spec).await {
            Ok(h) => h,
            Err(e) => {
                net.abandon().await;
                let _ = vmm::remove_pod_dir(&dir);
                return Err(e);
            }
        };
        let record = new_record(&id, &spec, &handler, &handle, &net);
        let booted = self
            .record_and_boot(&record, &handle, &spec, &net, template.is_some())
            .await;
        let (handle, booted) = match (booted, &template) {
            // Only a failure of the restore itself is worth a cold boot; the request's own
            // error (the agent refusing its hostname or sysctls) would fail the same way.
            (Err(e), Some(t)) if !e.is_request_error() => {
                tracing::warn!(
                    sandbox = %id,
                    template = %t.key,
                    "restore from the VM template failed, booting the kernel: {e}"
                );
                self.boot_cold(&record, handle, &spec, &net, vmm_spec, t)
                    .await
            }
            (booted, _) => (handle, booted),
        };
        let client = match booted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(sandbox = %id, "RunPodSandbox failed, cleaning up: {e}");
                self.discard_vm(&id, &handle).await;
                net.abandon().await;
                return Err(e);
            }
        };
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            record: Mutex::new(SandboxRecord {
                state: SandboxState::Ready,
                vmm: handle.clone(),
                ..record
            }),
            agent: Mutex::new(Some(client)),
            stopping: AtomicBool::new(false),
            lifecycle: tokio::sync::Mutex::new(Default::default()),
        });
        if let Err(e) = self.put_sandbox(&sb) {
            self.discard_vm(&id, &handle).await;
            net.abandon().await;
            return Err(e);
        }
        lock(&self.inner.sandboxes).insert(id.clone(), sb.clone());
        self.watch_vmm(sb);
        tracing::info!(
            sandbox = %id,
            pod = %format!("{}/{}", spec.namespace, spec.name),
            secs = started.elapsed().as_secs_f64(),
            restored = template.is_some(),
            "sandbox ready"
        );
        Ok(id)
    }

    /// The pod directory of the new sandbox `id`, which must not exist yet.
    fn new_pod_dir(&self, id: &str) -> Result<PathBuf, PodError> {
        let dir = self
            .inner
            .config
            .state_dir
            .join(PODS_DIR)
            .join(&id[..POD_DIR_NAME_LEN]);
        if dir.symlink_metadata().is_ok() {
            return Err(PodError::Internal(format!(
                "pod directory {} exists already",
                dir.display()
            )));
        }
        Ok(dir)
    }

    /// The new sandbox's network: namespace, CNI ADD, TAP.
    async fn setup_network(
        &self,
        id: &str,
        dir: &Path,
        spec: &SandboxSpec,
    ) -> Result<PodNetwork, PodError> {
        let pod_ref = PodRef {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            uid: spec.uid.clone(),
        };
        let net = PodNetwork::setup(
            &self.inner.config.cni,
            id,
            dir,
            pod_ref,
            &spec.port_mappings,
        )
        .await?;
        Ok(net)
    }

    /// The VM template a sandbox of `handler` restores from, when the handler uses one and
    /// it can be had; None boots the kernel.
    async fn template_for(&self, id: &str, handler: &Handler) -> Option<Template> {
        if !handler.template {
            return None;
        }
        match self
            .inner
            .templates
            .get(&self.template_inputs(handler))
            .await
        {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    sandbox = %id,
                    handler = %handler.name,
                    "no VM template, booting the kernel: {}",
                    error_chain(&e)
                );
                None
            }
        }
    }

    /// The VMM of a new sandbox: the handler's kernel, image and size, the image slots, the
    /// pod's TAP and namespace, its cgroup, and the template to restore from, if any.
    fn vmm_spec(
        &self,
        id: &str,
        dir: &Path,
        handler: &Handler,
        net: &PodNetwork,
        template: Option<&Template>,
        cgroup: vmm::CgroupPath,
    ) -> VmmSpec {
        VmmSpec {
            sandbox_id: id.to_string(),
            dir: dir.to_path_buf(),
            kernel: handler.kernel.clone(),
            rootfs: handler.image.clone(),
            cmdline_extra: handler.kernel_cmdline_extra.clone(),
            vcpus: handler.vcpus,
            mem_mib: handler.memory_mib,
            drives: slot_drives(&self.inner.placeholder),
            tap: Some(net.link().tap.clone()),
            mac: Some(net.link().mac.clone()),
            netns: Some(net.netns_path().to_owned()),
            restore: template.map(Template::restore_config),
            jail: self.inner.jail,
            cgroup: Some(cgroup),
            console_max_bytes: handler.console_max_bytes,
            share: true,
        }
    }

    /// Records the sandbox (NotReady) before the long wait, so that a crash now leaves a
    /// NotReady sandbox to clean up, then waits for its agent and sets the pod up.
    async fn record_and_boot(
        &self,
        record: &SandboxRecord,
        handle: &VmmHandle,
        spec: &SandboxSpec,
        net: &PodNetwork,
        restored: bool,
    ) -> Result<AgentClient<Channel>, PodError> {
        self.inner.state.sandboxes.put(&record.id, record)?;
        self.boot(&record.id, handle, spec, &record.hostname, net, restored)
            .await
    }

    /// After a VM restored from `template` failed: a template that does not restore is
    /// dropped (the next pod builds a new one); this pod boots the kernel in the same
    /// directory and namespace. Returns the VM now to clean up on failure (the restored one
    /// if the new one did not launch) and the agent, or why it failed.
    async fn boot_cold(
        &self,
        record: &SandboxRecord,
        restored: VmmHandle,
        spec: &SandboxSpec,
        net: &PodNetwork,
        vmm_spec: VmmSpec,
        template: &Template,
    ) -> (VmmHandle, Result<AgentClient<Channel>, PodError>) {
        template.discard();
        let h = restored.clone();
        let _ = tokio::task::spawn_blocking(move || h.kill()).await;
        let cold = VmmSpec {
            restore: None,
            ..vmm_spec
        };
        match self.launch(&record.id, &cold).await {
            Ok(handle) => {
                let record = SandboxRecord {
                    vmm: handle.clone(),
                    ..record.clone()
                };
                let booted = self
                    .record_and_boot(&record, &handle, spec, net, false)
                    .await;
                (handle, booted)
            }
            Err(e) => (restored, Err(e)),
        }
    }

    fn template_inputs(&self, handler: &Handler) -> template::TemplateInputs {
        template::TemplateInputs {
            handler: handler.clone(),
            vmm_binary: self.inner.config.vmm_binary.clone(),
            drives: slot_drives(&self.inner.placeholder),
            jail: self.inner.jail,
        }
    }

    /// In the background: removes the templates no handler uses any more (an earlier VMM,
    /// kernel, image or configuration; every size class of a handler is kept), then builds
    /// the VM template of every handler that uses one at its default size, so that the
    /// first pod of a handler restores instead of waiting for a kernel boot. Other size
    /// classes are built when a pod first needs one. Failures are logged: those pods boot
    /// cold.
    pub fn prepare_templates(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let config = &this.inner.config;
            let wanted: Vec<(String, template::TemplateInputs)> = config
                .handler_names()
                .into_iter()
                .filter_map(|name| config.handler(name).ok())
                .filter(|h| h.template)
                .map(|h| (h.name.clone(), this.template_inputs(h)))
                .collect();
            let sized: Vec<(String, template::TemplateInputs)> = wanted
                .iter()
                .flat_map(|(name, inputs)| {
                    sizing::classes(&inputs.handler).into_iter().map(|size| {
                        let mut inputs = inputs.clone();
                        inputs.handler.vcpus = size.vcpus;
                        inputs.handler.memory_mib = size.memory_mib;
                        (name.clone(), inputs)
                    })
                })
                .collect();
            let t = this.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                let mut keep = Vec::new();
                let mut failed = std::collections::HashSet::new();
                for (name, inputs) in &sized {
                    if failed.contains(name) {
                        continue;
                    }
                    match t.inner.templates.key(inputs) {
                        Ok(key) => keep.push(key),
                        // Its pods fail the same way; nothing of it is worth keeping.
                        Err(e) => {
                            tracing::warn!(handler = %name, "template inputs: {}", error_chain(&e));
                            failed.insert(name.clone());
                        }
                    }
                }
                t.inner.templates.prune(&keep);
            })
            .await;
            if let Err(e) = pruned {
                tracing::error!("template prune task: {e}");
            }
            for (name, inputs) in &wanted {
                if let Err(e) = this.inner.templates.get(inputs).await {
                    if this.inner.templates.stopping() {
                        tracing::info!(handler = %name, "template build ended: podvisord stops");
                        return;
                    }
                    tracing::warn!(
                        handler = %name,
                        "no VM template; its pods will boot the kernel: {}",
                        error_chain(&e)
                    );
                }
            }
        })
    }

    /// Starts the VMM of `spec` (a blocking launch).
    async fn launch(&self, id: &str, spec: &VmmSpec) -> Result<VmmHandle, PodError> {
        let binary = self.inner.config.vmm_binary.clone();
        let spec = spec.clone();
        vm::blocking(id, "launch", move || vmm::launch(&binary, &spec)).await
    }

    /// Waits for the new VM's agent and sets the pod up in it. A VM `restored` from a
    /// template still has the template's NIC MAC, random state and clock: the agent takes
    /// the pod's MAC, mixes in host random bytes and steps its clock (done on cold boots
    /// too: the guest clock then starts exact).
    async fn boot(
        &self,
        id: &str,
        handle: &VmmHandle,
        spec: &SandboxSpec,
        hostname: &str,
        net: &PodNetwork,
        restored: bool,
    ) -> Result<AgentClient<Channel>, PodError> {
        let timeout = if restored {
            AGENT_RESTORE_TIMEOUT
        } else {
            AGENT_BOOT_TIMEOUT
        };
        let mut client = connect_agent(id, handle, timeout).await?;
        let mut net_config = net.guest_config()?;
        if restored {
            for i in &mut net_config.interfaces {
                i.current_mac = template::TEMPLATE_MAC.to_string();
            }
        }
        call(
            "ConfigureNetwork",
            AGENT_CALL_TIMEOUT,
            client.configure_network(net_config),
        )
        .await?;
        let req = agent::SetupSandboxRequest {
            sandbox_id: id.to_string(),
            hostname: hostname.to_string(),
            resolv_conf: resolv_conf(&spec.dns),
            hosts: Vec::new(),
            sysctls: spec.sysctls.clone(),
            random_seed: random_bytes(RANDOM_SEED_BYTES)?,
            time_unix_nanos: now_ns(),
        };
        call(
            "SetupSandbox",
            AGENT_CALL_TIMEOUT,
            client.setup_sandbox(req),
        )
        .await?;
        Ok(client)
    }

    /// The id of the sandbox (in any state) whose pod name is `key` ([`sandbox_key`]).
    fn sandbox_named(&self, key: &str) -> Option<String> {
        lock(&self.inner.sandboxes)
            .values()
            .find(|sb| {
                let r = lock(&sb.record);
                sandbox_key(&r.name, &r.namespace, &r.uid, r.attempt) == key
            })
            .map(|sb| sb.id.clone())
    }

    /// Kills a VM that never became a usable sandbox and removes all trace of it.
    async fn discard_vm(&self, id: &str, handle: &VmmHandle) {
        let h = handle.clone();
        let done = tokio::task::spawn_blocking(move || {
            h.kill()?;
            h.remove_dir()
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sandbox = id, "clean up VM: {}", error_chain(&e)),
            Err(e) => tracing::error!(sandbox = id, "clean up task: {e}"),
        }
        if let Err(e) = self.inner.state.sandboxes.remove(id) {
            tracing::error!(sandbox = id, "remove record: {e}");
        }
    }

    /// Watches a ready sandbox's VMM: if it ends unasked, the sandbox becomes NotReady and
    /// its containers exited.
    pub(super) fn watch_vmm(&self, sb: Arc<Sandbox>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                if sb.stopping.load(Ordering::SeqCst)
                    || sb.state() != SandboxState::Ready
                    || this.sandbox_arc(&sb.id).is_none()
                {
                    return;
                }
                let handle = lock(&sb.record).vmm.clone();
                if !handle.is_alive() {
                    if sb.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    tracing::warn!(
                        sandbox = %sb.id,
                        "the pod's VM exited; the end of its log:\n{}",
                        handle.log_tail()
                    );
                    this.vm_gone(&sb, VM_EXITED);
                    return;
                }
            }
        });
    }

    /// The sandbox's VM is gone: NotReady, containers exited.
    pub(super) fn vm_gone(&self, sb: &Sandbox, message: &str) {
        lock(&sb.record).state = SandboxState::NotReady;
        lock(&sb.agent).take();
        if let Err(e) = self.put_sandbox(sb) {
            tracing::error!(sandbox = %sb.id, "persist: {e}");
        }
        for c in self.containers_of(&sb.id) {
            self.mark_exited(&c, LOST_EXIT_CODE, "Error", message);
        }
    }

    /// StopPodSandbox: kills the containers, stops the VM. Idempotent; an unknown id is not
    /// an error.
    pub async fn stop_sandbox(&self, id: &str) -> Result<(), PodError> {
        let Some(sb) = self.sandbox_arc(id) else {
            return Ok(());
        };
        let _slots = sb.lifecycle.lock().await;
        sb.stopping.store(true, Ordering::SeqCst);
        let handle = lock(&sb.record).vmm.clone();
        let live: Vec<Arc<Container>> = self
            .containers_of(id)
            .into_iter()
            .filter(|c| c.state() != ContainerState::Exited)
            .collect();
        let client = lock(&sb.agent).clone();
        if let (false, Some(mut client)) = (live.is_empty(), client) {
            kill_live(id, &mut client, &live).await;
            for c in &live {
                c.wait_exited(POD_KILL_WAIT).await;
            }
        }
        lock(&sb.agent).take();
        let h = handle.clone();
        let stopped = vm::blocking(id, "stop", move || h.stop(VMM_STOP_TIMEOUT)).await?;
        tracing::info!(sandbox = id, outcome = ?stopped, "sandbox VM stopped");
        // The VMM's leaf goes now, not at removal: kubelet removes a stopped pod's cgroup
        // (our leaf inside it) possibly before it removes the sandbox.
        let h = handle.clone();
        if let Err(e) = vm::blocking(id, "remove the cgroup", move || h.remove_cgroup()).await {
            tracing::warn!(sandbox = id, "remove the VMM's cgroup: {e}");
        }
        for c in self.containers_of(id) {
            self.mark_exited(&c, 137, "Error", "stopped with its pod");
        }
        lock(&sb.record).state = SandboxState::NotReady;
        self.put_sandbox(&sb)?;
        let pod_dir = lock(&sb.record).vmm.dir.clone();
        network::release_recorded(&self.inner.config.cni, id, &pod_dir).await?;
        Ok(())
    }

    /// RemovePodSandbox: stops it if needed, removes its containers, its pod directory and
    /// its record. An unknown id is not an error.
    pub async fn remove_sandbox(&self, id: &str) -> Result<(), PodError> {
        if self.sandbox_arc(id).is_none() {
            return Ok(());
        }
        self.stop_sandbox(id).await?;
        let Some(sb) = self.sandbox_arc(id) else {
            return Ok(());
        };
        let _slots = sb.lifecycle.lock().await;
        for c in self.containers_of(id) {
            self.forget_container(&sb, &c)?;
        }
        let handle = lock(&sb.record).vmm.clone();
        vm::blocking(id, "remove", move || {
            if handle.is_alive() {
                handle.kill()?;
            }
            handle.remove_dir()
        })
        .await?;
        network::delete_netns(id).await?;
        self.inner.state.sandboxes.remove(id)?;
        lock(&self.inner.sandboxes).remove(id);
        tracing::info!(sandbox = id, "sandbox removed");
        Ok(())
    }
}

/// Kills the pod's running containers `live` in its VM, which is stopped next. One KillAll
/// kills them all and flushes the share; their mounts and cgroups go with the VM, not one
/// guest round trip each. A pod whose agent predates KillAll (started by an older
/// podvisord) gets a DeleteContainer for each.
async fn kill_live(sandbox: &str, client: &mut AgentClient<Channel>, live: &[Arc<Container>]) {
    let req = agent::KillAllRequest {
        timeout_ms: POD_KILL_WAIT.as_millis() as u32,
    };
    match call("KillAll", KILL_WAIT, client.kill_all(req)).await {
        Ok(r) if r.left > 0 => {
            tracing::warn!(sandbox, left = r.left, "containers outlived SIGKILL");
        }
        Ok(_) => {}
        Err(PodError::Agent { status, .. }) if status.code() == tonic::Code::Unimplemented => {
            for c in live {
                let req = agent::DeleteContainerRequest {
                    container_id: lock(&c.record).agent_container_id.clone(),
                    force: true,
                };
                if let Err(e) =
                    call("DeleteContainer", KILL_WAIT, client.delete_container(req)).await
                {
                    tracing::warn!(container = %c.id, "kill with its pod: {e}");
                }
            }
        }
        Err(e) => tracing::warn!(sandbox, "kill the containers with their pod: {e}"),
    }
}

/// The record of a new sandbox, NotReady, on VM `handle` and network `net`.
fn new_record(
    id: &str,
    spec: &SandboxSpec,
    handler: &Handler,
    handle: &VmmHandle,
    net: &PodNetwork,
) -> SandboxRecord {
    SandboxRecord {
        id: id.to_string(),
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        uid: spec.uid.clone(),
        attempt: spec.attempt,
        labels: spec.labels.clone(),
        annotations: spec.annotations.clone(),
        runtime_handler: spec.runtime_handler.clone(),
        created_at_ns: now_ns(),
        state: SandboxState::NotReady,
        vmm: handle.clone(),
        log_directory: spec.log_directory.clone(),
        hostname: spec.hostname.clone(),
        dns: spec.dns.clone(),
        port_mappings: spec.port_mappings.clone(),
        ips: net.ips(),
        netns: Some(net.netns_path().to_owned()),
        privileged: spec.privileged,
        vcpus: handler.vcpus,
        memory_mib: handler.memory_mib,
    }
}

/// The node's hostname: a pod's when its config gives none, as containerd does (the pod
/// name is often longer than the 64 bytes a hostname may have).
fn node_hostname() -> Result<String, PodError> {
    let name =
        nix::unistd::gethostname().map_err(|e| PodError::Internal(format!("gethostname: {e}")))?;
    name.into_string()
        .map_err(|n| PodError::Internal(format!("the node's hostname {n:?} is not UTF-8")))
}
