//! Serves the control API on a thread of its own.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use super::http::{self, HttpError, Request};
use super::types::{
    BootInfo, DeviceInfo, DriveSwap, ErrorBody, SnapshotCreate, SnapshotCreated, VmInfo, VmRunState,
};
use crate::exit::ExitReason;
use crate::virtio::mmio::lock;
use crate::vm::VmHandle;

/// Accepts connections until the process ends; a bad client never stops it.
pub fn serve(listener: UnixListener, vm: Arc<VmHandle>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => handle_connection(stream, &vm),
            Err(e) => tracing::warn!("control API accept: {e}"),
        }
    }
}

fn handle_connection(mut stream: UnixStream, vm: &VmHandle) {
    // A client that stalls must not hold the API forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let (status, body, stop) = match http::read_request(&mut stream) {
        Ok(req) if is_stop(&req) => (204, String::new(), true),
        Ok(req) => {
            let (status, body) = route(&req, vm);
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
        vm.exit.trigger(ExitReason::Stopped);
    }
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

fn route(req: &Request, vm: &VmHandle) -> (u16, String) {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/vm") => match serde_json::to_string(&info(vm)) {
            Ok(body) => (200, body),
            Err(e) => (500, error_body(&e.to_string())),
        },
        ("PUT", "/vm/pause") => {
            vm.control.pause();
            tracing::info!("paused");
            (204, String::new())
        }
        ("PUT", "/vm/resume") => {
            vm.control.resume();
            tracing::info!("resumed");
            (204, String::new())
        }
        ("PUT", "/vm/snapshot") => create_snapshot(&req.body, vm),
        ("PUT", p) if p.starts_with("/drives/") => {
            swap_drive(&p["/drives/".len()..], &req.body, vm)
        }
        (_, "/vm" | "/vm/pause" | "/vm/resume" | "/vm/stop" | "/vm/snapshot") => {
            (405, error_body("method not allowed"))
        }
        _ => (404, error_body(&format!("no such resource {path}"))),
    }
}

fn create_snapshot(body: &[u8], vm: &VmHandle) -> (u16, String) {
    let req: SnapshotCreate = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return (400, error_body(&format!("snapshot body: {e}"))),
    };
    match vm.snapshot(&req.state_path, &req.mem_path) {
        Ok(stats) => {
            let answer = SnapshotCreated {
                state_bytes: stats.state_bytes,
                mem_file_bytes: stats.mem_file_bytes,
                mem_data_bytes: stats.mem_data_bytes,
                elapsed_ms: stats.elapsed.as_secs_f64() * 1000.0,
            };
            match serde_json::to_string(&answer) {
                Ok(b) => (200, b),
                Err(e) => (500, error_body(&e.to_string())),
            }
        }
        Err(crate::snapshot::SnapshotError::NotReady(why)) => (409, error_body(&why)),
        Err(e) => (
            500,
            error_body(&format!("snapshot: {}", crate::error_chain(&e))),
        ),
    }
}

fn swap_drive(id: &str, body: &[u8], vm: &VmHandle) -> (u16, String) {
    let swap: DriveSwap = match serde_json::from_slice(body) {
        Ok(s) => s,
        Err(e) => return (400, error_body(&format!("drive swap body: {e}"))),
    };
    let Some((_, block)) = vm.drives.iter().find(|(d, _)| d == id) else {
        return (404, error_body(&format!("no drive with id {id:?}")));
    };
    let swapped = lock(block).swap_backing(&swap.path, swap.read_only);
    match swapped {
        Ok(()) => {
            // Bump the transport's config generation too, so the guest's
            // multi-word capacity read cannot mix old and new halves.
            let block_ptr = Arc::as_ptr(block).cast::<u8>();
            for t in vm.mmio.transports() {
                let mut t = lock(t);
                if Arc::as_ptr(t.device()).cast::<u8>() == block_ptr {
                    t.config_changed();
                }
            }
            tracing::info!(drive = id, path = %swap.path.display(), "drive backing swapped");
            (204, String::new())
        }
        Err(e) => (400, error_body(&format!("swap drive {id}: {e}"))),
    }
}

fn info(vm: &VmHandle) -> VmInfo {
    let ms = |us: Option<u64>| us.map(|u| u as f64 / 1000.0);
    VmInfo {
        state: if vm.control.is_paused() {
            VmRunState::Paused
        } else {
            VmRunState::Running
        },
        pid: std::process::id(),
        vcpus: vm.vcpus,
        mem_mib: vm.mem_mib,
        boot: BootInfo {
            first_vcpu_entry_ms: ms(vm.times.first_vcpu_entry_us()),
            init_ms: ms(vm.times.init_us()),
        },
        devices: vm
            .mmio
            .transports()
            .map(|t| {
                let t = lock(t);
                let dev = lock(t.device());
                DeviceInfo {
                    name: dev.name(),
                    state: format!("{:?}", t.state()),
                    counters: dev.counters().into(),
                    transport: t.counters().into(),
                }
            })
            .collect(),
    }
}
