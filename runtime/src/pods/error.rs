//! Why a sandbox or container operation failed ([`PodError`]), and the gRPC code a CRI
//! server answers each failure with ([`PodError::code`]).

use std::time::Duration;

use podvisor_common::IoError;

use super::process::ProcessError;
use crate::image::ImageError;
use crate::logs::LogError;
use crate::network::NetworkError;
use crate::seccomp::SeccompError;
use crate::state::StateError;
use crate::vmm::VmmError;

/// Why a sandbox or container operation failed; [`PodError::code`] is its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A request that cannot be served as asked.
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown sandbox, container or image.
    #[error("{0}")]
    NotFound(String),
    /// The name is reserved by another sandbox or container (or a request creating one).
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No image slot, too much volume data.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The container's process cannot be composed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A host path cannot be bound into the pod's share.
    #[error("volume")]
    Volume(#[source] VmmError),
    /// The container's seccomp profile cannot be used.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The image store failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guest agent refused or failed a call.
    #[error("{what}: the guest agent answered {}: {}", .status.code(), .status.message())]
    Agent {
        /// The call.
        what: String,
        /// Its answer.
        status: tonic::Status,
    },
    /// The guest agent did not answer a call in time.
    #[error("{what}: the guest agent did not answer within {timeout:?}")]
    AgentTimeout {
        /// The call.
        what: String,
        /// How long it had.
        timeout: Duration,
    },
    /// The guest agent of a new or recovered VM never answered.
    #[error("sandbox {sandbox}: the guest agent did not answer within {timeout:?} (last: {last})")]
    AgentUnreachable {
        /// The sandbox.
        sandbox: String,
        /// How long it was given.
        timeout: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// The VM ended while it was needed.
    #[error("sandbox {sandbox}: the VM exited; the end of its log:\n{log_tail}")]
    VmExited {
        /// The sandbox.
        sandbox: String,
        /// The end of `vmm.log`.
        log_tail: String,
    },
    /// Launching, stopping or cleaning up the VMM failed.
    #[error("sandbox {sandbox}: VMM")]
    Vmm {
        /// The sandbox.
        sandbox: String,
        /// Why.
        #[source]
        source: VmmError,
    },
    /// The configured VMM user cannot be used (at start).
    #[error("configuration")]
    VmmUser(#[source] VmmError),
    /// A record could not be stored.
    #[error("persist state")]
    State(#[from] StateError),
    /// A container log could not be opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A file operation of podvisord failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The pod's network could not be set up or released.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PodError {
    /// The gRPC code a CRI server answers with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            PodError::InvalidArgument(_) | PodError::Process(_) => Code::InvalidArgument,
            PodError::NotFound(_) => Code::NotFound,
            PodError::AlreadyExists(_) => Code::AlreadyExists,
            PodError::FailedPrecondition(_) => Code::FailedPrecondition,
            PodError::ResourceExhausted(_) => Code::ResourceExhausted,
            PodError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            PodError::Volume(
                VmmError::NotAbsolute(_) | VmmError::VolumeKind(_) | VmmError::ShareId(_),
            )
            | PodError::Seccomp(_) => Code::InvalidArgument,
            PodError::Volume(_) => Code::Internal,
            PodError::Image(e) => e.code(),
            PodError::Agent { status, .. } => match status.code() {
                c @ (Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::ResourceExhausted
                | Code::Unimplemented) => c,
                Code::Unavailable | Code::Unknown | Code::Cancelled => Code::Unavailable,
                _ => Code::Internal,
            },
            PodError::AgentTimeout { .. } => Code::DeadlineExceeded,
            PodError::AgentUnreachable { .. } | PodError::VmExited { .. } => Code::Unavailable,
            PodError::Network(e) if e.is_not_ready() => Code::FailedPrecondition,
            PodError::Network(_) => Code::Internal,
            PodError::Vmm { .. }
            | PodError::VmmUser(_)
            | PodError::State(_)
            | PodError::Log(_)
            | PodError::Io(_)
            | PodError::Internal(_) => Code::Internal,
        }
    }
}

impl PodError {
    /// The request's own fault (a bad argument, a name in use), as opposed to a failure
    /// of the machinery serving it: doing it another way (a cold boot after a failed
    /// restore) or again fails the same way, so it is answered at once.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self.code(),
            tonic::Code::InvalidArgument | tonic::Code::AlreadyExists
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::agent::ignore_gone;

    #[test]
    fn error_codes() {
        use tonic::Code;
        assert_eq!(
            PodError::InvalidArgument("x".into()).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            PodError::Volume(VmmError::VolumeKind("/dev/null".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            PodError::Volume(VmmError::StillMounted("/x".into())).code(),
            Code::Internal
        );
        let agent = |code| PodError::Agent {
            what: "x".into(),
            status: tonic::Status::new(code, "m"),
        };
        assert_eq!(agent(Code::NotFound).code(), Code::NotFound);
        assert_eq!(agent(Code::Unknown).code(), Code::Unavailable);
        assert_eq!(agent(Code::DataLoss).code(), Code::Internal);
        assert!(ignore_gone::<()>(Err(agent(Code::NotFound))).is_ok());
        // The agent refusing the request vs. the VM failing it.
        assert!(agent(Code::InvalidArgument).is_request_error());
        assert!(PodError::AlreadyExists("x".into()).is_request_error());
        assert!(!agent(Code::Unavailable).is_request_error());
        assert!(!agent(Code::NotFound).is_request_error());
        let timeout = PodError::AgentTimeout {
            what: "SetupSandbox".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(!timeout.is_request_error());
        assert!(ignore_gone::<()>(Err(agent(Code::Internal))).is_err());
    }
}
