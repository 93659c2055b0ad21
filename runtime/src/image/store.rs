//! The image store: records loaded from `images/`, lookups by name, id or digest, usage
//! counts that keep images in use from being removed, and the space the store takes.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use podvisor_common::error_chain;
use tracing::{info, warn};

use super::RegistryConfig;
use super::blobs::{BlobStore, fsync_dir};
use super::endpoints::Endpoints;
use super::error::{ImageError, io_err};
use super::flight::SingleFlight;
use super::limits::ImageLimits;
use super::record::{ImageRecord, ROOTFS_FILE};
use super::reference::{ImageName, image_id, is_sha256_hex};

/// Shortest hex prefix accepted as an image id (`crictl images` shows 13).
const MIN_ID_PREFIX: usize = 8;

/// The image store. Cheap to clone: clones share one store.
#[derive(Clone)]
pub struct ImageStore {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    pub(super) root: PathBuf,
    pub(super) images_dir: PathBuf,
    pub(super) tmp_dir: PathBuf,
    pub(super) blobs: BlobStore,
    pub(super) endpoints: Endpoints,
    pub(super) limits: ImageLimits,
    state: Mutex<State>,
    /// Pulls in flight, by normalised reference.
    pub(super) pulls: SingleFlight<ImageRecord>,
    /// Images being built, by id (two references may resolve to one image).
    pub(super) builds: SingleFlight<ImageRecord>,
}

#[derive(Default)]
struct State {
    images: HashMap<String, ImageRecord>,
    /// Users per image id (containers running the image).
    users: HashMap<String, u64>,
    /// Blobs a pull in progress relies on, with their number of pulls: never collected.
    pinned: HashMap<String, u64>,
}

/// Space used by the store's file system tree (CRI `ImageFsInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    /// The store's root directory.
    pub mountpoint: PathBuf,
    /// Bytes allocated to files under the root.
    pub used_bytes: u64,
    /// Inodes under the root, the root included.
    pub inodes_used: u64,
}

/// An image in use: it cannot be removed while a lease on it exists. Dropping the lease
/// ends the use.
#[derive(Debug)]
pub struct ImageLease {
    store: ImageStore,
    record: ImageRecord,
}

impl ImageLease {
    /// The image.
    pub fn record(&self) -> &ImageRecord {
        &self.record
    }

    /// Its read-only root file system.
    pub fn rootfs(&self) -> PathBuf {
        self.store.rootfs(&self.record)
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let mut state = self.store.lock();
        if let Some(n) = state.users.get_mut(&self.record.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.users.remove(&self.record.id);
            }
        }
    }
}

/// Blobs pinned for the duration of a pull.
pub(super) struct BlobPins {
    store: ImageStore,
    digests: Vec<String>,
}

impl BlobPins {
    /// Ends the pins and removes the pinned blobs that no image uses and no other pull
    /// has pinned: what a failed pull fetched does not stay on disk.
    pub(super) fn release_unused(mut self) {
        // Taken: the drop that follows has nothing left to unpin.
        let digests = std::mem::take(&mut self.digests);
        let mut state = self.store.lock();
        unpin(&mut state, &digests);
        for digest in &digests {
            let used = state
                .images
                .values()
                .any(|r| r.blobs().any(|b| b == digest));
            if used || state.pinned.contains_key(digest) {
                continue;
            }
            match self.store.inner.blobs.remove(digest) {
                Ok(()) => info!(blob = %digest, "removed blob of a failed pull"),
                Err(e) => warn!(blob = %digest, error = %error_chain(&e), "cannot remove blob"),
            }
        }
    }
}

fn unpin(state: &mut State, digests: &[String]) {
    for d in digests {
        if let Some(n) = state.pinned.get_mut(d) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.pinned.remove(d);
            }
        }
    }
}

