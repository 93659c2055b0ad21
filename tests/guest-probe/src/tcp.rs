//! TCP servers on 127.0.0.1 only (never reachable from outside the VM) for the port-forward
//! test, each connection served in a thread of its own, until killed:
//! - `guest-probe tcp-echo-server PORT` echoes until the client half-closes, then writes
//!   `ECHO-EOF <bytes echoed>\n` (a reply only a half-closed client can see) and closes;
//! - `guest-probe tcp-greet-server PORT` writes `GREETING\n`, half-closes at once, reads until
//!   the client's EOF and prints `TCP-GOT <bytes>` on stdout (data sent after the server's
//!   half-close must still arrive).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};

/// What a server does with one connection.
type Serve = fn(TcpStream) -> std::io::Result<()>;

/// The echo server.
pub fn echo_server(port: u16) -> Result<(), String> {
    serve(port, echo)
}

/// The greeting server.
pub fn greet_server(port: u16) -> Result<(), String> {
    serve(port, greet)
}

/// Listens on 127.0.0.1:`port` and prints `TCP-LISTENING <port>` once it accepts.
fn serve(port: u16, f: Serve) -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
    // The test reads stdout as it comes: flushed at once.
    let mut out = std::io::stdout().lock();
    writeln!(out, "TCP-LISTENING {port}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    drop(out);
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                std::thread::spawn(move || {
                    if let Err(e) = f(c) {
                        eprintln!("guest-probe: serve: {e}");
                    }
                });
            }
            Err(e) => eprintln!("guest-probe: accept: {e}"),
        }
    }
    Ok(())
}

fn echo(mut c: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        c.write_all(&buf[..n])?;
        total += n as u64;
    }
    c.write_all(format!("ECHO-EOF {total}\n").as_bytes())?;
    c.shutdown(Shutdown::Write)
}

fn greet(mut c: TcpStream) -> std::io::Result<()> {
    c.write_all(b"GREETING\n")?;
    c.shutdown(Shutdown::Write)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "TCP-GOT {total}")?;
    out.flush()
}
