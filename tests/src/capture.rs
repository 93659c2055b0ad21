//! Raw frames seen on a host interface (an AF_PACKET socket, no tcpdump), for tests that
//! send frames with text markers and check which ones arrive.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{Context, bail};

/// An AF_PACKET socket bound to one interface: every frame it receives or sends.
pub struct Capture {
    fd: OwnedFd,
    ifname: String,
}

fn os_err(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_owned())
}

impl Capture {
    /// Starts capturing on `ifname` (of the calling thread's network namespace): frames
    /// from now on are kept in the socket until read.
    pub fn open(ifname: &str) -> anyhow::Result<Self> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(os_err("socket(AF_PACKET)"));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(os_err(&format!("no interface {ifname}")));
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = i32::try_from(index)?;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_ll of `len` bytes that outlives the call.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
            return Err(os_err(&format!("bind AF_PACKET to {ifname}")));
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let tv_len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: tv is a valid timeval of `tv_len` bytes that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                tv_len,
            )
        };
        if rc != 0 {
            return Err(os_err("SO_RCVTIMEO"));
        }
        Ok(Self {
            fd,
            ifname: ifname.to_owned(),
        })
    }

    /// Reads frames until each of `want` was seen or `deadline` passed, and returns every
    /// marker seen, in order: the text from `prefix` up to (not including) the next `;`.
    pub fn markers_until(
        &self,
        prefix: &str,
        want: &[String],
        deadline: Instant,
    ) -> anyhow::Result<Vec<String>> {
        let mut seen: Vec<String> = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !want.iter().all(|w| seen.contains(w)) {
            if Instant::now() >= deadline {
                bail!("{want:?} not seen on {} in time; saw {seen:?}", self.ifname);
            }
            // SAFETY: buf is valid for writes of buf.len() bytes for the whole call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(e).with_context(|| format!("recv on {}", self.ifname)),
                }
            };
            seen.extend(markers(&buf[..n], prefix.as_bytes()));
        }
        Ok(seen)
    }
}

/// The markers in one frame.
fn markers(frame: &[u8], prefix: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = frame;
    while let Some(at) = rest.windows(prefix.len()).position(|w| w == prefix) {
        let tail = &rest[at..];
        let end = tail.iter().position(|b| *b == b';').unwrap_or(tail.len());
        out.push(String::from_utf8_lossy(&tail[..end]).into_owned());
        rest = &tail[end..];
    }
    out
}
