//! Pulling an image into the store: resolve the reference on the first endpoint that
//! answers (mirrors, then the registry), download the config and the missing layers into
//! the blob store, unpack them into a staging tree and make the image's ext4 file.
//!
//! Concurrent pulls of one reference run once; so do builds of one image id reached by
//! different references.

use std::io::{BufReader, Read};
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use podvisor_common::error_chain;
use tracing::{info, warn};

use super::blobs::fsync_dir;
use super::error::{ImageError, io_err, task_err};
use super::ext4;
use super::limits::{ImageLimits, Limit};
use super::record::{ImageRecord, ROOTFS_FILE, parse_config, uid_and_username};
use super::reference::{ImageName, sha256_hex};
use super::remote::{Remote, Session};
use super::store::ImageStore;
use super::unpack::{Compression, DeviceNode, Unpacker};

/// Layers downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;
const CONFIG_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Where an image was found and how to fetch its blobs.
struct Source {
    name: ImageName,
    session: Session,
    manifest: OciImageManifest,
    /// The digest of `manifest`.
    manifest_digest: String,
    /// What the reference resolved to: the index's digest for a multi-platform image
    /// (registries and kubelet name it so), else `manifest_digest`.
    resolved_digest: String,
}

/// One layer to fetch and unpack, as the manifest describes it (checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Compressed size, above 0.
    pub size: u64,
    /// From its media type.
    pub compression: Compression,
}

/// Checks `manifest` against `limits` before anything is fetched: a container image
/// config, sha256 digests, sizes above 0, at most `max_layers` layers, a config of at most
/// `max_config_bytes` and declared sizes adding up to at most `max_download_bytes`.
/// Returns the config's size and the layers.
pub fn check_manifest(
    reference: &str,
    manifest: &OciImageManifest,
    limits: &ImageLimits,
) -> Result<(u64, Vec<LayerPlan>), ImageError> {
    let unsupported = |what: String| ImageError::Unsupported {
        reference: reference.to_string(),
        what,
    };
    let config = &manifest.config;
    if !CONFIG_MEDIA_TYPES.contains(&config.media_type.as_str()) {
        return Err(unsupported(format!(
            "config media type {} (not a container image)",
            config.media_type
        )));
    }
    if sha256_hex(&config.digest).is_none() {
        return Err(unsupported(format!("config digest {}", config.digest)));
    }
    let count = manifest.layers.len();
    if count as u64 > limits.max_layers {
        return Err(ImageError::LimitExceeded {
            what: format!("image {reference}: {count} layers"),
            limit: Limit::Layers,
            max: limits.max_layers,
        });
    }
    let config_size = declared_size(reference, config, "config")?;
    if config_size > limits.max_config_bytes {
        return Err(ImageError::LimitExceeded {
            what: format!(
                "image {reference}: config {} declares {config_size} bytes",
                config.digest
            ),
            limit: Limit::ConfigBytes,
            max: limits.max_config_bytes,
        });
    }
    let mut total = config_size;
    let mut layers = Vec::with_capacity(count);
    for (i, layer) in manifest.layers.iter().enumerate() {
        let what = format!("layer {}/{count}", i + 1);
        let compression = Compression::for_media_type(&layer.media_type)
            .ok_or_else(|| unsupported(format!("layer media type {}", layer.media_type)))?;
        if sha256_hex(&layer.digest).is_none() {
            return Err(unsupported(format!("layer digest {}", layer.digest)));
        }
        let size = declared_size(reference, layer, &what)?;
        total = total.saturating_add(size);
        if total > limits.max_download_bytes {
            return Err(ImageError::LimitExceeded {
                what: format!(
                    "image {reference}: config and layers up to {what} declare {total} bytes"
                ),
                limit: Limit::DownloadBytes,
                max: limits.max_download_bytes,
            });
        }
        layers.push(LayerPlan {
            digest: layer.digest.clone(),
            size,
            compression,
        });
    }
    Ok((config_size, layers))
}

