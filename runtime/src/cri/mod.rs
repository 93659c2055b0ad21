//! CRI gRPC services on a Unix socket: [`runtime_service`] (pods and containers, on
//! [`crate::pods`]) and [`image_service`] (images, on [`crate::image`]).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use podvisor_common::IoError;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::pods::{PodError, PodManager};
use crate::stream::StreamServer;

pub mod image_service;
pub mod runtime_service;

pub use image_service::CriImageService;
pub use runtime_service::CriRuntimeService;

/// The largest message either side sends (kubelet's limit).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Preparing or binding the socket failed.
    #[error(transparent)]
    Socket(#[from] IoError),
    /// Another process serves the socket.
    #[error("socket {0} is in use: is another podvisord running?")]
    InUse(PathBuf),
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The gRPC server failed.
    #[error("serve CRI")]
    Serve(#[source] tonic::transport::Error),
}

fn socket_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ServeError + 'a {
    move |source| ServeError::Socket(IoError::new(what, path, source))
}

/// Binds the CRI socket: creates its directory, removes a stale socket (never a live one,
/// never anything but a socket), binds, and sets mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(socket_err("create directory for", path))?;
    }
    match path.symlink_metadata() {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(socket_err("remove stale socket", path))?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err("inspect", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_err("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(socket_err("chmod", path))?;
    Ok(listener)
}

/// Serves both CRI services on `listener` until `shutdown` completes; running pods are left
/// alone.
pub async fn serve(
    listener: UnixListener,
    pods: PodManager,
    streams: StreamServer,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let runtime = RuntimeServiceServer::new(CriRuntimeService::new(pods.clone(), streams))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let images = ImageServiceServer::new(CriImageService::new(pods.images().clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(runtime)
        .add_service(images)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}

/// The gRPC status for a manager error: its code, its whole chain as the message.
pub fn status(e: &PodError) -> tonic::Status {
    let code = e.code();
    let msg = podvisor_common::error_chain(e);
    if matches!(code, tonic::Code::Internal | tonic::Code::Unavailable) {
        tracing::warn!("{msg}");
    } else {
        tracing::debug!("{msg}");
    }
    tonic::Status::new(code, msg)
}

/// An InvalidArgument status.
pub fn invalid(msg: impl Into<String>) -> tonic::Status {
    tonic::Status::invalid_argument(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/cri.sock");
        let l = bind(&path).unwrap();
        let mode = path.symlink_metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        // A live socket is refused.
        assert!(matches!(bind(&path), Err(ServeError::InUse(_))));
        drop(l);
        // A stale one is replaced.
        let _l = bind(&path).unwrap();

        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(bind(&file), Err(ServeError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn status_carries_code_and_chain() {
        let s = status(&PodError::NotFound("container \"x\" not found".into()));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "container \"x\" not found");
    }
}
