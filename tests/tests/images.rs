//! The runtime's image store against a real registry (Debian's docker-registry on
//! 127.0.0.1): pulls by tag, digest, mirror and index; the ext4 image's content (read with
//! debugfs, nothing mounted); single flight; list, status, leases, removal, reopening;
//! and the errors a CRI server maps to gRPC codes; an image built by umoci, whose layers have
//! no tar end-of-archive blocks; hostile images against the store's caps (a decompression
//! bomb, an oversized config, descriptors whose sizes lie or are 0), which leave nothing
//! behind. No VM is involved.

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use podvisor_runtime::image::{
    ImageError, ImageLimits, ImageRecord, ImageStore, Limit, RegistryConfig,
};
use podvisor_tests::image::{CONTAINER_PASSWD, HOST_BUSYBOX};
use podvisor_tests::registry::{
    IMAGE_PATH, Registry, SPECIAL_CAPFILE, SPECIAL_DEVICE, SPECIAL_SETUID, busybox_config,
    busybox_layer, gzip_zero_bomb, push_busybox, push_busybox_index,
    push_busybox_with_special_files, push_layers, push_layers_with_manifest, push_oci_layout,
};

/// Runs `debugfs -R request` on an ext4 image (read-only, no mount).
fn debugfs(image: &Path, request: &str) -> anyhow::Result<String> {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .context("run debugfs (e2fsprogs)")?;
    ensure!(out.status.success(), "debugfs -R {request:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A port nothing listens on.
fn closed_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn config_for(registry: &Registry, mirrors: &[(&str, String)]) -> RegistryConfig {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (from, to) in mirrors {
        map.entry(from.to_string()).or_default().push(to.clone());
    }
    RegistryConfig {
        insecure: vec![registry.host().to_string()],
        mirrors: map,
    }
}

/// The ext4 image holds the busybox layer: files, symlinks, modes, label.
fn check_rootfs(store: &ImageStore, record: &ImageRecord) -> anyhow::Result<()> {
    let rootfs = store.rootfs(record);
    ensure!(rootfs.is_file(), "{} is missing", rootfs.display());
    let passwd = debugfs(&rootfs, "cat /etc/passwd")?;
    ensure!(
        passwd == CONTAINER_PASSWD,
        "/etc/passwd in the image: {passwd:?}"
    );

    let busybox = debugfs(&rootfs, "stat /bin/busybox")?;
    let host_size = std::fs::metadata(HOST_BUSYBOX)?.len();
    ensure!(busybox.contains("Type: regular"), "{busybox}");
    ensure!(busybox.contains("Mode:  0755"), "{busybox}");
    ensure!(busybox.contains(&format!("Size: {host_size}")), "{busybox}");
    ensure!(busybox.contains("User:     0   Group:     0"), "{busybox}");

    let sh = debugfs(&rootfs, "stat /bin/sh")?;
    ensure!(sh.contains("Type: symlink"), "{sh}");
    ensure!(sh.contains("Fast link dest: \"busybox\""), "{sh}");
    let tmp = debugfs(&rootfs, "stat /tmp")?;
    ensure!(tmp.contains("Mode:  01777"), "{tmp}");

    let stats = debugfs(&rootfs, "stats")?;
    let label = &record.id_hex()[..12];
    ensure!(
        stats.contains(&format!("Filesystem volume name:   {label}")),
        "label {label}: {stats}"
    );
    ensure!(!stats.contains("has_journal"), "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_digest_and_mirror_then_list_status_remove() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "test/busybox", "1.0").await?;
    let second = push_busybox(&registry, "test/busybox", "stable").await?;
    ensure!(
        pushed.digest == second.digest,
        "same content, same manifest"
    );

    let dir = tempfile::tempdir()?;
    // As an operator's /var/lib/podvisor may be: open to all; the store closes it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mirror = format!("http://{}", registry.host());
    let config = config_for(&registry, &[("registry.example.test", mirror)]);
    let store = ImageStore::open(dir.path(), config.clone())?;
    let host = registry.host();

    // By tag.
    let record = store.pull(&pushed.reference, None).await?;
    ensure!(record.id == pushed.config_digest, "{record:?}");
    ensure!(record.repo_tags == [pushed.reference.clone()], "{record:?}");
    let repo_digest = format!("{host}/test/busybox@{}", pushed.digest);
    ensure!(record.repo_digests == [repo_digest.clone()], "{record:?}");
    ensure!(record.layers == [pushed.layer_digest.clone()], "{record:?}");
    ensure!(record.config.entrypoint.is_empty(), "{record:?}");
    ensure!(record.config.cmd == ["sh"], "{record:?}");
    ensure!(record.config.env == [IMAGE_PATH], "{record:?}");
    ensure!(record.config.working_dir == "/", "{record:?}");
    ensure!(record.config.user.is_empty(), "{record:?}");
    ensure!(
        record.uid.is_none() && record.username.is_empty(),
        "{record:?}"
    );
    ensure!(
        record.size > std::fs::metadata(HOST_BUSYBOX)?.len() / 2,
        "{record:?}"
    );
    check_rootfs(&store, &record)?;
    // No other host user reaches the store: the image file does not open as nobody.
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "head",
            "-c1",
        ])
        .arg(store.rootfs(&record))
        .output()
        .context("run setpriv (util-linux)")?;
    ensure!(
        !as_nobody.status.success()
            && String::from_utf8_lossy(&as_nobody.stderr).contains("Permission denied"),
        "the image file opens for nobody: {as_nobody:?}"
    );

    // The second tag, by digest, and through the mirror: the same image, more names.
    let stable = store.pull(&second.reference, None).await?;
    ensure!(stable.id == record.id, "{stable:?}");
    let by_digest = store.pull(&repo_digest, None).await?;
    ensure!(by_digest.id == record.id, "{by_digest:?}");
    let mirrored = "registry.example.test/test/busybox:1.0";
    let via_mirror = store.pull(mirrored, None).await?;
    ensure!(via_mirror.id == record.id, "{via_mirror:?}");
    let expected_tags = [
        pushed.reference.clone(),
        second.reference.clone(),
        mirrored.to_string(),
    ];
    ensure!(via_mirror.repo_tags == expected_tags, "{via_mirror:?}");
    ensure!(
        via_mirror.repo_digests
            == [
                repo_digest.clone(),
                format!("registry.example.test/test/busybox@{}", pushed.digest)
            ],
        "{via_mirror:?}"
    );
    ensure!(store.list().len() == 1, "{:?}", store.list());

    // Status by every name.
    for name in [
        pushed.reference.as_str(),
        second.reference.as_str(),
        mirrored,
        &repo_digest,
        &record.id,
        record.id_hex(),
        &record.id_hex()[..13],
    ] {
        let found = store
            .status(name)
            .with_context(|| format!("status {name}"))?;
        ensure!(found.id == record.id, "status {name}: {found:?}");
    }
    let missing = store.status(&format!("{host}/test/busybox:nope"));
    ensure!(
        matches!(&missing, Err(e) if e.code() == tonic::Code::NotFound),
        "{missing:?}"
    );

    // In use: not removable.
    let before = store.fs_info()?;
    let lease = store.acquire(&pushed.reference)?;
    ensure!(lease.rootfs() == store.rootfs(&record));
    let refused = store.remove(&record.id);
    match &refused {
        Err(e @ ImageError::InUse { .. }) => {
            println!("[images] remove while in use: {e}");
            ensure!(e.code() == tonic::Code::FailedPrecondition, "{e}")
        }
        other => anyhow::bail!("remove of an image in use: {other:?}"),
    }
    ensure!(store.rootfs(&record).is_file(), "still there");
    drop(lease);

    // Records survive a reopen.
    drop(store);
    let store = ImageStore::open(dir.path(), config)?;
    let reloaded = store.status(mirrored)?;
    ensure!(reloaded == via_mirror, "{reloaded:?} != {via_mirror:?}");
    check_rootfs(&store, &reloaded)?;

    let removed = store.remove(&second.reference)?;
    ensure!(removed.id == record.id, "removes the image, all its names");
    ensure!(store.list().is_empty(), "{:?}", store.list());
    ensure!(!store.rootfs(&record).exists(), "rootfs removed");
    let blobs = std::fs::read_dir(dir.path().join("blobs/sha256"))?.count();
    ensure!(blobs == 0, "{blobs} blobs left");
    let after = store.fs_info()?;
    ensure!(
        after.used_bytes < before.used_bytes && after.inodes_used < before.inodes_used,
        "{before:?} -> {after:?}"
    );
    let again = store.remove(&record.id);
    ensure!(
        matches!(&again, Err(e) if e.code() == tonic::Code::NotFound),
        "{again:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_make_one_image() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "test/busybox", "1.0").await?;
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path(), config_for(&registry, &[]))?;

    // The same reference twice, and the same image by digest.
    let by_digest = format!("{}/test/busybox@{}", registry.host(), pushed.digest);
    let (a, b, c) = tokio::join!(
        store.pull(&pushed.reference, None),
        store.pull(&pushed.reference, None),
        store.pull(&by_digest, None),
    );
    let (a, b, c) = (a?, b?, c?);
    ensure!(a == b, "{a:?} != {b:?}");
    ensure!(
        a.id == c.id && a.id == pushed.config_digest,
        "{a:?} / {c:?}"
    );
    ensure!(store.list().len() == 1, "{:?}", store.list());
    let images = std::fs::read_dir(dir.path().join("images"))?.count();
    ensure!(images == 1, "{images} image directories");
    let leftovers = std::fs::read_dir(dir.path().join("tmp"))?.count();
    ensure!(leftovers == 0, "{leftovers} entries left in tmp/");
    let status = store.status(&pushed.reference)?;
    ensure!(status.repo_tags == [pushed.reference.clone()], "{status:?}");

    // The layer was downloaded once. Its access log line follows the response: wait for it.
    let layer = format!("/v2/test/busybox/blobs/{}", pushed.layer_digest);
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.requests("GET", &layer) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let downloads = registry.requests("GET", &layer);
    ensure!(downloads == 1, "layer downloaded {downloads} times");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_resolves_to_linux_amd64() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let index = push_busybox_index(&registry, "test/multi", "1").await?;
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path(), config_for(&registry, &[]))?;
    let record = store.pull(&index.reference, None).await?;
    ensure!(
        record.id == index.config_digest,
        "amd64 image expected: {record:?}"
    );
    let index_digest = format!("{}/test/multi@{}", registry.host(), index.digest);
    ensure!(record.repo_digests == [index_digest.clone()], "{record:?}");
    ensure!(record.manifest_digest != index.digest, "{record:?}");
    check_rootfs(&store, &record)?;

    // The amd64 manifest's own tag: the same image, built from the same manifest.
    let platform = store
        .pull(&registry.reference("test/multi", "1-amd64"), None)
        .await?;
    ensure!(platform.id == record.id, "{platform:?}");
    ensure!(
        platform.manifest_digest == record.manifest_digest,
        "{platform:?}"
    );
    let platform_digest = format!("{}/test/multi@{}", registry.host(), record.manifest_digest);
    ensure!(
        platform.repo_digests == [index_digest, platform_digest],
        "{platform:?}"
    );
    ensure!(store.list().len() == 1, "{:?}", store.list());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_fall_back_and_errors_map_to_grpc_codes() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "test/busybox", "1.0").await?;
    let dir = tempfile::tempdir()?;
    let dead = closed_port()?;
    // A mirror that is down: the registry itself is tried next.
    let config = config_for(
        &registry,
        &[(registry.host(), format!("http://127.0.0.1:{dead}"))],
    );
    let store = ImageStore::open(dir.path(), config)?;
    let record = store.pull(&pushed.reference, None).await?;
    ensure!(record.id == pushed.config_digest, "{record:?}");

    // Unreachable registry.
    drop(store);
    let mut config = config_for(&registry, &[]);
    config.insecure.push(format!("127.0.0.1:{dead}"));
    let store = ImageStore::open(dir.path(), config)?;
    let down = store
        .pull(&format!("127.0.0.1:{dead}/test/busybox:1.0"), None)
        .await;
    match &down {
        Err(e @ ImageError::Unavailable { .. }) => {
            println!("[images] unreachable registry: {e}");
            ensure!(e.code() == tonic::Code::Unavailable, "{e}")
        }
        other => anyhow::bail!("pull from a closed port: {other:?}"),
    }

    // Not in the registry.
    let missing = store
        .pull(&format!("{}/test/nothing:1", registry.host()), None)
        .await;
    ensure!(
        matches!(&missing, Err(e) if e.code() == tonic::Code::NotFound),
        "{missing:?}"
    );
    if let Err(e) = &missing {
        println!("[images] missing repository: {e}");
    }
    let no_tag = store
        .pull(&format!("{}/test/busybox:2.0", registry.host()), None)
        .await;
    ensure!(
        matches!(&no_tag, Err(e) if e.code() == tonic::Code::NotFound),
        "{no_tag:?}"
    );

    // Invalid references.
    for bad in ["Not A Reference", "UPPER/case:1", "busybox@sha256:12", ""] {
        let err = store.pull(bad, None).await;
        match &err {
            Err(e @ ImageError::InvalidReference { .. }) => {
                ensure!(e.code() == tonic::Code::InvalidArgument, "{bad:?}: {e}")
            }
            other => anyhow::bail!("pull {bad:?}: {other:?}"),
        }
    }
    // Failed pulls leave nothing behind; the image pulled earlier is still there.
    ensure!(store.list().len() == 1, "{:?}", store.list());
    let leftovers = std::fs::read_dir(dir.path().join("tmp"))?.count();
    ensure!(leftovers == 0, "{leftovers} entries left in tmp/");
    Ok(())
}

