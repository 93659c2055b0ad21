//! Errors of the image store, each with the gRPC code a CRI server answers with.

use std::path::Path;
use std::sync::Arc;

use oci_client::errors::OciDistributionError;
use podvisor_common::IoError;

use super::limits::Limit;

/// Everything that can go wrong with images. `Clone` because one pull's result is handed
/// to every caller waiting for the same reference.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse, or names something this store cannot hold.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The registry configuration is unusable (e.g. a mirror URL).
    #[error("invalid registry configuration: {0}")]
    InvalidConfig(String),

    /// No local image matches the name, id or digest.
    #[error("image {0:?} not found")]
    NotFound(String),

    /// The registry does not have the image (or no linux/amd64 variant of it).
    #[error("image {reference} not found in registry {registry}")]
    NotInRegistry {
        reference: String,
        registry: String,
        #[source]
        source: Arc<OciDistributionError>,
    },

    /// The registry cannot be reached, timed out, or failed on its side (5xx, 429).
    #[error("registry {registry} unavailable")]
    Unavailable {
        registry: String,
        #[source]
        source: Arc<OciDistributionError>,
    },

    /// The registry refused the credentials, or asked for some.
    #[error("registry {registry} refused access to {reference}")]
    Unauthorized {
        reference: String,
        registry: String,
        #[source]
        source: Arc<OciDistributionError>,
    },

    /// Any other answer of a registry that does not fit the variants above.
    #[error("registry {registry}")]
    Registry {
        registry: String,
        #[source]
        source: Arc<OciDistributionError>,
    },

    /// The image uses something this store does not handle (media type, digest algorithm).
    #[error("image {reference}: unsupported {what}")]
    Unsupported { reference: String, what: String },

    /// Content does not match its digest.
    #[error("{what}: digest mismatch, expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    /// One of the store's caps was reached: the image (or what a registry sends for it)
    /// takes more than this host allows. Nothing of it is kept.
    #[error("{what}: over the cap {limit} = {max}")]
    LimitExceeded {
        /// What was being fetched or unpacked, and how much of it there was.
        what: String,
        /// The cap.
        limit: Limit,
        /// Its value.
        max: u64,
    },

    /// A manifest is unusable: a descriptor's size of zero or less, a layer without a
    /// digest this store takes...
    #[error("image {reference}: {message}")]
    BadManifest { reference: String, message: String },

    /// A registry sent another number of bytes than the descriptor declares.
    #[error("{what}: the registry sent {actual} bytes, its descriptor declares {declared}")]
    SizeMismatch {
        what: String,
        declared: u64,
        /// What was received (`"more than N"` when the download was cut).
        actual: String,
    },

    /// A layer's content is unsafe or malformed (path escapes, links through symlinks...).
    #[error("layer {digest}: {message}")]
    BadLayer { digest: String, message: String },

    /// The image config blob is not a usable OCI/Docker image config.
    #[error("image config {digest}: {message}")]
    BadConfig { digest: String, message: String },

    /// The image is used by containers and cannot be removed.
    #[error("image {id} is in use ({users} users)")]
    InUse { id: String, users: u64 },

    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 for image {id} failed: {message}")]
    Mkfs { id: String, message: String },

    /// A file operation of the store failed (shared: the error is `Clone`).
    #[error("{}: {}", .0, .0.source)]
    Io(#[source] Arc<IoError>),

    /// An image record is not the JSON it should be, or could not be encoded.
    #[error("image record {what}")]
    Record {
        /// The record (its file, or its image id when encoding).
        what: String,
        /// Why.
        #[source]
        source: Arc<serde_json::Error>,
    },

    /// A blocking task of the store ended without a result (it panicked).
    #[error("{what}: task failed")]
    Task {
        /// What the task was doing.
        what: String,
        /// Why.
        #[source]
        source: Arc<tokio::task::JoinError>,
    },

    /// The registry client could not be set up.
    #[error("registry client")]
    Client(#[source] Arc<OciDistributionError>),

    /// A bug or an impossible state (a pull task that vanished, a corrupt record).
    #[error("internal image store error: {0}")]
    Internal(String),
}

impl ImageError {
    /// The gRPC status code a CRI server answers with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ImageError::InvalidReference { .. }
            | ImageError::Unsupported { .. }
            | ImageError::BadLayer { .. }
            | ImageError::BadConfig { .. }
            | ImageError::BadManifest { .. } => Code::InvalidArgument,
            ImageError::LimitExceeded { .. } => Code::ResourceExhausted,
            ImageError::NotFound(_) | ImageError::NotInRegistry { .. } => Code::NotFound,
            ImageError::Unavailable { .. } => Code::Unavailable,
            ImageError::Unauthorized { .. } => Code::PermissionDenied,
            ImageError::InUse { .. } => Code::FailedPrecondition,
            ImageError::DigestMismatch { .. } | ImageError::SizeMismatch { .. } => Code::DataLoss,
            ImageError::Registry { .. } => Code::Unknown,
            ImageError::InvalidConfig(_)
            | ImageError::Mkfs { .. }
            | ImageError::Io(_)
            | ImageError::Record { .. }
            | ImageError::Task { .. }
            | ImageError::Client(_)
            | ImageError::Internal(_) => Code::Internal,
        }
    }

    /// A file operation `op` on `path` failed with `source`.
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        ImageError::Io(Arc::new(IoError::new(op, path, source)))
    }
}

/// `.map_err(task_err(what))` for a `spawn_blocking` that did not finish.
pub(crate) fn task_err(what: String) -> impl FnOnce(tokio::task::JoinError) -> ImageError {
    move |source| ImageError::Task {
        what,
        source: Arc::new(source),
    }
}

/// `.map_err(io_err("read", path))`: shorthand for [`ImageError::io`].
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let at = IoError::at(op, path);
    move |source| ImageError::Io(Arc::new(at(source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_for_cri() {
        let invalid = ImageError::InvalidReference {
            reference: "A:B".into(),
            reason: "x".into(),
        };
        assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            ImageError::NotFound("x".into()).code(),
            tonic::Code::NotFound
        );
        let busy = ImageError::InUse {
            id: "sha256:00".into(),
            users: 1,
        };
        assert_eq!(busy.code(), tonic::Code::FailedPrecondition);
        assert!(busy.to_string().contains("in use"));
        let down = ImageError::Unavailable {
            registry: "r".into(),
            source: Arc::new(OciDistributionError::GenericError(Some(
                "connection refused".into(),
            ))),
        };
        assert_eq!(down.code(), tonic::Code::Unavailable);
        let big = ImageError::LimitExceeded {
            what: "layer sha256:00: unpacked more than 64 bytes".into(),
            limit: Limit::UnpackedBytes,
            max: 64,
        };
        assert_eq!(big.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            big.to_string(),
            "layer sha256:00: unpacked more than 64 bytes: over the cap images.max_unpacked_bytes = 64"
        );
        let zero = ImageError::BadManifest {
            reference: "r".into(),
            message: "layer 1/1 declares size 0".into(),
        };
        assert_eq!(zero.code(), tonic::Code::InvalidArgument);
        let long = ImageError::SizeMismatch {
            what: "blob sha256:00".into(),
            declared: 2,
            actual: "more than 2".into(),
        };
        assert_eq!(long.code(), tonic::Code::DataLoss);
    }
}
