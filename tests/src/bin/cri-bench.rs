//! `cri-bench [RUNS]` (default 3): pod start and stop+remove through the CRI socket, and the
//! host memory of a pod, for podvisor and, when Debian's containerd is installed, for
//! containerd + runc driven by the same client.
//!
//! Per run: RunPodSandbox + CreateContainer + StartContainer ("pod start"), the pod's memory
//! with it running, then StopContainer + RemoveContainer + StopPodSandbox +
//! RemovePodSandbox ("stop + remove"). The image is pulled before the runs. Printed:
//! medians over the runs.
//!
//! Memory of a pod: for podvisor the VMM's RSS (all of it, and without the guest RAM
//! mapping), for containerd the RSS of the pod's shim and every process under it (pause and
//! the container); plus how much the runtime daemon's own RSS grew while the pod started.
//! RSS counts shared library pages in every process, so the containerd sum is an upper bound.
//!
//! The container asks for the namespaces kubelet asks for by default (a PID namespace of its
//! own, the pod's network and IPC), from both runtimes; with `--seccomp-default` also the
//! RuntimeDefault seccomp profile (kubelet's `--seccomp-default`), to measure what it costs.
//!
//! `--compare-jail`: podvisor only, template starts only, twice in one run: VMMs jailed (the
//! default) and unjailed (`vmm_user = ""`); prints both and the ratio, the jail's cost.
//!
//! Everything runs in temporary directories: a local registry with busybox, podvisord with
//! its own configuration, containerd with its own root, state, socket and CNI network. Both
//! runtimes give their pods a network (a bridge CNI network, Debian's plugins).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_tests::containerd::{Containerd, containerd_available, push_pause};
use podvisor_tests::cri::{
    CNI_BIN_DIR, Daemon, connect, delete_link, shell_container, write_bridge_conflist,
};
use podvisor_tests::procfs::{self, GuestRam, cmdline, pids, with_descendants};
use podvisor_tests::registry::{Registry, push_busybox};
use podvisor_tests::{artifacts, paths};
use tonic::transport::Channel;

/// Guest memory of the benchmark's pod VMs.
const POD_MEM_MIB: u64 = 256;
/// The container of every pod: exits at once on SIGTERM, as a well-behaved workload does.
/// It says "ready" once its handler is in place: as the init of its own PID namespace it
/// would not even see a SIGTERM that came before (the kernel drops signals a namespace's init
/// does not handle), and StopContainer would wait its whole timeout.
const WORKLOAD: &str = "trap 'exit 0' TERM; echo ready; sleep 100000 & wait";
/// How long the workload may take to say it is ready (not part of any figure).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// StopContainer's grace period.
const STOP_TIMEOUT: i64 = 10;

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// RunPodSandbox alone.
    run_sandbox: Duration,
    /// RunPodSandbox + CreateContainer + StartContainer.
    start: Duration,
    stop_remove: Duration,
    /// The pod's processes' RSS.
    pod_rss_kib: u64,
    /// The same without guest RAM (podvisor booted from a kernel only: a restored VM's RAM
    /// is a file mapping).
    pod_rss_no_guest_kib: Option<u64>,
    /// Memory only the pod's VMM holds: `Anonymous:` in smaps_rollup (podvisor only; with a
    /// template, the guest pages it wrote since the restore plus the VMM's own heap).
    private_kib: Option<u64>,
    /// The runtime daemon's RSS growth while the pod started.
    daemon_growth_kib: i64,
}

/// What differs between the runtimes.
enum Runtime {
    Podvisor { daemon_pid: u32 },
    Containerd { daemon_pid: u32 },
}

