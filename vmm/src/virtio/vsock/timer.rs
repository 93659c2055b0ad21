//! The device's deadline timer: a one-shot timerfd on the event loop, armed to the
//! muxer's earliest deadline so a connection whose peer stays silent is given up on time
//! rather than at the next unrelated event.
//!
//! The timerfd is created with the device, before the VMM's seccomp filters go on, so the
//! filtered threads never need `timerfd_create`. It is armed and read only from the event
//! loop (`timerfd_settime`, `read`): see `crate::seccomp`. Arming early is harmless (an
//! expiry that finds nothing expired just re-arms), so only a deadline that becomes
//! earlier than the armed one needs a new setting; deadlines only appear while the event
//! loop handles a device event.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A one-shot timer for the earliest connection deadline.
#[derive(Debug)]
pub(super) struct DeadlineTimer {
    fd: TimerFd,
    /// The deadline the timer is set for, as last set here; `None` when disarmed or
    /// known to have expired.
    armed: Option<Instant>,
}

impl DeadlineTimer {
    /// A disarmed, non-blocking timer on the monotonic clock (the one `Instant` reads).
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new().map_err(io::Error::from)?;
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Self { fd, armed: None })
    }

    /// The descriptor the event loop watches (readable once the timer expired).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Consumes an expiry the event loop reported. Non-blocking: a report that went
    /// stale (the timer was set again since, earlier in the same epoll batch) reads
    /// nothing.
    pub fn consume(&mut self) {
        match self.fd.wait() {
            Ok(_) => self.armed = None,
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {}
            Err(e) => crate::warn_limited!("vsock: read deadline timer: {e}"),
        }
    }

    /// Sets the timer for `deadline`, or disarms it with `None`. Nothing is done when
    /// it is already set for that deadline.
    pub fn set(&mut self, deadline: Option<Instant>) {
        if deadline == self.armed {
            return;
        }
        let result = match deadline {
            // A zero setting would disarm: a deadline already passed fires at once.
            Some(at) => {
                let after = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                self.fd.reset(after, None)
            }
            None => self.fd.clear(),
        };
        match result {
            Ok(()) => self.armed = deadline,
            // Left as it was: the next event tries again.
            Err(e) => crate::warn_limited!("vsock: set deadline timer: {e}"),
        }
    }

    /// Whether the kernel has the timer armed (tests).
    #[cfg(test)]
    pub fn is_armed(&self) -> bool {
        self.fd.is_armed().expect("timerfd_gettime")
    }
}

/// Makes `fd` non-blocking (`TimerFd` opens blocking; a read with nothing expired must
/// not stall the event loop).
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own only returns its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor we own changes only its status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
