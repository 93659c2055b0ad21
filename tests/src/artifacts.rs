//! Binaries the tests run, built on demand with cargo (once per process).
//!
//! - `podvisor-vmm` for the host, in this build's profile
//!   (override: `PODVISOR_VMM=/path/to/podvisor-vmm`);
//! - `guest-probe`, static, with an explicit `--target` so its
//!   `+crt-static` build stays apart from host builds
//!   (override: `PODVISOR_GUEST_PROBE=/path/to/guest-probe`).

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
            "podvisor-tests",
            "--bin",
            "guest-probe",
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