/// Runs umoci (Debian's) with `args`.
fn umoci(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("umoci")
        .args(args)
        .output()
        .context("run umoci (make setup installs it)")?;
    ensure!(out.status.success(), "umoci {args:?}: {out:?}");
    Ok(())
}

fn gunzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut tar)?;
    Ok(tar)
}

/// umoci writes a layer that ends right after its last file's data: no padding to 512
/// bytes, no end-of-archive blocks (Go's archive/tar, and so containerd, takes them). The
/// pull unpacks it; the same layer cut inside the file's data is refused, and leaves no image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umoci_layers_without_tar_trailer() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    let layout_s = layout.display().to_string();
    let src = dir.path().join("hello");
    std::fs::write(&src, "hello from umoci\n")?;
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &format!("{layout_s}:t")])?;
    umoci(&[
        "insert",
        "--image",
        &format!("{layout_s}:t"),
        &src.display().to_string(),
        "/hello",
    ])?;
    let mut tar_len = 0;
    let reference = push_oci_layout(&registry, &layout, "t", "test/umoci", "1", |_, layers| {
        let tar = gunzip(&layers[0])?;
        tar_len = tar.len();
        Ok(())
    })
    .await?;
    // One header and the 17 bytes of data: nothing after them.
    ensure!(tar_len == 512 + 17, "umoci's layer is {tar_len} bytes");

    let store = ImageStore::open(&dir.path().join("store"), config_for(&registry, &[]))?;
    let record = store.pull(&reference, None).await?;
    let hello = debugfs(&store.rootfs(&record), "cat /hello")?;
    ensure!(
        hello == "hello from umoci\n",
        "/hello in the image: {hello:?}"
    );

    // The same layer cut inside the file's data (the config's diff_id made to match).
    let cut = push_oci_layout(
        &registry,
        &layout,
        "t",
        "test/umoci",
        "cut",
        |config, layers| {
            let tar = gunzip(&layers[0])?;
            let short = &tar[..512 + 8];
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, short)?;
            layers[0] = gz.finish()?;
            let mut json: serde_json::Value = serde_json::from_slice(config)?;
            let digest = format!("sha256:{}", podvisor_tests::registry::hex_digest(short));
            json["rootfs"]["diff_ids"][0] = serde_json::Value::String(digest);
            *config = serde_json::to_vec(&json)?;
            Ok(())
        },
    )
    .await?;
    let err = store.pull(&cut, None).await.expect_err("a truncated layer");
    let msg = format!("{:#}", anyhow::Error::from(err));
    println!("[images] a layer cut inside its last file: {msg}");
    ensure!(
        msg.contains("truncated") || msg.contains("unexpected EOF") || msg.contains("end of file"),
        "{msg}"
    );
    ensure!(
        store.list().len() == 1,
        "the cut image was kept: {:?}",
        store.list()
    );
    Ok(())
}

