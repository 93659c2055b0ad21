//! `boot-bench`: boots the test image N times with podvisor-vmm and with
//! QEMU's microvm machine, and prints boot times and memory side by side.
//!
//! ```text
//! cargo run --release -p podvisor-tests --bin boot-bench -- [--runs N] [--qemu-runs N] [--no-qemu] [--mem-mib N]
//! ```
//!
//! The guest script is tests/guest/bench.sh (the kernel wrote the boot marker
//! just before running it): print `PROBE: bench=init`, hold 1 s (so memory can be sampled at init),
//! `poweroff -f`. So "exit" figures include that 1 s hold, on both VMMs.
//!
//! Figures per run (milliseconds from spawning the VMM process):
//! - vcpu: first KVM_RUN (`GET /vm` `boot.first_vcpu_entry_ms`, polled early);
//! - init(api): the guest kernel wrote the boot-marker port just before running init (`boot.init_ms`);
//! - init(con): the host saw `PROBE: bench=init` on the console file (50 ms polls),
//!   measured the same way for QEMU, so that is the column the ratio uses;
//! - exit: the VMM process ended;
//! - RSS: from /proc/<pid>/smaps sampled at init: total Rss, and Rss minus
//!   the guest RAM mapping (an anonymous mapping of exactly mem-mib MiB for
//!   podvisor-vmm, the largest anonymous mapping of mem-mib..mem-mib+4 MiB
//!   for QEMU); see podvisor_tests::procfs.
//!
//! On a kvm_pvm host the guest kernel is emulated: compare ratios from one
//! run, not absolute times.

use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use podvisor_tests::procfs::{self, GuestRam};
use podvisor_tests::vm::test_cmdline;
use podvisor_tests::{Vm, VmSpec, artifacts, image, paths};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long QEMU gets to exit after init (see `qemu_run`).
const QEMU_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const INIT_MARKER: &str = "PROBE: bench=init";
/// QEMU's isa-debug-exit at the guest kernel's power-off port exits with (0 << 1) | 1.
const QEMU_POWER_OFF_STATUS: i32 = 1;

#[derive(Debug)]
struct Options {
    runs: usize,
    qemu_runs: usize,
    mem_mib: u64,
}

/// QEMU's CPU model: the host's, less what a kvm_pvm host cannot set.
const QEMU_CPU: &str = "host,arch-capabilities=off";

