//! Images reach a VM through [`IMAGE_SLOTS`] spare read-only drives (`img0`..`img3`) the VM
//! boots with, backed by one shared placeholder file; CreateContainer hot-swaps an image's
//! ext4 file into a slot. Containers of one image in one sandbox share its slot. Here: the
//! slots' names, the placeholder, the choice of a slot and the drive swap.

use std::path::{Path, PathBuf};
use std::time::Instant;

use podvisor_common::IoError;

use super::error::PodError;
use super::vm;
use crate::vmm::{DriveSpec, VmmHandle};

/// Spare image drives every pod VM boots with.
pub const IMAGE_SLOTS: usize = 4;
/// The placeholder behind unused image slots, under the root directory.
pub const PLACEHOLDER_FILE: &str = "placeholder.img";
/// The placeholder's size: one block of zeros.
pub const PLACEHOLDER_BYTES: u64 = 4096;

pub(super) fn slot_name(slot: usize) -> String {
    format!("img{slot}")
}

pub(super) fn slot_index(name: &str) -> Option<usize> {
    name.strip_prefix("img")?
        .parse()
        .ok()
        .filter(|i| *i < IMAGE_SLOTS)
}

/// Creates `<root_dir>/placeholder.img` (4096 zeros) unless a file of that size is there.
pub(super) fn ensure_placeholder(root_dir: &Path) -> Result<PathBuf, PodError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root_dir.join(PLACEHOLDER_FILE);
    std::fs::create_dir_all(root_dir).map_err(IoError::at("create directory", root_dir))?;
    match path.symlink_metadata() {
        Ok(m) if m.is_file() && m.len() == PLACEHOLDER_BYTES => return Ok(path),
        Ok(_) => {
            std::fs::remove_file(&path).map_err(IoError::at("remove bad placeholder", &path))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IoError::new("inspect", &path, e).into()),
    }
    let tmp = root_dir.join(format!(".{PLACEHOLDER_FILE}.{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(IoError::at("create", &tmp))?;
    f.set_len(PLACEHOLDER_BYTES)
        .and_then(|()| f.sync_all())
        .map_err(IoError::at("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(IoError::at("rename", &tmp))?;
    Ok(path)
}

/// A slot for `image_id` in the sandbox: the one a container of the image uses (`users`
/// holds the image each slot's containers use), else a free one (preferring one still
/// backed by the image, as `backing` says).
pub(super) fn choose_slot(
    sandbox_id: &str,
    users: &[Option<String>; IMAGE_SLOTS],
    backing: &[Option<String>; IMAGE_SLOTS],
    image_id: &str,
) -> Result<usize, PodError> {
    if let Some(slot) = users.iter().position(|u| u.as_deref() == Some(image_id)) {
        return Ok(slot);
    }
    let free = |slot: &usize| users[*slot].is_none();
    (0..IMAGE_SLOTS)
        .filter(free)
        .find(|s| backing[*s].as_deref() == Some(image_id))
        .or_else(|| (0..IMAGE_SLOTS).find(free))
        .ok_or_else(|| {
            PodError::ResourceExhausted(format!(
                "pod sandbox {sandbox_id} already runs {IMAGE_SLOTS} different images, the \
                 most a podvisor pod can hold"
            ))
        })
}

/// A pod VM's image slots, each on `placeholder` until an image is swapped in.
pub(super) fn slot_drives(placeholder: &Path) -> Vec<DriveSpec> {
    (0..IMAGE_SLOTS)
        .map(|slot| DriveSpec {
            id: slot_name(slot),
            path: placeholder.to_path_buf(),
            read_only: true,
        })
        .collect()
}

/// Swaps image `image_id` (its ext4 file `rootfs`) into `slot` of the VM behind `handle`,
/// unless `backing` says it is there already; `backing` then says so.
pub(super) async fn swap_in(
    sandbox_id: &str,
    handle: &VmmHandle,
    backing: &mut [Option<String>; IMAGE_SLOTS],
    slot: usize,
    image_id: &str,
    rootfs: &Path,
) -> Result<(), PodError> {
    if backing[slot].as_deref() == Some(image_id) {
        return Ok(());
    }
    let serial = slot_name(slot);
    backing[slot] = None;
    let handle = handle.clone();
    let (s, path) = (serial.clone(), rootfs.to_path_buf());
    let t = Instant::now();
    vm::blocking(sandbox_id, "swap", move || {
        handle.swap_drive(&s, &path, true)
    })
    .await?;
    backing[slot] = Some(image_id.to_string());
    tracing::info!(sandbox = %sandbox_id, slot = %serial, image = %image_id, ms = t.elapsed().as_millis(), "image drive swapped in");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_named_img0_to_img3() {
        assert_eq!(slot_name(3), "img3");
        assert_eq!(slot_index("img2"), Some(2));
        assert_eq!(slot_index("img4"), None);
        assert_eq!(slot_index("root"), None);
    }

    #[test]
    fn placeholder_is_created_once_and_repaired() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let p = ensure_placeholder(&root).unwrap();
        assert_eq!(p, root.join(PLACEHOLDER_FILE));
        let meta = p.metadata().unwrap();
        assert_eq!(meta.len(), PLACEHOLDER_BYTES);
        assert!(std::fs::read(&p).unwrap().iter().all(|b| *b == 0));
        let ino = meta.ino();
        assert_eq!(ensure_placeholder(&root).unwrap(), p);
        assert_eq!(p.metadata().unwrap().ino(), ino, "kept, not rewritten");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        ensure_placeholder(&root).unwrap();
        let meta = p.symlink_metadata().unwrap();
        assert!(meta.is_file() && meta.len() == PLACEHOLDER_BYTES);
    }

    #[test]
    fn a_slot_is_shared_by_an_image_and_reused_when_free() {
        let id = |s: &str| Some(s.to_string());
        let users = [id("a"), None, id("b"), None];
        let backing = [id("a"), id("x"), id("b"), id("c")];
        assert_eq!(choose_slot("s", &users, &backing, "b").unwrap(), 2);
        assert_eq!(choose_slot("s", &users, &backing, "c").unwrap(), 3);
        assert_eq!(choose_slot("s", &users, &backing, "d").unwrap(), 1);
        let full = [id("a"), id("b"), id("c"), id("d")];
        assert!(matches!(
            choose_slot("s", &full, &backing, "e"),
            Err(PodError::ResourceExhausted(_))
        ));
    }
}
