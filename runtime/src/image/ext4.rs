//! The ext4 image of an unpacked tree: `mkfs.ext4 -d`, nothing mounted. Sized from the
//! tree (4 KiB blocks, one inode each, no journal: the image is only ever read) plus
//! headroom; retried once at twice the size if the estimate was short.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tracing::{debug, warn};

use super::error::{ImageError, io_err};
use super::unpack::{DeviceKind, DeviceNode};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
/// Symlink targets shorter than this live in the inode.
const FAST_SYMLINK_MAX: u64 = 59;
/// Fixed room for the superblock, group descriptors, bitmaps and `lost+found`.
const FIXED_HEADROOM: u64 = 16 << 20;

/// What a tree needs in ext4: data blocks and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeSize {
    /// File data, directory and long-symlink blocks, in bytes.
    pub bytes: u64,
    /// Files, directories, links and devices (hard links counted once).
    pub inodes: u64,
}

/// Measures `dir` without following symlinks.
pub fn measure(dir: &Path) -> Result<TreeSize, ImageError> {
    let mut size = TreeSize::default();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        size.inodes += 1;
        // ext4 directory entries: 8 bytes plus the name, 4-byte aligned; `.` and `..`.
        let mut dir_bytes = 24;
        for entry in std::fs::read_dir(&d).map_err(io_err("read", &d))? {
            let entry = entry.map_err(io_err("read", &d))?;
            let path = entry.path();
            dir_bytes += 8 + (entry.file_name().len() as u64).next_multiple_of(4);
            let meta = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            size.inodes += 1;
            if meta.is_file() {
                size.bytes += meta.len().next_multiple_of(BLOCK);
            } else if meta.file_type().is_symlink() && meta.len() > FAST_SYMLINK_MAX {
                size.bytes += BLOCK;
            }
        }
        size.bytes += dir_bytes.next_multiple_of(BLOCK);
    }
    Ok(size)
}

/// The image size and inode count `mkfs.ext4` is asked for, for a tree of `tree`.
pub fn plan(tree: TreeSize) -> (u64, u64) {
    let inodes = tree.inodes + tree.inodes / 4 + 256;
    // An eighth more for extent blocks, bitmaps and group descriptors.
    let bytes = tree.bytes + tree.bytes / 8 + inodes * INODE_SIZE + FIXED_HEADROOM;
    (bytes.next_multiple_of(1 << 20), inodes)
}

/// Makes the ext4 image `image` (which must not exist) of the tree `staging`, labelled
/// `label` (at most 16 bytes), root directory owned by root, with `devices` made inside the
/// image in place of their placeholders.
pub fn make(
    staging: &Path,
    image: &Path,
    label: &str,
    devices: &[DeviceNode],
) -> Result<(), ImageError> {
    let tree = measure(staging)?;
    let (bytes, inodes) = plan(tree);
    debug!(image = %image.display(), ?tree, bytes, inodes, "making ext4 image");
    match mkfs(staging, image, label, bytes, inodes) {
        Ok(()) => {}
        Err(first) => {
            warn!(image = %image.display(), error = %first, "mkfs.ext4 failed, retrying at twice the size");
            let _ = std::fs::remove_file(image);
            mkfs(staging, image, label, bytes * 2, inodes * 2)?;
        }
    }
    add_devices(image, label, devices)
}

/// Replaces each device's placeholder in `image` by the node, with debugfs: the node exists
/// only inside the image file, never on the host.
fn add_devices(image: &Path, label: &str, devices: &[DeviceNode]) -> Result<(), ImageError> {
    if devices.is_empty() {
        return Ok(());
    }
    let fail = mkfs_error(label);
    let mut script = String::new();
    for d in devices {
        // debugfs splits its commands on white space: a path it cannot take is refused.
        let path = d
            .path
            .to_str()
            .filter(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            })
            .ok_or_else(|| {
                fail(format!(
                    "device node {:?}: only printable ASCII paths without quotes",
                    d.path
                ))
            })?;
        let (node, type_bits) = match d.kind {
            DeviceKind::Char => (format!("c {} {}", d.major, d.minor), 0o020_000),
            DeviceKind::Block => (format!("b {} {}", d.major, d.minor), 0o060_000),
            DeviceKind::Fifo => ("p".to_string(), 0o010_000),
        };
        // mknod takes a name in the current directory.
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        script.push_str(&format!(
            "cd /{parent}\nrm {name}\nmknod {name} {node}\nsif {name} mode {}\nsif {name} uid {}\nsif {name} gid {}\n",
            type_bits | d.mode,
            d.uid,
            d.gid
        ));
    }
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("run debugfs (install e2fsprogs): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(format!("write debugfs commands: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait for debugfs: {e}")))?;
    // debugfs exits 0 whatever its commands did: any line but its banner is an error.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || !errors.is_empty() {
        return Err(fail(format!(
            "debugfs making {} device nodes: {}: {}",
            devices.len(),
            out.status,
            errors.join("; ")
        )));
    }
    let file = std::fs::File::open(image).map_err(io_err("open", image))?;
    file.sync_all().map_err(io_err("fsync", image))
}

