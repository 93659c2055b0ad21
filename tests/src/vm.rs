//! A podvisor-vmm microVM under test: spawned with its console in a file,
//! watched through console markers, killed and cleaned up on drop.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use podvisor_vmm_api::{SnapshotCreate, SnapshotCreated, VmInfo};
use regex::Regex;

use crate::netns::NetNs;
use crate::{artifacts, image, paths};

/// How often the console file and the process are looked at while waiting.
const POLL: Duration = Duration::from_millis(50);

/// An extra drive.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    /// Host file.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
    /// Drive id (the guest's virtio serial).
    pub id: String,
}

/// The root file system a VM boots (always the first drive: `/dev/vda`, id `root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRoot {
    /// The busybox test image ([`image::test_image`]); init is a shell script that runs
    /// `/tests/<VmSpec::test>.sh`.
    TestImage,
    /// The real guest root image `build/guest/rootfs.ext4` ([`artifacts::agent_rootfs`],
    /// refreshed with `make rootfs`); init is the podvisor agent, which prints
    /// [`AGENT_READY`] on the console once it serves the API on vsock.
    AgentRootfs,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The root file system and init.
    pub root: GuestRoot,
    /// The guest script to run: `/tests/<test>.sh` (only with [`GuestRoot::TestImage`]).
    pub test: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub mem_mib: u64,
    /// Drives after the root drive.
    pub drives: Vec<DriveSpec>,
    /// A TAP to attach (it must exist where the VMM runs).
    pub net_tap: Option<String>,
    /// A vsock device with this CID (its socket lives in the VM's directory).
    pub vsock_cid: Option<u64>,
    /// Serve the control API (its socket lives in the VM's directory).
    pub api: bool,
    /// Appended to the kernel command line (`KEY=value` words reach init's environment).
    pub cmdline_extra: String,
    /// `--seccomp` for the VMM (kill, log, off); `None` for its default (kill).
    pub seccomp: Option<&'static str>,
}

impl VmSpec {
    /// The test image running `/tests/<test>.sh`: one vCPU, 128 MiB, no device but the root
    /// drive.
    pub fn new(test: &str) -> Self {
        Self {
            root: GuestRoot::TestImage,
            test: test.into(),
            vcpus: 1,
            mem_mib: 128,
            drives: Vec::new(),
            net_tap: None,
            vsock_cid: None,
            api: false,
            cmdline_extra: String::new(),
            seccomp: None,
        }
    }
}

/// The command line every test boot uses.
pub fn test_cmdline(test: &str) -> String {
    format!("quiet root=/dev/vda ro rootfstype=ext4 init=/init podvisor.test={test}")
}

/// The command line of a VM booting the guest root image with the agent as init.
pub const AGENT_CMDLINE: &str = "quiet root=/dev/vda ro rootfstype=ext4 init=/sbin/podvisor-agent";

/// The console line the agent prints once it serves the API.
pub const AGENT_READY: &str = "podvisor-agent: ready";

/// The guest CID [`VmSpec::agent`] gives the vsock device.
pub const AGENT_VSOCK_CID: u64 = 3;

impl VmSpec {
    /// The guest root image with the agent as init, a vsock device (its Unix socket is
    /// [`Vm::vsock_uds`]) and the control API: one vCPU, 128 MiB.
    pub fn agent() -> Self {
        Self {
            root: GuestRoot::AgentRootfs,
            test: String::new(),
            vsock_cid: Some(AGENT_VSOCK_CID),
            api: true,
            ..Self::new("")
        }
    }

    /// The root image and the kernel command line for this spec.
    fn root_and_cmdline(&self) -> anyhow::Result<(PathBuf, String)> {
        let (root, mut cmdline) = match self.root {
            GuestRoot::TestImage => (image::test_image()?, test_cmdline(&self.test)),
            GuestRoot::AgentRootfs => (artifacts::agent_rootfs()?, AGENT_CMDLINE.to_owned()),
        };
        if !self.cmdline_extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cmdline_extra);
        }
        Ok((root, cmdline))
    }
}

