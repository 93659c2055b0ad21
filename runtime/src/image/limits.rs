//! Caps on what one image may take from the host: a registry and its images are not
//! trusted, so every read of theirs stops at a cap, whatever they declare or send.
//!
//! | cap | default | checked |
//! | --- | --- | --- |
//! | `max_manifest_bytes` | 4 MiB | manifests and indexes, while they are read |
//! | `max_config_bytes` | 4 MiB | the config's declared size, before it is fetched |
//! | `max_layers` | 128 | the manifest, before anything is fetched |
//! | `max_download_bytes` | 16 GiB | the declared sizes of config and layers, summed |
//! | `max_unpacked_bytes` | 16 GiB | every byte the layers decompress to, and sparse holes |
//! | `max_inodes` | 1,000,000 | tar entries across all layers |
//!
//! Why these defaults:
//! - 4 MiB for a manifest or config is distribution's own ceiling for manifests and
//!   hundreds of times what real ones take (a few KiB; a config with a long history,
//!   tens of KiB), while keeping what is held in memory at once small.
//! - 128 layers: Docker refuses images deeper than 125 (overlayfs' stacking limit), so no
//!   image built by the usual tools has more.
//! - 16 GiB unpacked holds the big ordinary images (CUDA and ML framework images take
//!   8 to 15 GiB) and bounds what one pull can put on the host's disk: the staging tree
//!   and the ext4 image are each at most about that big while an image is made.
//! - 16 GiB downloaded, as much as unpacked: compressed layers are never meaningfully
//!   bigger than their content (incompressible content stays about as big).
//! - 1,000,000 inodes: the largest distribution and SDK images have a few hundred
//!   thousand files; each inode costs 256 bytes of inode table in the image and one inode
//!   of the host's file system while staging.
//!
//! How unpacking is counted, for one image, over all its layers:
//! - Bytes: every byte of the decompressed layer streams (headers, file data, data of
//!   entries that are skipped, anything after the tar end), plus the holes of sparse
//!   files at their apparent size. So a sparse file counts as big as it looks, because
//!   the ext4 image is sized from apparent sizes and a container reading it sees that
//!   many bytes, while its holes take no disk in the staging tree.
//! - Inodes: every tar entry, whiteouts included, as it is applied.
//! - Both add up as the layers are applied: a file a later layer replaces or deletes
//!   still counted, as did the work and the disk it took. This bounds the work of a pull,
//!   not only what the image holds in the end.
//!
//! Besides these, fixed caps that no image needs to reach: the tar headers of one entry
//! (with its PAX records, GNU long names and sparse maps) are read into memory and may
//! take at most [`MAX_ENTRY_METADATA_BYTES`]; a registry's error answer is read up to
//! 64 KiB for its message.

/// The tar headers read for one entry (header blocks, PAX records, GNU long names and
/// sparse maps), which the tar reader holds in memory: 1 MiB.
pub const MAX_ENTRY_METADATA_BYTES: u64 = 1 << 20;

/// Caps on one image: see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Bytes of one manifest or index.
    pub max_manifest_bytes: u64,
    /// Bytes of the image config.
    pub max_config_bytes: u64,
    /// Layers of one image.
    pub max_layers: u64,
    /// Compressed bytes of config and layers, as their descriptors declare them.
    pub max_download_bytes: u64,
    /// Bytes the layers unpack to (holes of sparse files at their apparent size).
    pub max_unpacked_bytes: u64,
    /// Tar entries over all layers.
    pub max_inodes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_manifest_bytes: 4 << 20,
            max_config_bytes: 4 << 20,
            max_layers: 128,
            max_download_bytes: 16 << 30,
            max_unpacked_bytes: 16 << 30,
            max_inodes: 1_000_000,
        }
    }
}

impl ImageLimits {
    /// The value of `limit`.
    pub fn get(&self, limit: Limit) -> u64 {
        match limit {
            Limit::ManifestBytes => self.max_manifest_bytes,
            Limit::ConfigBytes => self.max_config_bytes,
            Limit::Layers => self.max_layers,
            Limit::DownloadBytes => self.max_download_bytes,
            Limit::UnpackedBytes => self.max_unpacked_bytes,
            Limit::Inodes => self.max_inodes,
            Limit::EntryMetadataBytes => MAX_ENTRY_METADATA_BYTES,
        }
    }

    /// The first cap that is zero: every cap must allow something.
    pub fn first_zero(&self) -> Option<Limit> {
        Limit::CONFIGURABLE.into_iter().find(|l| self.get(*l) == 0)
    }
}

/// One of the caps, for errors that name the one that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`ImageLimits::max_manifest_bytes`].
    ManifestBytes,
    /// [`ImageLimits::max_config_bytes`].
    ConfigBytes,
    /// [`ImageLimits::max_layers`].
    Layers,
    /// [`ImageLimits::max_download_bytes`].
    DownloadBytes,
    /// [`ImageLimits::max_unpacked_bytes`].
    UnpackedBytes,
    /// [`ImageLimits::max_inodes`].
    Inodes,
    /// [`MAX_ENTRY_METADATA_BYTES`] (fixed).
    EntryMetadataBytes,
}

impl Limit {
    /// The caps podvisord's configuration sets.
    pub const CONFIGURABLE: [Limit; 6] = [
        Limit::ManifestBytes,
        Limit::ConfigBytes,
        Limit::Layers,
        Limit::DownloadBytes,
        Limit::UnpackedBytes,
        Limit::Inodes,
    ];

    /// Its key in podvisord's `[images]` table.
    pub fn key(self) -> &'static str {
        match self {
            Limit::ManifestBytes => "max_manifest_bytes",
            Limit::ConfigBytes => "max_config_bytes",
            Limit::Layers => "max_layers",
            Limit::DownloadBytes => "max_download_bytes",
            Limit::UnpackedBytes => "max_unpacked_bytes",
            Limit::Inodes => "max_inodes",
            Limit::EntryMetadataBytes => "tar header bytes per entry (fixed)",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::EntryMetadataBytes => f.write_str(self.key()),
            other => write!(f, "images.{}", other.key()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_names() {
        let d = ImageLimits::default();
        assert_eq!(d.get(Limit::ManifestBytes), 4 * 1024 * 1024);
        assert_eq!(d.get(Limit::ConfigBytes), 4 * 1024 * 1024);
        assert_eq!(d.get(Limit::Layers), 128);
        assert_eq!(d.get(Limit::UnpackedBytes), 16 * 1024 * 1024 * 1024);
        assert_eq!(d.get(Limit::Inodes), 1_000_000);
        assert_eq!(d.first_zero(), None);
        let zero = ImageLimits { max_layers: 0, ..d };
        assert_eq!(zero.first_zero(), Some(Limit::Layers));
        assert_eq!(
            Limit::UnpackedBytes.to_string(),
            "images.max_unpacked_bytes"
        );
    }
}
