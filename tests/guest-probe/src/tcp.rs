//! `guest-probe tcp-echo-server PORT`: a TCP server on 127.0.0.1 only (never reachable from
//! outside the VM), for the port-forward test. Every connection is echoed in a thread of its
//! own until the client half-closes; then the server writes `ECHO-EOF <bytes echoed>\n` (a
//! reply that only a half-closed client can see) and closes. Serves until killed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};

/// Listens on 127.0.0.1:`port` and prints `TCP-LISTENING <port>` once it accepts.
pub fn echo_server(port: u16) -> Result<(), String> {
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
                    if let Err(e) = echo(c) {
                        eprintln!("guest-probe: echo: {e}");
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
