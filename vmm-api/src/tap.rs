//! The TAP backend: a non-blocking `/dev/net/tun` file attached to one TAP
//! interface, exchanging frames prefixed with a 12-byte virtio_net_hdr_v1.

use std::ffi::c_int;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, VNET_HDR_LEN};

const TUN_DEVICE: &str = "/dev/net/tun";

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
    pub fn open(name: &str) -> Result<Self, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
            return Err(NetError::InvalidTapName {
                name: name.to_owned(),
            });
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| NetError::OpenTun {
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
            return Err(NetError::Attach {
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
            return Err(NetError::VnetHeaderSize {
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
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
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
            return Err(NetError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub(super) fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included); `WouldBlock` when the TAP's
    /// queue is full.
    pub(super) fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
