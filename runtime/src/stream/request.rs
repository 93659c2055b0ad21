//! A validated Exec, Attach or PortForward request, kept under its token until its client
//! connects.

use k8s_cri::v1 as cri;

/// A validated streaming request, waiting for its connection.
#[derive(Debug, Clone)]
pub enum StreamRequest {
    /// `/exec/<token>`.
    Exec(cri::ExecRequest),
    /// `/attach/<token>`.
    Attach(cri::AttachRequest),
    /// `/portforward/<token>`.
    PortForward(cri::PortForwardRequest),
}

impl StreamRequest {
    /// The URL path's first segment for this request.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Exec(_) => "exec",
            StreamRequest::Attach(_) => "attach",
            StreamRequest::PortForward(_) => "portforward",
        }
    }
}