/// Serializes booting tests inside one test process.
///
/// Two microVMs booting at once on this 2-core kvm_pvm host (plus whatever
/// else runs) were seen to stall in the guest kernel's clocksource switch
/// for many minutes; booting tests take this lock so `--test-threads=N`
/// only parallelizes the tests that do not boot.
pub fn boot_slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SLOT.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What to wait for on the console.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// A line containing this text.
    Substring(String),
    /// A line matching this regex.
    Regex(Regex),
}

impl Pattern {
    /// A regex pattern; panics on a bad regex (a bug in the test).
    #[allow(clippy::expect_used)]
    pub fn regex(re: &str) -> Self {
        Self::Regex(Regex::new(re).expect("test regex is valid"))
    }

    /// Whether `line` matches.
    pub fn matches(&self, line: &str) -> bool {
        match self {
            Self::Substring(s) => line.contains(s.as_str()),
            Self::Regex(r) => r.is_match(line),
        }
    }
}

impl From<&str> for Pattern {
    fn from(s: &str) -> Self {
        Self::Substring(s.into())
    }
}

impl From<String> for Pattern {
    fn from(s: String) -> Self {
        Self::Substring(s)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Substring(s) => write!(f, "{s:?}"),
            Self::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

/// A running (or ended) podvisor-vmm.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    status: Option<ExitStatus>,
    started: Instant,
    dir: tempfile::TempDir,
    console: PathBuf,
    stderr: PathBuf,
    console_read: u64,
    partial: String,
    /// Bytes of the line being written, not yet decoded.
    pending: Vec<u8>,
    lines: Vec<String>,
    api_sock: Option<PathBuf>,
    vsock_uds: Option<PathBuf>,
}

impl Vm {
    /// Boots `spec` (its root image, see [`GuestRoot`]) with the guest kernel, optionally
    /// inside `netns`.
    pub fn boot(spec: &VmSpec, netns: Option<&NetNs>) -> anyhow::Result<Self> {
        Self::launch(spec, netns, None)
    }

    /// Continues the snapshot `state` + `mem` (written through `PUT /vm/snapshot`) in a new
    /// VMM with `spec`'s devices (same kinds and order as the snapshotted VM; new vsock
    /// socket, API socket and console in a directory of its own).
    pub fn restore(spec: &VmSpec, state: &Path, mem: &Path) -> anyhow::Result<Self> {
        Self::launch(spec, None, Some((state, mem)))
    }

