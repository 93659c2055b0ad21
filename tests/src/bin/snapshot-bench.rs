//! `snapshot-bench`: cold boot against restore from a snapshot, on the same guest.
//!
//! The guest is the test image running `tests/guest/snapshot.sh` (a vsock echo server, 1
//! vCPU, 128 MiB). Cold: VMM start to the first vsock echo answered. The booted VM is then
//! paused and snapshotted while its next server listens; each restore is timed from its VMM's
//! start to the first echo answered on its own socket, one at a time and then two at once.
//! Also printed: snapshot time and sizes, and each restored VMM's private (anonymous) memory,
//! and what the VMM's seccomp filters cost a restore: restores with `--seccomp off`
//! alternate with the default ones (filters on).
//! Figures from one run on one host: compare the ratios.
//!
//! ```text
//! snapshot-bench [--restores N]
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use podvisor_tests::vm::host_vsock_echo;
use podvisor_tests::{Vm, VmSpec, paths, procfs};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// The line guest-probe prints once its echo server listens.
const LISTENING: &str = "VSOCK-LISTENING 5000";
/// Between attempts to reach a guest server that is not listening yet.
const RETRY: Duration = Duration::from_millis(10);

fn spec() -> VmSpec {
    VmSpec {
        vsock_cid: Some(3),
        api: true,
        ..VmSpec::new("snapshot")
    }
}

/// Echoes over `vm`'s vsock socket as soon as the guest answers; returns the time from the
/// VMM's start.
fn first_echo(vm: &mut Vm, timeout: Duration) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + timeout;
    let uds = vm.vsock_uds()?.to_path_buf();
    loop {
        if uds.exists() && host_vsock_echo(&uds, 5000, "bench", STEP_TIMEOUT).is_ok() {
            return Ok(vm.started().elapsed());
        }
        if vm.try_status()?.is_some() || Instant::now() > deadline {
            bail!("no echo from the guest\n{}", vm.report());
        }
        std::thread::sleep(RETRY);
    }
}

fn stop(vm: &mut Vm) -> anyhow::Result<()> {
    vm.api("PUT", "/vm/stop", None)?;
    let status = vm.wait_exit(STEP_TIMEOUT)?;
    if !status.success() {
        bail!("VMM ended with {status}");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn restore_once(
    state: &Path,
    mem: &Path,
    seccomp: Option<&'static str>,
) -> anyhow::Result<(f64, u64)> {
    let spec = VmSpec { seccomp, ..spec() };
    let mut vm = Vm::restore(&spec, state, mem)?;
    let t = first_echo(&mut vm, STEP_TIMEOUT)?;
    let anon = procfs::anonymous_kib(vm.pid())?;
    stop(&mut vm)?;
    Ok((ms(t), anon))
}

fn main() -> anyhow::Result<()> {
    let mut restores = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--restores" => {
                restores = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .context("--restores N")?;
            }
            other => bail!("unknown argument {other:?} (snapshot-bench [--restores N])"),
        }
    }
    paths::require_kvm()?;
    let dir = tempfile::Builder::new()
        .prefix("podvisor-snapshot-bench-")
        .tempdir()?;
    let state = dir.path().join("vm.state");
    let mem = dir.path().join("vm.mem");

    let mut source = Vm::boot(&spec(), None)?;
    // While the guest boots, a CONNECT waits up to 2 s for an answer: wait for the server's
    // console line instead of knocking all the time.
    source.wait_for_console_count(LISTENING, 1, BOOT_TIMEOUT)?;
    let cold = first_echo(&mut source, STEP_TIMEOUT)?;
    let cold_anon = procfs::anonymous_kib(source.pid())?;
    source.wait_for_console("PROBE: served n=1", STEP_TIMEOUT)?;
    // The next server is up once the console shows its second listening line.
    source.wait_for_console_count(LISTENING, 2, STEP_TIMEOUT)?;
    source.api("PUT", "/vm/pause", None)?;
    let snap = source.snapshot(&state, &mem)?;
    stop(&mut source)?;

    let mut times = Vec::new();
    let mut anons = Vec::new();
    let mut unfiltered = Vec::new();
    for i in 0..restores {
        let (t, anon) = restore_once(&state, &mem, None).with_context(|| format!("restore {i}"))?;
        eprintln!("restore {i}: first echo {t:.1} ms, private memory {anon} KiB");
        times.push(t);
        anons.push(anon as f64);
        let (t, _) = restore_once(&state, &mem, Some("off"))
            .with_context(|| format!("restore {i} without seccomp"))?;
        eprintln!("restore {i} without seccomp: first echo {t:.1} ms");
        unfiltered.push(t);
    }
    // Two at once from the one snapshot.
    let pair_started = Instant::now();
    let mut a = Vm::restore(&spec(), &state, &mem)?;
    let mut b = Vm::restore(&spec(), &state, &mem)?;
    let ta = first_echo(&mut a, STEP_TIMEOUT)?;
    let tb = first_echo(&mut b, STEP_TIMEOUT)?;
    let pair = pair_started.elapsed();
    stop(&mut a)?;
    stop(&mut b)?;

    let restore_ms = median(times);
    let unfiltered_ms = median(unfiltered);
    println!("snapshot-bench: 1 vCPU, 128 MiB, test image, kvm_pvm; one run");
    println!(
        "cold boot, VMM start -> first vsock echo        {:>10.1} ms   private memory {cold_anon} KiB (guest RAM included)",
        ms(cold)
    );
    println!(
        "restore,   VMM start -> first vsock echo (median of {restores}) {:>6.1} ms   private memory {:.0} KiB (median)",
        restore_ms,
        median(anons)
    );
    println!(
        "restore without the VMM's seccomp filters (median of {restores}) {unfiltered_ms:>6.1} ms   ratio filtered / unfiltered {:.3}",
        restore_ms / unfiltered_ms
    );
    println!(
        "two restores at once: both answered after {:.1} ms ({:.1} / {:.1} ms)",
        ms(pair),
        ms(ta),
        ms(tb)
    );
    println!(
        "snapshot of the paused VM {:.1} ms: state file {} bytes, memory file {} MiB with {:.1} MiB of data",
        snap.elapsed_ms,
        snap.state_bytes,
        snap.mem_file_bytes >> 20,
        snap.mem_data_bytes as f64 / f64::from(1 << 20)
    );
    println!(
        "ratio restore / cold boot: {:.4} (restore is {:.0}x faster)",
        restore_ms / ms(cold),
        ms(cold) / restore_ms
    );
    Ok(())
}
