//! Why a seccomp profile cannot be used ([`SeccompError`]).

use std::path::PathBuf;

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile file cannot be read.
    #[error("read seccomp profile {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile file is too large.
    #[error("seccomp profile {path} is over {max} bytes")]
    TooLong {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The profile is not valid JSON of the profile format.
    #[error("seccomp profile is not a valid profile")]
    Json(#[source] serde_json::Error),
    /// Where the profile was read from, around any other error.
    #[error("seccomp profile {}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<SeccompError>,
    },
    /// An action this runtime does not know.
    #[error("unknown seccomp action {0:?}")]
    UnknownAction(String),
    /// `SCMP_ACT_NOTIFY` or a listener: there is no seccomp agent in the guest.
    #[error("seccomp notifications (SCMP_ACT_NOTIFY, listenerPath) are not supported")]
    Notify,
    /// A comparison operator this runtime does not know.
    #[error("unknown seccomp comparison {0:?}")]
    UnknownOperator(String),
    /// A system call has arguments 0 to 5.
    #[error("seccomp rule on argument {0}: system calls have arguments 0 to 5")]
    ArgIndex(u8),
    /// A `minKernel` that is not `major.minor`.
    #[error("seccomp minKernel {0:?} is not major.minor")]
    MinKernel(String),
    /// `seccompiler` refused a rule.
    #[error("seccomp rule")]
    Rule(#[source] seccompiler::BackendError),
    /// The program is longer than the kernel takes.
    #[error("seccomp profile compiles to {len} BPF instructions; the kernel takes at most {max}")]
    TooLarge {
        /// The program's length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
}
