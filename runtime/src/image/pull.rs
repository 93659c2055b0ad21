//! Pulling an image into the store: resolve the reference on the first endpoint that
//! answers (mirrors, then the registry), download the config and the missing layers into
//! the blob store, unpack them into a staging tree and make the image's ext4 file.
//!
//! Concurrent pulls of one reference run once; so do builds of one image id reached by
//! different references.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use podvisor_common::error_chain;
use tracing::{info, warn};

use super::blobs::fsync_dir;
use super::endpoints::{Endpoint, plain_http_hosts};
use super::error::{ImageError, io_err, task_err};
use super::ext4;
use super::record::{ImageRecord, ROOTFS_FILE, parse_config, uid_and_username};
use super::reference::{ImageName, sha256_hex};
use super::store::ImageStore;
use super::unpack::{Compression, Unpacker};

/// Layers downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for any single read from a registry.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const CONFIG_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Where an image was found and how to fetch its blobs.
struct Source {
    name: ImageName,
    client: Client,
    /// The reference on the endpoint that answered.
    reference: Reference,
    host: String,
    manifest: OciImageManifest,
    /// The digest of `manifest`.
    manifest_digest: String,
    /// What the reference resolved to: the index's digest for a multi-platform image
    /// (registries and kubelet name it so), else `manifest_digest`.
    resolved_digest: String,
}

impl ImageStore {
    /// Pulls `reference` (normalised: `busybox` is `docker.io/library/busybox:latest`)
    /// for linux/amd64, with `auth` as basic credentials for the registry (never sent to
    /// mirrors). Returns the image's record, with the reference's tag and digest added.
    pub async fn pull(
        &self,
        reference: &str,
        auth: Option<(String, String)>,
    ) -> Result<ImageRecord, ImageError> {
        let name = ImageName::parse(reference)?;
        let store = self.clone();
        let key = name.to_string();
        self.inner
            .pulls
            .run(
                &key,
                move || async move { store.pull_name(name, auth).await },
            )
            .await
    }

    async fn pull_name(
        &self,
        name: ImageName,
        auth: Option<(String, String)>,
    ) -> Result<ImageRecord, ImageError> {
        let source = self.resolve(name, auth).await?;
        let id = source.manifest.config.digest.clone();
        if sha256_hex(&id).is_none() {
            return Err(ImageError::Unsupported {
                reference: source.name.to_string(),
                what: format!("config digest {id}"),
            });
        }
        let repo_tag = source.name.repo_tag();
        let repo_digest = source.name.repo_digest(&source.resolved_digest);
        if self.get(&id).is_some() {
            info!(image = %source.name, id = %id, "image already present");
        } else {
            let store = self.clone();
            self.inner
                .builds
                .run(&id, move || async move { store.build(source).await })
                .await?;
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.add_names(&id, repo_tag.as_deref(), &repo_digest))
            .await
            .map_err(task_err("record names".to_string()))?
    }

    /// Finds the image's (linux/amd64) manifest on the first endpoint that has it.
    async fn resolve(
        &self,
        name: ImageName,
        auth: Option<(String, String)>,
    ) -> Result<Source, ImageError> {
        let endpoints = self.inner.endpoints.for_registry(name.registry());
        let client = registry_client(&endpoints)?;
        let credentials = match auth {
            Some((user, pass)) => RegistryAuth::Basic(user, pass),
            None => RegistryAuth::Anonymous,
        };
        let mut last_error = None;
        for endpoint in &endpoints {
            let reference = name.at_host(&endpoint.host);
            let auth = if endpoint.mirror {
                &RegistryAuth::Anonymous
            } else {
                &credentials
            };
            info!(image = %name, endpoint = %endpoint.host, "resolving image");
            match client
                .pull_image_manifest_and_list_digest(&reference, auth)
                .await
            {
                Ok((manifest, digest, list_digest)) => {
                    return Ok(Source {
                        resolved_digest: list_digest.unwrap_or_else(|| digest.clone()),
                        manifest_digest: digest,
                        name,
                        client,
                        reference,
                        host: endpoint.host.clone(),
                        manifest,
                    });
                }
                Err(e) => {
                    let error = registry_error(&name, &endpoint.host, e);
                    warn!(image = %name, endpoint = %endpoint.host, error = %error_chain(&error), "cannot resolve image");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ImageError::Internal(format!("{name}: no endpoint"))))
    }

    /// Downloads what is missing and makes the image.
    async fn build(&self, source: Source) -> Result<ImageRecord, ImageError> {
        let manifest = &source.manifest;
        let id = manifest.config.digest.clone();
        let unsupported = |what: String| ImageError::Unsupported {
            reference: source.name.to_string(),
            what,
        };
        if !CONFIG_MEDIA_TYPES.contains(&manifest.config.media_type.as_str()) {
            return Err(unsupported(format!(
                "config media type {} (not a container image)",
                manifest.config.media_type
            )));
        }
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            let compression = Compression::for_media_type(&layer.media_type)
                .ok_or_else(|| unsupported(format!("layer media type {}", layer.media_type)))?;
            if sha256_hex(&layer.digest).is_none() {
                return Err(unsupported(format!("layer digest {}", layer.digest)));
            }
            layers.push((layer.digest.clone(), compression));
        }
        let _pins =
            self.pin(std::iter::once(id.as_str()).chain(layers.iter().map(|(d, _)| d.as_str())));

        self.fetch(&source, &manifest.config, "config").await?;
        let config_path = self.inner.blobs.path(&id)?;
        let config_data = tokio::fs::read(&config_path)
            .await
            .map_err(io_err("read", &config_path))?;
        let (config, diff_ids) = parse_config(&id, &config_data)?;
        if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
            return Err(ImageError::BadConfig {
                digest: id,
                message: format!("{} diff_ids for {} layers", diff_ids.len(), layers.len()),
            });
        }