impl Drop for BlobPins {
    fn drop(&mut self) {
        unpin(&mut self.store.lock(), &self.digests);
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store under `root` and loads its images, with the
    /// default [`ImageLimits`]. Leftovers of interrupted work (`tmp/`) and blobs no image
    /// uses are removed.
    pub fn open(root: &Path, registries: RegistryConfig) -> Result<Self, ImageError> {
        Self::open_with_limits(root, registries, ImageLimits::default())
    }

    /// [`ImageStore::open`] with the caps `limits` on every image pulled; a cap of 0 is
    /// refused.
    pub fn open_with_limits(
        root: &Path,
        registries: RegistryConfig,
        limits: ImageLimits,
    ) -> Result<Self, ImageError> {
        if let Some(zero) = limits.first_zero() {
            return Err(ImageError::InvalidConfig(format!("{zero} is 0")));
        }
        let endpoints = Endpoints::new(&registries)?;
        let images_dir = root.join("images");
        let tmp_dir = root.join("tmp");
        let blobs_dir = root.join("blobs");
        // 0700: unpacked trees (device nodes, setuid files, xattrs of hostile images) and
        // the image files are podvisord's alone; no other host user reaches into them.
        for d in [root, &images_dir, &tmp_dir, &blobs_dir] {
            std::fs::create_dir_all(d).map_err(io_err("create", d))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod 0700", d))?;
        }
        empty_dir(&tmp_dir)?;
        let blobs = BlobStore::new(root, &tmp_dir)?;
        let images = load_records(&images_dir)?;

        let used: HashSet<&str> = images.values().flat_map(|r| r.blobs()).collect();
        for digest in blobs.list()? {
            if !used.contains(digest.as_str()) {
                info!(blob = %digest, "removing blob no image uses");
                blobs.remove(&digest)?;
            }
        }
        info!(root = %root.display(), images = images.len(), "image store open");
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                images_dir,
                tmp_dir,
                blobs,
                endpoints,
                limits,
                state: Mutex::new(State {
                    images,
                    ..State::default()
                }),
                pulls: SingleFlight::default(),
                builds: SingleFlight::default(),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The caps on every image pulled.
    pub fn limits(&self) -> &ImageLimits {
        &self.inner.limits
    }

    /// Every image, sorted by id.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut all: Vec<ImageRecord> = self.lock().images.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The image `name` refers to: an id (`sha256:<hex>`, `<hex>` or a unique hex prefix
    /// of at least 8 digits), a repo tag or a repo digest, normalised (`busybox` finds
    /// `docker.io/library/busybox:latest`).
    pub fn status(&self, name: &str) -> Result<ImageRecord, ImageError> {
        let state = self.lock();
        find(&state.images, name)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(name.to_string()))
    }

    /// The root file system of `record`.
    pub fn rootfs(&self, record: &ImageRecord) -> PathBuf {
        self.inner
            .images_dir
            .join(record.id_hex())
            .join(ROOTFS_FILE)
    }

    /// Marks the image `name` (as for [`ImageStore::status`]) in use until the lease is
    /// dropped.
    pub fn acquire(&self, name: &str) -> Result<ImageLease, ImageError> {
        let mut state = self.lock();
        let record = find(&state.images, name)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(name.to_string()))?;
        *state.users.entry(record.id.clone()).or_default() += 1;
        drop(state);
        Ok(ImageLease {
            store: self.clone(),
            record,
        })
    }

    /// How many leases the image `id` has.
    pub fn users(&self, id: &str) -> u64 {
        self.lock().users.get(id).copied().unwrap_or(0)
    }

