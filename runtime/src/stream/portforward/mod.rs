//! Port forwarding: each forwarded connection is dialled inside the pod's VM by its agent
//! (so a server bound to 127.0.0.1 in the pod is reachable) and relayed to the client over
//! SPDY ([`spdy`]: a data and an error stream per connection) or a WebSocket ([`ws`]: two
//! channels per port).

mod spdy;
mod ws;

use crate::pods::PodError;

pub(super) use spdy::spdy;
pub(super) use ws::websocket;

/// Parses a port as clients send it: 1-65535.
fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("invalid port {s:?}: a port is 1-65535")),
    }
}

/// The message a failed forward leaves on its error stream (kubelet's wording).
fn forward_error(port: u16, sandbox: &str, e: &PodError) -> String {
    format!(
        "error forwarding port {port} to pod {sandbox}: {}",
        podvisor_common::error_chain(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port("http").is_err());
    }
}