impl Runtime {
    fn name(&self) -> &'static str {
        match self {
            Runtime::Podvisor { .. } => "podvisor",
            Runtime::Containerd { .. } => "containerd",
        }
    }

    fn daemon_pid(&self) -> u32 {
        match self {
            Runtime::Podvisor { daemon_pid } | Runtime::Containerd { daemon_pid } => *daemon_pid,
        }
    }

    /// The pod's RSS, without guest RAM, and private, while it runs.
    async fn pod_rss(
        &self,
        rt: &mut RuntimeServiceClient<Channel>,
        sandbox_id: &str,
    ) -> anyhow::Result<(u64, Option<u64>, Option<u64>)> {
        match self {
            Runtime::Podvisor { .. } => {
                let sb = rt
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: sandbox_id.into(),
                        verbose: true,
                    })
                    .await
                    .context("PodSandboxStatus")?
                    .into_inner();
                let info: serde_json::Value =
                    serde_json::from_str(sb.info.get("info").context("no verbose info")?)?;
                let pid = u32::try_from(info["vmm"]["pid"].as_u64().context("no VMM pid")?)?;
                let rss = procfs::rss(pid, GuestRam::Exact(POD_MEM_MIB << 20))?;
                Ok((
                    rss.total_kib,
                    rss.vmm_kib(),
                    Some(procfs::anonymous_kib(pid)?),
                ))
            }
            Runtime::Containerd { .. } => {
                let needle = format!("-id {sandbox_id}");
                let shims: Vec<u32> = pids()
                    .into_iter()
                    .filter(|p| {
                        let c = cmdline(*p);
                        c.contains("containerd-shim") && c.contains(&needle)
                    })
                    .collect();
                ensure!(!shims.is_empty(), "no containerd shim for pod {sandbox_id}");
                let mut total = 0;
                for pid in with_descendants(&shims) {
                    total += total_rss_kib(pid).unwrap_or(0);
                }
                Ok((total, None, None))
            }
        }
    }
}

fn total_rss_kib(pid: u32) -> anyhow::Result<u64> {
    Ok(procfs::rss(pid, GuestRam::Exact(0))?.total_kib)
}

