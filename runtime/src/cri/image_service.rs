//! The CRI `ImageService` on top of the image store.
//!
//! The store does the work; this module turns requests into store calls and store
//! results into CRI messages, with the gRPC code each [`ImageError`] carries.

use std::collections::HashMap;

use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest,
    ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::image::{ImageError, ImageRecord, ImageStore};

/// The CRI image service. Cheap to clone: clones share one store.
#[derive(Debug, Clone)]
pub struct CriImageService {
    store: ImageStore,
}

impl CriImageService {
    /// Serves `store`.
    pub fn new(store: ImageStore) -> Self {
        CriImageService { store }
    }

    /// Runs a store call that touches the file system off the async workers.
    async fn blocking<T, F>(&self, what: &str, f: F) -> Result<Result<T, ImageError>, Status>
    where
        T: Send + 'static,
        F: FnOnce(ImageStore) -> Result<T, ImageError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| Status::internal(format!("{what}: task failed: {e}")))
    }
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let wanted = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|spec| spec.image)
            .filter(|name| !name.is_empty());
        let records = match wanted {
            // The filter names an image the way ImageStatus does (tag, digest or id).
            Some(name) => match self.store.status(&name) {
                Ok(record) => vec![record],
                Err(ImageError::NotFound(_)) => Vec::new(),
                Err(e) => return Err(image_status(&e, "list images", &name)),
            },
            None => self.store.list(),
        };
        Ok(Response::new(ListImagesResponse {
            images: records.iter().map(cri_image).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = spec_image(request.image.as_ref())?;
        let record = match self.store.status(name) {
            Ok(record) => record,
            // CRI: an image that is not present is a successful answer without an image.
            Err(ImageError::NotFound(_)) => {
                return Ok(Response::new(ImageStatusResponse::default()));
            }
            Err(e) => return Err(image_status(&e, "image status", name)),
        };
        let mut info = HashMap::new();
        if request.verbose {
            let json = serde_json::to_string(&record).map_err(|e| {
                Status::internal(format!("image status {name:?}: encode record: {e}"))
            })?;
            info.insert("info".to_string(), json);
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(cri_image(&record)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = spec_image(request.image.as_ref())?;
        let auth = credentials(request.auth.as_ref())
            .map_err(|e| Status::invalid_argument(format!("pull image {name:?}: {e}")))?;
        info!(
            image = name,
            authenticated = auth.is_some(),
            "pulling image"
        );
        let record = self
            .store
            .pull(name, auth)
            .await
            .map_err(|e| image_status(&e, "pull image", name))?;
        info!(image = name, id = %record.id, "image pulled");
        Ok(Response::new(PullImageResponse {
            image_ref: record.id,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let name = spec_image(request.get_ref().image.as_ref())?.to_string();
        let target = name.clone();
        match self
            .blocking("remove image", move |store| store.remove(&target))
            .await?
        {
            Ok(_) => Ok(Response::new(RemoveImageResponse {})),
            // CRI: removing an image that is not there succeeds (kubelet retries removals).
            Err(ImageError::NotFound(_)) => Ok(Response::new(RemoveImageResponse {})),
            Err(e) => Err(image_status(&e, "remove image", &name)),
        }
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let usage = self
            .blocking("image fs info", |store| store.fs_info())
            .await?
            .map_err(|e| {
                let message = podvisor_common::error_chain(&e);
                Status::new(e.code(), format!("image fs info: {message}"))
            })?;
        let timestamp = podvisor_common::now_ns();
        let fs = FilesystemUsage {
            timestamp,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: usage.mountpoint.display().to_string(),
            }),
            used_bytes: Some(UInt64Value {
                value: usage.used_bytes,
            }),
            inodes_used: Some(UInt64Value {
                value: usage.inodes_used,
            }),
        };
        // Containers write nothing of their own on the host besides what the image store
        // holds (their writable layers live in the pod's VM), so both are the same tree.
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![fs.clone()],
            container_filesystems: vec![fs],
        }))
    }
}

/// The image a request names; an empty or missing spec is the caller's mistake.
fn spec_image(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    spec.map(|s| s.image.as_str())
        .filter(|name| !name.is_empty())
        .ok_or_else(|| Status::invalid_argument("image spec with an image name is required"))
}

/// A store error as a gRPC status: the error's code, and a message naming the operation
/// and the image.
fn image_status(error: &ImageError, op: &str, image: &str) -> Status {
    let message = podvisor_common::error_chain(error);
    if error.code() == tonic::Code::Internal {
        warn!(image, error = %message, "{op} failed");
    }
    Status::new(error.code(), format!("{op} {image:?}: {message}"))
}

/// A store record as a CRI image.
fn cri_image(record: &ImageRecord) -> Image {
    Image {
        id: record.id.clone(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size: record.size,
        uid: record.uid.map(|value| Int64Value { value }),
        username: record.username.clone(),
        spec: Some(ImageSpec {
            image: record.id.clone(),
            ..ImageSpec::default()
        }),
        pinned: false,
    }
}

/// Basic credentials from a CRI `AuthConfig`: `username`/`password`, or `auth` as
/// base64 of `user:password` (the form of a Docker config file). `None` for an
/// anonymous pull.
fn credentials(auth: Option<&AuthConfig>) -> Result<Option<(String, String)>, String> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    if !auth.username.is_empty() {
        return Ok(Some((auth.username.clone(), auth.password.clone())));
    }
    if !auth.auth.is_empty() {
        let decoded = decode_base64(auth.auth.trim())
            .ok_or_else(|| "auth is not valid base64".to_string())?;
        let text = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8 text".to_string())?;
        let (user, pass) = text
            .split_once(':')
            .ok_or_else(|| "auth is not of the form user:password".to_string())?;
        return Ok(Some((user.to_string(), pass.to_string())));
    }
    if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
        // The store speaks basic auth only; an anonymous pull may still work.
        warn!("token credentials are not supported, pulling anonymously");
    }
    Ok(None)
}

