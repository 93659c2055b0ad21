//! `guest-probe`: a tiny static tool the integration tests run inside a
//! microVM. It only needs libc, so it runs on a bare busybox disk.
//!
//! ```text
//! guest-probe vsock-echo-server PORT        # listen on VMADDR_CID_ANY:PORT, echo one connection
//! guest-probe vsock-echo-client PORT MSG    # connect to the host (CID 2), send MSG, print the reply
//! guest-probe tcp-echo-server PORT          # listen on 127.0.0.1:PORT only, echo every
//!                                           # connection until its EOF (see `tcp`)
//! guest-probe tcp-greet-server PORT         # listen on 127.0.0.1:PORT only, greet and
//!                                           # half-close, count what comes (see `tcp`)
//! guest-probe hello                         # prove a static program runs: print uid and pid
//! guest-probe vsock-attack PORT             # as a hostile container: socket(AF_VSOCK) and
//!                                           # connect to CID 1, the VM's own CID and the host
//! guest-probe spoof IFACE OWN_IP GATEWAY_IP TAG
//!                                           # as a hostile guest: raw frames with a forged
//!                                           # source MAC, IP and ARP sender, and one honest
//!                                           # frame (see `spoof`)
//! ```
//!
//! Every line meant for the test starts with a fixed word (`VSOCK-LISTENING`, `TCP-LISTENING`, `TCP-GOT`,
//! `VSOCK-REPLY`, `BOOT-MARKER`, `SPOOF-SENT`); errors go to stderr as `guest-probe: ...`.

mod spoof;
mod tcp;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

/// The host's vsock context id.
const VMADDR_CID_HOST: u32 = 2;
/// Longest reply the client keeps.
const MAX_REPLY: usize = 64 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["vsock-echo-server", port] => parse_port(port).and_then(echo_server),
        ["vsock-echo-client", port, message] => {
            parse_port(port).and_then(|p| echo_client(p, message))
        }
        ["tcp-echo-server", port] => parse_port(port).and_then(|p| {
            u16::try_from(p)
                .map_err(|_| format!("bad port {p}"))
                .and_then(tcp::echo_server)
        }),
        ["tcp-greet-server", port] => parse_port(port).and_then(|p| {
            u16::try_from(p)
                .map_err(|_| format!("bad port {p}"))
                .and_then(tcp::greet_server)
        }),
        ["hello"] => hello(),
        ["vsock-attack", port] => parse_port(port).map(vsock_attack),
        ["spoof", iface, own_ip, gateway, tag] => {
            spoof::spoof(iface, own_ip, gateway, tag).map(|lines| lines.iter().for_each(|l| say(l)))
        }
        _ => Err(format!(
            "usage: guest-probe vsock-echo-server PORT | vsock-echo-client PORT MESSAGE | tcp-echo-server PORT | tcp-greet-server PORT | hello | vsock-attack PORT | spoof IFACE OWN_IP GATEWAY_IP TAG (got {args:?})"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_port(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("bad port {s:?}"))
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Prints one line and flushes it: the test reads stdout as it comes.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket(AF_VSOCK)"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn read_some(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, String> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes for the whole call.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(os_err("read"));
        }
    }
}

fn write_all(fd: &OwnedFd, mut buf: &[u8]) -> Result<(), String> {
    while !buf.is_empty() {
        // SAFETY: buf is valid for reads of buf.len() bytes for the whole call.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_err("write"));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn echo_server(port: u32) -> Result<(), String> {
    let sock = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
    let rc = unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
    if rc != 0 {
        return Err(os_err(&format!("bind vsock port {port}")));
    }
    // SAFETY: listen() takes no pointers.
    if unsafe { libc::listen(sock.as_raw_fd(), 1) } != 0 {
        return Err(os_err("listen"));
    }
    say(&format!("VSOCK-LISTENING {port}"));
    let conn = loop {
        // SAFETY: null address pointers are allowed: the peer address is not wanted.
        let fd = unsafe {
            libc::accept4(
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            break unsafe { OwnedFd::from_raw_fd(fd) };
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(os_err("accept"));
        }
    };
    let mut buf = vec![0u8; 4096];
    let mut total = 0usize;
    loop {
        let n = read_some(&conn, &mut buf)?;
        if n == 0 {
            break;
        }
        write_all(&conn, &buf[..n])?;
        total += n;
    }
    say(&format!("VSOCK-ECHOED {total}"));
    Ok(())
}

fn echo_client(port: u32, message: &str) -> Result<(), String> {
    let sock = vsock_socket()?;
    let addr = vsock_addr(VMADDR_CID_HOST, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
    if rc != 0 {
        return Err(os_err(&format!(
            "connect to vsock {VMADDR_CID_HOST}:{port}"
        )));
    }
    write_all(&sock, format!("{message}\n").as_bytes())?;
    // SAFETY: shutdown() takes no pointers.
    if unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) } != 0 {
        return Err(os_err("shutdown"));
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while reply.len() < MAX_REPLY && !reply.contains(&b'\n') {
        let n = read_some(&sock, &mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    let line = text.split('\n').next().unwrap_or_default();
    say(&format!("VSOCK-REPLY {line}"));
    Ok(())
}

fn hello() -> Result<(), String> {
    // SAFETY: getuid() takes no arguments and cannot fail.
    let uid = unsafe { libc::getuid() };
    say(&format!("HELLO uid={uid} pid={}", std::process::id()));
    Ok(())
}

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (linux/vm_sockets.h).
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The VM's own CID from /dev/vsock, when this process can open it.
fn local_cid() -> Result<u32, String> {
    let dev = std::fs::File::open("/dev/vsock").map_err(|e| format!("open /dev/vsock: {e}"))?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`, which outlives the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    if rc != 0 {
        return Err(os_err("IOCTL_VM_SOCKETS_GET_LOCAL_CID"));
    }
    Ok(cid)
}

/// Tries to reach `port` over vsock as a container would reach its agent, one line per
/// attempt: `VSOCK-ATTACK <target> connected` or `VSOCK-ATTACK <target> refused: <error>`.
/// A socket(2) call with AF_VSOCK in the low 32 bits and junk above them is tried too (the
/// kernel reads the family as an int).
fn vsock_attack(port: u32) {
    // SAFETY: socket() takes no pointers; the raw call passes the 64-bit family unmodified.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_socket,
            0xffff_ffff_0000_0000u64 | libc::AF_VSOCK as u64,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh descriptor nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        say("VSOCK-ATTACK socket-high-bits created");
    } else {
        say(&format!(
            "VSOCK-ATTACK socket-high-bits refused: {}",
            io::Error::last_os_error()
        ));
    }
    let mut targets = vec![
        ("cid-1".to_string(), libc::VMADDR_CID_LOCAL),
        ("host".to_string(), VMADDR_CID_HOST),
    ];
    match local_cid() {
        Ok(cid) => targets.push((format!("own-cid-{cid}"), cid)),
        Err(e) => say(&format!("VSOCK-ATTACK own-cid unknown: {e}")),
    }
    for (name, cid) in targets {
        let sock = match vsock_socket() {
            Ok(s) => s,
            Err(e) => {
                say(&format!("VSOCK-ATTACK {name} refused: {e}"));
                continue;
            }
        };
        let addr = vsock_addr(cid, port);
        // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
        let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
        if rc == 0 {
            say(&format!("VSOCK-ATTACK {name} connected"));
        } else {
            say(&format!(
                "VSOCK-ATTACK {name} refused: {}",
                os_err("connect")
            ));
        }
    }
}