    /// Removes the image `name` (as for [`ImageStore::status`]) with all its tags, its
    /// ext4 image and the blobs no other image uses. Refused while the image is in use.
    /// Returns the removed record.
    pub fn remove(&self, name: &str) -> Result<ImageRecord, ImageError> {
        let mut state = self.lock();
        let record = find(&state.images, name)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(name.to_string()))?;
        if let Some(&users) = state.users.get(&record.id)
            && users > 0
        {
            return Err(ImageError::InUse {
                id: record.id,
                users,
            });
        }
        // Out of images/ first: a crash while deleting must not leave half an image there.
        let dir = self.inner.images_dir.join(record.id_hex());
        let trash = self.temp_path(&format!("removed-{}", record.id_hex()));
        std::fs::rename(&dir, &trash).map_err(io_err("move away", &dir))?;
        state.images.remove(&record.id);
        for digest in record.blobs() {
            let shared = state
                .images
                .values()
                .any(|r| r.blobs().any(|b| b == digest));
            if !shared
                && !state.pinned.contains_key(digest)
                && let Err(e) = self.inner.blobs.remove(digest)
            {
                warn!(blob = digest, error = %error_chain(&e), "cannot remove blob");
            }
        }
        drop(state);
        if let Err(e) = std::fs::remove_dir_all(&trash) {
            warn!(path = %trash.display(), error = %e, "cannot delete removed image");
        }
        fsync_dir(&self.inner.images_dir)?;
        info!(image = %record.id, tags = ?record.repo_tags, "image removed");
        Ok(record)
    }

    /// Bytes and inodes used under the store's root. Walks the tree: call from a
    /// blocking context.
    pub fn fs_info(&self) -> Result<FsUsage, ImageError> {
        let mut used_bytes = 0;
        let mut inodes_used = 0;
        let mut seen = HashSet::new();
        let mut stack = vec![self.inner.root.clone()];
        while let Some(path) = stack.pop() {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Temporary files come and go while pulls run.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::io("stat", &path, e)),
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            used_bytes += meta.blocks() * 512;
            inodes_used += 1;
            if meta.is_dir() {
                let entries = match std::fs::read_dir(&path) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(ImageError::io("read", &path, e)),
                };
                for entry in entries.flatten() {
                    stack.push(entry.path());
                }
            }
        }
        Ok(FsUsage {
            mountpoint: self.inner.root.clone(),
            used_bytes,
            inodes_used,
        })
    }

    // ---- for pull.rs ----

    /// The image `id`, if stored.
    pub(super) fn get(&self, id: &str) -> Option<ImageRecord> {
        self.lock().images.get(id).cloned()
    }

    /// Keeps `digests` from being collected by a concurrent removal until dropped.
    pub(super) fn pin<'a>(&self, digests: impl IntoIterator<Item = &'a str>) -> BlobPins {
        let digests: Vec<String> = digests.into_iter().map(str::to_string).collect();
        let mut state = self.lock();
        for d in &digests {
            *state.pinned.entry(d.clone()).or_default() += 1;
        }
        drop(state);
        BlobPins {
            store: self.clone(),
            digests,
        }
    }

    /// Adds a newly built image (already on disk).
    pub(super) fn insert(&self, record: ImageRecord) {
        self.lock().images.insert(record.id.clone(), record);
    }

    /// Points `repo_tag` at the image `id` (taking it from any other image) and adds
    /// `repo_digest` to it; saves the records that changed.
    pub(super) fn add_names(
        &self,
        id: &str,
        repo_tag: Option<&str>,
        repo_digest: &str,
    ) -> Result<ImageRecord, ImageError> {
        let mut state = self.lock();
        if !state.images.contains_key(id) {
            return Err(ImageError::NotFound(id.to_string()));
        }
        let mut changed = Vec::new();
        for r in state.images.values_mut() {
            let before = (r.repo_tags.len(), r.repo_digests.len());
            if r.id == id {
                if let Some(tag) = repo_tag
                    && !r.repo_tags.iter().any(|t| t == tag)
                {
                    r.repo_tags.push(tag.to_string());
                }
                if !r.repo_digests.iter().any(|d| d == repo_digest) {
                    r.repo_digests.push(repo_digest.to_string());
                }
            } else {
                if let Some(tag) = repo_tag {
                    r.repo_tags.retain(|t| t != tag);
                }
                r.repo_digests.retain(|d| d != repo_digest);
            }
            if before != (r.repo_tags.len(), r.repo_digests.len()) {
                changed.push(r.clone());
            }
        }
        for r in &changed {
            r.save(&self.inner.images_dir.join(r.id_hex()))?;
            if r.id != id {
                info!(image = %r.id, tags = ?r.repo_tags, "tag moved to {id}");
            }
        }
        state
            .images
            .get(id)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(id.to_string()))
    }

    /// A fresh path under `tmp/`.
    pub(super) fn temp_path(&self, what: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.inner
            .tmp_dir
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        podvisor_common::lock(&self.inner.state)
    }
}