    fn launch(
        spec: &VmSpec,
        netns: Option<&NetNs>,
        restore: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Self> {
        paths::require_kvm()?;
        let vmm = artifacts::vmm_binary()?;
        let (img, cmdline) = spec.root_and_cmdline()?;
        let dir = tempfile::Builder::new()
            .prefix("podvisor-vm-")
            .tempdir()
            .context("create the VM's temporary directory")?;
        let console = dir.path().join("console.log");
        let stderr = dir.path().join("vmm.stderr");
        let mut args: Vec<String> = match restore {
            None => vec![
                "--kernel".into(),
                paths::guest_kernel()?.display().to_string(),
                "--cmdline".into(),
                cmdline,
                "--vcpus".into(),
                spec.vcpus.to_string(),
                "--mem-mib".into(),
                spec.mem_mib.to_string(),
            ],
            Some((state, mem)) => vec![
                "--restore".into(),
                format!("state={},mem={}", state.display(), mem.display()),
            ],
        };
        args.extend([
            "--serial".into(),
            console.display().to_string(),
            "--drive".into(),
            format!("{},ro,id=root", img.display()),
        ]);
        for d in &spec.drives {
            args.push("--drive".into());
            args.push(format!(
                "{}{},id={}",
                d.path.display(),
                if d.read_only { ",ro" } else { "" },
                d.id
            ));
        }
        if let Some(tap) = &spec.net_tap {
            args.push("--net".into());
            args.push(format!("tap={tap}"));
        }
        let vsock_uds = spec.vsock_cid.map(|_| dir.path().join("vsock.sock"));
        if let (Some(cid), Some(uds)) = (spec.vsock_cid, &vsock_uds) {
            args.push("--vsock".into());
            args.push(format!("cid={cid},uds={}", uds.display()));
        }
        if let Some(level) = spec.seccomp {
            args.push("--seccomp".into());
            args.push(level.into());
        }
        let api_sock = spec.api.then(|| dir.path().join("api.sock"));
        if let Some(sock) = &api_sock {
            args.push("--api-sock".into());
            args.push(sock.display().to_string());
        }
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(ns.exec_prefix()).arg(&vmm);
                c
            }
            None => Command::new(&vmm),
        };
        cmd.args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).context("create the VMM's stderr file")?);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} {}", vmm.display(), args.join(" ")))?;
        Ok(Self {
            child,
            status: None,
            started,
            dir,
            console,
            stderr,
            console_read: 0,
            partial: String::new(),
            pending: Vec::new(),
            lines: Vec::new(),
            api_sock,
            vsock_uds,
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the VMM was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The VM's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The control API socket, if the VM has one.
    pub fn api_sock(&self) -> anyhow::Result<&Path> {
        self.api_sock
            .as_deref()
            .ok_or_else(|| anyhow!("this VM has no API socket"))
    }

    /// The vsock Unix socket, if the VM has a vsock device.
    pub fn vsock_uds(&self) -> anyhow::Result<&Path> {
        self.vsock_uds
            .as_deref()
            .ok_or_else(|| anyhow!("this VM has no vsock device"))
    }

    /// One control API call; the body of a 2xx answer.
    pub fn api(&self, method: &str, uri: &str, body: Option<&str>) -> anyhow::Result<String> {
        let sock = self.api_sock()?;
        podvisor_vmm_api::client::call(sock, method, uri, body)
            .with_context(|| format!("API {method} {uri}"))
    }

    /// `GET /vm`.
    pub fn info(&self) -> anyhow::Result<VmInfo> {
        let body = self.api("GET", "/vm", None)?;
        serde_json::from_str(&body).with_context(|| format!("parse GET /vm answer {body}"))
    }

    /// Everything the VMM wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read stderr: {e}>"))
    }

    /// Console lines read so far.
    pub fn console_lines(&mut self) -> &[String] {
        let _ = self.read_console();
        &self.lines
    }

    /// The whole console so far, one string (for failure reports).
    pub fn console(&mut self) -> String {
        let _ = self.read_console();
        let mut s = self.lines.join("\n");
        if !self.partial.is_empty() {
            s.push('\n');
            s.push_str(&self.partial);
        }
        s
    }

    fn read_console(&mut self) -> anyhow::Result<()> {
        let mut f = match File::open(&self.console) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("open {}", self.console.display())),
        };
        f.seek(SeekFrom::Start(self.console_read))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .with_context(|| format!("read {}", self.console.display()))?;
        self.console_read += buf.len() as u64;
        // Decode whole lines only: a read may end inside a UTF-8 sequence.
        self.pending.extend_from_slice(&buf);
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            self.lines.push(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            );
        }
        self.partial = String::from_utf8_lossy(&self.pending).into_owned();
        Ok(())
    }

    /// The first complete console line matching `pat`. A line still being
    /// written is never matched: its value may be cut short.
    fn find(&self, pat: &Pattern) -> Option<String> {
        self.lines.iter().find(|l| pat.matches(l)).cloned()
    }

    /// Like [`Self::find`], and also the unterminated last line, once the
    /// VMM has ended and nothing more will be written.
    fn find_final(&self, pat: &Pattern) -> Option<String> {
        self.find(pat)
            .or_else(|| pat.matches(&self.partial).then(|| self.partial.clone()))
    }

    /// Whether the VMM has ended (without waiting).
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("wait for the VMM")?;
        }
        Ok(self.status)
    }

    /// Waits until a console line (any line since boot) matches `pat`;
    /// returns that line. Fails when `timeout` passes or the VMM ends first.
    pub fn wait_for_console(
        &mut self,
        pat: impl Into<Pattern>,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let pat = pat.into();
        let deadline = Instant::now() + timeout;
        loop {
            self.read_console()?;
            if let Some(line) = self.find(&pat) {
                return Ok(line);
            }
            if let Some(status) = self.try_status()? {
                self.read_console()?;
                if let Some(line) = self.find_final(&pat) {
                    return Ok(line);
                }
                bail!(
                    "the VMM ended ({status}) before the console showed {pat}\n{}",
                    self.report()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the console did not show {pat} within {timeout:?}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `n` console lines (any since boot) contain `text`.
    pub fn wait_for_console_count(
        &mut self,
        text: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.read_console()?;
            let seen = self.lines.iter().filter(|l| l.contains(text)).count();
            if seen >= n {
                return Ok(());
            }
            if self.try_status()?.is_some() || Instant::now() >= deadline {
                bail!(
                    "the console showed {text:?} {seen} times, not {n}, within {timeout:?}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `PUT /vm/snapshot` (the VM must be paused): writes `state` and `mem`.
    pub fn snapshot(&self, state: &Path, mem: &Path) -> anyhow::Result<SnapshotCreated> {
        let body = serde_json::to_string(&SnapshotCreate {
            state_path: state.to_path_buf(),
            mem_path: mem.to_path_buf(),
        })?;
        let answer = self.api("PUT", "/vm/snapshot", Some(&body))?;
        serde_json::from_str(&answer).with_context(|| format!("snapshot answer {answer:?}"))
    }

    /// Waits for the VMM to end; kills it when `timeout` passes.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                let _ = self.read_console();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "the VMM did not end within {timeout:?}; killed\n{}",
                    self.report()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills the VMM (if still running) and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.try_status(), Ok(None)) {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// The tail of the console and stderr, for failure messages.
    pub fn report(&mut self) -> String {
        let _ = self.read_console();
        let tail = |lines: &[String], n: usize| {
            lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| format!("  | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut console = self.lines.clone();
        if !self.partial.is_empty() {
            console.push(self.partial.clone());
        }
        let stderr: Vec<String> = self.stderr().lines().map(str::to_string).collect();
        let api = match (self.status, &self.api_sock) {
            (None, Some(_)) => match self.info() {
                Ok(i) => {
                    let devices: Vec<String> = i
                        .devices
                        .iter()
                        .map(|d| {
                            format!("{}: {} completed={}", d.name, d.state, d.counters.completed)
                        })
                        .collect();
                    format!(
                        "\n--- GET /vm ---\n  boot={:?}\n  {}",
                        i.boot,
                        devices.join("\n  ")
                    )
                }
                Err(e) => format!("\n--- GET /vm failed: {e:#}"),
            },
            _ => String::new(),
        };
        format!(
            "--- console (last 40 of {} lines, {:.1} s since spawn) ---\n{}\n--- VMM stderr (last 30 lines) ---\n{}{api}",
            console.len(),
            self.started.elapsed().as_secs_f64(),
            tail(&console, 40),
            tail(&stderr, 30)
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Host → guest vsock through the hybrid socket: `CONNECT <port>` then echo.
pub fn host_vsock_echo(
    uds: &Path,
    port: u32,
    message: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(uds).with_context(|| format!("connect {}", uds.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut ack = Vec::new();
    let mut byte = [0u8; 1];
    while ack.last() != Some(&b'\n') && ack.len() < 64 {
        let n = s.read(&mut byte).context("read the CONNECT answer")?;
        ensure!(
            n == 1,
            "EOF after {:?} while waiting for the CONNECT answer",
            String::from_utf8_lossy(&ack)
        );
        ack.push(byte[0]);
    }
    let ack = String::from_utf8_lossy(&ack);
    ensure!(
        ack.starts_with("OK "),
        "CONNECT {port} answered {ack:?}, expected \"OK <n>\\n\""
    );
    s.write_all(format!("{message}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut echo = String::new();
    s.read_to_string(&mut echo).context("read the echo")?;
    ensure!(
        echo == format!("{message}\n"),
        "echo was {echo:?}, sent {message:?}"
    );
    Ok(())
}
