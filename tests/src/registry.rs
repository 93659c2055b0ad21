//! A local OCI registry for image tests: Debian's `docker-registry` (distribution 2.8)
//! on 127.0.0.1, plain HTTP, storage in a temporary directory, killed on drop; and a
//! busybox image pushed to it with oci-client.
//!
//! The busybox image has one gzip layer:
//!
//! ```text
//! /bin/busybox            Debian's static busybox
//! /bin/<applet>           symlinks to busybox (image::CONTAINER_APPLETS, env, nc, httpd)
//! /etc/passwd /etc/group  image::CONTAINER_PASSWD / CONTAINER_GROUP
//! /tmp /root /home/app /proc /sys /dev
//! ```
//!
//! and the config `Cmd ["sh"]`, `Env [PATH=...]`, `WorkingDir "/"`, `User ""`, no
//! `Entrypoint`. The layer is built once per process with fixed times, so every push of
//! it has the same digests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::image::{CONTAINER_APPLETS, CONTAINER_GROUP, CONTAINER_PASSWD, HOST_BUSYBOX};

/// Debian's registry binary (package docker-registry).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// Applets linked besides [`CONTAINER_APPLETS`].
pub const EXTRA_APPLETS: &[&str] = &["env", "nc", "httpd"];
/// `PATH` in the image config.
pub const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the registry may take to answer `/v2/`.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Layer file times: fixed, so the layer digest is too.
const LAYER_MTIME: u64 = 1_700_000_000;

/// A running registry, killed on drop.
pub struct Registry {
    child: Child,
    host: String,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Starts a registry on a free port of 127.0.0.1 and waits until `GET /v2/` answers.
    pub fn start() -> anyhow::Result<Self> {
        if !Path::new(REGISTRY_BIN).is_file() {
            bail!("{REGISTRY_BIN} is missing: install the docker-registry package");
        }
        let dir = tempfile::Builder::new()
            .prefix("podvisor-registry-")
            .tempdir()
            .context("create the registry's directory")?;
        // The port is free when asked for; another process could take it before the
        // registry binds, in which case the registry exits and we try another.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            match Self::spawn(dir.path(), port) {
                Ok(child) => {
                    return Ok(Registry {
                        child,
                        host: format!("127.0.0.1:{port}"),
                        dir,
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("registry did not start")))
    }

    fn spawn(dir: &Path, port: u16) -> anyhow::Result<Child> {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).context("create registry storage")?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .context("write registry config")?;
        let log_path = dir.join("registry.log");
        let log = std::fs::File::create(&log_path).context("create registry log")?;
        let mut child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("registry log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {REGISTRY_BIN}"))?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().context("wait for registry")? {
                bail!(
                    "registry exited ({status}) before answering: {}",
                    log_tail(&log_path)
                );
            }
            if v2_answers(port) {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "registry on port {port} did not answer /v2/ within {START_DEADLINE:?}: {}",
                    log_tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host)
    }

    /// How many `method path` requests the registry has logged (its access log, written
    /// as each response completes).
    pub fn requests(&self, method: &str, path: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        let needle = format!("\"{method} {path} HTTP/");
        log.lines().filter(|l| l.contains(&needle)).count()
    }

    /// The registry's log so far (for failure messages).
    pub fn log(&self) -> String {
        log_tail(&self.dir.path().join("registry.log"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr().context("local address")?.port())
}

/// Whether `GET /v2/` gets an HTTP 200.
fn v2_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or_default().to_string()
}

/// What a push left in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub reference: String,
    /// The digest of what the tag points to (the manifest, or the index).
    pub digest: String,
    /// The config digest: the image id a runtime reports.
    pub config_digest: String,
    /// The digest of the gzip layer.
    pub layer_digest: String,
}

