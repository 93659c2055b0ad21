//! Images: pulling from registries, a content-addressed blob store, and one read-only ext4
//! root file system per image, shared by every sandbox that runs the image.
//!
//! On disk, under the store's root directory:
//!
//! ```text
//! blobs/sha256/<hex>             config and layer blobs, named by their verified digest
//! images/<id hex>/image.json     the image record (ImageRecord)
//! images/<id hex>/rootfs.ext4    all layers unpacked in order, made once per image id
//! tmp/                           downloads, staging trees and images being built;
//!                                emptied when the store is opened
//! ```
//!
//! An image directory appears by rename only when both files are complete, so whatever
//! is under `images/` after a crash is usable.
//!
//! One module, one job:
//! - [`reference`](mod@reference): parsing and normalising image references.
//! - [`endpoints`]: which hosts to fetch a reference from (mirrors, plain HTTP).
//! - [`error`]: the error type, with its gRPC code.
//! - [`blobs`]: the content-addressed blob store.
//! - [`limits`]: the caps on what one image may take from the host.
//! - [`record`]: the image record and what it takes from the OCI image config.
//! - `flight`: running concurrent identical requests once.
//! - `tarstream`: the metered, hashed layer stream under the tar reader; sparse holes.
//! - [`unpack`]: applying layer tarballs to a staging tree (whiteouts, path safety).
//! - [`ext4`]: sizing and making the ext4 image.
//! - `remote`: fetching manifests and blobs from a registry, every read capped.
//! - [`store`]: the image store: records, usage counts, listing and removal.
//! - [`pull`]: pulling an image into the store, checked against [`ImageLimits`].

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub mod blobs;
pub mod endpoints;
pub mod error;
pub mod ext4;
mod flight;
pub mod limits;
pub mod pull;
pub mod record;
pub mod reference;
mod remote;
pub mod store;
mod tarstream;
pub mod unpack;

pub use error::ImageError;
pub use limits::{ImageLimits, Limit};
pub use record::{ImageConfig, ImageRecord};
pub use reference::ImageName;
pub use store::{FsUsage, ImageLease, ImageStore};

/// Registry settings: which registries speak plain HTTP and which mirrors to try first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`, as written in image references) reached over
    /// plain HTTP instead of HTTPS.
    pub insecure: Vec<String>,
    /// Mirrors per registry, tried in order before the registry itself, e.g.
    /// `"registry.k8s.io" = ["http://127.0.0.1:5000"]`. A mirror serves the same
    /// repository paths as the registry. Without a scheme, a mirror uses HTTPS unless it
    /// is listed in `insecure`.
    pub mirrors: HashMap<String, Vec<String>>,
}
