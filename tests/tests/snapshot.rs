//! VMM snapshot and restore on real microVMs.
//!
//! One VM boots the test image (`tests/guest/snapshot.sh`: a vsock echo server started again
//! after every connection), answers once, is paused and snapshotted while its next server
//! listens, and is stopped. Two new VMMs restore that snapshot at the same time, each with a
//! vsock socket of its own: both guests answer on them, continuing where the snapshot left
//! off. Bad state files are refused with exit code 1 and a message naming the problem.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use podvisor_tests::vm::host_vsock_echo;
use podvisor_tests::{Vm, VmSpec, paths, procfs};

/// Boot under kvm_pvm takes tens of seconds, more on a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Any later step.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// The line guest-probe prints once its echo server listens.
const LISTENING: &str = "VSOCK-LISTENING 5000";

fn spec() -> VmSpec {
    VmSpec {
        vsock_cid: Some(3),
        api: true,
        ..VmSpec::new("snapshot")
    }
}

/// Waits until a restored VMM has bound its vsock socket (it does so before the vCPUs run).
fn wait_for_socket(vm: &mut Vm) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let uds = vm.vsock_uds()?.to_path_buf();
    while !uds.exists() {
        ensure!(
            vm.try_status()?.is_none() && Instant::now() < deadline,
            "the restored VMM never bound {}\n{}",
            uds.display(),
            vm.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs the VMM on `args` and returns its exit code and stderr.
fn vmm_fails(args: &[String]) -> anyhow::Result<(Option<i32>, String)> {
    let out = std::process::Command::new(podvisor_tests::artifacts::vmm_binary()?)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .context("run podvisor-vmm")?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

#[test]
fn snapshot_restores_twice_and_bad_state_files_are_refused() {
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}

fn run() -> anyhow::Result<()> {
    paths::require_kvm()?;
    let snap_dir = tempfile::Builder::new()
        .prefix("podvisor-snapshot-")
        .tempdir()?;
    let state = snap_dir.path().join("vm.state");
    let mem = snap_dir.path().join("vm.mem");

    // The source VM: boots, answers once, is snapshotted while its next server listens.
    let mut source = Vm::boot(&spec(), None)?;
    source
        .wait_for_console_count(LISTENING, 1, BOOT_TIMEOUT)
        .map_err(|e| e.context("boot"))?;
    let booted = source.started().elapsed();
    host_vsock_echo(source.vsock_uds()?, 5000, "before-snapshot", STEP_TIMEOUT)
        .context("echo from the booted VM")?;
    source.wait_for_console("PROBE: served n=1 rc=0", STEP_TIMEOUT)?;
    source.wait_for_console_count(LISTENING, 2, STEP_TIMEOUT)?;
    let refused = source.snapshot(&state, &mem);
    ensure!(
        refused.is_err(),
        "a running VM was snapshotted: {refused:?}"
    );
    source.api("PUT", "/vm/pause", None)?;
    let created = source.snapshot(&state, &mem)?;
    ensure!(
        created.mem_file_bytes == 128 << 20,
        "memory file is {} bytes, the guest has 128 MiB",
        created.mem_file_bytes
    );
    ensure!(
        created.mem_data_bytes > 0 && created.mem_data_bytes < created.mem_file_bytes,
        "memory file holds {} data bytes of {}: it should be sparse but not empty",
        created.mem_data_bytes,
        created.mem_file_bytes
    );
    source.api("PUT", "/vm/stop", None)?;
    let status = source.wait_exit(STEP_TIMEOUT)?;
    ensure!(status.success(), "source VMM ended with {status}");

    // Two restores from the one snapshot, at the same time.
    let restore_started = Instant::now();
    let mut a = Vm::restore(&spec(), &state, &mem)?;
    let mut b = Vm::restore(&spec(), &state, &mem)?;
    for (name, vm) in [("a", &mut a), ("b", &mut b)] {
        wait_for_socket(vm)?;
        let t = Instant::now();
        host_vsock_echo(
            vm.vsock_uds()?,
            5000,
            &format!("after-restore-{name}"),
            STEP_TIMEOUT,
        )
        .with_context(|| format!("echo from restored VM {name}\n{}", vm.report()))?;
        println!(
            "[snapshot] restored VM {name} answered {:.0} ms after its VMM started ({:.0} ms to the echo)",
            vm.started().elapsed().as_secs_f64() * 1000.0,
            t.elapsed().as_secs_f64() * 1000.0
        );
        vm.wait_for_console("PROBE: served n=2 rc=0", STEP_TIMEOUT)
            .with_context(|| format!("restored VM {name} went on with its loop"))?;
    }
    println!(
        "[snapshot] cold boot to the first listening server {:.1} s; two restores to both answers {:.1} s; \
         snapshot {:.0} ms, state file {} bytes, memory data {:.1} MiB of {} MiB",
        booted.as_secs_f64(),
        restore_started.elapsed().as_secs_f64(),
        created.elapsed_ms,
        created.state_bytes,
        created.mem_data_bytes as f64 / f64::from(1 << 20),
        created.mem_file_bytes >> 20
    );
    for (name, vm) in [("a", &a), ("b", &b)] {
        println!(
            "[snapshot] restored VM {name}: anonymous (private) memory {} KiB",
            procfs::anonymous_kib(vm.pid())?
        );
    }
    let mem_on_disk = std::fs::read(&mem)?;
    ensure!(
        mem_on_disk.len() as u64 == created.mem_file_bytes,
        "the memory file changed size under the restored VMs"
    );
    for vm in [&mut a, &mut b] {
        vm.api("PUT", "/vm/stop", None)?;
        let status = vm.wait_exit(STEP_TIMEOUT)?;
        ensure!(status.success(), "restored VMM ended with {status}");
    }

    refused_state_files(&state, &mem, snap_dir.path())
}

/// Corrupt, truncated and foreign state files, and a device set that does not match: the
/// VMM exits 1 with a message naming the problem, before any guest runs.
fn refused_state_files(state: &Path, mem: &Path, dir: &Path) -> anyhow::Result<()> {
    let good = std::fs::read(state)?;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut flipped = good.clone();
    let last = flipped.len() - 2;
    flipped[last] ^= 0x20;
    cases.push(("flipped byte", flipped, "is corrupt: body SHA-256"));
    cases.push(("truncated", good[..good.len() / 2].to_vec(), "truncated"));
    cases.push((
        "not a state file",
        b"{\"vcpus\": 1}".repeat(8),
        "not a podvisor state file",
    ));
    let img = podvisor_tests::image::test_image()?;
    // A restore with the root drive only.
    let restore_root_only = |state: &Path| {
        vmm_fails(&[
            "--restore".into(),
            format!("state={},mem={}", state.display(), mem.display()),
            "--serial".into(),
            "null".into(),
            "--drive".into(),
            format!("{},ro,id=root", img.display()),
        ])
    };
    for (name, bytes, want) in cases {
        let bad = dir.join("bad.state");
        std::fs::write(&bad, bytes)?;
        let (code, stderr) = restore_root_only(&bad)?;
        ensure!(
            code == Some(1) && stderr.contains(want),
            "{name}: exit {code:?}, stderr {stderr:?} (wanted exit 1 and {want:?})"
        );
    }
    // The snapshot's VM had a vsock device: a restore without one would leave the guest's
    // driver talking to an empty MMIO window.
    let (code, stderr) = restore_root_only(state)?;
    ensure!(
        code == Some(1) && stderr.contains("devices [block:root, vsock]"),
        "restore without the vsock device: exit {code:?}, stderr {stderr:?}"
    );
    Ok(())
}