/// The busybox layer: its gzip bytes and the digest of the uncompressed tar.
pub fn busybox_layer() -> anyhow::Result<&'static (Vec<u8>, String)> {
    static LAYER: OnceLock<Result<(Vec<u8>, String), String>> = OnceLock::new();
    LAYER
        .get_or_init(|| build_busybox_layer().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn build_busybox_layer() -> anyhow::Result<(Vec<u8>, String)> {
    let busybox = std::fs::read(HOST_BUSYBOX)
        .with_context(|| format!("read {HOST_BUSYBOX} (install busybox-static)"))?;
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("home/", 0o755),
        ("home/app/", 0o755),
        ("proc/", 0o555),
        ("root/", 0o700),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
    ] {
        append(&mut tar, tar::EntryType::Directory, dir, mode, b"", None)?;
    }
    append(
        &mut tar,
        tar::EntryType::Regular,
        "bin/busybox",
        0o755,
        &busybox,
        None,
    )?;
    for applet in CONTAINER_APPLETS.iter().chain(EXTRA_APPLETS) {
        append(
            &mut tar,
            tar::EntryType::Symlink,
            &format!("bin/{applet}"),
            0o777,
            b"",
            Some("busybox"),
        )?;
    }
    // The probe the isolation checks run as a hostile container.
    let probe = crate::artifacts::guest_probe()?;
    let probe = std::fs::read(&probe).with_context(|| format!("read {}", probe.display()))?;
    append(
        &mut tar,
        tar::EntryType::Regular,
        "bin/guest-probe",
        0o755,
        &probe,
        None,
    )?;
    append(
        &mut tar,
        tar::EntryType::Regular,
        "etc/passwd",
        0o644,
        CONTAINER_PASSWD.as_bytes(),
        None,
    )?;
    append(
        &mut tar,
        tar::EntryType::Regular,
        "etc/group",
        0o644,
        CONTAINER_GROUP.as_bytes(),
        None,
    )?;
    let tar = tar.into_inner().context("finish the layer tar")?;
    let diff_id = format!("sha256:{}", hex_digest(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).context("gzip the layer")?;
    Ok((gz.finish().context("gzip the layer")?, diff_id))
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    path: &str,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header
        .set_path(path)
        .with_context(|| format!("tar path {path}"))?;
    if let Some(link) = link {
        header
            .set_link_name(link)
            .with_context(|| format!("tar link {path}"))?;
    }
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(LAYER_MTIME);
    header.set_size(data.len() as u64);
    header.set_cksum();
    tar.append(&header, data)
        .with_context(|| format!("append {path}"))
}

/// The sha256 of `data`, hex.
pub fn hex_digest(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The image config of the busybox image for `architecture`, whose one layer has
/// `diff_id`.
pub fn busybox_config(architecture: &str, diff_id: &str) -> Vec<u8> {
    serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Cmd": ["sh"],
            "Env": [IMAGE_PATH],
            "WorkingDir": "/",
            "User": "",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "podvisor-tests registry::push_busybox"}],
    })
    .to_string()
    .into_bytes()
}

/// A client speaking plain HTTP to every registry.
fn client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    })
}

/// Pushes the busybox image (one gzip layer, config for linux/`architecture`) as
/// `repo:tag` and returns its digests.
async fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    architecture: &str,
) -> anyhow::Result<PushedImage> {
    push_image_to(registry.host(), repo, tag, architecture)
        .await
        .map_err(|e| anyhow!("{e:#}; registry log: {}", registry.log()))
}

/// Pushes the image `ref_name` of the OCI layout at `layout` (as umoci writes one) as
/// `repo:tag`, its config and layer blobs byte for byte; `edit` may change the config and
/// layers first. Returns the reference.
pub async fn push_oci_layout(
    registry: &Registry,
    layout: &Path,
    ref_name: &str,
    repo: &str,
    tag: &str,
    edit: impl FnOnce(&mut Vec<u8>, &mut Vec<Vec<u8>>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let blob = |digest: &str| -> anyhow::Result<Vec<u8>> {
        let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
        let path = layout.join("blobs/sha256").join(hex);
        std::fs::read(&path).with_context(|| format!("read {}", path.display()))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).context("index.json")?)?;
    let manifest_digest = index["manifests"]
        .as_array()
        .context("index manifests")?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == ref_name)
        .and_then(|m| m["digest"].as_str())
        .with_context(|| format!("no {ref_name} in the layout"))?
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&manifest_digest)?)?;
    let config_media = manifest["config"]["mediaType"]
        .as_str()
        .context("config type")?;
    let mut config = blob(
        manifest["config"]["digest"]
            .as_str()
            .context("config digest")?,
    )?;
    let descriptors = manifest["layers"].as_array().context("layers")?;
    let mut layers = descriptors
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap_or_default()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    edit(&mut config, &mut layers)?;
    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .zip(descriptors)
        .map(|(data, d)| {
            ImageLayer::new(
                data,
                d["mediaType"].as_str().unwrap_or_default().to_string(),
                None,
            )
        })
        .collect();
    push_layers(
        registry,
        repo,
        tag,
        &layers,
        Config::new(config, config_media.to_string(), None),
    )
    .await
}