        let count = manifest.layers.len();
        // The futures are made first: a closure inside the stream would make this
        // future not `Send` (rust-lang/rust#104382).
        let downloads: Vec<_> = manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| self.fetch(&source, layer, format!("layer {}/{count}", i + 1)))
            .collect();
        futures::stream::iter(downloads)
            .buffer_unordered(PARALLEL_DOWNLOADS)
            .try_collect::<Vec<()>>()
            .await?;

        let (uid, username) = uid_and_username(&config.user);
        let record = ImageRecord {
            id: id.clone(),
            repo_tags: Vec::new(),
            repo_digests: Vec::new(),
            size: 0,
            config,
            uid,
            username,
            manifest_digest: source.manifest_digest.clone(),
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
        };
        let store = self.clone();
        let name = source.name.to_string();
        let record =
            tokio::task::spawn_blocking(move || store.assemble(&name, record, &layers, &diff_ids))
                .await
                .map_err(task_err(format!("build image {id}")))??;
        self.insert(record.clone());
        info!(image = %source.name, id = %record.id, size = record.size, "image ready");
        Ok(record)
    }

    /// Downloads the blob `desc` into the blob store unless it is there.
    async fn fetch(
        &self,
        source: &Source,
        desc: &OciDescriptor,
        what: impl std::fmt::Display,
    ) -> Result<(), ImageError> {
        if self.inner.blobs.contains(&desc.digest) {
            info!(image = %source.name, "{what}: {} already stored", desc.digest);
            return Ok(());
        }
        let size = u64::try_from(desc.size).ok();
        info!(image = %source.name, bytes = desc.size, "{what}: downloading {}", desc.digest);
        let stream = source
            .client
            .pull_blob_stream(&source.reference, desc)
            .await
            .map_err(|e| registry_error(&source.name, &source.host, e))?;
        // Progress in tenths of the blob.
        let mut next_tenth = 1;
        let written = self
            .inner
            .blobs
            .write_stream(&desc.digest, size, stream, |done| {
                if let Some(total) = size.filter(|t| *t > 0)
                    && done * 10 >= total * next_tenth
                    && next_tenth < 10
                {
                    info!(image = %source.name, done, total, "{what}: {}%", next_tenth * 10);
                    next_tenth = done * 10 / total + 1;
                }
            })
            .await?;
        info!(image = %source.name, bytes = written, "{what}: downloaded");
        Ok(())
    }

    /// Unpacks the layers into a staging tree and makes `images/<hex>/` from it
    /// (blocking). Returns `record` with its size filled in.
    fn assemble(
        &self,
        name: &str,
        mut record: ImageRecord,
        layers: &[(String, Compression)],
        diff_ids: &[String],
    ) -> Result<ImageRecord, ImageError> {
        let hex = record.id_hex().to_string();
        let work = self.temp_path(&format!("build-{hex}"));
        let staging = work.join("rootfs");
        let out = work.join("image");
        let result = (|| {
            for d in [&staging, &out] {
                std::fs::create_dir_all(d).map_err(io_err("create", d))?;
            }
            // The image's `/`: mkfs.ext4 -d copies the staging root's mode.
            set_mode(&staging, 0o755)?;
            let mut unpacker = Unpacker::new(&staging);
            let count = layers.len();
            for (i, (digest, compression)) in layers.iter().enumerate() {
                let path = self.inner.blobs.path(digest)?;
                let blob = std::fs::File::open(&path).map_err(io_err("open", &path))?;
                let entries = unpacker.apply(
                    BufReader::with_capacity(1 << 20, blob),
                    *compression,
                    digest,
                    diff_ids.get(i).map(String::as_str),
                )?;
                info!(image = name, entries, "layer {}/{count}: unpacked", i + 1);
            }
            let devices = unpacker.finish()?;
            let rootfs = out.join(ROOTFS_FILE);
            ext4::make(&staging, &rootfs, &hex[..12], &devices)?;
            std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))?;

            let mut size = ext4::allocated_bytes(&rootfs)?;
            for digest in record.blobs() {
                let path = self.inner.blobs.path(digest)?;
                size += std::fs::metadata(&path)
                    .map_err(io_err("stat", &path))?
                    .len();
            }
            record.size = size;
            record.save(&out)?;

            let dest = self.inner.images_dir.join(&hex);
            if dest.exists() {
                // Not loaded at open (incomplete or unreadable): replace it.
                let stale = work.join("stale");
                std::fs::rename(&dest, &stale).map_err(io_err("move away", &dest))?;
            }
            std::fs::rename(&out, &dest).map_err(io_err("rename into", &dest))?;
            fsync_dir(&self.inner.images_dir)?;
            Ok(record)
        })();
        if let Err(e) = std::fs::remove_dir_all(&work)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %work.display(), error = %e, "cannot clean up build directory");
        }
        result
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}