/// Waits until the container's CRI log has the workload's "ready" line.
async fn wait_for_ready(log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.ends_with(" ready")) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the workload did not log \"ready\" within {READY_TIMEOUT:?}; {}: {text:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The namespaces kubelet asks for a container of a pod without hostNetwork or
/// shareProcessNamespace: the pod's network and IPC, a PID namespace of its own.
fn kubelet_security_context() -> cri::LinuxContainerSecurityContext {
    cri::LinuxContainerSecurityContext {
        seccomp: SECCOMP_DEFAULT
            .get()
            .copied()
            .unwrap_or(false)
            .then(|| cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Pod as i32,
            pid: cri::NamespaceMode::Container as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_config(n: usize, log_directory: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        log_directory: log_directory.display().to_string(),
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("bench-{n}"),
            uid: format!("bench-uid-{n}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("bench-{n}"),
        ..Default::default()
    }
}

/// Pulls `image` and `prepull` (containerd's sandbox image), untimed, and runs the pod
/// start / stop + remove cycle `runs` times.
async fn bench(
    runtime: &Runtime,
    socket: &Path,
    image: &str,
    prepull: Option<&str>,
    runs: usize,
) -> anyhow::Result<Vec<Sample>> {
    let channel = connect(socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    print_version(runtime, &mut rt).await?;
    let image_ref = pull_images(runtime, &mut images, image, prepull).await?;
    let logs = tempfile::Builder::new().prefix("pvbench-logs").tempdir()?;
    let mut samples = Vec::new();
    for n in 0..runs {
        let log_dir = logs.path().join(format!("{}-{n}", runtime.name()));
        std::fs::create_dir_all(&log_dir)?;
        let sample = bench_run(runtime, &mut rt, n, &log_dir, &image_ref).await?;
        print_sample(runtime, n, &sample);
        samples.push(sample);
    }
    Ok(samples)
}

/// Asks the runtime for its CRI Version and prints it.
async fn print_version(
    runtime: &Runtime,
    rt: &mut RuntimeServiceClient<Channel>,
) -> anyhow::Result<()> {
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .context("Version")?
        .into_inner();
    println!(
        "[bench] {}: {} {} (CRI {})",
        runtime.name(),
        v.runtime_name,
        v.runtime_version,
        v.runtime_api_version
    );
    Ok(())
}

/// Pulls `prepull` (if any, untimed), then `image`, printing how long that took; returns
/// `image`'s reference.
async fn pull_images(
    runtime: &Runtime,
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    prepull: Option<&str>,
) -> anyhow::Result<String> {
    if let Some(other) = prepull {
        images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: other.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .with_context(|| format!("{}: PullImage {other}", runtime.name()))?;
    }
    let t = Instant::now();
    let image_ref = images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("{}: PullImage {image}", runtime.name()))?
        .into_inner()
        .image_ref;
    println!(
        "[bench] {}: pulled {image} in {:.2} s",
        runtime.name(),
        t.elapsed().as_secs_f64()
    );
    Ok(image_ref)
}

/// A pod started by `start_pod`, with its two timings.
struct StartedPod {
    sandbox_id: String,
    container_id: String,
    /// RunPodSandbox alone.
    run_sandbox: Duration,
    /// RunPodSandbox + CreateContainer + StartContainer.
    start: Duration,
}

/// One run of the cycle, pod `n` logging to `log_dir`: the pod start, the pod's memory and
/// the daemon's growth while it started, the wait for the workload (untimed), then the
/// stop + remove.
async fn bench_run(
    runtime: &Runtime,
    rt: &mut RuntimeServiceClient<Channel>,
    n: usize,
    log_dir: &Path,
    image_ref: &str,
) -> anyhow::Result<Sample> {
    let pod = pod_config(n, log_dir);
    let before = total_rss_kib(runtime.daemon_pid())?;
    let started = start_pod(runtime, rt, &pod, image_ref).await?;
    let after = total_rss_kib(runtime.daemon_pid())?;
    let (pod_rss_kib, pod_rss_no_guest_kib, private_kib) =
        runtime.pod_rss(rt, &started.sandbox_id).await?;
    wait_for_ready(&log_dir.join("app.log")).await?;

    let stop_remove =
        stop_and_remove(runtime, rt, started.sandbox_id, started.container_id).await?;
    Ok(Sample {
        run_sandbox: started.run_sandbox,
        start: started.start,
        stop_remove,
        pod_rss_kib,
        pod_rss_no_guest_kib,
        private_kib,
        daemon_growth_kib: i64::try_from(after)? - i64::try_from(before)?,
    })
}

/// RunPodSandbox + CreateContainer + StartContainer of the workload, timed.
async fn start_pod(
    runtime: &Runtime,
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &cri::PodSandboxConfig,
    image_ref: &str,
) -> anyhow::Result<StartedPod> {
    let t = Instant::now();
    let sandbox_id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("{}: RunPodSandbox", runtime.name()))?
        .into_inner()
        .pod_sandbox_id;
    let run_sandbox = t.elapsed();
    let container_id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.clone(),
            config: Some(cri::ContainerConfig {
                log_path: "app.log".into(),
                linux: Some(cri::LinuxContainerConfig {
                    security_context: Some(kubelet_security_context()),
                    ..Default::default()
                }),
                ..shell_container("app", image_ref, WORKLOAD)
            }),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .with_context(|| format!("{}: CreateContainer", runtime.name()))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .with_context(|| format!("{}: StartContainer", runtime.name()))?;
    Ok(StartedPod {
        sandbox_id,
        container_id,
        run_sandbox,
        start: t.elapsed(),
    })
}

/// StopContainer + RemoveContainer + StopPodSandbox + RemovePodSandbox; returns how long
/// they took.
async fn stop_and_remove(
    runtime: &Runtime,
    rt: &mut RuntimeServiceClient<Channel>,
    sandbox_id: String,
    container_id: String,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: container_id.clone(),
        timeout: STOP_TIMEOUT,
    })
    .await
    .with_context(|| format!("{}: StopContainer", runtime.name()))?;
    rt.remove_container(cri::RemoveContainerRequest { container_id })
        .await
        .with_context(|| format!("{}: RemoveContainer", runtime.name()))?;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .with_context(|| format!("{}: StopPodSandbox", runtime.name()))?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sandbox_id,
    })
    .await
    .with_context(|| format!("{}: RemovePodSandbox", runtime.name()))?;
    Ok(t.elapsed())
}

