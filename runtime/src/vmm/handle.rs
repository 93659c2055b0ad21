//! [`VmmHandle`]: a launched VMM as the sandbox record keeps it, and everything done to it
//! afterwards: alive or not, control API calls (`GET /vm`, drive swaps, stop), SIGKILL and
//! removing its directory.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_common::IoError;
use podvisor_vmm_api::client;
use podvisor_vmm_api::{DriveSwap, VmInfo};
use serde::{Deserialize, Serialize};

use super::cgroup::remove_cgroup;
use super::error::VmmError;
use super::pod_dir::remove_pod_dir;
use super::process::{PidFd, ProcStat, read_proc_stat};

/// How long a SIGKILLed VMM may take to go away before we report it stuck.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often [`VmmHandle::wait_api`] asks.
const API_POLL: Duration = Duration::from_millis(20);
/// Lines of `vmm.log` an [`VmmError::Exited`] quotes.
const LOG_TAIL_LINES: usize = 20;
/// How much of the end of `vmm.log` is read for [`LOG_TAIL_LINES`].
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// A launched VMM, as persisted in the sandbox record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmHandle {
    /// The VMM's pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// The pod directory.
    pub dir: PathBuf,
    /// Control API socket.
    pub api_sock: PathBuf,
    /// vsock Unix socket (dial it and send `CONNECT <port>\n`).
    pub vsock_uds: PathBuf,
    /// The guest console.
    pub console_log: PathBuf,
    /// The VMM's own output.
    pub vmm_log: PathBuf,
    /// Its cgroup (the same path in each hierarchy), removed with the directory.
    #[serde(default)]
    pub cgroup: Option<super::CgroupPath>,
}

/// How [`VmmHandle::stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It stopped through the control API within the timeout.
    Stopped,
    /// It was killed with SIGKILL.
    Killed,
    /// It was not running (any more).
    AlreadyGone,
}