/// Pushes `layers` and `config` as `repo:tag`; returns the reference.
pub async fn push_layers(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layers: &[ImageLayer],
    config: Config,
) -> anyhow::Result<String> {
    push_layers_with_manifest(registry, repo, tag, layers, config, |_| {}).await
}

/// Pushes `layers` and `config` as `repo:tag` under the manifest oci-client makes for them
/// as `edit` changes it (a hostile image's descriptors: sizes that lie, or are 0); returns
/// the reference.
pub async fn push_layers_with_manifest(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layers: &[ImageLayer],
    config: Config,
    edit: impl FnOnce(&mut OciImageManifest),
) -> anyhow::Result<String> {
    let reference_text = registry.reference(repo, tag);
    let reference: Reference = reference_text
        .parse()
        .with_context(|| format!("parse {reference_text}"))?;
    let mut manifest = OciImageManifest::build(layers, &config, None);
    edit(&mut manifest);
    client()
        .push(
            &reference,
            layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .map_err(|e| {
            anyhow!(
                "push {reference_text}: {e}; registry log: {}",
                registry.log()
            )
        })?;
    Ok(reference_text)
}

/// A gzip layer of `files` files (`zeros/00000`...) of `size` zero bytes each: a
/// decompression bomb. Made of gzip members (a layer may hold several, as pigz writes
/// them): the zeros are compressed once and repeated, so a gigabyte of them takes about
/// a megabyte and a moment to make, and is never held uncompressed.
pub fn gzip_zero_bomb(files: usize, size: usize) -> anyhow::Result<Vec<u8>> {
    let gzip = |data: &[u8]| -> anyhow::Result<Vec<u8>> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).context("gzip")?;
        gz.finish().context("gzip")
    };
    let padded = size.next_multiple_of(512);
    let zeros = gzip(&vec![0; padded])?;
    let mut layer = Vec::new();
    for i in 0..files {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_path(format!("zeros/{i:05}"))?;
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(LAYER_MTIME);
        header.set_size(size as u64);
        header.set_cksum();
        layer.extend(gzip(header.as_bytes())?);
        layer.extend_from_slice(&zeros);
    }
    layer.extend(gzip(&[0; 1024])?);
    Ok(layer)
}

/// Device node, setuid file and file capability the special-files layer holds.
pub const SPECIAL_DEVICE: &str = "opt/testnull";
/// A setuid-root copy of busybox in the special-files layer.
pub const SPECIAL_SETUID: &str = "opt/suid-busybox";
/// A file with a `security.capability` xattr (CAP_NET_RAW, effective) in that layer.
pub const SPECIAL_CAPFILE: &str = "opt/cap-file";

/// A layer of what a hostile image may hold: a character device (1:3, as /dev/null), a
/// setuid-root busybox and a file with a `security.capability` xattr (PAX header).
pub fn special_files_layer() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(HOST_BUSYBOX).with_context(|| format!("read {HOST_BUSYBOX}"))?;
    let mut tar = tar::Builder::new(Vec::new());
    append(
        &mut tar,
        tar::EntryType::Directory,
        "opt/",
        0o755,
        b"",
        None,
    )?;
    let mut dev = tar::Header::new_ustar();
    dev.set_entry_type(tar::EntryType::Char);
    dev.set_path(SPECIAL_DEVICE)?;
    dev.set_mode(0o666);
    dev.set_uid(0);
    dev.set_gid(0);
    dev.set_device_major(1)?;
    dev.set_device_minor(3)?;
    dev.set_mtime(LAYER_MTIME);
    dev.set_size(0);
    dev.set_cksum();
    tar.append(&dev, &b""[..]).context("append the device")?;
    append(
        &mut tar,
        tar::EntryType::Regular,
        SPECIAL_SETUID,
        0o4755,
        &busybox,
        None,
    )?;
    // VFS_CAP_REVISION_2, effective, CAP_NET_RAW (13) permitted.
    let mut cap = vec![0x01, 0x00, 0x00, 0x02];
    cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
    cap.extend_from_slice(&[0; 12]);
    tar.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
        .context("append the xattr")?;
    append(
        &mut tar,
        tar::EntryType::Regular,
        SPECIAL_CAPFILE,
        0o755,
        b"#!/bin/sh\n",
        None,
    )?;
    tar.into_inner().context("finish the layer tar")
}

