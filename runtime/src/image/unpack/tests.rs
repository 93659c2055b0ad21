//! The unpacker's tests: layer semantics and path safety here, the caps in `caps`.

use super::*;

mod caps;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

/// A layer tarball written header by header: names are stored raw, so layers can hold
/// what `tar::Builder` refuses to write (`..`, absolute names).
struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for LayerTar {
    fn default() -> Self {
        LayerTar {
            builder: tar::Builder::new(Vec::new()),
        }
    }
}

impl LayerTar {
    fn entry(mut self, kind: EntryType, name: &str, link: &str, data: &[u8], mode: u32) -> Self {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        let gnu = header.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_cksum();
        self.builder.append(&header, data).expect("append");
        self
    }
    fn dir(self, name: &str) -> Self {
        self.entry(EntryType::Directory, name, "", b"", 0o755)
    }
    fn file(self, name: &str, data: &str) -> Self {
        self.entry(EntryType::Regular, name, "", data.as_bytes(), 0o644)
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Symlink, name, target, b"", 0o777)
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Link, name, target, b"", 0o644)
    }
    fn device(mut self, name: &str, kind: EntryType, major: u32, minor: u32, mode: u32) -> Self {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_path(name).expect("path");
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(5);
        header.set_mtime(1_700_000_000);
        header.set_size(0);
        header.set_device_major(major).expect("major");
        header.set_device_minor(minor).expect("minor");
        header.set_cksum();
        self.builder.append(&header, &b""[..]).expect("append");
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }
}

/// A staging root inside a scratch directory that also holds an `outside/` tree,
/// which no layer may touch.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    unpacker: Unpacker,
}

impl Scratch {
    fn new() -> Self {
        Self::with_limits(&ImageLimits::default())
    }

    fn with_limits(limits: &ImageLimits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&root).expect("mkdir root");
        fs::create_dir_all(&outside).expect("mkdir outside");
        fs::write(outside.join("victim"), "host file").expect("write victim");
        let unpacker = Unpacker::with_limits(&root, limits);
        Scratch {
            _dir: dir,
            root,
            outside,
            unpacker,
        }
    }

    fn apply(&mut self, layer: LayerTar) -> Result<u64, ImageError> {
        self.unpacker
            .apply(&layer.bytes()[..], Compression::None, "sha256:test", None)
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.root.join(rel)).is_ok()
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.join(rel)).expect(rel)
    }

    fn outside_untouched(&self) {
        assert_eq!(
            fs::read_to_string(self.outside.join("victim")).expect("victim"),
            "host file"
        );
        let names: Vec<_> = fs::read_dir(&self.outside)
            .expect("outside")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["victim"], "nothing new outside the root");
    }
}

fn assert_bad_layer(result: Result<u64, ImageError>, needle: &str) {
    match result {
        Err(ImageError::BadLayer { message, .. }) => {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}")
        }
        other => panic!("expected a bad layer ({needle}), got {other:?}"),
    }
}

#[test]
fn whiteouts_and_opaque_directories() {
    let mut s = Scratch::new();
    s.apply(
        LayerTar::default()
            .dir("a/")
            .file("a/x", "x")
            .file("a/y", "y")
            .dir("b/")
            .file("b/old", "old")
            .dir("b/sub/")
            .file("b/sub/deep", "deep")
            .dir("c/")
            .file("c/inside", "c")
            .dir("d/")
            .file("d/old", "old"),
    )
    .expect("layer 1");
    s.apply(
        LayerTar::default()
            .file("a/.wh.x", "")
            .file("a/z", "z")
            // Whiteouts apply to lower layers only: z stays.
            .file("a/.wh.z", "")
            .file(".wh.c", "")
            // Opaque marker after this layer's own entries: they stay.
            .dir("b/")
            .dir("b/sub/")
            .file("b/new", "new")
            .file("b/.wh..wh..opq", "")
            // Opaque marker first.
            .file("d/.wh..wh..opq", "")
            .file("d/fresh", "fresh")
            // Whiteout of something that never existed, in a missing directory.
            .file("nowhere/.wh.ghost", ""),
    )
    .expect("layer 2");
    assert!(!s.exists("a/x"));
    assert_eq!(s.read("a/y"), "y");
    assert_eq!(s.read("a/z"), "z");
    assert!(!s.exists("c"));
    assert_eq!(s.read("b/new"), "new");
    assert!(!s.exists("b/old"));
    assert!(s.exists("b/sub"), "rewritten by this layer");
    assert!(!s.exists("b/sub/deep"), "below an opaque directory");
    assert!(!s.exists("d/old"));
    assert_eq!(s.read("d/fresh"), "fresh");
    assert!(!s.exists("nowhere"), "a whiteout creates nothing");
    assert!(!s.exists("a/.wh.z") && !s.exists("b/.wh..wh..opq"));
}

