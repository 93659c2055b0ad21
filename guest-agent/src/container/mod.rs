//! Containers inside the pod VM.
//!
//! Built directly on `nix`/`libc` rather than youki's libcontainer: the agent is PID 1 of a tiny
//! VM where every system call is expensive, and libcontainer brings an OCI-bundle model (config
//! files, state directories, a re-exec'd init, seccomp/systemd code) we would pay for on every
//! container. Here the agent prepares the rootfs in its own mount namespace, then `clone3`s the
//! container process straight into its namespaces and cgroup; the child runs a short list of raw
//! system calls (see `spawn`) and waits for StartContainer before exec.
//!
//! Modules: `rootfs` (image, overlay, /dev, mounts), `spawn` (namespaces and the child),
//! `cgroup`, `devices` (which devices a container may open), `users`, `caps` (capabilities,
//! rlimits, no_new_privs), `io` (pipes, pty),
//! `exit` (exit codes, OOM), `stats`, `stop` (the pod's stop: every container at once).

pub mod caps;
pub mod cgroup;
pub mod devices;
pub mod exit;
pub mod io;
pub mod rootfs;
pub mod seccomp;
pub mod spawn;
pub mod stats;
mod stop;
pub mod users;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use podvisor_proto::v1::*;
use tonic::Status;

use crate::paths::Paths;
use crate::reaper::Reaper;
use crate::sandbox::SandboxFiles;
use cgroup::Cgroup;
use exit::Process;
use podvisor_common::error_chain;

/// Execs one container may have at a time (finished ones are pruned first).
const MAX_EXECS: usize = 256;

type BoxStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(what: &str, e: &(dyn std::error::Error + 'static)) -> Status {
    Status::invalid_argument(format!("{what}: {}", error_chain(e)))
}

fn internal(what: &str, e: &(dyn std::error::Error + 'static)) -> Status {
    Status::internal(format!("{what}: {}", error_chain(e)))
}

fn cstring(what: &str, s: &[u8]) -> Result<CString, Status> {
    CString::new(s).map_err(|_| Status::invalid_argument(format!("{what} contains a NUL byte")))
}

fn valid_id(id: &str) -> Result<(), Status> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || id.starts_with('.')
    {
        return Err(Status::invalid_argument(format!(
            "invalid id {id:?}: use 1-128 characters [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
}

struct Container {
    bundle: PathBuf,
    image_serial: String,
    cgroup: Option<Cgroup>,
    init: Arc<Process>,
    state: Mutex<State>,
    start: Mutex<Option<(OwnedFd, std::fs::File)>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

/// All containers of the pod.
pub struct Manager {
    paths: Paths,
    files: SandboxFiles,
    reaper: Reaper,
    sandbox_id: Mutex<String>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    images: Mutex<rootfs::ImageMounts>,
    /// Holder process of the pod-shared PID namespace (pid, namespace fd).
    pod_pidns: Mutex<Option<OwnedFd>>,
    /// The pod's share is mounted at [`Paths::share`].
    share_mounted: Mutex<bool>,
    last_cap: u32,
    /// Use cgroups (false in host tests without cgroup v2).
    use_cgroups: bool,
}

impl Manager {
    pub fn new(paths: Paths, files: SandboxFiles, reaper: Reaper) -> Self {
        let use_cgroups = paths.cgroup_root.join("cgroup.controllers").exists();
        Self {
            paths,
            files,
            reaper,
            sandbox_id: Mutex::new("sandbox".to_owned()),
            containers: Mutex::new(HashMap::new()),
            images: Mutex::new(rootfs::ImageMounts::default()),
            pod_pidns: Mutex::new(None),
            share_mounted: Mutex::new(false),
            last_cap: caps::last_cap(),
            use_cgroups,
        }
    }

    pub fn set_sandbox_id(&self, id: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Ok(());
        }
        valid_id(id)?;
        if !lock(&self.containers).is_empty() {
            return Err(Status::failed_precondition(
                "SetupSandbox after containers were created",
            ));
        }
        *lock(&self.sandbox_id) = id.to_owned();
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, Status> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("container {id:?} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, Status> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        lock(&c.execs).get(exec_id).cloned().ok_or_else(|| {
            Status::not_found(format!("exec {exec_id:?} not found in container {id:?}"))
        })
    }

    /// The pod-shared PID namespace, created on first use: a holder process that is its init.
    fn pod_pid_namespace(&self) -> Result<OwnedFd, Status> {
        let mut guard = lock(&self.pod_pidns);
        if let Some(fd) = guard.as_ref() {
            return fd
                .try_clone()
                .map_err(|e| internal("dup pid namespace", &e));
        }
        // SAFETY: clone3 behaving as fork; the child only sets SIGCHLD to SIG_IGN (so the kernel
        // reaps the orphans it inherits) and pauses forever, with raw system calls.
        let pid = self
            .reaper
            .spawn(|| {
                // SAFETY: clone_args is plain data; all-zero is its default.
                let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
                args.flags = libc::CLONE_NEWPID as u64;
                args.exit_signal = libc::SIGCHLD as u64;
                // SAFETY: see above.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_clone3,
                        &mut args as *mut libc::clone_args,
                        std::mem::size_of::<libc::clone_args>(),
                    )
                };
                if r == 0 {
                    spawn::close_all_but(&[-1, -1, -1]);
                    // SAFETY: async-signal-safe calls only.
                    unsafe {
                        // What the pod's containers see as PID 1, like Kubernetes' pause.
                        libc::prctl(libc::PR_SET_NAME, c"pause".as_ptr());
                        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                        loop {
                            libc::pause();
                        }
                    }
                }
                if r < 0 {
                    return Err(nix::Error::last());
                }
                Ok(nix::unistd::Pid::from_raw(r as i32))
            })
            .map_err(|e| internal("create pod PID namespace", &e))?
            .0;
        let fd: OwnedFd = std::fs::File::open(format!("/proc/{pid}/ns/pid"))
            .map_err(|e| internal("open pod PID namespace", &e))?
            .into();
        *guard = Some(fd.try_clone().map_err(|e| internal("dup", &e))?);
        Ok(fd)
    }

    fn read_image_file(rootfs_fd: &OwnedFd, rel: &str) -> String {
        use std::io::Read;
        let Ok(fd) = crate::safepath::open_beneath(
            rootfs_fd,
            Path::new(rel),
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        ) else {
            return String::new();
        };
        let mut s = String::new();
        let _ = std::fs::File::from(fd).take(4 << 20).read_to_string(&mut s);
        s
    }

    /// Builds the parts of the child plan common to create and exec.
    #[allow(clippy::too_many_arguments)]
    fn process_plan(
        &self,
        p: &podvisor_proto::v1::Process,
        rootfs_fd: &OwnedFd,
        stdio: spawn::ChildStdio,
    ) -> Result<spawn::ChildPlan, Status> {
        if p.args.is_empty() {
            return Err(Status::invalid_argument("process args are empty"));
        }
        let user = p.user.clone().unwrap_or_default();
        let id = users::resolve(
            &user,
            &Self::read_image_file(rootfs_fd, "etc/passwd"),
            &Self::read_image_file(rootfs_fd, "etc/group"),
        )
        .map_err(|e| invalid("user", &e))?;
        let caps_sets = caps::CapSets::from_request(p.capabilities.as_ref())
            .map_err(|e| invalid("capabilities", &e))?;
        let rlimits = caps::parse_rlimits(&p.rlimits).map_err(|e| invalid("rlimits", &e))?;
        let mut env = p.env.clone();
        for e in &env {
            if !e.contains('=') {
                return Err(Status::invalid_argument(format!(
                    "environment entry {e:?} has no '='"
                )));
            }
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", id.home));
        }
        if p.terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".to_owned());
        }
        let cwd = if p.cwd.is_empty() {
            "/"
        } else {
            p.cwd.as_str()
        };
        if !cwd.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "cwd {cwd:?} is not absolute"
            )));
        }
        let arg0 = &p.args[0];
        let candidates: Vec<String> = if arg0.contains('/') {
            vec![arg0.clone()]
        } else {
            let path = env
                .iter()
                .rev()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| format!("{}/{arg0}", d.trim_end_matches('/')))
                .collect()
        };
        Ok(spawn::ChildPlan {
            clone_flags: 0,
            pid_ns: None,
            setns: Vec::new(),
            cgroup: None,
            rootfs: None,
            hostname: None,
            rlimits,
            caps: caps_sets,
            last_cap: self.last_cap,
            no_new_privs: p.no_new_privs,
            seccomp: seccomp::parse(&p.seccomp_filter)?,
            uid: id.uid,
            gid: id.gid,
            groups: id.additional_gids,
            cwd: cstring("cwd", cwd.as_bytes())?,
            argv: p
                .args
                .iter()
                .map(|a| cstring("argument", a.as_bytes()))
                .collect::<Result<_, _>>()?,
            envp: env
                .iter()
                .map(|a| cstring("environment", a.as_bytes()))
                .collect::<Result<_, _>>()?,
            exec_candidates: candidates
                .iter()
                .map(|a| cstring("executable", a.as_bytes()))
                .collect::<Result<_, _>>()?,
            stdio,
        })
    }

    pub async fn create(self: Arc<Self>, r: CreateContainerRequest) -> Result<u32, Status> {
        valid_id(&r.container_id)?;
        // Duplicate ids first (checked again when the container is inserted).
        {
            let containers = lock(&self.containers);
            if containers.contains_key(&r.container_id) {
                return Err(Status::already_exists(format!(
                    "container {:?} already exists",
                    r.container_id
                )));
            }
        }
        let process = r
            .process
            .clone()
            .ok_or_else(|| Status::invalid_argument("process is missing"))?;
        if process.args.is_empty() {
            return Err(Status::invalid_argument("process args are empty"));
        }
        let image = r
            .image
            .clone()
            .ok_or_else(|| Status::invalid_argument("image is missing"))?;
        rootfs::validate_mounts(&r.mounts).map_err(|e| invalid("mounts", &e))?;
        let lower_rel = if image.subpath.is_empty() {
            PathBuf::new()
        } else {
            crate::safepath::relative_components(&format!("/{}", image.subpath))
                .map_err(|e| invalid("image subpath", &e))?
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.create_blocking(r, process, image, lower_rel))
            .await
            .map_err(|e| internal("create task", &e))?
    }

    fn create_blocking(
        &self,
        r: CreateContainerRequest,
        process: podvisor_proto::v1::Process,
        image: Image,
        lower_rel: PathBuf,
    ) -> Result<u32, Status> {
        let id = r.container_id.clone();
        let bundle = self.paths.containers().join(&id);
        if bundle.exists() {
            return Err(Status::already_exists(format!(
                "container {id:?} already exists"
            )));
        }
        self.mount_share_for(&r.mounts)?;
        let t = std::time::Instant::now();
        let image_root = lock(&self.images)
            .acquire(
                &self.paths.images(),
                &image.block_device_serial,
                image.size_bytes,
            )
            .map_err(|e| match e {
                rootfs::RootfsError::NoDevice(_) | rootfs::RootfsError::SizeMismatch { .. } => {
                    Status::failed_precondition(format!("image: {}", error_chain(&e)))
                }
                e if e.is_invalid_argument() => invalid("image", &e),
                e => internal("mount image", &e),
            })?;
        tracing::debug!(container = %id, ms = t.elapsed().as_millis(), "image mounted");
        let result = self.create_in(&r, &process, image_root.join(&lower_rel), &bundle);
        match result {
            Ok((c, pid)) => {
                let mut containers = lock(&self.containers);
                if containers.contains_key(&id) {
                    drop(containers);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return Err(Status::already_exists(format!(
                        "container {id:?} already exists"
                    )));
                }
                containers.insert(id, Arc::new(c));
                Ok(pid)
            }
            Err((status, cgroup)) => {
                rootfs::cleanup(&bundle);
                if let Some(cg) = cgroup {
                    let _ = cg.kill_all();
                    let _ = cg.remove();
                }
                lock(&self.images).release(&image.block_device_serial);
                Err(status)
            }
        }
    }

    /// Mounts the pod's virtio-fs share the first time a container's mount comes from it
    /// (pods without volumes never pay for the mount).
    fn mount_share_for(&self, mounts: &[podvisor_proto::v1::Mount]) -> Result<(), Status> {
        let share = self.paths.share();
        if !mounts
            .iter()
            .any(|m| Path::new(&m.source).starts_with(&share))
        {
            return Ok(());
        }
        let mut mounted = lock(&self.share_mounted);
        if *mounted {
            return Ok(());
        }
        let t = std::time::Instant::now();
        rootfs::mount_share(&share).map_err(|e| {
            Status::failed_precondition(format!("mount the pod's share: {}", error_chain(&e)))
        })?;
        tracing::debug!(ms = t.elapsed().as_millis(), "pod share mounted");
        *mounted = true;
        Ok(())
    }

    /// Test hook: create from a directory instead of an image block device.
    #[cfg(test)]
    pub fn create_from_dir(&self, r: &CreateContainerRequest, lower: &Path) -> Result<u32, Status> {
        let bundle = self.paths.containers().join(&r.container_id);
        let process = r.process.clone().unwrap_or_default();
        let (c, pid) = self
            .create_in(r, &process, lower.to_path_buf(), &bundle)
            .map_err(|(s, _)| {
                rootfs::cleanup(&bundle);
                s
            })?;
        lock(&self.containers).insert(r.container_id.clone(), Arc::new(c));
        Ok(pid)
    }

    #[allow(clippy::result_large_err)]
    /// The container's cgroup under the sandbox's, with its resources and, unless it is
    /// privileged, its device program; None where the guest has no cgroups. On error, the
    /// cgroup made so far is returned for removal.
    fn container_cgroup(
        &self,
        r: &CreateContainerRequest,
    ) -> Result<Option<Cgroup>, (Status, Option<Cgroup>)> {
        if !self.use_cgroups {
            return Ok(None);
        }
        let sandbox = lock(&self.sandbox_id).clone();
        let cg = Cgroup::create(&self.paths.cgroup_podvisor(), &sandbox, &r.container_id)
            .map_err(|e| (internal("create cgroup", &e), None))?;
        if let Some(res) = &r.resources {
            cg.apply_new(res).map_err(|e| {
                let s = match e {
                    cgroup::CgroupError::Invalid(_) => invalid("resources", &e),
                    _ => internal("apply resources", &e),
                };
                (s, Some(cg.clone()))
            })?;
        }
        // Only the standard devices, unless privileged (every device of the VM).
        if !r.privileged {
            devices::restrict(&cg.path)
                .map_err(|e| (internal("restrict devices", &e), Some(cg.clone())))?;
        }
        Ok(Some(cg))
    }

    fn create_in(
        &self,
        r: &CreateContainerRequest,
        process: &podvisor_proto::v1::Process,
        lower: PathBuf,
        bundle: &Path,
    ) -> Result<(Container, u32), (Status, Option<Cgroup>)> {
        let ns = r.namespaces.unwrap_or_default();
        let mode = |v: i32, what: &str| match NamespaceMode::try_from(v) {
            Ok(m) => Ok(m),
            Err(_) => Err((
                Status::invalid_argument(format!("unknown {what} namespace mode {v}")),
                None,
            )),
        };
        let pid_mode = mode(ns.pid, "pid")?;
        let ipc_mode = mode(ns.ipc, "ipc")?;
        let uts_mode = mode(ns.uts, "uts")?;

        let t = std::time::Instant::now();
        let prepared = rootfs::prepare(&rootfs::RootfsSpec {
            lower,
            bundle: bundle.to_path_buf(),
            mounts: &r.mounts,
            readonly: r.readonly_rootfs,
            etc_files: vec![
                (self.files.hosts.clone(), "/etc/hosts"),
                (self.files.resolv_conf.clone(), "/etc/resolv.conf"),
                (self.files.hostname.clone(), "/etc/hostname"),
            ],
            shared_shm: (ipc_mode == NamespaceMode::Pod && self.files.shm.is_dir())
                .then(|| self.files.shm.clone()),
            privileged: r.privileged,
        })
        .map_err(|e| {
            if e.is_invalid_argument() {
                (invalid("rootfs", &e), None)
            } else {
                (internal("prepare rootfs", &e), None)
            }
        })?;

        tracing::debug!(container = %r.container_id, ms = t.elapsed().as_millis(), "rootfs prepared");
        let t = std::time::Instant::now();
        let cgroup = self.container_cgroup(r)?;
        let fail = |s: Status| (s, cgroup.clone());

        let size = (
            process.console_width.clamp(1, u16::MAX.into()) as u16,
            process.console_height.clamp(1, u16::MAX.into()) as u16,
        );
        let (stdio, pio) = io::create(process.terminal, process.stdin, size, Some(&prepared.fd))
            .map_err(|e| fail(internal("create stdio", &e)))?;
        let mut plan = self
            .process_plan(process, &prepared.fd, stdio)
            .map_err(fail)?;

        plan.rootfs = Some(rootfs_plan(r, &prepared.rootfs).map_err(fail)?);
        let mut flags = libc::CLONE_NEWNS as u64;
        match pid_mode {
            NamespaceMode::Container => flags |= libc::CLONE_NEWPID as u64,
            NamespaceMode::Pod => plan.pid_ns = Some(self.pod_pid_namespace().map_err(fail)?),
        }
        if ipc_mode == NamespaceMode::Container {
            flags |= libc::CLONE_NEWIPC as u64;
        }
        if uts_mode == NamespaceMode::Container {
            flags |= libc::CLONE_NEWUTS as u64;
            let hostname = std::fs::read_to_string(&self.files.hostname).unwrap_or_default();
            let h = hostname.trim();
            if !h.is_empty() {
                plan.hostname = Some(cstring("hostname", h.as_bytes()).map_err(fail)?);
            }
        }
        plan.clone_flags = flags;
        plan.cgroup = match &cgroup {
            Some(cg) => Some(
                cg.open_dir()
                    .map_err(|e| fail(internal("open cgroup", &e)))?,
            ),
            None => None,
        };
        tracing::debug!(container = %r.container_id, ms = t.elapsed().as_millis(), "cgroup and plan ready");
        let t = std::time::Instant::now();
        let spawned = spawn::spawn(plan, &self.reaper, true).map_err(|e| {
            fail(Status::failed_precondition(format!(
                "create container {:?}: {}",
                r.container_id,
                error_chain(&e)
            )))
        })?;
        let pid = spawned.pid.as_raw();
        let init = Process::track(pid, Arc::new(pio), spawned.exit, cgroup.clone());
        let start = spawned.start.map(|s| (s, spawned.sync));
        tracing::info!(container = %r.container_id, pid, spawn_ms = t.elapsed().as_millis(), "container created");
        Ok((
            Container {
                bundle: bundle.to_path_buf(),
                image_serial: r
                    .image
                    .as_ref()
                    .map(|i| i.block_device_serial.clone())
                    .unwrap_or_default(),
                cgroup,
                init,
                state: Mutex::new(State::Created),
                start: Mutex::new(start),
                execs: Mutex::new(HashMap::new()),
            },
            pid as u32,
        ))
    }

    pub async fn start(&self, id: &str) -> Result<(), Status> {
        let c = self.get(id)?;
        if *lock(&c.state) != State::Created {
            return Err(Status::failed_precondition(format!(
                "container {id:?} was already started"
            )));
        }
        if c.init.exited().is_some() {
            return Err(Status::failed_precondition(format!(
                "container {id:?} has exited"
            )));
        }
        let Some((start_fd, mut sync)) = lock(&c.start).take() else {
            return Err(Status::failed_precondition(format!(
                "container {id:?} is being started"
            )));
        };
        *lock(&c.state) = State::Running;
        *lock(&c.init.started_at) = exit::now_nanos();
        let id2 = id.to_owned();
        let t = std::time::Instant::now();
        tokio::task::spawn_blocking(move || spawn::start(start_fd, &mut sync))
            .await
            .map_err(|e| internal("start task", &e))?
            .map_err(|e| {
                Status::failed_precondition(format!("start container {id2:?}: {}", error_chain(&e)))
            })?;
        tracing::info!(container = %id, exec_ms = t.elapsed().as_millis(), "container started");
        Ok(())
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, Status> {
        let p = self.process(id, exec_id)?;
        Ok(p.wait().await)
    }

    pub fn signal(&self, r: &SignalProcessRequest) -> Result<(), Status> {
        let sig = nix::sys::signal::Signal::try_from(r.signal as i32)
            .map_err(|_| Status::invalid_argument(format!("invalid signal {}", r.signal)))?;
        let c = self.get(&r.container_id)?;
        if r.all {
            let Some(cg) = &c.cgroup else {
                return Err(Status::failed_precondition(
                    "no cgroup: cannot signal all processes",
                ));
            };
            for pid in cg.procs().map_err(|e| internal("list processes", &e))? {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let p = self.process(&r.container_id, &r.exec_id)?;
        if p.exited().is_some() {
            return Err(Status::failed_precondition("process has already exited"));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
            .map_err(|e| internal("kill", &e))
    }

    pub async fn delete(&self, id: &str, force: bool) -> Result<(), Status> {
        let c = self.get(id)?;
        if c.init.exited().is_none() {
            let created = *lock(&c.state) == State::Created;
            if !force && !created {
                return Err(Status::failed_precondition(format!(
                    "container {id:?} is running (use force)"
                )));
            }
            c.kill();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c.init.wait()).await;
        }
        lock(&self.containers).remove(id);
        let bundle = c.bundle.clone();
        let cg = c.cgroup.clone();
        tokio::task::spawn_blocking(move || {
            rootfs::cleanup(&bundle);
            if let Some(cg) = cg
                && let Err(e) = cg.remove()
            {
                tracing::warn!("{}", error_chain(&e));
            }
        })
        .await
        .map_err(|e| internal("delete task", &e))?;
        if !c.image_serial.is_empty() {
            lock(&self.images).release(&c.image_serial);
        }
        tracing::info!(container = %id, "container deleted");
        Ok(())
    }

    pub async fn exec(self: Arc<Self>, r: ExecProcessRequest) -> Result<u32, Status> {
        valid_id(&r.exec_id)?;
        let c = self.get(&r.container_id)?;
        if *lock(&c.state) != State::Running || c.init.exited().is_some() {
            return Err(Status::failed_precondition(format!(
                "container {:?} is not running",
                r.container_id
            )));
        }
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&r.exec_id) {
                return Err(Status::already_exists(format!(
                    "exec {:?} already exists",
                    r.exec_id
                )));
            }
            // Finished execs are kept for a late WaitProcess until the table fills up.
            if execs.len() >= MAX_EXECS {
                execs.retain(|_, p| p.exited().is_none());
            }
            if execs.len() >= MAX_EXECS {
                return Err(Status::resource_exhausted(format!(
                    "container {:?} already runs {MAX_EXECS} execs",
                    r.container_id
                )));
            }
        }
        let process = r
            .process
            .clone()
            .ok_or_else(|| Status::invalid_argument("process is missing"))?;
        let me = self.clone();
        let c2 = c.clone();
        let (pid, proc_) = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let init = c2.init.pid;
            let ns = |name: &str| -> Result<OwnedFd, Status> {
                std::fs::File::open(format!("/proc/{init}/ns/{name}"))
                    .map(Into::into)
                    .map_err(|e| internal(&format!("open {name} namespace"), &e))
            };
            let root: OwnedFd = std::fs::File::open(format!("/proc/{init}/root"))
                .map(Into::into)
                .map_err(|e| internal("open container root", &e))?;
            let size = (
                process.console_width.clamp(1, u16::MAX.into()) as u16,
                process.console_height.clamp(1, u16::MAX.into()) as u16,
            );
            // The container's rootfs as the agent mounted it: its devpts is the container's.
            let rootfs = rootfs::rootfs_dir(&c2.bundle);
            let rootfs_fd: OwnedFd = nix::fcntl::open(
                &rootfs,
                nix::fcntl::OFlag::O_PATH
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| internal(&format!("open {}", rootfs.display()), &e))?;
            let (stdio, pio) = io::create(process.terminal, process.stdin, size, Some(&rootfs_fd))
                .map_err(|e| internal("create stdio", &e))?;
            let mut plan = me.process_plan(&process, &root, stdio)?;
            plan.pid_ns = Some(ns("pid")?);
            plan.setns = vec![
                (ns("ipc")?, libc::CLONE_NEWIPC),
                (ns("uts")?, libc::CLONE_NEWUTS),
                (ns("mnt")?, libc::CLONE_NEWNS),
            ];
            plan.cgroup = match &c2.cgroup {
                Some(cg) => Some(cg.open_dir().map_err(|e| internal("open cgroup", &e))?),
                None => None,
            };
            let t = std::time::Instant::now();
            let mut spawned = spawn::spawn(plan, &me.reaper, false)
                .map_err(|e| Status::failed_precondition(format!("exec: {}", error_chain(&e))))?;
            let pid = spawned.pid.as_raw();
            let cloned_ms = t.elapsed().as_millis();
            let p = Process::track(pid, Arc::new(pio), spawned.exit, c2.cgroup.clone());
            spawn::wait_exec(&mut spawned.sync)
                .map_err(|e| Status::failed_precondition(format!("exec: {}", error_chain(&e))))?;
            tracing::debug!(
                pid,
                cloned_ms,
                exec_ms = t.elapsed().as_millis(),
                "exec spawned"
            );
            Ok((pid, p))
        })
        .await
        .map_err(|e| internal("exec task", &e))??;
        lock(&c.execs).insert(r.exec_id.clone(), proc_);
        Ok(pid as u32)
    }

    pub async fn attach_io(
        &self,
        mut input: tonic::Streaming<ProcessInput>,
    ) -> Result<BoxStream<ProcessOutput>, Status> {
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty ProcessIo stream"))?;
        let p = self.process(&first.container_id, &first.exec_id)?;
        let output = io::Attachment::take(p.io.clone()).ok_or_else(|| {
            Status::failed_precondition("the process's output is already attached")
        })?;
        let io = p.io.clone();
        tokio::spawn(async move {
            let mut msg = Some(first);
            loop {
                let m = match msg.take() {
                    Some(m) => m,
                    None => match input.message().await {
                        Ok(Some(m)) => m,
                        _ => break,
                    },
                };
                if !m.stdin.is_empty() {
                    let file = lock(&io.stdin).as_ref().and_then(|f| f.try_clone().ok());
                    if let Some(f) = file {
                        let data = m.stdin;
                        let _ = tokio::task::spawn_blocking(move || {
                            use std::io::Write;
                            (&f).write_all(&data)
                        })
                        .await;
                    }
                }
                if m.close_stdin {
                    io.close_stdin();
                }
            }
        });
        Ok(Box::pin(tokio_stream::StreamExt::map(output, Ok)))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Status> {
        self.process(id, exec_id)?.io.close_stdin();
        Ok(())
    }

    pub fn resize_pty(&self, r: &ResizePtyRequest) -> Result<(), Status> {
        let p = self.process(&r.container_id, &r.exec_id)?;
        let w = u16::try_from(r.width).map_err(|_| Status::invalid_argument("width too large"))?;
        let h =
            u16::try_from(r.height).map_err(|_| Status::invalid_argument("height too large"))?;
        p.io.resize(w, h).map_err(|e| match e {
            nix::Error::ENOTTY => Status::failed_precondition("the process has no terminal"),
            e => internal("resize", &e),
        })
    }

    pub fn stats(&self, r: &StatsRequest) -> Result<StatsResponse, Status> {
        let containers = lock(&self.containers);
        let ids: Vec<String> = if r.container_ids.is_empty() {
            containers.keys().cloned().collect()
        } else {
            r.container_ids.clone()
        };
        let meminfo = stats::meminfo();
        let mut out = Vec::new();
        for id in ids {
            let c = containers
                .get(&id)
                .ok_or_else(|| Status::not_found(format!("container {id:?} not found")))?;
            out.push(ContainerStats {
                container_id: id,
                stats: c
                    .cgroup
                    .as_ref()
                    .map(|cg| stats::read_stats(&cg.path, &meminfo)),
                writable_layer: stats::fs_usage(&rootfs::upper_dir(&c.bundle)),
            });
        }
        let sandbox_dir = self
            .paths
            .cgroup_podvisor()
            .join(lock(&self.sandbox_id).as_str());
        Ok(StatsResponse {
            sandbox: self
                .use_cgroups
                .then(|| stats::read_stats(&sandbox_dir, &meminfo)),
            containers: out,
        })
    }

    pub fn update_resources(&self, r: &UpdateResourcesRequest) -> Result<(), Status> {
        let c = self.get(&r.container_id)?;
        let res = r
            .resources
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("resources are missing"))?;
        let cg = c
            .cgroup
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("container has no cgroup"))?;
        cg.apply(res).map_err(|e| match e {
            cgroup::CgroupError::Invalid(_) => invalid("resources", &e),
            _ => internal("update resources", &e),
        })
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, Status> {
        let c = self.get(id)?;
        let pids = match &c.cgroup {
            Some(cg) => cg.procs().map_err(|e| internal("list processes", &e))?,
            None => vec![c.init.pid],
        };
        Ok(pids
            .into_iter()
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // Fields after the command name "(...)": state ppid ...
                let after = stat.rsplit_once(')')?.1;
                let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                Some(ProcessInfo {
                    pid: pid as u32,
                    ppid,
                    cmdline: cmdline
                        .split(|b| *b == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect(),
                })
            })
            .collect())
    }
}