/// The size `desc` declares, which must be above 0: it is also the most that is read.
fn declared_size(reference: &str, desc: &OciDescriptor, what: &str) -> Result<u64, ImageError> {
    u64::try_from(desc.size)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| ImageError::BadManifest {
            reference: reference.to_string(),
            message: format!(
                "{what} {} declares size {} (must be above 0)",
                desc.digest, desc.size
            ),
        })
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
        let remote = Remote::new(&endpoints)?;
        let credentials = match auth {
            Some((user, pass)) => RegistryAuth::Basic(user, pass),
            None => RegistryAuth::Anonymous,
        };
        let mut last_error = None;
        for endpoint in &endpoints {
            let reference = name.at_host(&endpoint.host);
            let auth = if endpoint.mirror {
                RegistryAuth::Anonymous
            } else {
                credentials.clone()
            };
            info!(image = %name, endpoint = %endpoint.host, "resolving image");
            let resolved = async {
                let session = remote.session(&name, endpoint, reference, auth).await?;
                let resolved = session
                    .manifest(self.inner.limits.max_manifest_bytes)
                    .await?;
                Ok::<_, ImageError>((session, resolved))
            };
            match resolved.await {
                Ok((session, resolved)) => {
                    return Ok(Source {
                        resolved_digest: resolved
                            .list_digest
                            .unwrap_or_else(|| resolved.digest.clone()),
                        manifest_digest: resolved.digest,
                        name,
                        session,
                        manifest: resolved.manifest,
                    });
                }
                Err(error) => {
                    warn!(image = %name, endpoint = %endpoint.host, error = %error_chain(&error), "cannot resolve image");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ImageError::Internal(format!("{name}: no endpoint"))))
    }

    /// Downloads what is missing and makes the image. On failure, the blobs it fetched
    /// that no image uses and no other pull waits for are removed with the rest.
    async fn build(&self, source: Source) -> Result<ImageRecord, ImageError> {
        let id = source.manifest.config.digest.clone();
        let name = source.name.to_string();
        let (config_size, layers) = check_manifest(&name, &source.manifest, &self.inner.limits)?;
        let pins =
            self.pin(std::iter::once(id.as_str()).chain(layers.iter().map(|l| l.digest.as_str())));
        let result = self.download_and_make(&source, config_size, layers).await;
        if result.is_err() {
            pins.release_unused();
        }
        result
    }

    async fn download_and_make(
        &self,
        source: &Source,
        config_size: u64,
        layers: Vec<LayerPlan>,
    ) -> Result<ImageRecord, ImageError> {
        let id = source.manifest.config.digest.clone();
        self.fetch(source, &id, config_size, "config").await?;
        let config_data = self.read_config(&id)?;
        let (config, diff_ids) = parse_config(&id, &config_data)?;
        if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
            return Err(ImageError::BadConfig {
                digest: id,
                message: format!("{} diff_ids for {} layers", diff_ids.len(), layers.len()),
            });
        }

        let count = layers.len();
        // The futures are made first: a closure inside the stream would make this
        // future not `Send` (rust-lang/rust#104382).
        let downloads: Vec<_> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                self.fetch(
                    source,
                    &l.digest,
                    l.size,
                    format!("layer {}/{count}", i + 1),
                )
            })
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
            layers: layers.iter().map(|l| l.digest.clone()).collect(),
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

    /// The stored config blob `id`, read up to the config cap (it may have been stored
    /// under a larger one).
    fn read_config(&self, id: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.inner.blobs.path(id)?;
        let max = self.inner.limits.max_config_bytes;
        let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
        let mut data = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut data)
            .map_err(io_err("read", &path))?;
        if data.len() as u64 > max {
            return Err(ImageError::LimitExceeded {
                what: format!("config {id}: more than {max} bytes"),
                limit: Limit::ConfigBytes,
                max,
            });
        }
        Ok(data)
    }

    /// Downloads the blob `digest` of the declared `size` into the blob store unless it
    /// is there. Never reads more than `size` bytes of it.
    async fn fetch(
        &self,
        source: &Source,
        digest: &str,
        size: u64,
        what: impl std::fmt::Display,
    ) -> Result<(), ImageError> {
        if self.inner.blobs.contains(digest) {
            info!(image = %source.name, "{what}: {digest} already stored");
            return Ok(());
        }
        info!(image = %source.name, bytes = size, "{what}: downloading {digest}");
        let response = source.session.blob(digest).await?;
        if let Some(len) = response.content_length()
            && len != size
        {
            return Err(ImageError::SizeMismatch {
                what: format!("{what} {digest}"),
                declared: size,
                actual: len.to_string(),
            });
        }
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        // Progress in tenths of the blob.
        let mut next_tenth = 1;
        let written = self
            .inner
            .blobs
            .write_stream(digest, size, stream, |done| {
                if done * 10 >= size * next_tenth && next_tenth < 10 {
                    info!(image = %source.name, done, total = size, "{what}: {}%", next_tenth * 10);
                    next_tenth = done * 10 / size + 1;
                }
            })
            .await?;
        info!(image = %source.name, bytes = written, "{what}: downloaded");
        Ok(())
    }

    /// Unpacks the layers into a staging tree and makes `images/<hex>/` from it
    /// (blocking). Returns `record` with its size filled in. Whatever fails, the build
    /// directory (staging tree, partial image) is removed.
    fn assemble(
        &self,
        name: &str,
        mut record: ImageRecord,
        layers: &[LayerPlan],
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
            let devices = self.unpack_layers(name, &staging, layers, diff_ids)?;
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

    /// Applies the layers to `staging` within the unpacking caps; returns the image's
    /// device nodes.
    fn unpack_layers(
        &self,
        name: &str,
        staging: &Path,
        layers: &[LayerPlan],
        diff_ids: &[String],
    ) -> Result<Vec<DeviceNode>, ImageError> {
        let mut unpacker = Unpacker::with_limits(staging, &self.inner.limits);
        let count = layers.len();
        for (i, layer) in layers.iter().enumerate() {
            let path = self.inner.blobs.path(&layer.digest)?;
            let blob = std::fs::File::open(&path).map_err(io_err("open", &path))?;
            let entries = unpacker.apply(
                BufReader::with_capacity(1 << 20, blob),
                layer.compression,
                &layer.digest,
                diff_ids.get(i).map(String::as_str),
            )?;
            info!(image = name, entries, "layer {}/{count}: unpacked", i + 1);
        }
        let (bytes, inodes) = unpacker.used();
        info!(image = name, bytes, inodes, "layers unpacked");
        unpacker.finish()
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    fn digest(c: char) -> String {
        format!("sha256:{}", std::iter::repeat_n(c, 64).collect::<String>())
    }

    /// A manifest with a config of `config_size` bytes and layers of `layer_sizes`.
    fn manifest(config_size: i64, layer_sizes: &[i64]) -> OciImageManifest {
        let layers: Vec<_> = layer_sizes
            .iter()
            .map(|size| serde_json::json!({"mediaType": GZIP, "digest": digest('b'), "size": size}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest('a'),
                "size": config_size,
            },
            "layers": layers,
        }))
        .expect("manifest")
    }

    fn over(result: Result<(u64, Vec<LayerPlan>), ImageError>, limit: Limit) -> String {
        match result {
            Err(e @ ImageError::LimitExceeded { limit: l, .. }) if l == limit => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                e.to_string()
            }
            other => panic!("expected {limit}, got {other:?}"),
        }
    }

    #[test]
    fn manifests_are_checked_against_the_caps_before_any_fetch() {
        let limits = ImageLimits::default();
        let (config, layers) =
            check_manifest("r", &manifest(1500, &[10, 20]), &limits).expect("fine");
        assert_eq!(config, 1500);
        assert_eq!(
            layers,
            [10, 20].map(|size| LayerPlan {
                digest: digest('b'),
                size,
                compression: Compression::Gzip,
            })
        );

        // Layers: 128 pass, 129 do not.
        check_manifest("r", &manifest(2, &[1; 128]), &limits).expect("128 layers");
        let msg = over(
            check_manifest("r", &manifest(2, &[1; 129]), &limits),
            Limit::Layers,
        );
        assert!(
            msg.contains("129 layers") && msg.contains("max_layers = 128"),
            "{msg}"
        );

        // A config declaring 5 MiB, or 10 GB.
        for size in [5 << 20, 10_000_000_000] {
            let msg = over(
                check_manifest("r", &manifest(size, &[1]), &limits),
                Limit::ConfigBytes,
            );
            assert!(msg.contains(&format!("declares {size} bytes")), "{msg}");
        }

        // The declared sizes add up past the download cap.
        let small = ImageLimits {
            max_download_bytes: 100,
            ..limits
        };
        check_manifest("r", &manifest(40, &[30, 30]), &small).expect("exactly 100");
        let msg = over(
            check_manifest("r", &manifest(40, &[30, 31]), &small),
            Limit::DownloadBytes,
        );
        assert!(msg.contains("layer 2/2"), "{msg}");
    }

    #[test]
    fn sizes_of_zero_or_less_are_refused() {
        let limits = ImageLimits::default();
        for (config, layers) in [(0, vec![1]), (-1, vec![1]), (2, vec![1, 0]), (2, vec![-5])] {
            match check_manifest("r", &manifest(config, &layers), &limits) {
                Err(e @ ImageError::BadManifest { .. }) => {
                    assert_eq!(e.code(), tonic::Code::InvalidArgument);
                    assert!(e.to_string().contains("must be above 0"), "{e}");
                }
                other => panic!("{config} {layers:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn what_is_not_a_container_image_is_refused() {
        let limits = ImageLimits::default();
        let mut m = manifest(2, &[1]);
        m.layers[0].media_type = "application/vnd.wasm.content.layer.v1+wasm".into();
        let err = check_manifest("r", &m, &limits).expect_err("wasm");
        assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
        let mut m = manifest(2, &[1]);
        m.layers[0].digest = "sha512:00".into();
        let err = check_manifest("r", &m, &limits).expect_err("sha512");
        assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
        let mut m = manifest(2, &[1]);
        m.config.media_type = "application/vnd.wasm.config.v1+json".into();
        let err = check_manifest("r", &m, &limits).expect_err("wasm config");
        assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
    }
}
