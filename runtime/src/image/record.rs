//! The image record (`images/<id hex>/image.json`) and what it keeps of the OCI image
//! config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::blobs::fsync_dir;
use super::error::{ImageError, io_err};

/// The file name of a record inside its image directory.
pub const RECORD_FILE: &str = "image.json";
/// The file name of the root file system inside an image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

/// What a container takes from the image config (`config` in the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`; empty when unset.
    pub entrypoint: Vec<String>,
    /// `Cmd`; empty when unset.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir`; empty when unset.
    pub working_dir: String,
    /// `User` as written (`uid`, `uid:gid`, `name`, `name:group` or empty).
    pub user: String,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `StopSignal`; empty when unset.
    pub stop_signal: String,
}

/// One image in the store. Its id is the digest of its config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:<hex>` of the config blob.
    pub id: String,
    /// `registry/repository:tag` names pointing at this image.
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:<manifest or index digest>` names of this image.
    pub repo_digests: Vec<String>,
    /// Bytes the image takes in the store: its blobs plus the blocks of its ext4 image.
    pub size: u64,
    /// The container defaults from the image config.
    pub config: ImageConfig,
    /// The numeric user of `config.user`, when it is numeric (CRI `Image.uid`).
    pub uid: Option<i64>,
    /// The user name of `config.user`, when it is not numeric (CRI `Image.username`).
    pub username: String,
    /// The digest of the (platform) manifest the image was built from.
    pub manifest_digest: String,
    /// The layer blob digests, bottom first.
    pub layers: Vec<String>,
}

impl ImageRecord {
    /// The hex part of the id: the name of the image directory.
    pub fn id_hex(&self) -> &str {
        self.id.strip_prefix("sha256:").unwrap_or(&self.id)
    }

    /// The config blob and the layer blobs.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.layers.iter().map(String::as_str))
    }

    /// Reads `dir/image.json`.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(RECORD_FILE);
        let data = std::fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&data).map_err(|e| ImageError::Record {
            what: path.display().to_string(),
            source: Arc::new(e),
        })
    }

    /// Writes `dir/image.json`: temporary file, fsync, rename, fsync of `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(RECORD_FILE);
        let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
        let data = serde_json::to_vec_pretty(self).map_err(|e| ImageError::Record {
            what: format!("encode {}", self.id),
            source: Arc::new(e),
        })?;
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()
        })();
        written.map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename into", &path))?;
        fsync_dir(dir)
    }
}

/// Splits an image's `User` the way CRI's `ImageStatus` reports it: a numeric user
/// (`1000` or `1000:1000`) is a uid, anything else (`app`, `app:staff`) a user name.
pub fn uid_and_username(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or_default();
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

/// The parts of an OCI (or Docker) image config file we use.
#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parses the image config blob `digest`: the container defaults and the layers'
/// uncompressed digests (`rootfs.diff_ids`, bottom first).
pub fn parse_config(digest: &str, data: &[u8]) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let file: ConfigFile = serde_json::from_slice(data).map_err(|e| ImageError::BadConfig {
        digest: digest.to_string(),
        message: e.to_string(),
    })?;
    let c = file.config.unwrap_or_default();
    let config = ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.unwrap_or_default(),
        user: c.user.unwrap_or_default(),
        labels: c.labels.unwrap_or_default(),
        stop_signal: c.stop_signal.unwrap_or_default(),
    };
    let diff_ids = file.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    Ok((config, diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_split_for_cri() {
        assert_eq!(uid_and_username(""), (None, String::new()));
        assert_eq!(uid_and_username("0"), (Some(0), String::new()));
        assert_eq!(uid_and_username("1000:1000"), (Some(1000), String::new()));
        assert_eq!(uid_and_username("app"), (None, "app".to_string()));
        assert_eq!(uid_and_username("app:staff"), (None, "app".to_string()));
        assert_eq!(uid_and_username(":staff"), (None, String::new()));
    }

    #[test]
    fn docker_config_with_nulls() {
        let json = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": null, "Cmd": ["sh"], "Env": ["PATH=/bin"],
                       "WorkingDir": "/srv", "User": "1000", "Labels": {"a": "b"},
                       "StopSignal": "SIGQUIT", "ExposedPorts": {"80/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]}
        }"#;
        let (config, diff_ids) = parse_config("sha256:cc", json).expect("parse");
        assert!(config.entrypoint.is_empty());
        assert_eq!(config.cmd, ["sh"]);
        assert_eq!(config.env, ["PATH=/bin"]);
        assert_eq!(config.working_dir, "/srv");
        assert_eq!(config.user, "1000");
        assert_eq!(config.labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(config.stop_signal, "SIGQUIT");
        assert_eq!(diff_ids, ["sha256:aa", "sha256:bb"]);

        let (config, diff_ids) = parse_config("sha256:cc", b"{}").expect("empty config");
        assert_eq!(config, ImageConfig::default());
        assert!(diff_ids.is_empty());

        let err = parse_config("sha256:cc", b"[1]").expect_err("not an object");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = ImageRecord {
            id: format!("sha256:{}", "ab".repeat(32)),
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            repo_digests: vec![],
            size: 42,
            config: ImageConfig::default(),
            uid: Some(0),
            username: String::new(),
            manifest_digest: format!("sha256:{}", "cd".repeat(32)),
            layers: vec![format!("sha256:{}", "ef".repeat(32))],
        };
        record.save(dir.path()).expect("save");
        assert_eq!(ImageRecord::load(dir.path()).expect("load"), record);
        assert_eq!(record.id_hex(), "ab".repeat(32));
        assert_eq!(record.blobs().count(), 2);
    }
}
