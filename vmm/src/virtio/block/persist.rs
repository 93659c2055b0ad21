//! A virtio-blk device in the device table: built from a [`DriveConfig`], recorded in a
//! snapshot as its drive id ([`BlockState`]). Queue and ring state are the transport's.

use podvisor_vmm_api::config::DriveConfig;
use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig, BlockError};

/// What a snapshot records of a drive: its id. A restore must attach a drive with the same
/// id in the same place, since the guest's filesystems are bound to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The drive id.
    pub drive_id: String,
}

impl std::fmt::Display for BlockState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "block:{}", self.drive_id)
    }
}

/// The drive `d` describes, and what a snapshot records of it.
pub fn build(d: &DriveConfig) -> Result<(Block, BlockState), BlockError> {
    let block = Block::new(BlockConfig {
        path: d.path.clone(),
        read_only: d.read_only,
        id: d.id.clone(),
    })?;
    let state = BlockState {
        drive_id: d.id.clone(),
    };
    Ok((block, state))
}
