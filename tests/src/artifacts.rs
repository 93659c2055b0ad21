//! Binaries the tests run, built on demand with cargo (once per process).
//!
//! - `podvisor-vmm` for the host, in this build's profile
//!   (override: `PODVISOR_VMM=/path/to/podvisor-vmm`);
//! - `guest-probe`, static, with an explicit `--target` so its
//!   `+crt-static` build stays apart from host builds
//!   (override: `PODVISOR_GUEST_PROBE=/path/to/guest-probe`);
//! - the guest root image `build/guest/rootfs.ext4` with the static agent as init, brought up
//!   to date with `make rootfs` (override: `PODVISOR_ROOTFS=/path/to/rootfs.ext4`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};

use crate::paths;

/// The host target triple the static guest-probe is built for.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(paths::workspace_root());
    // Flags of an outer build must not leak into these builds.
    c.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    c
}

fn run_cargo(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("run cargo to build {what}"))?;
    if !out.status.success() {
        bail!(
            "building {what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn once(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    f: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PathBuf> {
    cell.get_or_init(|| f().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Whether this crate was built with optimizations (then so is the VMM).
pub fn release_profile() -> bool {
    !cfg!(debug_assertions)
}

/// The podvisor-vmm binary.
pub fn vmm_binary() -> anyhow::Result<PathBuf> {
    static VMM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&VMM, || {
        if let Some(p) = std::env::var_os("PODVISOR_VMM") {
            return Ok(PathBuf::from(p));
        }
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "podvisor-vmm",
            "--bin",
            "podvisor-vmm",
        ]);
        let profile = if release_profile() {
            cmd.arg("--release");
            "release"
        } else {
            "debug"
        };
        run_cargo(cmd, "podvisor-vmm")?;
        let bin = paths::target_dir().join(profile).join("podvisor-vmm");
        if !bin.is_file() {
            bail!("cargo built podvisor-vmm but {} is missing", bin.display());
        }
        Ok(bin)
    })
}

/// The static guest-probe binary.
pub fn guest_probe() -> anyhow::Result<PathBuf> {
    static PROBE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&PROBE, || {
        if let Some(p) = std::env::var_os("PODVISOR_GUEST_PROBE") {
            return Ok(PathBuf::from(p));
        }
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--quiet",
            "--release",
            "--target",
            GUEST_TARGET,
            "-p",
            "podvisor-guest-probe",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
        run_cargo(cmd, "guest-probe (static)")?;
        let bin = paths::target_dir()
            .join(GUEST_TARGET)
            .join("release")
            .join("guest-probe");
        if !bin.is_file() {
            bail!("cargo built guest-probe but {} is missing", bin.display());
        }
        Ok(bin)
    })
}

/// The guest root image (`build/guest/rootfs.ext4`), made current once per process with
/// `make -C <workspace> rootfs` (static agent build, then images/build-rootfs.sh).
pub fn agent_rootfs() -> anyhow::Result<PathBuf> {
    static ROOTFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&ROOTFS, || {
        if let Some(p) = std::env::var_os("PODVISOR_ROOTFS") {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("PODVISOR_ROOTFS={} is not a file", p.display());
            }
            return Ok(p);
        }
        let root = paths::workspace_root();
        let agent = paths::target_dir()
            .join(GUEST_TARGET)
            .join("release")
            .join("podvisor-agent");
        eprintln!(
            "[podvisor-tests] make -C {} rootfs (static agent + guest root image)",
            root.display()
        );
        let out = Command::new("make")
            .arg("-C")
            .arg(&root)
            .arg("rootfs")
            // The Makefile assumes <workspace>/target; follow CARGO_TARGET_DIR.
            .arg(format!("AGENT_BIN={}", agent.display()))
            // The Makefile sets RUSTFLAGS for the static build; an outer build's flags must
            // not leak in.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .output()
            .context("run make (install make) to build the guest root image")?;
        if !out.status.success() {
            let tail = |b: &[u8]| {
                let s = String::from_utf8_lossy(b);
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            bail!(
                "`make -C {} rootfs` failed ({}): the agent tests need a current guest root \
                 image {}.\n--- stdout ---\n{}\n--- stderr ---\n{}",
                root.display(),
                out.status,
                paths::agent_rootfs_path().display(),
                tail(&out.stdout),
                tail(&out.stderr)
            );
        }
        let img = paths::agent_rootfs_path();
        let fresh = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified());
        match (fresh(&img), fresh(&agent)) {
            (Ok(i), Ok(a)) if i >= a => Ok(img),
            (Ok(_), Ok(_)) => bail!(
                "`make rootfs` succeeded but {} is older than the agent {}",
                img.display(),
                agent.display()
            ),
            (Err(e), _) => Err(e).with_context(|| {
                format!("`make rootfs` succeeded but {} is missing", img.display())
            }),
            (_, Err(e)) => Err(e).with_context(|| {
                format!("`make rootfs` succeeded but {} is missing", agent.display())
            }),
        }
    })
}