fn parse_options() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 5,
        qemu_runs: 5,
        mem_mib: 128,
    };
    let mut qemu_runs = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> anyhow::Result<usize> {
            let v = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name} {v:?} is not a number"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs")?,
            "--qemu-runs" => qemu_runs = Some(num("--qemu-runs")?),
            "--no-qemu" => qemu_runs = Some(0),
            "--mem-mib" => o.mem_mib = num("--mem-mib")? as u64,
            "-h" | "--help" => {
                println!("boot-bench [--runs N] [--qemu-runs N] [--no-qemu] [--mem-mib N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ensure!(o.runs > 0, "--runs must be at least 1");
    o.qemu_runs = qemu_runs.unwrap_or(o.runs);
    Ok(o)
}

#[derive(Debug, Default, Clone)]
struct Run {
    vcpu_ms: Option<f64>,
    init_api_ms: Option<f64>,
    init_console_ms: Option<f64>,
    exit_ms: Option<f64>,
    rss_total_kib: Option<u64>,
    rss_vmm_kib: Option<u64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn podvisor_run(mem_mib: u64) -> anyhow::Result<Run> {
    let spec = VmSpec {
        mem_mib,
        api: true,
        ..VmSpec::new("bench")
    };
    let mut vm = Vm::boot(&spec, None)?;
    let mut run = Run::default();
    // The first vCPU entry comes early: poll the API for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.vcpu_ms.is_none() && Instant::now() < deadline && vm.try_status()?.is_none() {
        if vm.api_sock().is_ok_and(Path::exists)
            && let Ok(info) = vm.info()
        {
            run.vcpu_ms = info.boot.first_vcpu_entry_ms;
        }
        if run.vcpu_ms.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    vm.wait_for_console(INIT_MARKER, BOOT_TIMEOUT)?;
    run.init_console_ms = Some(ms(vm.started().elapsed()));
    if let Ok(rss) = procfs::rss(vm.pid(), GuestRam::Exact(mem_mib << 20)) {
        run.rss_total_kib = Some(rss.total_kib);
        run.rss_vmm_kib = rss.vmm_kib();
    }
    if let Ok(info) = vm.info() {
        run.init_api_ms = info.boot.init_ms;
        run.vcpu_ms = run.vcpu_ms.or(info.boot.first_vcpu_entry_ms);
    }
    let status = vm.wait_exit(EXIT_TIMEOUT)?;
    run.exit_ms = Some(ms(vm.started().elapsed()));
    ensure!(
        status.code() == Some(0),
        "podvisor-vmm ended with {status}\n{}",
        vm.report()
    );
    Ok(run)
}

fn qemu_run(mem_mib: u64, dir: &Path) -> anyhow::Result<Run> {
    let kernel = paths::guest_kernel()?;
    let img = image::test_image()?;
    let console = dir.join("qemu-console.log");
    let stderr_path = dir.join("qemu.stderr");
    let _ = std::fs::remove_file(&console);
    let mut cmd = qemu_command(mem_mib, &kernel, &img, &console, &stderr_path)?;
    let started = Instant::now();
    let mut child = cmd.spawn().context("spawn qemu-system-x86_64")?;
    let mut run = Run::default();
    let result = (|| -> anyhow::Result<()> {
        qemu_wait_for_init(&mut child, started, &console, &stderr_path, &mut run)?;
        if let Ok(rss) = procfs::rss(child.id(), GuestRam::AtLeast(mem_mib << 20)) {
            run.rss_total_kib = Some(rss.total_kib);
            run.rss_vmm_kib = rss.vmm_kib();
        }
        qemu_wait_for_exit(&mut child, started, &stderr_path, &mut run)
    })();
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result.map(|()| run)
}

/// The guest kernel command line for QEMU: the test image's, plus the flags podvisor-vmm
/// adds itself (see podvisor_vmm::boot::cmdline::build); QEMU adds the
/// virtio_mmio.device declarations.
fn qemu_append() -> String {
    let mut append = format!(
        "{} console=ttyS0 8250.nr_uarts=1 reboot=k podvisor.exit_port={:#x}",
        test_cmdline("bench"),
        podvisor_vmm::devices::legacy::EXIT_PORT
    );
    if podvisor_vmm::boot::cmdline::host_is_pvm() {
        append.push(' ');
        append.push_str(podvisor_vmm::boot::cmdline::PVM_FLAGS);
    }
    append
}

/// The QEMU microvm command booting `kernel` with the read-only root image `img`, the
/// serial console written to `console` and stderr to `stderr_path` (created here).
fn qemu_command(
    mem_mib: u64,
    kernel: &Path,
    img: &Path,
    console: &Path,
    stderr_path: &Path,
) -> anyhow::Result<Command> {
    let append = qemu_append();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        // kvm_pvm refuses IA32_ARCH_CAPABILITIES writes, which QEMU asserts on.
        QEMU_CPU,
    ])
    .args([
        "-m",
        &mem_mib.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", &append])
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,readonly=on",
        img.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"])
    .args([
        "-device",
        &format!(
            "isa-debug-exit,iobase={:#x},iosize=1",
            podvisor_vmm::devices::legacy::EXIT_PORT
        ),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(stderr_path)?);
    Ok(cmd)
}

/// QEMU's stderr so far (empty if unreadable).
fn qemu_stderr(stderr_path: &Path) -> String {
    std::fs::read_to_string(stderr_path).unwrap_or_default()
}

/// Polls the console file every 50 ms until it has the init marker and records
/// `init_console_ms`; fails if QEMU ends first or `BOOT_TIMEOUT` passes.
fn qemu_wait_for_init(
    child: &mut Child,
    started: Instant,
    console: &Path,
    stderr_path: &Path,
    run: &mut Run,
) -> anyhow::Result<()> {
    let deadline = started + BOOT_TIMEOUT;
    loop {
        if std::fs::read_to_string(console).is_ok_and(|c| c.contains(INIT_MARKER)) {
            run.init_console_ms = Some(ms(started.elapsed()));
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            bail!(
                "QEMU ended ({s}) before {INIT_MARKER:?}; stderr: {}",
                qemu_stderr(stderr_path).trim()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "QEMU: no {INIT_MARKER:?} within {BOOT_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `QEMU_EXIT_TIMEOUT` for QEMU to end after the guest's power-off, records
/// `exit_ms` and checks the isa-debug-exit status.
///
/// Under kvm_pvm, QEMU's isa-debug-exit was seen not to end QEMU on the guest's power-off
/// write: then this keeps the init figures and leaves the exit time empty rather than
/// dropping the run.
fn qemu_wait_for_exit(
    child: &mut Child,
    started: Instant,
    stderr_path: &Path,
    run: &mut Run,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + QEMU_EXIT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "qemu: no exit within {QEMU_EXIT_TIMEOUT:?} after the guest powered off; exit time not measured"
            );
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(status) = status {
        run.exit_ms = Some(ms(started.elapsed()));
        ensure!(
            status.code() == Some(QEMU_POWER_OFF_STATUS),
            "QEMU ended with {status} (power-off through isa-debug-exit is {QEMU_POWER_OFF_STATUS}); stderr: {}",
            qemu_stderr(stderr_path).trim()
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn median_of(runs: &[Run], f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    median(runs.iter().filter_map(f).collect())
}

fn median_row(runs: &[Run]) -> Run {
    let kib =
        |f: fn(&Run) -> Option<u64>| median_of(runs, |r| f(r).map(|v| v as f64)).map(|v| v as u64);
    Run {
        vcpu_ms: median_of(runs, |r| r.vcpu_ms),
        init_api_ms: median_of(runs, |r| r.init_api_ms),
        init_console_ms: median_of(runs, |r| r.init_console_ms),
        exit_ms: median_of(runs, |r| r.exit_ms),
        rss_total_kib: kib(|r| r.rss_total_kib),
        rss_vmm_kib: kib(|r| r.rss_vmm_kib),
    }
}

const HEADERS: [&str; 8] = [
    "vmm",
    "run",
    "vcpu ms",
    "init(api) ms",
    "init(con) ms",
    "exit ms",
    "RSS total MiB",
    "RSS excl. guest MiB",
];

fn cells(vmm: &str, label: &str, r: &Run) -> Vec<String> {
    let t = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let m = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1024.0));
    vec![
        vmm.into(),
        label.into(),
        t(r.vcpu_ms),
        t(r.init_api_ms),
        t(r.init_console_ms),
        t(r.exit_ms),
        m(r.rss_total_kib),
        m(r.rss_vmm_kib),
    ]
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i < 2 {
                let _ = write!(s, "{c:<w$}  ");
            } else {
                let _ = write!(s, "{c:>w$}  ");
            }
        }
        println!("{}", s.trim_end());
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    println!(
        "{}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
    );
    for r in rows {
        line(r);
    }
}

fn main() -> anyhow::Result<()> {
    let o = parse_options()?;
    paths::require_kvm()?;
    print_setup(&o)?;
    let mut rows = Vec::new();
    let ours = podvisor_runs(&o, &mut rows);
    let ours_median = median_row(&ours);
    rows.push(cells("podvisor", "median", &ours_median));
    let (theirs, qemu_error) = qemu_runs(&o, &mut rows)?;
    let theirs_median = median_row(&theirs);
    if !theirs.is_empty() {
        rows.push(cells("qemu", "median", &theirs_median));
    }
    println!();
    print_table(&HEADERS, &rows);
    if !theirs.is_empty() {
        print_ratios(&ours_median, &theirs_median);
    }
    if let Some(e) = qemu_error {
        println!("\nQEMU failed (last error): {e}");
    }
    println!(
        "\nRSS excl. guest = total Rss in /proc/<pid>/smaps at init minus the Rss of the guest RAM mapping \
         (anonymous, exactly mem-mib MiB for podvisor; largest anonymous mapping of mem-mib..mem-mib+4 MiB for QEMU).\n\
         exit includes bench.sh's 1 s hold at init."
    );
    if ours.is_empty() {
        bail!("no podvisor run succeeded");
    }
    Ok(())
}

/// Prints the kernel, VMM and image in use and what will run.
fn print_setup(o: &Options) -> anyhow::Result<()> {
    let kernel = paths::guest_kernel()?;
    let vmm = artifacts::vmm_binary()?;
    let img = image::test_image()?;
    println!("kernel {}", kernel.display());
    println!("vmm    {}", vmm.display());
    println!("image  {}", img.display());
    println!(
        "{} podvisor boot(s), {} QEMU boot(s), 1 vCPU, {} MiB, kvm_pvm host: {}",
        o.runs,
        o.qemu_runs,
        o.mem_mib,
        podvisor_vmm::boot::cmdline::host_is_pvm()
    );
    Ok(())
}

/// Boots podvisor-vmm `o.runs` times, adding a table row per run; returns the runs that
/// succeeded.
fn podvisor_runs(o: &Options, rows: &mut Vec<Vec<String>>) -> Vec<Run> {
    let mut ours = Vec::new();
    for i in 1..=o.runs {
        match podvisor_run(o.mem_mib) {
            Ok(r) => {
                eprintln!("podvisor run {i}: {r:?}");
                rows.push(cells("podvisor", &i.to_string(), &r));
                ours.push(r);
            }
            Err(e) => {
                eprintln!("podvisor run {i} failed: {e:#}");
                rows.push(cells("podvisor", &format!("{i} FAILED"), &Run::default()));
            }
        }
    }
    ours
}

/// Boots QEMU `o.qemu_runs` times, adding a table row per run; returns the runs that
/// succeeded and the last failure's error.
fn qemu_runs(
    o: &Options,
    rows: &mut Vec<Vec<String>>,
) -> anyhow::Result<(Vec<Run>, Option<String>)> {
    let mut theirs = Vec::new();
    let mut qemu_error = None;
    if o.qemu_runs > 0 {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-bench-qemu-")
            .tempdir()?;
        for i in 1..=o.qemu_runs {
            match qemu_run(o.mem_mib, dir.path()) {
                Ok(r) => {
                    eprintln!("qemu run {i}: {r:?}");
                    rows.push(cells("qemu", &i.to_string(), &r));
                    theirs.push(r);
                }
                Err(e) => {
                    eprintln!("qemu run {i} failed: {e:#}");
                    rows.push(cells("qemu", &format!("{i} FAILED"), &Run::default()));
                    qemu_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    Ok((theirs, qemu_error))
}

/// Prints the podvisor/QEMU ratios of the medians.
fn print_ratios(ours_median: &Run, theirs_median: &Run) {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let kib = |v: Option<u64>| v.map(|v| v as f64);
    println!();
    print_table(
        &["ratio podvisor/qemu (medians)", "value"],
        &[
            vec![
                "init (console marker)".into(),
                ratio(ours_median.init_console_ms, theirs_median.init_console_ms),
            ],
            vec![
                "exit".into(),
                ratio(ours_median.exit_ms, theirs_median.exit_ms),
            ],
            vec![
                "RSS total".into(),
                ratio(
                    kib(ours_median.rss_total_kib),
                    kib(theirs_median.rss_total_kib),
                ),
            ],
            vec![
                "RSS excl. guest RAM".into(),
                ratio(kib(ours_median.rss_vmm_kib), kib(theirs_median.rss_vmm_kib)),
            ],
        ],
    );
}
