//! Serves the control API on a thread of its own: reads each request with the codec of
//! [`podvisor_vmm_api::http`], routes it to a typed operation of [`VmHandle`] and answers
//! with its JSON body or `{"error": ...}`.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use podvisor_common::{IoError, error_chain};
use podvisor_vmm_api::config::SeccompLevel;
use podvisor_vmm_api::http::{self, HttpError, Request};
use podvisor_vmm_api::{DriveSwap, ErrorBody, SnapshotCreate, SnapshotCreated};

use crate::exit::ExitReason;
use crate::handle::{SwapError, VmHandle};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::SnapshotError;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Why the API could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(IoError),
    /// The thread could not be started.
    #[error("spawn API thread")]
    Spawn(#[source] std::io::Error),
}

/// Binds the control socket at `path` and serves it on a thread of its own for as long as
/// the process runs.
/// The thread runs under the API's seccomp filter (`level`); if it cannot be installed, the
/// VM ends with the reason.
pub fn start(path: &Path, vm: Arc<VmHandle>, level: SeccompLevel) -> Result<(), ServerError> {
    let listener = UnixListener::bind(path)
        .map_err(|e| ServerError::Bind(IoError::new("control socket", path, e)))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || match seccomp::install(ThreadKind::Api, level) {
            Ok(()) => serve(listener, &vm),
            Err(e) => vm.exit.trigger(ExitReason::Fault(error_chain(&e))),
        })
        .map_err(ServerError::Spawn)?;
    Ok(())
}

/// Accepts connections until the process ends; a bad client never stops it.
fn serve(listener: UnixListener, vm: &VmHandle) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => handle_connection(stream, vm),
            Err(e) => tracing::warn!("control API accept: {e}"),
        }
    }
}

fn handle_connection(mut stream: UnixStream, vm: &VmHandle) {
    // A client that stalls must not hold the API forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let (status, body, stop) = match read_request(&mut stream) {
        Ok((req, _)) if is_stop(&req) => (204, String::new(), true),
        Ok((req, fd)) => {
            let (status, body) = route(&req, fd, vm);
            (status, body, false)
        }
        Err(HttpError::TooLarge) => (413, error_body("request too large"), false),
        Err(e) => (400, error_body(&e.to_string()), false),
    };
    if let Err(e) = http::write_response(&mut stream, status, &body) {
        tracing::debug!("control API answer: {e}");
    }
    if stop {
        // After the answer: the VMM ends soon after the trigger, and the caller should
        // learn that its stop was taken rather than see the socket close mid-answer.
        drop(stream);
        vm.stop();
    }
}

/// Reads one request and the descriptor its first bytes carried, if any (one at most: the
/// kernel closes any more, and any sent with later bytes, which are read without room for
/// them).
fn read_request(stream: &mut UnixStream) -> Result<(Request, Option<File>), HttpError> {
    let mut first = vec![0u8; 4096];
    let (n, fd) = stream
        .recv_with_fd(&mut first)
        .map_err(|e| HttpError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    first.truncate(n);
    let req = http::read_request(&mut std::io::Cursor::new(first).chain(stream))?;
    Ok((req, fd))
}

fn is_stop(req: &Request) -> bool {
    req.method == "PUT" && req.path.split('?').next() == Some("/vm/stop")
}

fn error_body(msg: &str) -> String {
    serde_json::to_string(&ErrorBody {
        error: msg.to_string(),
    })
    .unwrap_or_default()
}

fn route(req: &Request, fd: Option<File>, vm: &VmHandle) -> (u16, String) {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/vm") => json(&vm.info()),
        ("PUT", "/vm/pause") => {
            vm.pause();
            (204, String::new())
        }
        ("PUT", "/vm/resume") => {
            vm.resume();
            (204, String::new())
        }
        ("PUT", "/vm/snapshot") => create_snapshot(&req.body, vm),
        ("PUT", p) if p.starts_with("/drives/") => {
            swap_drive(&p["/drives/".len()..], &req.body, fd, vm)
        }
        (_, "/vm" | "/vm/pause" | "/vm/resume" | "/vm/stop" | "/vm/snapshot") => {
            (405, error_body("method not allowed"))
        }
        _ => (404, error_body(&format!("no such resource {path}"))),
    }
}

/// A 200 answer with `value` as its body.
fn json(value: &impl serde::Serialize) -> (u16, String) {
    match serde_json::to_string(value) {
        Ok(body) => (200, body),
        Err(e) => (500, error_body(&e.to_string())),
    }
}

fn create_snapshot(body: &[u8], vm: &VmHandle) -> (u16, String) {
    let req: SnapshotCreate = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return (400, error_body(&format!("snapshot body: {e}"))),
    };
    match vm.snapshot(&req.state_path, &req.mem_path) {
        Ok(stats) => json(&SnapshotCreated {
            state_bytes: stats.state_bytes,
            mem_file_bytes: stats.mem_file_bytes,
            mem_data_bytes: stats.mem_data_bytes,
            elapsed_ms: stats.elapsed.as_secs_f64() * 1000.0,
        }),
        Err(SnapshotError::NotReady(why)) => (409, error_body(&why)),
        Err(e @ SnapshotError::Vcpus(_)) => (409, error_body(&error_chain(&e))),
        Err(e) => (500, error_body(&format!("snapshot: {}", error_chain(&e)))),
    }
}

/// A drive swap opens `path` itself, or takes the descriptor sent with the request (a jailed
/// VMM sees no image store).
fn swap_drive(id: &str, body: &[u8], fd: Option<File>, vm: &VmHandle) -> (u16, String) {
    let swap: DriveSwap = match serde_json::from_slice(body) {
        Ok(s) => s,
        Err(e) => return (400, error_body(&format!("drive swap body: {e}"))),
    };
    match vm.swap_drive(id, &swap, fd) {
        Ok(()) => (204, String::new()),
        Err(e @ SwapError::NoDrive(_)) => (404, error_body(&e.to_string())),
        Err(e @ SwapError::Backing { .. }) => (400, error_body(&error_chain(&e))),
    }
}