impl VmmHandle {
    fn proc_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
        let pid = self.pid;
        move |source| VmmError::Process { pid, what, source }
    }

    /// Our VMM's current `/proc` status, `None` when it is gone (including a pid now used by
    /// another process).
    fn stat(&self) -> io::Result<Option<ProcStat>> {
        Ok(read_proc_stat(self.pid)?
            .filter(|s| s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X')))
    }

    /// Whether the VMM still runs. A pid reused by another process, or an ended VMM not yet
    /// reaped, is not alive. When `/proc` cannot be read the VMM is taken to be alive, so
    /// nothing of a VM that may still run is cleaned up.
    pub fn is_alive(&self) -> bool {
        match self.stat() {
            Ok(s) => s.is_some(),
            Err(e) => {
                tracing::warn!(pid = self.pid, "read /proc/{}/stat: {e}", self.pid);
                true
            }
        }
    }

    /// A pidfd for our VMM, `None` when it is gone. The pidfd is opened before the start time
    /// is compared, so it cannot refer to a process that took the pid over afterwards.
    fn pidfd(&self) -> Result<Option<PidFd>, VmmError> {
        let Some(fd) = PidFd::open(self.pid).map_err(self.proc_err("open pidfd"))? else {
            return Ok(None);
        };
        let ours = self.stat().map_err(self.proc_err("read /proc stat"))?;
        Ok(ours.map(|_| fd))
    }

    /// `GET /vm`.
    pub fn info(&self) -> Result<VmInfo, VmmError> {
        let body = client::call(&self.api_sock, "GET", "/vm", None)?;
        serde_json::from_str(&body).map_err(|source| VmmError::BadAnswer {
            path: self.api_sock.clone(),
            body,
            source,
        })
    }

    /// Waits until the control API answers `GET /vm`. Fails when the VMM ends first (quoting
    /// the end of its log) or `timeout` passes.
    pub fn wait_api(&self, timeout: Duration) -> Result<VmInfo, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.info() {
                Ok(info) => return Ok(info),
                Err(e @ VmmError::BadAnswer { .. }) => return Err(e),
                Err(e) => tracing::trace!(pid = self.pid, "control API not up yet: {e}"),
            }
            if !self.is_alive() {
                return Err(VmmError::Exited {
                    pid: self.pid,
                    log_tail: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmmError::ApiTimeout(self.api_sock.clone()));
            }
            std::thread::sleep(API_POLL);
        }
    }

    /// The last lines of `vmm.log`, for error messages: only its last
    /// [`LOG_TAIL_BYTES`] are read, however much the VMM wrote.
    pub fn log_tail(&self) -> String {
        let text = match read_tail(&self.vmm_log, LOG_TAIL_BYTES) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => return format!("<cannot read {}: {e}>", self.vmm_log.display()),
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// `PUT /drives/{id}`: a new backing file for a running drive.
    pub fn swap_drive(&self, id: &str, path: &Path, read_only: bool) -> Result<(), VmmError> {
        let valid = (1..=20).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err(VmmError::DriveId(id.to_string()));
        }
        // The VMM gets the file open: a jailed one has no path to the image store, and
        // no symlink put in place of the image later is followed.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| VmmError::File(IoError::new("open drive image", path, e)))?;
        let body = serde_json::to_string(&DriveSwap {
            path: path.to_path_buf(),
            read_only,
        })
        .map_err(|e| VmmError::File(IoError::new("serialize drive swap for", path, e.into())))?;
        client::call_with_fd(
            &self.api_sock,
            "PUT",
            &format!("/drives/{id}"),
            Some(&body),
            Some(file.as_fd()),
        )?;
        Ok(())
    }

    /// Stops the VM: `PUT /vm/stop`, then waits up to `timeout` for the VMM to end, then
    /// SIGKILL. Returns once the process is gone.
    pub fn stop(&self, timeout: Duration) -> Result<StopOutcome, VmmError> {
        let Some(pidfd) = self.pidfd()? else {
            return Ok(StopOutcome::AlreadyGone);
        };
        // The client waits up to 30 s for an answer; a VMM too stuck to answer must not hold
        // the stop past `timeout`, so the call runs on a thread of its own.
        let (tx, rx) = std::sync::mpsc::channel();
        let sock = self.api_sock.clone();
        let asked = std::thread::Builder::new()
            .name(format!("vmm-stop-{}", self.pid))
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = tx.send(client::call(&sock, "PUT", "/vm/stop", None));
            });
        let started = Instant::now();
        let answer = match asked {
            Ok(_) => rx.recv_timeout(timeout).ok(),
            Err(e) => {
                tracing::warn!(pid = self.pid, "no thread for PUT /vm/stop: {e}");
                None
            }
        };
        match answer {
            Some(Ok(_)) => {
                let left = timeout.saturating_sub(started.elapsed());
                if pidfd
                    .wait_exit(left)
                    .map_err(self.proc_err("wait for exit"))?
                {
                    return Ok(StopOutcome::Stopped);
                }
                tracing::warn!(pid = self.pid, "VMM did not stop within {timeout:?}");
            }
            Some(Err(e)) => {
                if pidfd
                    .wait_exit(Duration::ZERO)
                    .map_err(self.proc_err("wait for exit"))?
                {
                    return Ok(StopOutcome::AlreadyGone);
                }
                tracing::warn!(pid = self.pid, "PUT /vm/stop: {e}");
            }
            None => tracing::warn!(pid = self.pid, "PUT /vm/stop: no answer in {timeout:?}"),
        }
        self.kill_with(&pidfd)?;
        Ok(StopOutcome::Killed)
    }

    /// SIGKILLs the VMM and waits for it to go away; a VMM already gone is not an error.
    pub fn kill(&self) -> Result<(), VmmError> {
        match self.pidfd()? {
            Some(pidfd) => self.kill_with(&pidfd),
            None => Ok(()),
        }
    }

    fn kill_with(&self, pidfd: &PidFd) -> Result<(), VmmError> {
        pidfd.kill().map_err(self.proc_err("send SIGKILL"))?;
        if pidfd
            .wait_exit(KILL_WAIT)
            .map_err(self.proc_err("wait for exit"))?
        {
            tracing::info!(pid = self.pid, "VMM killed");
            Ok(())
        } else {
            Err(VmmError::NotGone(self.pid))
        }
    }

    /// Removes the pod directory and everything in it, and the VMM's cgroup, once the VMM
    /// has ended.
    pub fn remove_dir(&self) -> Result<(), VmmError> {
        // Refuses a VMM that still runs.
        self.remove_cgroup()?;
        remove_pod_dir(&self.dir)
    }

    /// Removes the VMM's cgroup, once the VMM has ended (for a VM whose directory goes
    /// with something else's, a template's).
    pub fn remove_cgroup(&self) -> Result<(), VmmError> {
        if self.is_alive() {
            return Err(VmmError::StillRunning(self.pid));
        }
        match &self.cgroup {
            Some(path) => remove_cgroup(path),
            None => Ok(()),
        }
    }
}