#[test]
fn path_escapes_are_refused() {
    let mut s = Scratch::new();
    assert_bad_layer(
        s.apply(LayerTar::default().file("../outside/victim", "pwned")),
        "`..`",
    );
    assert_bad_layer(
        s.apply(LayerTar::default().file("a/../../escape", "pwned")),
        "`..`",
    );
    assert_bad_layer(s.apply(LayerTar::default().file("a/.wh...", "")), "invalid");
    // An absolute name is inside the root all the same.
    s.apply(LayerTar::default().file("/abs/file", "in root"))
        .expect("absolute name");
    assert_eq!(s.read("abs/file"), "in root");
    s.outside_untouched();
}

#[test]
fn hard_links_stay_inside_the_tree() {
    let mut s = Scratch::new();
    s.apply(LayerTar::default().file("etc/data", "data"))
        .expect("layer 1");
    let victim = s.outside.join("victim");
    let up = format!("../../{}", victim.display());
    assert_bad_layer(s.apply(LayerTar::default().hardlink("l1", &up)), "`..`");
    // An absolute target is looked up in the root, where this one does not exist.
    assert_bad_layer(
        s.apply(LayerTar::default().hardlink("l2", &victim.display().to_string())),
        "not in the tree",
    );
    assert_bad_layer(
        s.apply(LayerTar::default().hardlink("l3", "etc")),
        "directory",
    );
    s.apply(LayerTar::default().hardlink("etc/same", "/etc/data"))
        .expect("link inside");
    let a = fs::metadata(s.root.join("etc/data")).expect("data");
    let b = fs::metadata(s.root.join("etc/same")).expect("same");
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    assert!(!s.exists("l1") && !s.exists("l2") && !s.exists("l3"));
    s.outside_untouched();
}

#[test]
fn symlinks_from_layers_are_never_followed() {
    let mut s = Scratch::new();
    let outside = s.outside.display().to_string();
    let victim = s.outside.join("victim").display().to_string();
    s.apply(
        LayerTar::default()
            .symlink("evil", &outside)
            .symlink("relative", "../outside")
            .symlink("file-link", &victim),
    )
    .expect("layer 1");

    // Through a symlinked directory: refused, whatever the target.
    assert_bad_layer(
        s.apply(LayerTar::default().file("evil/pwned", "x")),
        "symbolic link",
    );
    assert_bad_layer(
        s.apply(LayerTar::default().file("relative/pwned", "x")),
        "symbolic link",
    );
    assert_bad_layer(
        s.apply(LayerTar::default().file("evil/.wh.victim", "")),
        "symbolic link",
    );
    assert_bad_layer(
        s.apply(LayerTar::default().hardlink("h", "evil/victim")),
        "symbolic link",
    );
    assert_bad_layer(
        s.apply(LayerTar::default().dir("evil/sub/")),
        "symbolic link",
    );
    // A file over a symlink replaces the link, not what it points to.
    s.apply(LayerTar::default().file("file-link", "replaced"))
        .expect("file over symlink");
    assert!(
        fs::symlink_metadata(s.root.join("file-link"))
            .expect("stat")
            .is_file()
    );
    assert_eq!(s.read("file-link"), "replaced");
    // A whiteout of a symlink removes the link only.
    s.apply(LayerTar::default().file(".wh.evil", ""))
        .expect("whiteout");
    assert!(!s.exists("evil"));
    // A directory over a symlink replaces it too.
    s.apply(LayerTar::default().dir("relative/").file("relative/f", "f"))
        .expect("dir over symlink");
    assert!(
        fs::symlink_metadata(s.root.join("relative"))
            .expect("stat")
            .is_dir()
    );
    s.outside_untouched();
}

#[test]
fn metadata_is_kept() {
    let mut s = Scratch::new();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_path("bin/su").expect("path");
    header.set_mode(0o4755);
    header.set_uid(1000);
    header.set_gid(2000);
    header.set_mtime(1_600_000_000);
    header.set_size(2);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &b"#!"[..]).expect("append");
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(EntryType::Directory);
    dir.set_path("bin/").expect("path");
    dir.set_mode(0o700);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(1_500_000_000);
    dir.set_size(0);
    dir.set_cksum();
    builder.append(&dir, &b""[..]).expect("append");
    let data = builder.into_inner().expect("tar");
    s.unpacker
        .apply(&data[..], Compression::None, "sha256:test", None)
        .expect("apply");
    let Scratch { root, unpacker, .. } = &mut s;
    std::mem::replace(unpacker, Unpacker::new(root))
        .finish()
        .expect("finish");
    let m = fs::metadata(s.root.join("bin/su")).expect("stat");
    assert_eq!(m.mode() & 0o7777, 0o4755, "setuid survives chown");
    assert_eq!((m.uid(), m.gid()), (1000, 2000));
    assert_eq!(m.mtime(), 1_600_000_000);
    let d = fs::metadata(s.root.join("bin")).expect("stat");
    assert_eq!(d.mode() & 0o7777, 0o700);
    assert_eq!(
        d.mtime(),
        1_500_000_000,
        "set after the directory's entries"
    );
}

