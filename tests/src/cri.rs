//! A real `podvisord` for CRI tests: built with cargo, started with a configuration in a
//! temporary directory, stopped on drop together with every VMM it left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::{artifacts, paths};

/// How long podvisord may take to serve its socket.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The podvisord binary, built once per process in this build's profile
/// (override: `PODVISORD=/path/to/podvisord`).
pub fn podvisord_binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_podvisord().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_podvisord() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PODVISORD") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(paths::workspace_root())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .args([
            "build",
            "--quiet",
            "-p",
            "podvisor-runtime",
            "--bin",
            "podvisord",
        ]);
    let profile = if artifacts::release_profile() {
        cmd.arg("--release");
        "release"
    } else {
        "debug"
    };
    let out = cmd.output().context("run cargo to build podvisord")?;
    if !out.status.success() {
        bail!(
            "building podvisord failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = paths::target_dir().join(profile).join("podvisord");
    if !bin.is_file() {
        bail!("cargo built podvisord but {} is missing", bin.display());
    }
    Ok(bin)
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
    log: PathBuf,
}

impl Daemon {
    /// Writes a configuration (socket, directories, `vmm_binary`, then `extra` TOML) and
    /// starts podvisord with it; returns once the socket accepts connections.
    pub fn start(extra: &str) -> anyhow::Result<Self> {
        let bin = podvisord_binary()?;
        let vmm = artifacts::vmm_binary()?;
        // Short paths: the pods' Unix sockets live under the state directory.
        let dir = tempfile::Builder::new()
            .prefix("pvd")
            .tempdir_in("/tmp")
            .context("temporary directory")?;
        let socket = dir.path().join("cri.sock");
        let state_dir = dir.path().join("state");
        let root_dir = dir.path().join("root");
        let config = format!(
            "socket = {:?}\nroot_dir = {:?}\nstate_dir = {:?}\nvmm_binary = {:?}\n{extra}",
            socket.display().to_string(),
            root_dir.display().to_string(),
            state_dir.display().to_string(),
            vmm.display().to_string(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).context("write config")?;
        let log = dir.path().join("podvisord.log");
        let log_file = std::fs::File::create(&log).context("create daemon log")?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("PODVISORD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut daemon = Self {
            child: Some(child),
            dir,
            socket,
            state_dir,
            root_dir,
            log,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok() {
                return Ok(daemon);
            }
            if let Some(child) = daemon.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("podvisord exited ({status}):\n{}", daemon.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "podvisord did not serve {} within {START_DEADLINE:?}:\n{}",
                    daemon.socket.display(),
                    daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The temporary directory holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What podvisord logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether podvisord still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
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

fn nix_pid(pid: u32) -> libc::pid_t {
    libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // VMMs are detached from podvisord: a failed test must not leave VMs running.
        for pid in vmm_processes_under(self.dir.path()) {
            eprintln!("[cri] killing left-over podvisor-vmm {pid}");
            // SAFETY: kill(2) on a pid just read from /proc; at worst it is gone already.
            unsafe { libc::kill(nix_pid(pid), libc::SIGKILL) };
        }
    }
}
