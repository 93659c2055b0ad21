//! A TAP interface as the VMM's virtio-net uses it: a non-blocking `/dev/net/tun` file
//! attached to one TAP interface, exchanging frames prefixed with a 12-byte
//! virtio_net_hdr_v1. Here rather than in the VMM so that podvisord can create and set up
//! the TAP the same way without linking KVM code.

use std::ffi::c_int;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUN_DEVICE: &str = "/dev/net/tun";

/// Size of `struct virtio_net_hdr_v1`, the header in front of every frame
/// (always this size: VERSION_1 is always negotiated).
pub const VNET_HDR_LEN: usize = 12;

/// Why a TAP could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL byte.
    #[error("invalid TAP name {name:?}: needs 1 to 15 bytes and no NUL")]
    InvalidTapName {
        /// The rejected name.
        name: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun for TAP {name}")]
    OpenTun {
        /// The TAP being opened.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETIFF failed (no permission, or the interface exists with
    /// incompatible flags such as multi_queue, or is not a TAP).
    #[error("attach TAP {name} (TUNSETIFF)")]
    Attach {
        /// The TAP being opened.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("set a {VNET_HDR_LEN}-byte virtio-net header on TAP {name} (TUNSETVNETHDRSZ)")]
    VnetHeaderSize {
        /// The TAP.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETOFFLOAD failed.
    #[error("set offloads {flags:#x} on TAP {name} (TUNSETOFFLOAD)")]
    Offload {
        /// The TAP.
        name: String,
        /// The TUN_F_* flags asked for.
        flags: u32,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name`, creating it if it does not exist
    /// (a TAP created here disappears when the `Tap` is dropped, since it is
    /// never made persistent). The file is non-blocking, frames carry no
    /// packet-info prefix and start with a 12-byte virtio_net_hdr_v1.
    ///
    /// `name` may be a kernel template such as `"tap%d"`; [`Tap::name`] then
    /// returns the name the kernel picked.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
            return Err(TapError::InvalidTapName {
                name: name.to_owned(),
            });
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::OpenTun {
                name: name.to_owned(),
                source,
            })?;

        // SAFETY: `ifreq` is plain old data (a byte array and a union of
        // integers and addresses); all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // The flags are small positive constants that fit a c_short.
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: the fd is a tun file we own; TUNSETIFF reads and writes
        // exactly one `struct ifreq`, which `ifr` is and which outlives the
        // call. The return value is checked.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel writes back the interface's real name (it expands "%d").
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let name = String::from_utf8_lossy(&actual).into_owned();

        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: the fd is a tun file we own; TUNSETVNETHDRSZ reads one
        // `int` from the pointer, which points at `hdr_len`. The return value
        // is checked.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHeaderSize {
                name,
                source: io::Error::last_os_error(),
            });
        }

        Ok(Self { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The attached `/dev/net/tun` file (for callers that manage the interface, such as the
    /// runtime making it persistent before a VMM attaches).
    pub fn into_file(self) -> File {
        self.file
    }

    /// Tells the kernel which offloads the reader handles (TUN_F_* flags):
    /// with `TUN_F_CSUM` the TAP may hand over frames with partial
    /// checksums, with `TUN_F_TSO4`/`TUN_F_TSO6` unsegmented TCP packets.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: the fd is a tun file we own; TUNSETOFFLOAD takes its
        // argument by value and touches no memory of ours. The return value
        // is checked.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included); `WouldBlock` when the TAP's
    /// queue is full.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