#[test]
fn layers_without_the_tar_trailer_are_read_as_go_reads_them() {
    let data = "x".repeat(700);
    let full = LayerTar::default()
        .dir("etc")
        .file("etc/motd", &data)
        .bytes();
    // Header blocks: etc, etc/motd; then 700 bytes of data from offset 1024.
    let data_end = 2 * 512 + 700;
    for (cut, what) in [
        (data_end, "no padding"),
        (data_end + 100, "part of the padding"),
    ] {
        let layer = &full[..cut];
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(layer)));
        let mut s = Scratch::new();
        let count = s
            .unpacker
            .apply(layer, Compression::None, "sha256:l", Some(&diff_id))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(count, 2, "{what}");
        assert_eq!(s.read("etc/motd"), data, "{what}");
    }
    // Truncated entry data is still refused, also inside the last block.
    for cut in [data_end - 1, 2 * 512 + 600, 2 * 512 + 10, 512 + 100] {
        let mut s = Scratch::new();
        let e = s
            .unpacker
            .apply(&full[..cut], Compression::None, "sha256:l", None);
        assert!(
            matches!(e, Err(ImageError::BadLayer { .. })),
            "cut at {cut}: {e:?}"
        );
    }
}

#[test]
fn compressed_layers_and_diff_ids() {
    let tar = LayerTar::default().file("etc/hostname", "box\n").bytes();
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let zst = zstd::encode_all(&tar[..], 3).expect("zstd");

    for (data, compression) in [
        (&tar, Compression::None),
        (&gz, Compression::Gzip),
        (&zst, Compression::Zstd),
    ] {
        let mut s = Scratch::new();
        s.unpacker
            .apply(&data[..], compression, "sha256:l", Some(&diff_id))
            .expect("apply");
        assert_eq!(s.read("etc/hostname"), "box\n", "{compression:?}");
        let err = s
            .unpacker
            .apply(&data[..], compression, "sha256:l", Some("sha256:00"))
            .expect_err("wrong diff id");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    }
    let mut s = Scratch::new();
    let err = s
        .unpacker
        .apply(&tar[..], Compression::Gzip, "sha256:l", None)
        .expect_err("not gzip");
    assert!(matches!(err, ImageError::BadLayer { .. }), "{err}");
}

#[test]
fn layer_media_types() {
    use Compression::*;
    for (media_type, expected) in [
        ("application/vnd.oci.image.layer.v1.tar", Some(None)),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Some(Gzip),
        ),
        ("application/vnd.docker.image.rootfs.diff.tar", Some(None)),
        ("application/vnd.wasm.content.layer.v1+wasm", Option::None),
    ] {
        assert_eq!(
            Compression::for_media_type(media_type),
            expected,
            "{media_type}"
        );
    }
}
/// An image's device nodes are never made on the host: placeholders in the tree (the
/// ext4 step makes the nodes, see its tests); one a later layer replaced is a file.
#[test]
fn device_nodes_exist_only_inside_the_image() {
    let mut s = Scratch::new();
    s.apply(
        LayerTar::default()
            .dir("dev")
            .device("dev/mynull", EntryType::Char, 1, 3, 0o666)
            .device("dev/disk", EntryType::Block, 8, 0, 0o660)
            .device("dev/gone", EntryType::Char, 1, 5, 0o600)
            .device("fifo", EntryType::Fifo, 0, 0, 0o644)
            .hardlink("dev/null-link", "dev/mynull"),
    )
    .expect("layer 1");
    s.apply(LayerTar::default().file("dev/gone", "a file now"))
        .expect("layer 2");
    for p in ["dev/mynull", "dev/disk", "fifo", "dev/null-link"] {
        let m = fs::symlink_metadata(s.root.join(p)).expect(p);
        assert!(m.is_file() && m.len() == 0, "{p} on the host: {m:?}");
    }
    let devices = s.unpacker.finish().expect("finish");
    let paths: Vec<&str> = devices.iter().filter_map(|d| d.path.to_str()).collect();
    assert_eq!(paths, ["dev/disk", "dev/mynull", "dev/null-link", "fifo"]);
    assert_eq!(
        (
            devices[1].kind,
            devices[1].major,
            devices[1].minor,
            devices[1].mode,
            devices[1].gid
        ),
        (DeviceKind::Char, 1, 3, 0o666, 5)
    );
}