/// Prints run `n`'s figures (`n` counts from 0, printed from 1).
fn print_sample(runtime: &Runtime, n: usize, sample: &Sample) {
    println!(
        "[bench] {} run {}: RunPodSandbox {:.2} s, pod start {:.2} s, stop+remove {:.2} s, \
         pod RSS {} KiB{}, private {} KiB, daemon RSS {:+} KiB",
        runtime.name(),
        n + 1,
        sample.run_sandbox.as_secs_f64(),
        sample.start.as_secs_f64(),
        sample.stop_remove.as_secs_f64(),
        sample.pod_rss_kib,
        sample
            .pod_rss_no_guest_kib
            .map(|k| format!(" ({k} KiB without guest RAM)"))
            .unwrap_or_default(),
        sample
            .private_kib
            .map_or_else(|| "-".to_string(), |k| k.to_string()),
        sample.daemon_growth_kib,
    );
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// Medians of one runtime's samples.
struct Medians {
    run_sandbox_s: f64,
    start_s: f64,
    stop_remove_s: f64,
    pod_rss_mib: f64,
    pod_rss_no_guest_mib: Option<f64>,
    private_mib: Option<f64>,
    daemon_growth_mib: f64,
}

fn medians(samples: &[Sample]) -> Option<Medians> {
    let mib = |k: f64| k / 1024.0;
    Some(Medians {
        run_sandbox_s: median(
            samples
                .iter()
                .map(|s| s.run_sandbox.as_secs_f64())
                .collect(),
        )?,
        private_mib: median(
            samples
                .iter()
                .filter_map(|s| s.private_kib.map(|k| k as f64))
                .collect(),
        )
        .map(mib),
        start_s: median(samples.iter().map(|s| s.start.as_secs_f64()).collect())?,
        stop_remove_s: median(
            samples
                .iter()
                .map(|s| s.stop_remove.as_secs_f64())
                .collect(),
        )?,
        pod_rss_mib: mib(median(
            samples.iter().map(|s| s.pod_rss_kib as f64).collect(),
        )?),
        pod_rss_no_guest_mib: median(
            samples
                .iter()
                .filter_map(|s| s.pod_rss_no_guest_kib.map(|k| k as f64))
                .collect(),
        )
        .map(mib),
        daemon_growth_mib: mib(median(
            samples.iter().map(|s| s.daemon_growth_kib as f64).collect(),
        )?),
    })
}

fn print_table(
    runs: usize,
    template: Option<&Medians>,
    cold: Option<&Medians>,
    containerd: Option<&Medians>,
    template_build_s: Option<f64>,
) {
    println!();
    println!(
        "cri-bench: medians of {runs} runs (podvisor from a VM template, podvisor booting its kernel, containerd + runc)"
    );
    let cell = |v: Option<f64>, prec: usize| match v {
        Some(v) => format!("{v:>12.prec$}"),
        None => format!("{:>12}", "-"),
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b.abs() > f64::EPSILON => format!("{:>10.2}", a / b),
        _ => format!("{:>10}", "-"),
    };
    println!(
        "{:<40} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "", "template", "cold boot", "containerd", "tpl/ctrd", "cold/ctrd"
    );
    type Field = fn(&Medians) -> Option<f64>;
    let rows: [(&str, Field, usize); 7] = [
        ("RunPodSandbox, s", |m| Some(m.run_sandbox_s), 2),
        ("pod start (Run+Create+Start), s", |m| Some(m.start_s), 2),
        ("stop+remove (4 calls), s", |m| Some(m.stop_remove_s), 2),
        (
            "pod RSS (VMM | shim+pause+app), MiB",
            |m| Some(m.pod_rss_mib),
            1,
        ),
        (
            "  VMM RSS without guest RAM, MiB",
            |m| m.pod_rss_no_guest_mib,
            1,
        ),
        (
            "  VMM private (anonymous) memory, MiB",
            |m| m.private_mib,
            1,
        ),
        (
            "runtime daemon RSS growth, MiB",
            |m| Some(m.daemon_growth_mib),
            1,
        ),
    ];
    for (name, f, prec) in rows {
        let t = template.and_then(f);
        let k = cold.and_then(f);
        let c = containerd.and_then(f);
        println!(
            "{name:<40} {} {} {} {} {}",
            cell(t, prec),
            cell(k, prec),
            cell(c, prec),
            ratio(t, c),
            ratio(k, c)
        );
    }
    if let Some(b) = template_build_s {
        println!("template build (boot, agent ready, snapshot), s: {b:.2}");
    }
}

/// podvisord's side: its CNI network goes with it.
struct PodvisorNet {
    dir: tempfile::TempDir,
    bridge: &'static str,
}

impl Drop for PodvisorNet {
    fn drop(&mut self) {
        delete_link(self.bridge);
    }
}

/// The command line: `[RUNS] [--only podvisor|containerd]`.
/// `--seccomp-default`: containers ask for the RuntimeDefault seccomp profile.
static SECCOMP_DEFAULT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

struct Args {
    runs: usize,
    podvisor: bool,
    containerd: bool,
    compare_jail: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        runs: 3,
        podvisor: true,
        containerd: true,
        compare_jail: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seccomp-default" => {
                let _ = SECCOMP_DEFAULT.set(true);
            }
            "--compare-jail" => out.compare_jail = true,
            "--only" => match args.next().as_deref() {
                Some("podvisor") => out.containerd = false,
                Some("containerd") => out.podvisor = false,
                other => bail!("--only podvisor|containerd, not {other:?}"),
            },
            n => {
                out.runs = n.parse().with_context(|| {
                    format!(
                        "usage: cri-bench [RUNS] [--only podvisor|containerd] [--seccomp-default] \
                         [--compare-jail]; {n:?} is no number"
                    )
                })?;
            }
        }
    }
    ensure!(out.runs > 0, "RUNS must be at least 1");
    Ok(out)
}

