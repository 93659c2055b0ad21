//! The VMM process as the kernel sees it: its `/proc/<pid>/stat` (state, session, start
//! time) and a pidfd, so that a recycled pid is never taken for our VMM.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// What [`VmmHandle`] needs from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// Field 3: R, S, D, Z, X, ...
    pub(super) state: char,
    /// Field 6.
    pub(super) session: i32,
    /// Field 22.
    pub(super) start_time: u64,
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let after_comm = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        session: fields.get(6 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// The start time of process `pid` (`/proc/<pid>/stat` field 22), as a [`VmmHandle`] records
/// it; `None` when there is no such process.
pub(crate) fn process_start_time(pid: u32) -> io::Result<Option<u64>> {
    Ok(read_proc_stat(pid)?.map(|s| s.start_time))
}

/// `None` when there is no process `pid`.
pub(super) fn read_proc_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(line) => parse_proc_stat(&line).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected /proc/{pid}/stat"),
            )
        }),
        // ESRCH: the process went away between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A process descriptor: signals and waits reach exactly the process it was opened for.
#[derive(Debug)]
pub(super) struct PidFd(OwnedFd);

impl PidFd {
    /// `None` when there is no process `pid`.
    pub(super) fn open(pid: u32) -> io::Result<Option<Self>> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; no
        // memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        let fd = i32::try_from(fd).map_err(|_| io::ErrorKind::InvalidData)?;
        // SAFETY: `fd` is a descriptor pidfd_open just returned; nothing else owns it.
        Ok(Some(Self(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Sends SIGKILL; a process that already ended is not an error.
    pub(super) fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on a descriptor we own, with no siginfo (null) and no
        // flags; no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until the process has ended (a pidfd polls readable then); false on timeout.
    pub(super) fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up: a timeout rounded down to 0 ms would spin until the deadline.
            let ms = PollTimeout::try_from(left.as_nanos().div_ceil(1_000_000))
                .unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) if Instant::now() >= deadline => return Ok(false),
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(true),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Kills every `podvisor-vmm` started with `--config <config>` (found through
/// `/proc/<pid>/cmdline`) and waits for each to end: the VMM of a pod directory no record
/// names. Returns their pids.
pub fn kill_vmms_with_config(config: &std::path::Path) -> io::Result<Vec<u32>> {
    let mut want = b"--config\0".to_vec();
    want.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(config.as_os_str()));
    want.push(0);
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let is_vmm = cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|exe| exe.ends_with(b"podvisor-vmm"));
        if !is_vmm || !cmdline.windows(want.len()).any(|w| w == want.as_slice()) {
            continue;
        }
        if let Some(pidfd) = PidFd::open(pid)? {
            pidfd.kill()?;
            if !pidfd.wait_exit(Duration::from_secs(10))? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("VMM {pid} did not end after SIGKILL"),
                ));
            }
            killed.push(pid);
        }
    }
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_past_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 \
                    2 3 4";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                state: 'S',
                session: 4242,
                start_time: 987654
            })
        );
        assert_eq!(parse_proc_stat("1 (x) S 1 1"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
        let own = read_proc_stat(std::process::id()).unwrap().unwrap();
        assert!(own.start_time > 0);
        assert_eq!(read_proc_stat(u32::MAX).unwrap(), None);
    }
}
