//! podvisor host–agent protocol (`podvisor.agent.v1`), generated from `agent.proto`.
//!
//! The host connects to the guest agent over vsock on [`AGENT_VSOCK_PORT`]. Both the client
//! ([`AgentClient`]) and the server ([`AgentServer`], [`Agent`]) are exported.

pub mod caps;
pub mod hybrid;

/// vsock port the guest agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Generated protobuf messages and gRPC client/server for `podvisor.agent.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("podvisor.agent.v1");
}

pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn port_is_1024() {
        assert_eq!(super::AGENT_VSOCK_PORT, 1024);
    }

    #[test]
    fn create_request_round_trips() {
        let req = v1::CreateContainerRequest {
            container_id: "c1".into(),
            process: Some(v1::Process {
                args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
                user: Some(v1::User {
                    username: "nobody".into(),
                    gid: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            namespaces: Some(v1::NamespaceOptions {
                pid: v1::NamespaceMode::Container as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = v1::CreateContainerRequest::decode(bytes.as_slice()).expect("decode");
        assert_eq!(req, back);
        assert_eq!(
            back.process.and_then(|p| p.user).and_then(|u| u.gid),
            Some(0)
        );
    }
}