/// A registry client for `endpoints`: plain HTTP where configured, linux/amd64 out of
/// multi-platform indexes.
fn registry_client(endpoints: &[Endpoint]) -> Result<Client, ImageError> {
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain_http_hosts(endpoints)),
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| ImageError::Client(Arc::new(e)))
}

/// What a CRI client can do about a registry client error.
enum RegistryFailure {
    Unauthorized,
    NotFound,
    Unavailable,
    Digest,
    Unsupported,
    Other,
}

/// Sorts a registry client error into what a CRI client can act on.
fn registry_error(name: &ImageName, host: &str, error: OciDistributionError) -> ImageError {
    let registry = host.to_string();
    let reference = name.to_string();
    let failure = classify(&error);
    let source = Arc::new(error);
    match failure {
        RegistryFailure::Unauthorized => ImageError::Unauthorized {
            reference,
            registry,
            source,
        },
        RegistryFailure::NotFound => ImageError::NotInRegistry {
            reference,
            registry,
            source,
        },
        RegistryFailure::Unavailable => ImageError::Unavailable { registry, source },
        RegistryFailure::Digest => ImageError::DigestMismatch {
            what: format!("{reference} from {registry}"),
            expected: "the digest in the reference or header".into(),
            actual: error_chain(&*source),
        },
        RegistryFailure::Unsupported => ImageError::Unsupported {
            reference,
            what: format!("manifest ({})", error_chain(&*source)),
        },
        RegistryFailure::Other => ImageError::Registry { registry, source },
    }
}

/// The [`RegistryFailure`] of a registry client error: by its kind, its HTTP status, or
/// the OCI error codes of its answer.
fn classify(error: &OciDistributionError) -> RegistryFailure {
    match error {
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
            RegistryFailure::Unavailable
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => RegistryFailure::Unauthorized,
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryFailure::NotFound,
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => RegistryFailure::Unauthorized,
            404 => RegistryFailure::NotFound,
            429 | 500.. => RegistryFailure::Unavailable,
            _ => RegistryFailure::Other,
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                RegistryFailure::Unauthorized
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                RegistryFailure::NotFound
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                RegistryFailure::Unavailable
            } else {
                RegistryFailure::Other
            }
        }
        OciDistributionError::DigestError(_) => RegistryFailure::Digest,
        OciDistributionError::UnsupportedMediaTypeError(_)
        | OciDistributionError::UnsupportedSchemaVersionError(_)
        | OciDistributionError::ManifestParsingError(_)
        | OciDistributionError::VersionedParsingError(_) => RegistryFailure::Unsupported,
        _ => RegistryFailure::Other,
    }
}
