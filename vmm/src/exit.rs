//! Why the VM stopped, decided once by whoever sees it first.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The end of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (keyboard-controller reset, triple fault, exit
    /// port). A microVM does not reboot: it ends, like Firecracker's.
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// The control API asked the VM to stop.
    Stopped,
    /// The VMM itself failed (a KVM error, an internal error of the vCPU).
    Fault(String),
}

impl ExitReason {
    /// The VMM's process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => 0,
            ExitReason::Fault(_) => 1,
            ExitReason::Panic => 2,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("guest powered off"),
            ExitReason::Reset => f.write_str("guest rebooted"),
            ExitReason::Panic => f.write_str("guest kernel panicked"),
            ExitReason::Stopped => f.write_str("stopped through the control API"),
            ExitReason::Fault(m) => write!(f, "VMM fault: {m}"),
        }
    }
}

/// Shared by vCPU threads, devices and the API; the event loop waits on it.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another one came first, and wakes the loop.
    pub fn trigger(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd the event loop polls.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
