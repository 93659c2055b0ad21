//! The guest test disk: a small ext4 image with busybox, guest-probe, an
//! `/init` script and the guest halves of the tests (`tests/guest/*.sh`).
//!
//! Layout of the image:
//!
//! ```text
//! /init                  shell script, PID 1: mounts, then runs /tests/$NAME.sh
//! /bin/busybox           Debian's busybox-static, with one symlink per applet
//! /bin/guest-probe       tests/guest-probe (crate podvisor-guest-probe), static
//! /tests/NAME.sh         guest scripts, chosen by `podvisor.test=NAME`
//! /proc /sys /dev /tmp   mount points
//! ```
//!
//! Built once per process into a temporary directory, removed at exit.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};

use crate::{artifacts, paths};

/// Where busybox comes from on the host (Debian's busybox-static).
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// The filesystem label.
pub const LABEL: &str = "podvisor-test";

/// The guest's PID 1. Every line for the test starts with `PROBE: `.
/// The test script is exec'd, so it becomes PID 1: its end is init's end
/// (a kernel panic) unless it powers off.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
read -r cmdline </proc/cmdline
name=
for word in $cmdline; do
    case "$word" in
        podvisor.test=*) name="${word#podvisor.test=}" ;;
    esac
done
echo "PROBE: init=started test=$name"
if [ -z "$name" ] || [ ! -f "/tests/$name.sh" ]; then
    echo "PROBE: init=error no script /tests/$name.sh"
    poweroff -f
fi
exec /bin/busybox sh "/tests/$name.sh"
"#;

/// Applets linked in [`container_image`]s (`trap` and `test` are shell builtins; `test` is
/// linked anyway).
pub const CONTAINER_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "readlink", "ls", "dd", "head", "tail", "yes", "tty", "test",
    "touch", "rm", "mkdir", "cp", "id", "hostname", "true", "false", "ps", "grep", "wc",
];

/// `/etc/passwd` of container images: root and `app` (uid 1000).
pub const CONTAINER_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
/// `/etc/group` of container images.
pub const CONTAINER_GROUP: &str = "root:x:0:\napp:x:1000:\n";

/// Builds a container image for the agent at `img`: an ext4 file system (made with
/// `mkfs.ext4 -d`, nothing is mounted) holding busybox with [`CONTAINER_APPLETS`],
/// `/etc/passwd`, `/etc/group` and empty `/tmp /proc /sys /dev /root /home/app`. `stage` is
/// a staging directory created here.
pub fn container_image(stage: &Path, img: &Path) -> anyhow::Result<()> {
    if !Path::new(HOST_BUSYBOX).is_file() {
        bail!("{HOST_BUSYBOX} is missing: install busybox-static");
    }
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/app",
    ] {
        std::fs::create_dir_all(stage.join(d))
            .with_context(|| format!("create {}/{d}", stage.display()))?;
    }
    std::fs::set_permissions(stage.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .context("chmod /tmp")?;
    std::fs::copy(HOST_BUSYBOX, stage.join("bin/busybox"))
        .context("copy busybox into the container image")?;
    for applet in CONTAINER_APPLETS {
        symlink("busybox", stage.join("bin").join(applet))
            .with_context(|| format!("symlink applet {applet}"))?;
    }
    std::fs::write(stage.join("etc/passwd"), CONTAINER_PASSWD).context("write /etc/passwd")?;
    std::fs::write(stage.join("etc/group"), CONTAINER_GROUP).context("write /etc/group")?;
    mkfs_ext4(stage, img, &["-E", "root_owner=0:0"], 8)
}

/// Builds the test image once per process and returns its path.
pub fn test_image() -> anyhow::Result<PathBuf> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

static IMAGE_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_image_dir() {
    if let Some(dir) = IMAGE_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn build_once() -> anyhow::Result<PathBuf> {
    let probe = artifacts::guest_probe()?;
    let dir = tempfile::Builder::new()
        .prefix("podvisor-test-image-")
        .tempdir()
        .context("create a temporary directory for the test image")?
        .keep();
    if IMAGE_DIR.set(dir.clone()).is_ok() {
        // SAFETY: remove_image_dir is an extern "C" fn without arguments that
        // only reads a OnceLock; registering it has no other effect.
        unsafe {
            libc::atexit(remove_image_dir);
        }
    }
    let img = dir.join("rootfs.ext4");
    build(&dir.join("root"), &probe, &paths::guest_scripts_dir(), &img)?;
    Ok(img)
}

/// Builds an image at `img` from a staging directory `root` (created here).
pub fn build(root: &Path, probe: &Path, scripts: &Path, img: &Path) -> anyhow::Result<()> {
    for d in ["bin", "tests", "proc", "sys", "dev", "tmp", "mnt"] {
        std::fs::create_dir_all(root.join(d))
            .with_context(|| format!("create {}/{d}", root.display()))?;
    }
    if !Path::new(HOST_BUSYBOX).is_file() {
        bail!("{HOST_BUSYBOX} is missing: install busybox-static");
    }
    std::fs::copy(HOST_BUSYBOX, root.join("bin/busybox")).context("copy busybox into the image")?;
    std::fs::copy(probe, root.join("bin/guest-probe"))
        .with_context(|| format!("copy {} into the image", probe.display()))?;
    // One symlink per applet, made here: `busybox --install` in the guest costs seconds.
    let list = Command::new(HOST_BUSYBOX)
        .arg("--list")
        .output()
        .context("run busybox --list")?;
    if !list.status.success() {
        bail!("busybox --list failed: {}", list.status);
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        symlink("busybox", root.join("bin").join(applet))
            .with_context(|| format!("symlink applet {applet}"))?;
    }
    write_executable(&root.join("init"), INIT_SCRIPT)?;
    let entries =
        std::fs::read_dir(scripts).with_context(|| format!("read {}", scripts.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("read {}", scripts.display()))?;
        let name = e.file_name();
        if Path::new(&name).extension().is_some_and(|x| x == "sh") {
            let text = std::fs::read_to_string(e.path())
                .with_context(|| format!("read {}", e.path().display()))?;
            write_executable(&root.join("tests").join(&name), &text)?;
        }
    }
    mkfs_ext4(root, img, &["-L", LABEL], 12)
}

/// Makes an ext4 image of `dir` with `mkfs.ext4 -d` (no mount): the files
/// plus `slack_mib` MiB for ext4's own structures.
fn mkfs_ext4(dir: &Path, img: &Path, extra: &[&str], slack_mib: u64) -> anyhow::Result<()> {
    let size_mib = dir_size(dir)? / (1 << 20) + slack_mib;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(dir)
        .args(extra)
        .arg(img)
        .arg(format!("{size_mib}M"))
        .output()
        .context("run mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d {} {} failed ({}): {}",
            dir.display(),
            img.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let meta = e.path().symlink_metadata()?;
        if meta.is_dir() {
            total += dir_size(&e.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}