/// A hostile image's special files pull fine and are in the image file as the image has
/// them (a character device, a setuid-root file, a `security.capability` xattr); the host
/// never gets the device node (the unpack tests check the staging tree).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files_land_in_the_image_only() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let reference = push_busybox_with_special_files(&registry, "test/special", "1").await?;
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path(), config_for(&registry, &[]))?;
    let record = store.pull(&reference, None).await?;
    let rootfs = store.rootfs(&record);
    let dev = debugfs(&rootfs, &format!("stat /{SPECIAL_DEVICE}"))?;
    ensure!(
        dev.contains("Type: character special") && dev.contains("major/minor number: 01:03"),
        "{dev}"
    );
    ensure!(dev.contains("Mode:  0666"), "{dev}");
    let suid = debugfs(&rootfs, &format!("stat /{SPECIAL_SETUID}"))?;
    ensure!(
        suid.contains("Mode:  04755") && suid.contains("User:     0"),
        "{suid}"
    );
    let cap = debugfs(&rootfs, &format!("ea_list /{SPECIAL_CAPFILE}"))?;
    ensure!(cap.contains("security.capability"), "{cap}");
    // Nothing like a device node anywhere under the store on the host.
    let found = Command::new("find")
        .arg(dir.path())
        .args(["-type", "c", "-o", "-type", "b"])
        .output()?;
    ensure!(
        found.status.success() && found.stdout.is_empty(),
        "{found:?}"
    );
    Ok(())
}