/// Decodes standard base64 (RFC 4648 alphabet, padding optional). `None` when `text`
/// is not base64.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let body = text.trim_end_matches('=');
    if text.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut bits = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            bits |= value(c)? << (18 - 6 * i);
        }
        // n characters carry n*6 bits: 2 -> 1 byte, 3 -> 2 bytes, 4 -> 3 bytes.
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::RegistryConfig;

    fn service(insecure: &[&str]) -> (tempfile::TempDir, CriImageService) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = RegistryConfig {
            insecure: insecure.iter().map(|s| s.to_string()).collect(),
            ..RegistryConfig::default()
        };
        let store = ImageStore::open(dir.path(), config).expect("open store");
        (dir, CriImageService::new(store))
    }

    fn spec(image: &str) -> Option<ImageSpec> {
        Some(ImageSpec {
            image: image.to_string(),
            ..ImageSpec::default()
        })
    }

    #[tokio::test]
    async fn unknown_images_are_absent_not_errors() {
        let (_dir, svc) = service(&[]);
        let status = svc
            .image_status(Request::new(ImageStatusRequest {
                image: spec("docker.io/library/busybox:latest"),
                verbose: true,
            }))
            .await
            .expect("status of an unknown image")
            .into_inner();
        assert!(status.image.is_none());
        assert!(status.info.is_empty());

        svc.remove_image(Request::new(RemoveImageRequest {
            image: spec("busybox"),
        }))
        .await
        .expect("removing an unknown image succeeds");

        let listed = svc
            .list_images(Request::new(ListImagesRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert!(listed.images.is_empty());

        let err = svc
            .image_status(Request::new(ImageStatusRequest {
                image: None,
                verbose: false,
            }))
            .await
            .expect_err("no image spec");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn stored_images_listed_inspected_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let planted = |hex: char, tag: &str, uid: Option<i64>, username: &str| {
            let record = ImageRecord {
                id: format!("sha256:{}", String::from(hex).repeat(64)),
                repo_tags: vec![tag.to_string()],
                repo_digests: vec![],
                size: 1234,
                config: crate::image::ImageConfig::default(),
                uid,
                username: username.to_string(),
                manifest_digest: format!("sha256:{}", "f".repeat(64)),
                layers: vec![],
            };
            let image_dir = dir.path().join("images").join(record.id_hex());
            std::fs::create_dir_all(&image_dir).expect("image dir");
            std::fs::write(image_dir.join(crate::image::record::ROOTFS_FILE), b"ext4")
                .expect("rootfs");
            record.save(&image_dir).expect("save record");
            record
        };
        let busybox = planted('a', "docker.io/library/busybox:latest", Some(0), "");
        let app = planted('b', "example.com/app:1", None, "app");
        let svc = CriImageService::new(
            ImageStore::open(dir.path(), RegistryConfig::default()).expect("open store"),
        );

        let all = svc
            .list_images(Request::new(ListImagesRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(all.images.len(), 2);
        let filtered = svc
            .list_images(Request::new(ListImagesRequest {
                filter: Some(k8s_cri::v1::ImageFilter {
                    image: spec("busybox"),
                }),
            }))
            .await
            .expect("list busybox")
            .into_inner();
        assert_eq!(filtered.images.len(), 1);
        let image = &filtered.images[0];
        assert_eq!(image.id, busybox.id);
        assert_eq!(image.repo_tags, busybox.repo_tags);
        assert_eq!(image.size, 1234);
        assert_eq!(image.uid, Some(Int64Value { value: 0 }));
        assert_eq!(
            image.spec.as_ref().map(|s| s.image.as_str()),
            Some(busybox.id.as_str())
        );

        let status = svc
            .image_status(Request::new(ImageStatusRequest {
                image: spec("example.com/app:1"),
                verbose: true,
            }))
            .await
            .expect("status")
            .into_inner();
        let image = status.image.expect("app is stored");
        assert_eq!(image.uid, None);
        assert_eq!(image.username, "app");
        let json: ImageRecord =
            serde_json::from_str(&status.info["info"]).expect("verbose info is the record");
        assert_eq!(json, app);

        let lease = svc.store.acquire(&app.id).expect("lease");
        let err = svc
            .remove_image(Request::new(RemoveImageRequest {
                image: spec("example.com/app:1"),
            }))
            .await
            .expect_err("in use");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("example.com/app:1"), "{err:?}");
        drop(lease);
        svc.remove_image(Request::new(RemoveImageRequest {
            image: spec("example.com/app:1"),
        }))
        .await
        .expect("remove");
        let listed = svc
            .list_images(Request::new(ListImagesRequest {
                filter: Some(k8s_cri::v1::ImageFilter {
                    image: spec("example.com/app:1"),
                }),
            }))
            .await
            .expect("list removed")
            .into_inner();
        assert!(listed.images.is_empty());
    }

    #[tokio::test]
    async fn pull_errors_carry_their_codes() {
        let (_dir, svc) = service(&["127.0.0.1:1"]);
        let err = svc
            .pull_image(Request::new(PullImageRequest {
                image: spec("Not A Reference"),
                ..PullImageRequest::default()
            }))
            .await
            .expect_err("invalid reference");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("Not A Reference"), "{err:?}");

        let err = svc
            .pull_image(Request::new(PullImageRequest {
                image: spec("127.0.0.1:1/library/busybox:latest"),
                auth: Some(AuthConfig {
                    auth: "dXNlcjpwYXNz".into(),
                    ..AuthConfig::default()
                }),
                ..PullImageRequest::default()
            }))
            .await
            .expect_err("nothing listens on port 1");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("127.0.0.1:1"), "{err:?}");

        let err = svc
            .pull_image(Request::new(PullImageRequest {
                image: spec("127.0.0.1:1/library/busybox:latest"),
                auth: Some(AuthConfig {
                    auth: "not base64!".into(),
                    ..AuthConfig::default()
                }),
                ..PullImageRequest::default()
            }))
            .await
            .expect_err("bad credentials");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }

    #[tokio::test]
    async fn fs_info_reports_the_store() {
        let (dir, svc) = service(&[]);
        let info = svc
            .image_fs_info(Request::new(ImageFsInfoRequest {}))
            .await
            .expect("fs info")
            .into_inner();
        assert_eq!(info.image_filesystems.len(), 1);
        assert_eq!(info.container_filesystems, info.image_filesystems);
        let fs = &info.image_filesystems[0];
        assert!(fs.timestamp > 0);
        assert_eq!(
            fs.fs_id.as_ref().map(|id| id.mountpoint.as_str()),
            dir.path().to_str()
        );
        // The root, images/, tmp/ and blobs/ at least.
        assert!(fs.inodes_used.as_ref().expect("inodes").value >= 4);
        assert!(fs.used_bytes.as_ref().expect("bytes").value > 0);
    }

    #[test]
    fn credentials_from_auth_config() {
        assert_eq!(credentials(None), Ok(None));
        let plain = AuthConfig {
            username: "user".into(),
            password: "secret".into(),
            auth: "ignored".into(),
            ..AuthConfig::default()
        };
        assert_eq!(
            credentials(Some(&plain)),
            Ok(Some(("user".into(), "secret".into())))
        );
        let encoded = AuthConfig {
            // base64("user:pa:ss")
            auth: "dXNlcjpwYTpzcw==".into(),
            ..AuthConfig::default()
        };
        assert_eq!(
            credentials(Some(&encoded)),
            Ok(Some(("user".into(), "pa:ss".into())))
        );
        let no_colon = AuthConfig {
            // base64("user")
            auth: "dXNlcg==".into(),
            ..AuthConfig::default()
        };
        assert!(credentials(Some(&no_colon)).is_err());
        assert_eq!(credentials(Some(&AuthConfig::default())), Ok(None));
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_base64("").as_deref(), Some(&b""[..]));
        assert_eq!(decode_base64("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_base64("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_base64("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(decode_base64("YWJjZA").as_deref(), Some(&b"abcd"[..]));
        assert_eq!(
            decode_base64("+/+/").as_deref(),
            Some(&[0xfb, 0xff, 0xbf][..])
        );
        assert_eq!(decode_base64("YWJjZ"), None);
        assert_eq!(decode_base64("YW*j"), None);
        assert_eq!(decode_base64("YQ==="), None);
    }
}
