//! The local terminal during `exec -t`, `attach -t` and `run -t`: raw mode while the
//! session runs (restored on every way out), and its size sent at the start and on every
//! SIGWINCH, as crictl and kubectl do.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};
use podvisor_runtime::pods::TermSize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// Raw mode on stdin until dropped.
pub(crate) struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin's terminal into raw mode; `None` when stdin is not a terminal.
    pub(crate) fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

nix::ioctl_read_bad!(get_winsize, libc::TIOCGWINSZ, libc::winsize);

/// The size of the terminal on `fd`, if it is one.
fn size_of(fd: BorrowedFd<'_>) -> Option<TermSize> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own; the fd is borrowed
    // for the call.
    unsafe { get_winsize(fd.as_raw_fd(), &mut ws) }.ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some(TermSize {
        width: ws.ws_col,
        height: ws.ws_row,
    })
}

/// The local terminal's sizes: the current one now, then one per SIGWINCH.
pub(crate) fn sizes() -> mpsc::Receiver<TermSize> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let current =
            || size_of(std::io::stdout().as_fd()).or_else(|| size_of(std::io::stdin().as_fd()));
        if let Some(s) = current()
            && tx.send(s).await.is_err()
        {
            return;
        }
        let Ok(mut winch) = signal(SignalKind::window_change()) else {
            return;
        };
        while winch.recv().await.is_some() {
            if let Some(s) = current()
                && tx.send(s).await.is_err()
            {
                return;
            }
        }
    });
    rx
}
