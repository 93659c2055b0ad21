//! A real `podvisord` for CRI tests: built with cargo, started with a configuration in a
//! temporary directory, stopped on drop together with every VMM it left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::pods::template;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{artifacts, paths};

/// How long podvisord may take to serve its socket.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The podvisord binary, built once per process in this build's profile
/// (override: `PODVISORD=/path/to/podvisord`).
pub fn podvisord_binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        match std::env::var_os("PODVISORD") {
            Some(p) => Ok(PathBuf::from(p)),
            None => build_runtime_binary("podvisord"),
        }
        .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A binary of the runtime crate (`podvisorctl`), built in this build's profile.
pub fn runtime_binary(name: &str) -> anyhow::Result<PathBuf> {
    if name == "podvisord" {
        return podvisord_binary();
    }
    build_runtime_binary(name)
}

fn build_runtime_binary(name: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(paths::workspace_root())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .args(["build", "--quiet", "-p", "podvisor-runtime", "--bin", name]);
    let profile = if artifacts::release_profile() {
        cmd.arg("--release");
        "release"
    } else {
        "debug"
    };
    let out = cmd
        .output()
        .with_context(|| format!("run cargo to build {name}"))?;
    if !out.status.success() {
        bail!(
            "building {name} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = paths::target_dir().join(profile).join(name);
    if !bin.is_file() {
        bail!("cargo built {name} but {} is missing", bin.display());
    }
    Ok(bin)
}

/// A gRPC channel over a CRI Unix socket (podvisord's, or containerd's for comparison).
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let socket = socket.to_path_buf();
    let shown = socket.display().to_string();
    Endpoint::from_static("http://cri.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connect to {shown}"))
}

/// Writes `<dir>/10-<name>.conflist`: a CNI network of Debian's `bridge` plugin (bridge
/// `bridge`, the gateway on the host, no masquerading) with `host-local` addresses from
/// `subnet`, kept under `dir`. Returns `dir`, for a `conf_dir` setting. The plugins are in
/// [`CNI_BIN_DIR`]; the bridge is left behind (remove it with [`delete_link`]).
pub fn write_bridge_conflist(
    dir: &Path,
    name: &str,
    bridge: &str,
    subnet: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": dir.join("ipam").display().to_string(),
            },
        }],
    });
    let path = dir.join(format!("10-{name}.conflist"));
    std::fs::write(&path, serde_json::to_vec_pretty(&conflist)?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(dir.to_path_buf())
}

/// Debian's CNI plugins (containernetworking-plugins).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// Deletes a network interface of the host (a CNI bridge); one that is not there is fine.
pub fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Pids of `podvisor-vmm` processes whose command line mentions `dir`.
pub fn vmm_processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // A zombie has an empty command line: it is no VM any more.
            text.contains("podvisor-vmm") && text.contains(&needle)
        })
        .collect()
}

/// Mount points at or beneath `dir` on the host (`/proc/self/mountinfo`), read here on its
/// own so a leak check does not share podvisord's blind spots.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Cgroup hierarchies mounted on the host (`/proc/self/mountinfo`). Read here on its own
/// rather than through podvisord's code, so a leak check does not share its blind spots.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mount_point = fields.get(4).map(PathBuf::from)?;
            (matches!(fstype, "cgroup" | "cgroup2") && fields.get(3) == Some(&"/"))
                .then_some(mount_point)
        })
        .collect()
}

/// Every `podvisor/<name>` cgroup left for `name` in any hierarchy.
pub fn cgroups_of(name: &str) -> Vec<PathBuf> {
    cgroup_hierarchies()
        .into_iter()
        .map(|h| h.join("podvisor").join(name))
        .filter(|p| p.exists())
        .collect()
}

/// Every pod's `podvisor/<sandbox id>` cgroup on the host (template VMs' left out).
pub fn pod_cgroups() -> Vec<PathBuf> {
    cgroup_hierarchies()
        .into_iter()
        .flat_map(|h| std::fs::read_dir(h.join("podvisor")).into_iter().flatten())
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with("template-"))
        .map(|e| e.path())
        .collect()
}

/// A running podvisord with its own socket, root and state directories.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The CRI socket.
    pub socket: PathBuf,
    /// Its state directory (records, pod directories).
    pub state_dir: PathBuf,
    /// Its root directory (images).
    pub root_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    launch: Launch,
}

