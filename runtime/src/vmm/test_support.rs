//! Test helpers for the VMM modules: a shell script standing in for podvisor-vmm, and a
//! one-request control API server.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{DriveSpec, VmmError, VmmHandle, VmmSpec, launch};

/// A stand-in for podvisor-vmm: a shell script (it ignores `--config`).
pub(super) struct FakeVmm {
    pub(super) dir: tempfile::TempDir,
    pub(super) binary: PathBuf,
    pub(super) kernel: PathBuf,
}

impl FakeVmm {
    pub(super) fn new(script: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("podvisor-vmm");
        std::fs::write(&binary, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, "not a kernel").unwrap();
        Self {
            dir,
            binary,
            kernel,
        }
    }

    pub(super) fn spec(&self) -> VmmSpec {
        VmmSpec {
            sandbox_id: "sb1".into(),
            dir: self.dir.path().join("pods").join("sb1"),
            kernel: self.kernel.clone(),
            rootfs: self.dir.path().join("rootfs.ext4"),
            cmdline_extra: "debug".into(),
            vcpus: 2,
            mem_mib: 256,
            drives: vec![DriveSpec {
                id: "img0".into(),
                path: self.dir.path().join("img0.ext4"),
                read_only: true,
            }],
            tap: Some("tap0".into()),
            mac: None,
            netns: None,
            restore: None,
            jail: None,
            cgroup: None,
            console_max_bytes: 1 << 20,
            share: false,
        }
    }

    /// Launches, retrying while the script is busy: a fork on another test thread may
    /// still hold the descriptor it was written through (ETXTBSY).
    pub(super) fn launch(&self, spec: &VmmSpec) -> Result<VmmHandle, VmmError> {
        for _ in 0..50 {
            match launch(&self.binary, spec) {
                Err(VmmError::Spawn { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
        panic!("{} stayed busy", self.binary.display());
    }
}

/// A `sleep` through the whole launch path.
pub(super) fn sleeping_vmm() -> (FakeVmm, VmmHandle) {
    let fake = FakeVmm::new("exec sleep 30");
    let handle = fake.launch(&fake.spec()).unwrap();
    (fake, handle)
}

/// Whether `pid` has gone entirely (reaped, not a zombie), waiting up to 5 s.
pub(super) fn reaped(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Serves one control API request on `sock` with `status` and `body`; hands the request
/// back and then runs `after`.
pub(super) fn serve_once(
    sock: &Path,
    status: u16,
    body: &'static str,
    after: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<podvisor_vmm_api::http::Request> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let req = podvisor_vmm_api::http::read_request(&mut s).unwrap();
        podvisor_vmm_api::http::write_response(&mut s, status, body).unwrap();
        drop(s);
        after();
        req
    })
}