/// What the child does in the container's rootfs at `rootfs` before it execs: /proc, the
/// masked and read-only paths and the namespaced sysctls of `r`.
fn rootfs_plan(r: &CreateContainerRequest, rootfs: &Path) -> Result<spawn::RootfsPlan, Status> {
    let path_pair = |p: &String| -> Result<(CString, CString), Status> {
        let rel = crate::safepath::relative_components(p).map_err(|e| invalid("path", &e))?;
        let abs = rootfs.join(&rel);
        Ok((
            cstring("path", rel.as_os_str().as_bytes())?,
            cstring("path", abs.as_os_str().as_bytes())?,
        ))
    };
    let masked = r
        .masked_paths
        .iter()
        .map(path_pair)
        .collect::<Result<_, _>>()?;
    let readonly = r
        .readonly_paths
        .iter()
        .map(path_pair)
        .collect::<Result<_, _>>()?;
    let mut sysctls = Vec::new();
    for (k, v) in &r.sysctls {
        let p = crate::sandbox::sysctl_path(k).map_err(|e| invalid("sysctl", &e))?;
        let in_root = rootfs.join(p.strip_prefix("/").unwrap_or(&p));
        sysctls.push((
            cstring("sysctl", in_root.as_os_str().as_bytes())?,
            cstring("sysctl value", v.as_bytes())?,
        ));
    }
    Ok(spawn::RootfsPlan {
        proc: rootfs::cpath(&rootfs.join("proc")),
        rootfs: rootfs::cpath(rootfs),
        masked,
        readonly,
        sysctls,
    })
}

#[cfg(test)]
mod tests;