async fn run() -> anyhow::Result<()> {
    let args = args()?;
    let runs = args.runs;
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "bench/busybox", "1").await?;
    println!("[bench] pushed {} ({})", pushed.reference, pushed.digest);
    if args.compare_jail {
        return compare_jail(&registry, &pushed.reference, runs).await;
    }

    let (template_samples, cold_samples, template_build_s) = if args.podvisor {
        let (t, build) = bench_podvisor(&registry, &pushed.reference, runs, true).await?;
        let (c, _) = bench_podvisor(&registry, &pushed.reference, runs, false).await?;
        (Some(t), Some(c), build)
    } else {
        (None, None, None)
    };

    let containerd_samples = if !args.containerd {
        None
    } else if containerd_available() {
        let pause = push_pause(registry.host(), "bench/pause", "1").await?;
        let ctrd = Containerd::start(registry.host(), &pause, "pvbenchc0", "10.88.213.0/24")?;
        let runtime = Runtime::Containerd {
            daemon_pid: ctrd.pid().context("containerd is not running")?,
        };
        let samples = bench(
            &runtime,
            &ctrd.socket,
            &pushed.reference,
            Some(&pause),
            runs,
        )
        .await;
        if samples.is_err() {
            eprintln!("[bench] containerd's log (end):\n{}", ctrd.log());
        }
        drop(ctrd);
        Some(samples?)
    } else {
        println!("[bench] containerd or runc is not installed: podvisor only");
        None
    };

    let t = template_samples.as_deref().and_then(medians);
    let k = cold_samples.as_deref().and_then(medians);
    let c = containerd_samples.as_deref().and_then(medians);
    print_table(runs, t.as_ref(), k.as_ref(), c.as_ref(), template_build_s);
    Ok(())
}