/// Looks `name` up as an id, a repo tag or digest, then a unique id prefix.
fn find<'a>(images: &'a HashMap<String, ImageRecord>, name: &str) -> Option<&'a ImageRecord> {
    if let Some(id) = image_id(name) {
        return images.get(&id);
    }
    if let Ok(parsed) = ImageName::parse(name) {
        let found = match (parsed.repo_tag(), parsed.digest()) {
            (_, Some(digest)) => {
                let wanted = parsed.repo_digest(digest);
                images.values().find(|r| r.repo_digests.contains(&wanted))
            }
            (Some(tag), None) => images.values().find(|r| r.repo_tags.contains(&tag)),
            (None, None) => None,
        };
        if found.is_some() {
            return found;
        }
    }
    let prefix = name.strip_prefix("sha256:").unwrap_or(name);
    let is_hex = prefix
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if prefix.len() < MIN_ID_PREFIX || !is_hex {
        return None;
    }
    let mut matches = images.values().filter(|r| r.id_hex().starts_with(prefix));
    match (matches.next(), matches.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// Loads every complete image directory under `images_dir`.
fn load_records(images_dir: &Path) -> Result<HashMap<String, ImageRecord>, ImageError> {
    let mut images = HashMap::new();
    for entry in std::fs::read_dir(images_dir).map_err(io_err("read", images_dir))? {
        let entry = entry.map_err(io_err("read", images_dir))?;
        let dir = entry.path();
        let name = entry.file_name();
        let Some(hex) = name.to_str().filter(|n| is_sha256_hex(n)) else {
            warn!(path = %dir.display(), "ignoring unexpected entry in images/");
            continue;
        };
        let record = match ImageRecord::load(&dir) {
            Ok(r) if r.id_hex() == hex => r,
            Ok(r) => {
                warn!(path = %dir.display(), id = %r.id, "ignoring image record under another id");
                continue;
            }
            Err(e) => {
                warn!(path = %dir.display(), error = %error_chain(&e), "ignoring unreadable image record");
                continue;
            }
        };
        if !dir.join(ROOTFS_FILE).is_file() {
            warn!(path = %dir.display(), "ignoring image without {ROOTFS_FILE}");
            continue;
        }
        images.insert(record.id.clone(), record);
    }
    Ok(images)
}

/// Removes everything inside `dir`.
fn empty_dir(dir: &Path) -> Result<(), ImageError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("read", dir))? {
        let path = entry.map_err(io_err("read", dir))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(io_err("remove leftover", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageConfig;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    /// Writes an image directory the way a pull leaves it (with a fake rootfs).
    fn plant(root: &Path, id_char: char, tags: &[&str], blobs: &BlobStore) -> ImageRecord {
        let layer = format!("layer {id_char}");
        let layer_digest = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(layer.as_bytes()))
        );
        blobs
            .write_bytes(&layer_digest, layer.as_bytes())
            .expect("layer blob");
        let record = ImageRecord {
            id: format!("sha256:{}", hex(id_char)),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![],
            size: 1,
            config: ImageConfig::default(),
            uid: None,
            username: String::new(),
            manifest_digest: format!("sha256:{}", hex('f')),
            layers: vec![layer_digest],
        };
        let dir = root.join("images").join(record.id_hex());
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(ROOTFS_FILE), b"ext4").expect("rootfs");
        record.save(&dir).expect("save");
        record
    }

    #[test]
    fn lookups_leases_removal_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        {
            let tmp = root.join("tmp");
            std::fs::create_dir_all(&tmp).expect("tmp");
            let blobs = BlobStore::new(root, &tmp).expect("blobs");
            plant(root, 'a', &["docker.io/library/busybox:latest"], &blobs);
            plant(root, 'b', &["registry.k8s.io/pause:3.9"], &blobs);
            // Leftovers of a crash: a half-built image and a stray blob.
            std::fs::create_dir_all(tmp.join("build-x/rootfs")).expect("leftover");
            std::fs::write(root.join("blobs/sha256").join(hex('9')), b"x").expect("stray");
        }
        let store = ImageStore::open(root, RegistryConfig::default()).expect("open");
        assert_eq!(store.list().len(), 2);
        assert_eq!(std::fs::read_dir(root.join("tmp")).expect("tmp").count(), 0);
        // Existing directories too: no other host user reaches the trees and images.
        for d in ["", "images", "tmp", "blobs"] {
            let mode = std::fs::metadata(root.join(d)).expect("stat").mode() & 0o7777;
            assert_eq!(mode, 0o700, "{d:?}");
        }
        assert!(!root.join("blobs/sha256").join(hex('9')).exists());

        let a = store.status("busybox").expect("by short name");
        assert_eq!(a.id, format!("sha256:{}", hex('a')));
        assert_eq!(store.status(&a.id).expect("by id"), a);
        assert_eq!(store.status(&hex('a')).expect("by hex id"), a);
        assert_eq!(store.status(&hex('a')[..12]).expect("by prefix"), a);
        assert!(matches!(
            store.status("busybox:other"),
            Err(ImageError::NotFound(_))
        ));
        assert!(matches!(store.status("aaaa"), Err(ImageError::NotFound(_))));

        let lease = store.acquire("registry.k8s.io/pause:3.9").expect("acquire");
        assert_eq!(store.users(&lease.record().id), 1);
        assert!(
            lease
                .rootfs()
                .ends_with(format!("{}/{ROOTFS_FILE}", hex('b')))
        );
        let err = store
            .remove("registry.k8s.io/pause:3.9")
            .expect_err("in use");
        assert!(matches!(err, ImageError::InUse { users: 1, .. }), "{err}");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        drop(lease);
        assert_eq!(store.users(&format!("sha256:{}", hex('b'))), 0);
        let removed = store.remove("registry.k8s.io/pause:3.9").expect("remove");
        assert!(!root.join("images").join(hex('b')).exists());
        assert!(!store.inner.blobs.contains(&removed.layers[0]));
        assert!(store.inner.blobs.contains(&a.layers[0]));
        assert!(matches!(
            store.remove(&removed.id),
            Err(ImageError::NotFound(_))
        ));

        // Tags move between images and survive a reopen.
        plant(root, 'c', &[], &store.inner.blobs);
        let store = ImageStore::open(root, RegistryConfig::default()).expect("reopen");
        let c_id = format!("sha256:{}", hex('c'));
        let c = store
            .add_names(
                &c_id,
                Some("docker.io/library/busybox:latest"),
                "docker.io/library/busybox@sha256:1",
            )
            .expect("tag");
        assert_eq!(c.repo_tags, ["docker.io/library/busybox:latest"]);
        let store = ImageStore::open(root, RegistryConfig::default()).expect("reopen");
        assert_eq!(store.status("busybox").expect("moved").id, c_id);
        assert!(store.status(&a.id).expect("a").repo_tags.is_empty());

        let usage = store.fs_info().expect("fs info");
        assert_eq!(usage.mountpoint, root);
        assert!(usage.inodes_used >= 8, "{usage:?}");
        assert!(usage.used_bytes > 0);
    }

    #[test]
    fn a_cap_of_zero_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = ImageLimits {
            max_inodes: 0,
            ..ImageLimits::default()
        };
        let err = ImageStore::open_with_limits(dir.path(), RegistryConfig::default(), limits)
            .expect_err("zero cap");
        assert!(err.to_string().contains("images.max_inodes"), "{err}");
        let store = ImageStore::open(dir.path(), RegistryConfig::default()).expect("open");
        assert_eq!(store.limits(), &ImageLimits::default());
    }
}
