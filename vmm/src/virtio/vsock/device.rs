//! The vsock device: configuration, features, config space, activation and
//! reset.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use vmm_sys_util::epoll::EventSet;

use super::handler::{Active, LISTENER_TOKEN, TIMER_TOKEN, queue_token};
use super::muxer::Muxer;
use super::timer::DeadlineTimer;
use super::{NUM_QUEUES, QUEUE_SIZE};
use crate::virtio::{
    ActivateContext, ActivateError, DeviceCounters, EventToken, QueueSnapshot, TYPE_VSOCK,
    VIRTIO_F_VERSION_1, VirtioDevice,
};

/// How the VMM configures a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 ..= 0xffff_fffe; 0-2 and `u32::MAX` are
    /// reserved).
    pub guest_cid: u64,
    /// The Unix socket host clients connect to (`CONNECT <port>\n`); guest
    /// connections to host port `P` go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or does not fit the 32 bits guests use.
    #[error("invalid guest cid {0}")]
    InvalidCid(u64),
    /// Something already exists at the socket path; the device does not
    /// remove files it did not create.
    #[error("vsock socket path {0} already exists")]
    PathExists(PathBuf),
    /// Binding the listener failed.
    #[error("bind vsock socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Making the listener non-blocking failed.
    #[error("set vsock socket {path} non-blocking")]
    Nonblocking {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The deadline timer (a timerfd) could not be created.
    #[error("create the deadline timer of vsock socket {path}")]
    Timer {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-vsock device whose host side is a Unix socket. Dropping it
/// unlinks the socket path it bound.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Fires at the earliest connection deadline. Made here, before the VMM's seccomp
    /// filters go on (activation comes later, on a filtered thread), and kept across
    /// resets.
    pub(super) timer: DeadlineTimer,
    counters: DeviceCounters,
    pub(super) active: Option<Active>,
}

impl Vsock {
    /// Binds the host-side listener at `cfg.uds_path` (which must not
    /// exist).
    pub fn new(cfg: VsockConfig) -> Result<Self, VsockError> {
        let VsockConfig {
            guest_cid,
            uds_path,
        } = cfg;
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        // bind() fails on an existing path too, but checking first gives a
        // clear error and never touches a socket another VMM is serving.
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(uds_path));
        }
        let timer = DeadlineTimer::new().map_err(|source| VsockError::Timer {
            path: uds_path.clone(),
            source,
        })?;
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        // From here on the path is ours: dropping `vsock` on error unlinks it.
        let vsock = Self {
            guest_cid,
            uds_path,
            listener,
            timer,
            counters: DeviceCounters::default(),
            active: None,
        };
        vsock
            .listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Nonblocking {
                path: vsock.uds_path.clone(),
                source,
            })?;
        Ok(vsock)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host-side socket path.
    pub fn uds_path(&self) -> &std::path::Path {
        &self.uds_path
    }

    /// Forwarded connections currently open (0 before activation).
    pub fn connection_count(&self) -> usize {
        self.active
            .as_ref()
            .map_or(0, |active| active.muxer.connection_count())
    }

    /// Tells the driver its connections are gone (after a snapshot restore,
    /// when host sockets did not survive): every connection is dropped and a
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` goes into an event buffer, at
    /// once if the driver posted one, else when it posts one.
    pub fn send_transport_reset(&mut self) {
        match self.active.as_mut() {
            Some(active) => active.transport_reset(&mut self.counters),
            None => tracing::debug!("vsock: transport reset before activation ignored"),
        }
    }

    /// Unregisters everything from the event loop and drops the
    /// connections and queues. The timer is only unwatched: disarming it takes
    /// `timerfd_settime`, which only the event loop's filter allows, and this may run on a
    /// vCPU thread. An expiry left over reaches the next activation as one spurious event.
    fn deactivate(&mut self) {
        if let Some(mut active) = self.active.take() {
            active.muxer.clear();
            active.events.remove(self.listener.as_raw_fd());
            active.events.remove(self.timer.raw_fd());
            for evt in &active.queue_events {
                active.events.remove(evt.as_raw_fd());
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.deactivate();
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::debug!("vsock: remove {}: {e}", self.uds_path.display());
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn device_features(&self) -> u64 {
        // VIRTIO_VSOCK_F_STREAM (bit 0) is implied when no socket type bit
        // is offered; SEQPACKET is not supported.
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        crate::virtio::read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "vsock: ignoring {}-byte write to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // A second DRIVER_OK without a reset would leak registrations.
        self.deactivate();
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            events,
            ..
        } = ctx;
        let queues: [_; NUM_QUEUES] =
            queues
                .try_into()
                .map_err(|q: Vec<_>| ActivateError::QueueCount {
                    expected: NUM_QUEUES,
                    got: q.len(),
                })?;
        let queue_events: [_; NUM_QUEUES] =
            queue_events
                .try_into()
                .map_err(|e: Vec<_>| ActivateError::QueueCount {
                    expected: NUM_QUEUES,
                    got: e.len(),
                })?;

        let mut fds: Vec<(RawFd, EventToken)> = queue_events
            .iter()
            .enumerate()
            .map(|(i, evt)| (evt.as_raw_fd(), queue_token(i)))
            .collect();
        fds.push((self.listener.as_raw_fd(), LISTENER_TOKEN));
        fds.push((self.timer.raw_fd(), TIMER_TOKEN));
        for (n, &(fd, token)) in fds.iter().enumerate() {
            if let Err(source) = events.add(fd, token, EventSet::IN) {
                for &(done, _) in fds.iter().take(n) {
                    events.remove(done);
                }
                return Err(ActivateError::Register { fd, source });
            }
        }

        let muxer = Muxer::new(self.guest_cid, self.uds_path.clone(), events.clone());
        self.active = Some(Active::new(
            mem,
            queues,
            queue_events,
            interrupt,
            events,
            muxer,
        ));
        Ok(())
    }

    fn handle_event(&mut self, token: u32, events: u32) {
        match self.active.as_mut() {
            Some(active) => active.handle_event(
                token,
                events,
                &self.listener,
                &mut self.timer,
                &mut self.counters,
            ),
            None => tracing::debug!("vsock: event {token} before activation"),
        }
    }

    fn reset(&mut self) {
        self.deactivate();
    }

    fn name(&self) -> String {
        format!("vsock cid={}", self.guest_cid)
    }

    fn counters(&self) -> DeviceCounters {
        self.counters.clone()
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        // Connections are not saved: their host sockets belong to the old
        // process. `restored` tells the driver.
        self.active
            .iter()
            .flat_map(|active| &active.queues)
            .map(QueueSnapshot::from)
            .collect()
    }

    /// No host connection survives a snapshot (virtio 1.2, 5.10.6.6): the
    /// driver must drop its sockets and re-read the guest CID, which may
    /// differ in this process.
    /// Activation built a new, empty connection table; the reset drops
    /// anything that got in since all the same. With no connection there is no deadline:
    /// the timer (new with the device, registered by activation) is armed by the first
    /// event that brings one, on the event loop.
    fn restored(&mut self) {
        tracing::info!("{}: restored, sending transport reset", self.name());
        self.send_transport_reset();
    }
}