const MIB: u64 = 1 << 20;

/// Bytes allocated (`st_blocks`) under `dir`; what vanishes while it is walked is skipped.
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Samples [`allocated`] of `dir` every few milliseconds until dropped; `peak` says the
/// most it saw.
struct DiskSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl DiskSampler {
    fn start(dir: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(allocated(&dir));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        DiskSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(u64::MAX)
    }
}

/// A failed pull left nothing: no image, no record, nothing in `tmp/` (downloads,
/// staging trees) or `images/`, and no blob (the stores of these tests start empty).
fn nothing_left(store: &ImageStore, root: &Path) -> anyhow::Result<()> {
    ensure!(store.list().is_empty(), "images: {:?}", store.list());
    for d in ["tmp", "images", "blobs/sha256"] {
        let left: Vec<_> = std::fs::read_dir(root.join(d))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        ensure!(left.is_empty(), "{d}/ holds {left:?}");
    }
    Ok(())
}

/// `result` is the cap `limit` reached, with gRPC code ResourceExhausted and a message
/// naming the cap and `needle`.
fn over_cap(
    result: Result<ImageRecord, ImageError>,
    limit: Limit,
    needle: &str,
) -> anyhow::Result<String> {
    match result {
        Err(e @ ImageError::LimitExceeded { limit: l, .. }) if l == limit => {
            let msg = e.to_string();
            println!("[images] {limit}: {msg}");
            ensure!(e.code() == tonic::Code::ResourceExhausted, "{e}");
            ensure!(msg.contains(&limit.to_string()), "no cap named: {msg}");
            ensure!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            Ok(msg)
        }
        other => bail!("expected {limit} to be reached, got {other:?}"),
    }
}