/// Pushes busybox with [`special_files_layer`] on top as `repo:tag` (linux/amd64); returns
/// the reference.
pub async fn push_busybox_with_special_files(
    registry: &Registry,
    repo: &str,
    tag: &str,
) -> anyhow::Result<String> {
    let (base, base_diff) = busybox_layer()?;
    let extra = special_files_layer()?;
    let extra_diff = format!("sha256:{}", hex_digest(&extra));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&extra).context("gzip the layer")?;
    let extra = gz.finish().context("gzip the layer")?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&busybox_config("amd64", base_diff))?;
    config["rootfs"]["diff_ids"] = serde_json::json!([base_diff, extra_diff]);
    let layers = [
        ImageLayer::oci_v1_gzip(base.clone(), None),
        ImageLayer::oci_v1_gzip(extra, None),
    ];
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    push_layers(registry, repo, tag, &layers, config).await
}

/// Pushes the busybox image for linux/amd64 as `repo:tag` to the registry at `host`
/// (`127.0.0.1:<port>`, plain HTTP), one that this process did not start.
pub async fn push_busybox_to(host: &str, repo: &str, tag: &str) -> anyhow::Result<PushedImage> {
    push_image_to(host, repo, tag, "amd64").await
}

async fn push_image_to(
    host: &str,
    repo: &str,
    tag: &str,
    architecture: &str,
) -> anyhow::Result<PushedImage> {
    let (layer, diff_id) = busybox_layer()?;
    let reference_text = format!("{host}/{repo}:{tag}");
    let reference: Reference = reference_text
        .parse()
        .with_context(|| format!("parse {reference_text}"))?;
    let layers = [ImageLayer::oci_v1_gzip(layer.clone(), None)];
    let config = Config::oci_v1(busybox_config(architecture, diff_id), None);
    let config_digest = config.sha256_digest();
    let layer_digest = layers[0].sha256_digest();
    let client = client();
    client
        .push(&reference, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .map_err(|e| anyhow!("push {reference_text}: {e}"))?;
    let digest = client
        .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
        .await
        .with_context(|| format!("digest of {reference_text}"))?;
    Ok(PushedImage {
        reference: reference_text,
        digest,
        config_digest,
        layer_digest,
    })
}

/// Pushes the busybox image for linux/amd64 as `repo:tag`.
pub async fn push_busybox(
    registry: &Registry,
    repo: &str,
    tag: &str,
) -> anyhow::Result<PushedImage> {
    push_image(registry, repo, tag, "amd64").await
}

/// Pushes a multi-platform index as `repo:tag`: a linux/arm64 busybox image (its config
/// says arm64, so its id differs) listed first, then the linux/amd64 one. The returned
/// config digest is the amd64 image's, `digest` the index's.
pub async fn push_busybox_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
) -> anyhow::Result<PushedImage> {
    let arm = push_image(registry, repo, &format!("{tag}-arm64"), "arm64").await?;
    let amd = push_image(registry, repo, &format!("{tag}-amd64"), "amd64").await?;
    let client = client();
    let mut entries = Vec::new();
    for (image, arch) in [(&arm, "arm64"), (&amd, "amd64")] {
        let reference: Reference = image.reference.parse().context("parse reference")?;
        let (manifest, _) = client
            .pull_manifest_raw(
                &reference,
                &RegistryAuth::Anonymous,
                &["application/vnd.oci.image.manifest.v1+json"],
            )
            .await
            .with_context(|| format!("fetch manifest {}", image.reference))?;
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.digest,
            "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .context("build the index")?;
    let reference_text = registry.reference(repo, tag);
    let reference: Reference = reference_text.parse().context("parse reference")?;
    client
        .push_manifest_list(&reference, &RegistryAuth::Anonymous, index)
        .await
        .map_err(|e| {
            anyhow!(
                "push index {reference_text}: {e}; registry log: {}",
                registry.log()
            )
        })?;
    let digest = client
        .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
        .await
        .with_context(|| format!("digest of {reference_text}"))?;
    Ok(PushedImage {
        reference: reference_text,
        digest,
        config_digest: amd.config_digest,
        layer_digest: amd.layer_digest,
    })
}