/// Which podvisord a [`Daemon`] runs, and what it adds to its environment.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The executable (an installed one); `None`: the build's, [`podvisord_binary`].
    pub binary: Option<PathBuf>,
    /// Environment variables set for podvisord (`NOTIFY_SOCKET`, to watch its readiness).
    pub env: Vec<(String, String)>,
    /// Share VM templates with other test daemons through [`template_cache`]: the cached
    /// ones are copied in before the first start, and the ones it built are cached when it
    /// stops (for tests that do not look at template builds themselves).
    pub shared_templates: bool,
}

impl Daemon {
    /// Writes a configuration (socket, directories, `vmm_binary`, then `extra` TOML) and
    /// starts podvisord with it; returns once the socket accepts connections.
    pub fn start(extra: &str) -> anyhow::Result<Self> {
        artifacts::vmm_binary()?;
        Self::start_with(Launch::default(), |socket, root_dir, state_dir| {
            base_config(socket, root_dir, state_dir, extra)
        })
    }

    /// Starts the podvisord of `launch` with the configuration `config` writes for this
    /// daemon's socket, root and state directories (its arguments, in that order); returns
    /// once the socket accepts connections.
    pub fn start_with(
        launch: Launch,
        config: impl FnOnce(&Path, &Path, &Path) -> String,
    ) -> anyhow::Result<Self> {
        // Short paths: the pods' Unix sockets live under the state directory.
        let dir = tempfile::Builder::new()
            .prefix("pvd")
            .tempdir_in("/tmp")
            .context("temporary directory")?;
        let socket = dir.path().join("cri.sock");
        let state_dir = dir.path().join("state");
        let root_dir = dir.path().join("root");
        let config = config(&socket, &root_dir, &state_dir);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).context("write config")?;
        let log = dir.path().join("podvisord.log");
        let mut daemon = Self {
            child: None,
            dir,
            socket,
            state_dir,
            root_dir,
            config: config_path,
            log,
            launch,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// Starts podvisord with this daemon's configuration (appending to its log) and waits
    /// until its socket accepts connections.
    fn spawn(&mut self) -> anyhow::Result<()> {
        if self.launch.shared_templates && !self.root_dir.exists() {
            seed_templates(&self.root_dir.join("templates"))?;
        }
        let bin = match &self.launch.binary {
            Some(bin) => bin.clone(),
            None => podvisord_binary()?,
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("open daemon log")?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("PODVISORD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // The socket file of a previous run is removed on SIGTERM; a connection proves
            // this run serves.
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("podvisord exited ({status}):\n{}", self.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "podvisord did not serve {} within {START_DEADLINE:?}:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops podvisord with SIGTERM (it must exit successfully) and starts it again with the
    /// same configuration; pod VMs keep running in between.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let status = self.stop()?;
        if !status.success() {
            bail!("podvisord exited {status} on SIGTERM");
        }
        self.spawn()
    }

    /// Stops podvisord with SIGTERM and starts it again with `extra` appended to its
    /// configuration (top-level keys must come before the first table: `extra` is put
    /// there); pod VMs keep running in between.
    pub fn restart_with(&mut self, extra: &str) -> anyhow::Result<()> {
        let status = self.stop()?;
        if !status.success() {
            bail!("podvisord exited {status} on SIGTERM");
        }
        let config = std::fs::read_to_string(&self.config).context("read config")?;
        std::fs::write(&self.config, format!("{extra}\n{config}")).context("write config")?;
        self.spawn()
    }

    /// Starts podvisord again after [`Daemon::stop`], with the same configuration.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("podvisord still runs");
        }
        self.spawn()
    }

    /// The pod directory of sandbox `id` (named by its first 16 hex digits).
    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("pods").join(&id[..id.len().min(16)])
    }

    /// The VM configuration podvisord started sandbox `id`'s VMM with (`vmm.json`).
    pub fn vmm_config(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let path = self.pod_dir(id).join("vmm.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// podvisord's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temporary directory holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What podvisord logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of every pod's guest console and VMM log, for failure reports.
    pub fn pod_logs(&self) -> String {
        let mut out = String::new();
        let pods = std::fs::read_dir(self.state_dir.join("pods"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for pod in pods {
            for name in ["console.log", "vmm.log"] {
                let text = std::fs::read_to_string(pod.join(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "--- {} (last 60 lines)\n{}\n",
                    pod.join(name).display(),
                    lines[lines.len().saturating_sub(60)..].join("\n")
                ));
            }
        }
        out
    }

    /// Whether podvisord still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs podvisord (a crash: nothing of its own cleanup runs) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("podvisord was already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERMs podvisord and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("podvisord was already stopped")?;
        let pid = nix_pid(child.id());
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                if self.launch.shared_templates {
                    harvest_templates(&self.root_dir.join("templates"));
                }
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("podvisord did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A test podvisord's configuration: its socket and directories, the build's VMM, then
/// `extra`.
fn base_config(socket: &Path, root_dir: &Path, state_dir: &Path, extra: &str) -> String {
    // Found (and built) by the caller already: this only looks it up again.
    let vmm = artifacts::vmm_binary().map_or_else(|_| String::new(), |p| p.display().to_string());
    format!(
        "socket = {:?}\nroot_dir = {:?}\nstate_dir = {:?}\nvmm_binary = {vmm:?}\n{extra}",
        socket.display().to_string(),
        root_dir.display().to_string(),
        state_dir.display().to_string(),
    )
}

/// Where test daemons share VM templates (`$PODVISOR_CACHE/test-templates`, by default
/// under /var/cache/podvisor as the guest kernel), each under its podvisord key (a hash of
/// every input: VMM, kernel and image contents, size, command line, drives), so a template
/// is only ever used by a podvisord that would build the same one.
pub fn template_cache() -> PathBuf {
    std::env::var_os("PODVISOR_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/podvisor"), PathBuf::from)
        .join("test-templates")
}
/// The most templates the cache keeps (the newest).
const TEMPLATE_CACHE_MAX: usize = 4;

/// A template directory podvisord finished: its snapshot and its `template.json`, no build
/// record.
fn finished_template(dir: &Path) -> bool {
    ["vm.state", "vm.mem", "template.json"]
        .iter()
        .all(|f| dir.join(f).is_file())
        && !dir.join("build.json").exists()
}

/// `cp -a --sparse=always from to`: the memory file is mostly holes.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let (from, to) = (from.display().to_string(), to.display().to_string());
    crate::host::run("cp", &["-a", "--sparse=always", &from, &to]).map(drop)
}

/// Copies every cached template into `templates` (made 0700, as podvisord makes it).
fn seed_templates(templates: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Ok(entries) = std::fs::read_dir(template_cache()) else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(templates)?;
    if let Some(root) = templates.parent() {
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    for e in entries.flatten() {
        if !finished_template(&e.path()) {
            continue;
        }
        // Another test process may prune this entry while it is copied: then this daemon
        // builds that template itself.
        let to = templates.join(e.file_name());
        if copy_tree(&e.path(), &to).is_err() {
            eprintln!("[cri] cached VM template {} went away", e.path().display());
            if to.exists() {
                std::fs::remove_dir_all(&to).with_context(|| format!("remove {}", to.display()))?;
            }
        }
    }
    Ok(())
}

/// Caches the finished templates of `templates` the cache lacks, then drops the oldest
/// beyond [`TEMPLATE_CACHE_MAX`]. Best effort: a test never fails on its cache.
fn harvest_templates(templates: &Path) {
    let cache = template_cache();
    let _ = std::fs::create_dir_all(&cache);
    for e in std::fs::read_dir(templates).into_iter().flatten().flatten() {
        let cached = cache.join(e.file_name());
        if !finished_template(&e.path()) || cached.exists() {
            continue;
        }
        // Per process: two test groups run side by side and may harvest the same template.
        let tmp = cache.join(format!(
            ".{}.{}.tmp",
            e.file_name().to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        if copy_tree(&e.path(), &tmp).is_ok() && std::fs::rename(&tmp, &cached).is_ok() {
            println!("[cri] cached VM template {}", cached.display());
        } else {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let mut cached: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        // Dot entries are another process's copies in progress.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    cached.sort();
    cached.reverse();
    for (_, old) in cached.into_iter().skip(TEMPLATE_CACHE_MAX) {
        let _ = std::fs::remove_dir_all(old);
    }
}

fn nix_pid(pid: u32) -> libc::pid_t {
    libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test that failed before it stopped podvisord: SIGTERM first (podvisord stops a
        // template build and deletes its namespace), SIGKILL after 30 s.
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("[cri] {e:#}");
        }
        // VMMs are detached from podvisord: a failed test must not leave VMs running.
        for pid in vmm_processes_under(self.dir.path()) {
            eprintln!("[cri] killing left-over podvisor-vmm {pid}");
            // SAFETY: kill(2) on a pid just read from /proc; at worst it is gone already.
            unsafe { libc::kill(nix_pid(pid), libc::SIGKILL) };
        }
        // Their cgroups can only go once they have exited (EBUSY before).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !vmm_processes_under(self.dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Nor network namespaces: those of sandboxes still recorded go (after their VMMs).
        let records = std::fs::read_dir(self.state_dir.join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for record in records {
            // Nor cgroups: the VMM's, named by the record's file name (its sandbox id).
            if let Some(id) = record
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                for cgroup in cgroups_of(id) {
                    // KVM's worker thread of the VM leaves the cgroup a moment after its
                    // VMM (EBUSY until then), as podvisord's own removal allows for.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while std::fs::remove_dir(&cgroup).is_err()
                        && cgroup.exists()
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            let netns = std::fs::read(&record)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["netns"].as_str().map(PathBuf::from));
            if let Some(netns) = netns.filter(|p| p.starts_with("/run/netns")) {
                remove_left_netns(&netns);
            }
        }
        // Nor the namespaces of template builds a killed podvisord left.
        let templates = self.root_dir.join("templates");
        let built = std::fs::read_dir("/run/netns")
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for netns in built {
            let name = netns.file_name().unwrap_or_default().to_string_lossy();
            if template::is_build_netns_of(&name, &templates) {
                remove_left_netns(&netns);
            }
        }
        // Nor the pods' shares: the temporary directory's removal would otherwise walk into
        // the volumes bound there.
        let mut mounts = mounts_under(self.dir.path());
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            eprintln!("[cri] unmounting left-over {}", m.display());
            if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2(2) with a NUL-terminated path that lives across the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Unmounts and removes the network namespace file `netns` (under /run/netns) a failed
/// test left.
fn remove_left_netns(netns: &Path) {
    eprintln!("[cri] removing left-over {}", netns.display());
    if let Ok(c) = std::ffi::CString::new(netns.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2(2) with a NUL-terminated path that lives across the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(netns);
}

/// PullImage of `image` for `pod`, as kubelet asks; returns the image reference to create
/// containers from.
pub async fn pull_image(
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    pod: &cri::PodSandboxConfig,
) -> anyhow::Result<String> {
    Ok(images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(pod.clone()),
        })
        .await
        .with_context(|| format!("PullImage {image}"))?
        .into_inner()
        .image_ref)
}

/// A [`shell_container`] script that idles until SIGTERM (then exits 0). It sleeps in
/// `wait`: on kvm_pvm a fork and exec of `sleep` every second keeps a host core ~70 % busy.
pub const IDLE_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// A container `name` of `image` running busybox `sh -c script`; callers add what else
/// they need (log path, mounts, security context) with struct update syntax.
pub fn shell_container(name: &str, image: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into()],
        args: vec![script.into()],
        ..Default::default()
    }
}

/// The message of a CRI call that failed with `code` (printed under `[tag]`); an error for
/// any other outcome.
pub fn expect_code<T: std::fmt::Debug>(
    tag: &str,
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
) -> anyhow::Result<String> {
    match r {
        Err(s) if s.code() == code => {
            println!("[{tag}] {what}: {code:?} {:?}", s.message());
            Ok(s.message().to_string())
        }
        other => bail!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// A sandbox RunPodSandbox made: its id, its VMM's pid and pod directory, and whether its
/// VM was restored from a template.
#[derive(Debug, Clone)]
pub struct PodVm {
    /// The sandbox id.
    pub id: String,
    /// The VMM's pid.
    pub vmm_pid: u32,
    /// The pod directory.
    pub dir: PathBuf,
    /// Restored from a VM template (its VM configuration names a snapshot).
    pub restored: bool,
}

/// RunPodSandbox with `pod` (default handler); what it made, read from its verbose status.
pub async fn run_pod_vm(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &cri::PodSandboxConfig,
) -> anyhow::Result<PodVm> {
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(status.info.get("info").context("no info")?)?;
    let dir = PathBuf::from(info["vmm"]["dir"].as_str().context("no pod dir")?);
    let vmm_pid = u32::try_from(info["vmm"]["pid"].as_u64().context("no VMM pid")?)?;
    let vm: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("vmm.json"))?)?;
    Ok(PodVm {
        id,
        vmm_pid,
        dir,
        restored: !vm["restore"].is_null(),
    })
}

/// CreateContainer + StartContainer of `config` in `sandbox`; the container's id.
pub async fn run_container(
    rt: &mut RuntimeServiceClient<Channel>,
    sandbox: &str,
    pod: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> anyhow::Result<String> {
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("StartContainer")?;
    Ok(id)
}

/// StopPodSandbox and RemovePodSandbox.
pub async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> anyhow::Result<()> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .context("StopPodSandbox")?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .context("RemovePodSandbox")?;
    Ok(())
}

/// ExecSync of `cmd` in container `id`, with two minutes to run.
pub async fn exec_sync(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
) -> anyhow::Result<cri::ExecSyncResponse> {
    exec_sync_within(rt, id, cmd, Duration::from_secs(120)).await
}

/// [`exec_sync`] with its own timeout.
pub async fn exec_sync_within(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
    timeout: Duration,
) -> anyhow::Result<cri::ExecSyncResponse> {
    Ok(rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        })
        .await
        .with_context(|| format!("ExecSync {cmd:?}"))?
        .into_inner())
}

/// The console cap of the tests' pods: the smallest podvisord takes, so a flooding guest
/// reaches it within its minute even on a loaded host (about 200 KB a minute was seen
/// through the emulated serial port with both test groups running).
pub const TEST_CONSOLE_MAX_BYTES: u64 = 64 << 10;

/// podvisord's configuration for a test: the registry at `registry_host` (plain HTTP), the
/// CNI networks in `conf_dir` with Debian's plugins, and the `podvisor` handler with the
/// test kernel and agent image (one vCPU, 256 MiB).
pub fn daemon_config(registry_host: &str, conf_dir: &Path) -> anyhow::Result<String> {
    let kernel = paths::guest_kernel()?;
    let rootfs = artifacts::agent_rootfs()?;
    Ok(format!(
        "[registry]\ninsecure = [{registry_host:?}]\n\n[cni]\nconf_dir = {conf_dir:?}\n\
         bin_dirs = [{CNI_BIN_DIR:?}]\n\n[handlers.podvisor]\nvcpus = 1\nmemory_mib = 256\n\
         kernel = {kernel:?}\nimage = {rootfs:?}\nconsole_max_bytes = {TEST_CONSOLE_MAX_BYTES}\n",
        conf_dir = conf_dir.display().to_string(),
        kernel = kernel.display().to_string(),
        rootfs = rootfs.display().to_string(),
    ))
}

/// A test's pod network: its CNI conf dir, and its bridge, removed when dropped.
pub struct PodNet {
    dir: tempfile::TempDir,
    bridge: &'static str,
}

impl Drop for PodNet {
    fn drop(&mut self) {
        delete_link(self.bridge);
    }
}

/// What a CRI test needs around podvisord: the registry, the CNI network, the image
/// reference. Kept until the test ends.
pub struct CriSetup {
    /// The registry (for more images).
    pub registry: crate::registry::Registry,
    net: PodNet,
    /// The pushed busybox image.
    pub image_name: String,
}

impl CriSetup {
    /// The addresses host-local IPAM holds leased on the test's network now.
    pub fn ip_leases(&self) -> Vec<String> {
        let dir = self.net.dir.path().join("ipam").join(self.net.bridge);
        let mut leases: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        leases.sort();
        leases
    }
}

/// A registry with busybox pushed, a bridge CNI network named `bridge` on `subnet`, and
/// podvisord configured for them with the test kernel and agent image; `tag` prefixes
/// what it prints.
pub async fn start_cri_daemon(
    tag: &str,
    bridge: &'static str,
    subnet: &str,
) -> anyhow::Result<(CriSetup, Daemon)> {
    paths::require_kvm()?;
    let registry = crate::registry::Registry::start()?;
    let pushed = crate::registry::push_busybox(&registry, "podvisor/busybox", tag).await?;
    let image_name = registry.reference("podvisor/busybox", tag);
    println!("[{tag}] pushed {image_name} ({})", pushed.digest);
    let net = PodNet {
        dir: tempfile::Builder::new().prefix("pvcni").tempdir()?,
        bridge,
    };
    let conf_dir = write_bridge_conflist(net.dir.path(), bridge, bridge, subnet)?;
    let config = daemon_config(registry.host(), &conf_dir)?;
    artifacts::vmm_binary()?;
    let daemon = Daemon::start_with(
        Launch {
            shared_templates: true,
            ..Launch::default()
        },
        |socket, root_dir, state_dir| base_config(socket, root_dir, state_dir, &config),
    )?;
    let setup = CriSetup {
        registry,
        net,
        image_name,
    };
    Ok((setup, daemon))
}