/// The config of a one-layer image without diff_ids (the bomb's would take hashing a
/// gigabyte to make; the config may leave them out).
fn config_without_diff_ids() -> Config {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    Config::oci_v1(config.to_string().into_bytes(), None)
}

/// A 1 MiB gzip layer that inflates to 1 GiB of zeros (64 files of 16 MiB), against a
/// store whose unpacked cap is 64 MiB: the pull fails naming the cap, having put at most
/// about the cap on disk (sampled while it runs), and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_stops_at_the_unpacked_cap() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let bomb = gzip_zero_bomb(64, 16 << 20)?;
    println!(
        "[images] bomb: {} bytes of gzip for 1 GiB of zeros",
        bomb.len()
    );
    ensure!(bomb.len() < 4 << 20, "{} bytes", bomb.len());
    let layers = [ImageLayer::oci_v1_gzip(bomb, None)];
    let reference = push_layers(
        &registry,
        "test/bomb",
        "1",
        &layers,
        config_without_diff_ids(),
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let cap = 64 * MIB;
    let limits = ImageLimits {
        max_unpacked_bytes: cap,
        ..ImageLimits::default()
    };
    let store = ImageStore::open_with_limits(dir.path(), config_for(&registry, &[]), limits)?;
    let sampler = DiskSampler::start(dir.path().join("tmp"));
    let started = Instant::now();
    let result = store.pull(&reference, None).await;
    let peak = sampler.peak();
    println!(
        "[images] bomb refused in {:?}; tmp/ peaked at {} KiB",
        started.elapsed(),
        peak / 1024
    );
    over_cap(
        result,
        Limit::UnpackedBytes,
        &format!("images.max_unpacked_bytes = {cap}"),
    )?;
    // The cap, plus the bomb's blob while it downloads and directory blocks.
    ensure!(peak <= cap + 4 * MIB, "tmp/ held {peak} bytes at a time");
    ensure!(peak > 0, "the sampler saw nothing at all");
    nothing_left(&store, dir.path())
}

/// A real 5 MiB config blob: refused from its descriptor, never downloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_over_the_cap_is_refused_before_download() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (layer, diff_id) = busybox_layer()?;
    let mut config: serde_json::Value = serde_json::from_slice(&busybox_config("amd64", diff_id))?;
    config["config"]["Labels"] = serde_json::json!({"padding": "x".repeat(5 << 20)});
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    let config_digest = config.sha256_digest();
    let layers = [ImageLayer::oci_v1_gzip(layer.clone(), None)];
    let reference = push_layers(&registry, "test/bigconfig", "1", &layers, config).await?;

    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path(), config_for(&registry, &[]))?;
    over_cap(
        store.pull(&reference, None).await,
        Limit::ConfigBytes,
        &config_digest,
    )?;
    let fetched = registry.requests("GET", &format!("/v2/test/bigconfig/blobs/{config_digest}"));
    ensure!(fetched == 0, "the config was fetched {fetched} times");
    nothing_left(&store, dir.path())
}