/// The jail's cost: template starts with jailed VMMs, then unjailed ones, in one run.
async fn compare_jail(registry: &Registry, image: &str, runs: usize) -> anyhow::Result<()> {
    let (jailed, _) = bench_podvisor_as(registry, image, runs, true, "podvisor").await?;
    let (free, _) = bench_podvisor_as(registry, image, runs, true, "").await?;
    let (Some(j), Some(f)) = (medians(&jailed), medians(&free)) else {
        bail!("no samples");
    };
    println!("\n[bench] the VMM jail, template starts, medians of {runs} runs:");
    println!(
        "  {:<28} {:>10} {:>10} {:>7}",
        "", "jailed", "unjailed", "ratio"
    );
    for (what, a, b) in [
        (
            "RunPodSandbox (restore+agent)",
            j.run_sandbox_s,
            f.run_sandbox_s,
        ),
        ("pod start", j.start_s, f.start_s),
        ("stop + remove", j.stop_remove_s, f.stop_remove_s),
    ] {
        println!("  {what:<28} {a:>9.2}s {b:>9.2}s {:>7.3}", a / b);
    }
    Ok(())
}

/// podvisord with its own configuration and CNI network, benchmarked, stopped. With
/// `template`, the handler's VM template is built first (by one pod, not counted) and its
/// build time returned.
async fn bench_podvisor(
    registry: &Registry,
    image: &str,
    runs: usize,
    template: bool,
) -> anyhow::Result<(Vec<Sample>, Option<f64>)> {
    bench_podvisor_as(registry, image, runs, template, "podvisor").await
}

/// [`bench_podvisor`] with VMMs running as `vmm_user` (`""`: unjailed).
async fn bench_podvisor_as(
    registry: &Registry,
    image: &str,
    runs: usize,
    template: bool,
    vmm_user: &str,
) -> anyhow::Result<(Vec<Sample>, Option<f64>)> {
    paths::require_kvm()?;
    let kernel = paths::guest_kernel()?;
    let rootfs = artifacts::agent_rootfs()?;
    let net = PodvisorNet {
        dir: tempfile::Builder::new().prefix("pvcni").tempdir()?,
        bridge: "pvbench0",
    };
    let conf_dir = write_bridge_conflist(
        net.dir.path(),
        "bench-podvisor",
        net.bridge,
        "10.88.212.0/24",
    )?;
    let mut daemon = Daemon::start(&format!(
        "vmm_user = {vmm_user:?}\n[registry]\ninsecure = [{host:?}]\n\n[cni]\nconf_dir = {conf_dir:?}\n\
         bin_dirs = [{CNI_BIN_DIR:?}]\n\n[handlers.podvisor]\nvcpus = 1\n\
         memory_mib = {POD_MEM_MIB}\nkernel = {kernel:?}\nimage = {rootfs:?}\ntemplate = {template}\n",
        host = registry.host(),
        conf_dir = conf_dir.display().to_string(),
        kernel = kernel.display().to_string(),
        rootfs = rootfs.display().to_string(),
    ))?;
    let podvisor = Runtime::Podvisor {
        daemon_pid: daemon.pid().context("podvisord is not running")?,
    };
    let build_s = if template {
        // One pod builds the template; the measured runs restore it.
        bench(&podvisor, &daemon.socket, image, None, 1)
            .await
            .inspect_err(|_| eprintln!("[bench] podvisord's log:\n{}", daemon.log()))?;
        Some(template_build_secs(&daemon.root_dir)?)
    } else {
        None
    };
    let samples = bench(&podvisor, &daemon.socket, image, None, runs).await;
    if samples.is_err() {
        eprintln!("[bench] podvisord's log:\n{}", daemon.log());
    }
    let samples = samples?;
    daemon.stop()?;
    Ok((samples, build_s))
}

/// `build_secs` of the one template under `root_dir/templates`.
fn template_build_secs(root_dir: &Path) -> anyhow::Result<f64> {
    let dir = root_dir.join("templates");
    for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let meta = e?.path().join("template.json");
        if let Ok(text) = std::fs::read_to_string(&meta) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            return v["build_secs"]
                .as_f64()
                .with_context(|| format!("no build_secs in {}", meta.display()));
        }
    }
    bail!("no template was built under {}", dir.display())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run())
}