/// At most the last `max` bytes of the file at `path`.
fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::test_support::{FakeVmm, serve_once, sleeping_vmm};
    use podvisor_vmm_api::client::ClientError;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_recycled_pid_is_not_our_vmm() {
        let (_fake, handle) = sleeping_vmm();
        let stranger = VmmHandle {
            start_time: handle.start_time + 1,
            ..handle.clone()
        };
        assert!(!stranger.is_alive());
        assert_eq!(
            stranger.stop(Duration::from_secs(1)).unwrap(),
            StopOutcome::AlreadyGone
        );
        stranger.kill().unwrap();
        assert!(
            handle.is_alive(),
            "the process with that pid was left alone"
        );
        handle.kill().unwrap();
    }

    #[test]
    fn stop_through_the_api() {
        let (_fake, handle) = sleeping_vmm();
        // The fake VMM's API: answer PUT /vm/stop, then end the way the VMM would.
        let pid = handle.pid;
        let server = serve_once(&handle.api_sock, 204, "", move || {
            // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        });
        let started = Instant::now();
        assert_eq!(
            handle.stop(Duration::from_secs(20)).unwrap(),
            StopOutcome::Stopped
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let req = server.join().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("PUT", "/vm/stop")
        );
        assert!(!handle.is_alive());
    }

    #[test]
    fn stop_kills_when_the_api_is_missing_or_silent() {
        let (_fake, handle) = sleeping_vmm();
        assert_eq!(
            handle.stop(Duration::from_secs(20)).unwrap(),
            StopOutcome::Killed,
            "no API socket: killed at once"
        );
        assert!(!handle.is_alive());

        // An API that accepts and never answers costs the timeout, not the client's 30 s.
        let (_fake, handle) = sleeping_vmm();
        let listener = UnixListener::bind(&handle.api_sock).unwrap();
        let started = Instant::now();
        assert_eq!(
            handle.stop(Duration::from_millis(300)).unwrap(),
            StopOutcome::Killed
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!handle.is_alive());
        drop(listener);

        // An API that answers but a VMM that does not end.
        let (_fake, handle) = sleeping_vmm();
        let server = serve_once(&handle.api_sock, 204, "", || {});
        assert_eq!(
            handle.stop(Duration::from_millis(300)).unwrap(),
            StopOutcome::Killed
        );
        server.join().unwrap();
        assert!(!handle.is_alive());
    }

    #[test]
    fn info_and_swap_drive_speak_the_api() {
        let (fake, handle) = sleeping_vmm();
        let info = r#"{"state":"running","pid":7,"vcpus":2,"mem_mib":256,
            "boot":{"first_vcpu_entry_ms":1.5,"init_ms":null},"devices":[]}"#;
        let server = serve_once(&handle.api_sock, 200, info, || {});
        let got = handle.info().unwrap();
        assert_eq!((got.pid, got.vcpus, got.mem_mib), (7, 2, 256));
        let req = server.join().unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", "/vm"));
        std::fs::remove_file(&handle.api_sock).unwrap();

        let server = serve_once(&handle.api_sock, 204, "", || {});
        let image = fake.dir.path().join("image.ext4");
        let e = handle.swap_drive("img0", &image, true).unwrap_err();
        assert!(e.to_string().contains("open drive image"), "{e}");
        std::fs::write(&image, [0u8; 4096]).unwrap();
        handle.swap_drive("img0", &image, true).unwrap();
        let req = server.join().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("PUT", "/drives/img0")
        );
        let swap: DriveSwap = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            swap,
            DriveSwap {
                path: image.clone(),
                read_only: true
            }
        );
        std::fs::remove_file(&handle.api_sock).unwrap();

        let server = serve_once(&handle.api_sock, 404, r#"{"error":"no drive"}"#, || {});
        let e = handle.swap_drive("nope", &image, false).unwrap_err();
        assert!(matches!(
            e,
            VmmError::Api(ClientError::Status { status: 404, .. })
        ));
        server.join().unwrap();
        for bad in [
            "",
            "a/b",
            "../x",
            "id with space",
            "x?y",
            "abcdefghijklmnopqrstu",
        ] {
            assert!(
                matches!(
                    handle.swap_drive(bad, &image, false),
                    Err(VmmError::DriveId(_))
                ),
                "{bad:?}"
            );
        }
        handle.kill().unwrap();
    }

    #[test]
    fn wait_api_reports_an_early_exit_with_the_log() {
        let fake = FakeVmm::new("echo 'podvisor-vmm: error: no tap0' >&2\nexit 1");
        let handle = fake.launch(&fake.spec()).unwrap();
        let e = handle.wait_api(Duration::from_secs(20)).unwrap_err();
        let VmmError::Exited { pid, log_tail } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(*pid, handle.pid);
        assert!(log_tail.contains("no tap0"), "{log_tail}");

        let (_fake, handle) = sleeping_vmm();
        let e = handle.wait_api(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, VmmError::ApiTimeout(_)), "{e:?}");
        handle.kill().unwrap();
    }

    #[test]
    fn remove_dir_waits_for_the_end_and_follows_no_symlink() {
        let (fake, handle) = sleeping_vmm();
        let outside = fake.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "keep").unwrap();
        std::os::unix::fs::symlink(&outside, handle.dir.join("link")).unwrap();
        std::fs::create_dir(handle.dir.join("sub")).unwrap();
        std::fs::write(handle.dir.join("sub/f"), "x").unwrap();

        assert!(matches!(
            handle.remove_dir(),
            Err(VmmError::StillRunning(p)) if p == handle.pid
        ));
        assert!(handle.dir.exists());
        handle.kill().unwrap();
        handle.remove_dir().unwrap();
        assert!(!handle.dir.exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("keep")).unwrap(),
            "keep"
        );
        handle.remove_dir().unwrap();

        // A symlink in place of the directory: the link goes, its target stays.
        let link = fake.dir.path().join("pod-link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        remove_pod_dir(&link).unwrap();
        assert!(link.symlink_metadata().is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn handle_round_trips_through_json() {
        let h = VmmHandle {
            pid: 4242,
            start_time: 123_456_789,
            dir: "/run/podvisor/pods/abc".into(),
            api_sock: "/run/podvisor/pods/abc/api.sock".into(),
            vsock_uds: "/run/podvisor/pods/abc/vsock.sock".into(),
            console_log: "/run/podvisor/pods/abc/console.log".into(),
            vmm_log: "/run/podvisor/pods/abc/vmm.log".into(),
            cgroup: None,
        };
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains("\"start_time\":123456789"), "{json}");
        assert_eq!(serde_json::from_str::<VmmHandle>(&json).unwrap(), h);
    }
    #[test]
    fn only_the_tail_of_a_long_log_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let mut text = "x".repeat(1 << 20);
        text.push_str("\nthe last line\n");
        std::fs::write(&log, &text).unwrap();
        let tail = read_tail(&log, LOG_TAIL_BYTES).unwrap();
        assert_eq!(tail.len() as u64, LOG_TAIL_BYTES);
        assert!(tail.ends_with(b"the last line\n"));
        assert_eq!(read_tail(&log, 1 << 30).unwrap().len(), text.len());
    }
}