/// A change to a pushed manifest, given the layer's real size.
type Edit = fn(&mut OciImageManifest, i64);

/// Descriptors that lie about sizes: a config declared 10 GB (the registry has the real,
/// small one) is refused before download; layers declared smaller or bigger than what
/// the registry sends end as size mismatches (DataLoss) with no partial blob; sizes of 0
/// or less are refused (InvalidArgument). Each leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_sizes_that_lie_are_refused() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (layer, diff_id) = busybox_layer()?;
    let layers = [ImageLayer::oci_v1_gzip(layer.clone(), None)];
    let config = || Config::oci_v1(busybox_config("amd64", diff_id), None);
    let config_digest = config().sha256_digest();
    let real = i64::try_from(layer.len())?;
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path(), config_for(&registry, &[]))?;
    let push = |tag: &'static str, edit: Edit| {
        push_layers_with_manifest(&registry, "test/lies", tag, &layers, config(), move |m| {
            edit(m, real)
        })
    };

    let huge = push("huge-config", |m, _| m.config.size = 10_000_000_000).await?;
    over_cap(
        store.pull(&huge, None).await,
        Limit::ConfigBytes,
        "declares 10000000000 bytes",
    )?;
    let fetched = registry.requests("GET", &format!("/v2/test/lies/blobs/{config_digest}"));
    ensure!(fetched == 0, "the config was fetched {fetched} times");
    nothing_left(&store, dir.path())?;

    // The registry sends more than the descriptor declares, then fewer.
    for (tag, edit) in [
        ("short", (|m, real| m.layers[0].size = real - 100) as Edit),
        ("long", |m, real| m.layers[0].size = real + 100),
    ] {
        let reference = push(tag, edit).await?;
        match store.pull(&reference, None).await {
            Err(e @ ImageError::SizeMismatch { .. }) => {
                println!("[images] layer size {tag}: {e}");
                ensure!(e.code() == tonic::Code::DataLoss, "{e}");
            }
            other => bail!("{tag}: {other:?}"),
        }
        nothing_left(&store, dir.path())?;
    }

    for (tag, edit) in [
        ("zero", (|m, _| m.layers[0].size = 0) as Edit),
        ("negative", |m, _| m.layers[0].size = -1),
        ("zero-config", |m, _| m.config.size = 0),
    ] {
        let reference = push(tag, edit).await?;
        match store.pull(&reference, None).await {
            Err(e @ ImageError::BadManifest { .. }) => {
                println!("[images] size {tag}: {e}");
                ensure!(e.code() == tonic::Code::InvalidArgument, "{e}");
                ensure!(e.to_string().contains("must be above 0"), "{e}");
            }
            other => bail!("{tag}: {other:?}"),
        }
        nothing_left(&store, dir.path())?;
    }
    Ok(())
}

/// The manifest and layer-count caps, set low on a store: an ordinary image is refused
/// naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_and_layer_caps_are_the_store_s() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "test/busybox", "1.0").await?;
    let special = push_busybox_with_special_files(&registry, "test/special", "1").await?;
    let dir = tempfile::tempdir()?;
    let tight = ImageLimits {
        max_manifest_bytes: 100,
        ..ImageLimits::default()
    };
    let store = ImageStore::open_with_limits(dir.path(), config_for(&registry, &[]), tight)?;
    over_cap(
        store.pull(&pushed.reference, None).await,
        Limit::ManifestBytes,
        "more than 100 bytes",
    )?;
    nothing_left(&store, dir.path())?;

    drop(store);
    let one_layer = ImageLimits {
        max_layers: 1,
        ..ImageLimits::default()
    };
    let store = ImageStore::open_with_limits(dir.path(), config_for(&registry, &[]), one_layer)?;
    over_cap(store.pull(&special, None).await, Limit::Layers, "2 layers")?;
    nothing_left(&store, dir.path())?;
    // One layer is within the cap.
    let record = store.pull(&pushed.reference, None).await?;
    ensure!(record.id == pushed.config_digest, "{record:?}");
    Ok(())
}