/// An [`ImageError::Mkfs`] of the image labelled `label`.
fn mkfs_error(label: &str) -> impl Fn(String) -> ImageError + '_ {
    move |message| ImageError::Mkfs {
        id: label.to_string(),
        message,
    }
}

fn mkfs(
    staging: &Path,
    image: &Path,
    label: &str,
    bytes: u64,
    inodes: u64,
) -> Result<(), ImageError> {
    let fail = mkfs_error(label);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-b"])
        .arg(BLOCK.to_string())
        .arg("-I")
        .arg(INODE_SIZE.to_string())
        .args(["-m", "0", "-O", "^has_journal", "-N"])
        .arg(inodes.to_string())
        .arg("-L")
        .arg(label)
        .args(["-E", "root_owner=0:0", "-d"])
        .arg(staging)
        .arg(image)
        .arg(format!("{}k", bytes / 1024))
        .output()
        .map_err(|e| fail(format!("run mkfs.ext4 (install e2fsprogs): {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let file = std::fs::File::open(image).map_err(io_err("open", image))?;
    file.sync_all().map_err(io_err("fsync", image))
}

/// Bytes allocated to `path` on disk (ext4 images are sparse).
pub fn allocated_bytes(path: &Path) -> Result<u64, ImageError> {
    let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
    Ok(meta.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .expect("run debugfs (e2fsprogs)");
        assert!(out.status.success(), "debugfs {request}: {:?}", out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn measures_blocks_and_inodes_once_per_hard_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join("a"), vec![1u8; 5000]).expect("write");
        std::fs::hard_link(root.join("a"), root.join("b")).expect("link");
        symlink("a", root.join("short")).expect("symlink");
        symlink("x".repeat(100), root.join("long")).expect("symlink");
        std::fs::create_dir(root.join("d")).expect("mkdir");
        let size = measure(root).expect("measure");
        // root, d, a (= b), short, long
        assert_eq!(size.inodes, 5);
        // a: 2 blocks; long symlink: 1; two directories: 1 each.
        assert_eq!(size.bytes, 5 * BLOCK);
        let (bytes, inodes) = plan(size);
        assert!(bytes >= size.bytes + FIXED_HEADROOM);
        assert!(inodes > size.inodes);
    }

    #[test]
    fn makes_a_labelled_image_of_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let staging = dir.path().join("root");
        std::fs::create_dir_all(staging.join("etc")).expect("mkdir");
        std::fs::write(staging.join("etc/hostname"), "box\n").expect("write");
        let image = dir.path().join("rootfs.ext4");
        make(&staging, &image, "0123456789ab", &[]).expect("mkfs");
        assert_eq!(debugfs(&image, "cat /etc/hostname"), "box\n");
        let stats = debugfs(&image, "stats");
        assert!(
            stats.contains("Filesystem volume name:   0123456789ab"),
            "{stats}"
        );
        assert!(!stats.contains("has_journal"), "{stats}");
        assert!(allocated_bytes(&image).expect("blocks") > 0);
    }
    /// Placeholders become the nodes inside the image, with their mode and owner; the file
    /// system stays consistent; a path debugfs cannot take is refused.
    #[test]
    fn device_placeholders_become_nodes_in_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let staging = dir.path().join("root");
        std::fs::create_dir_all(staging.join("dev")).expect("mkdir");
        let node = |path: &str, kind, major, minor| DeviceNode {
            path: path.into(),
            kind,
            major,
            minor,
            mode: 0o640,
            uid: 0,
            gid: 5,
        };
        let devices = [
            node("dev/mynull", DeviceKind::Char, 1, 3),
            node("dev/disk", DeviceKind::Block, 8, 0),
            node("fifo", DeviceKind::Fifo, 0, 0),
        ];
        for d in &devices {
            std::fs::write(staging.join(&d.path), b"").expect("placeholder");
        }
        let image = dir.path().join("image.ext4");
        make(&staging, &image, "devices", &devices).expect("mkfs");
        let stat = |p: &str| {
            let out = Command::new("debugfs")
                .args(["-R", &format!("stat /{p}")])
                .arg(&image)
                .output()
                .expect("debugfs");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let null = stat("dev/mynull");
        assert!(null.contains("Type: character special"), "{null}");
        assert!(null.contains("Mode:  0640"), "{null}");
        assert!(null.contains("Group:     5"), "{null}");
        assert!(null.contains("major/minor number: 01:03"), "{null}");
        assert!(stat("dev/disk").contains("Type: block special"));
        assert!(stat("fifo").contains("Type: FIFO"));
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&image)
            .output()
            .expect("e2fsck");
        assert!(fsck.status.success(), "{fsck:?}");

        std::fs::write(staging.join("a b"), b"").expect("placeholder");
        let bad = dir.path().join("bad.ext4");
        let err = make(
            &staging,
            &bad,
            "devices",
            &[node("a b", DeviceKind::Char, 1, 3)],
        )
        .expect_err("a path with a space");
        assert!(
            err.to_string().contains("a b") || format!("{err:?}").contains("a b"),
            "{err:?}"
        );
    }
}
