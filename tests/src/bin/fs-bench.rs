//! `fs-bench [--mib M] [--files N] [--swaps S]`: a pod's volume (virtio-fs) against the container's own
//! root file system (overlay, upper layer on the guest's tmpfs) in the same guest, and the
//! same work on the host, one run.
//!
//! In one privileged container of one pod (VM templates on; nothing timed includes the
//! pod's start), for each place: a sequential write of M MiB (default 64; `dd bs=1M`, then
//! fsync) and its read back after dropping the guest's caches (`dd bs=1M`), MiB/s; and N
//! small files (default 1,000) created, stat'ed and unlinked, files/s. Times are taken in
//! the guest (`/proc/uptime`, 10 ms steps) around each step, so no exec overhead counts.
//! The host figures are the same steps with the same tools on a host directory.
//! Then S configMap `..data` swaps (default 5), each timed from the swap on the host to
//! its value seen in the container (an upper bound: the container's write-back of a
//! marker is included; see `podvisor_tests::configmap`).
//!
//! Prints figures and ratios; asserts no time. Needs root, /dev/kvm, the guest kernel and
//! agent image (`make guest`) and the CNI plugins.

use std::path::Path;
use std::time::Instant;

use tonic::transport::Channel;

use anyhow::{Context, Result, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_tests::configmap::{SwapWatch, write_configmap};
use podvisor_tests::cri::{IDLE_SCRIPT, connect, pull_image, shell_container, start_cri_daemon};

type Runtime = RuntimeServiceClient<Channel>;

/// What one place measured: write and read MiB/s, small files per second.
#[derive(Debug, Clone, Copy)]
struct Figures {
    write: f64,
    read: f64,
    files: f64,
}

/// The benchmark script for directory `dir`: prints `<step> <start> <end>` lines. In the
/// guest (`in_guest`: caches dropped) the clock is `/proc/uptime` (10 ms steps, no fork;
/// the guest's steps take seconds); on the host `date +%s.%N`, as its steps take about a
/// millisecond.
fn script(dir: &str, mib: u32, files: u32, in_guest: bool) -> String {
    let (drop, now) = if in_guest {
        (
            "sync; echo 3 > /proc/sys/vm/drop_caches;",
            "read u _ < /proc/uptime; echo $u",
        )
    } else {
        ("", "date +%s.%N")
    };
    format!(
        "set -e; now() {{ {now}; }}; d={dir}; mkdir -p $d; \
         a=$(now); dd if=/dev/zero of=$d/big bs=1M count={mib} conv=fsync 2>/dev/null; \
         b=$(now); echo write $a $b; {drop} \
         a=$(now); dd if=$d/big of=/dev/null bs=1M 2>/dev/null; b=$(now); echo read $a $b; \
         rm -f $d/big; mkdir -p $d/small; cd $d/small; \
         a=$(now); i=0; while [ $i -lt {files} ]; do : > f$i; i=$((i+1)); done; \
         stat * > /dev/null; rm -f f*; b=$(now); echo files $a $b; cd /; rmdir $d/small"
    )
}

/// Reads `<step> <start> <end>` lines into figures.
fn figures(out: &str, mib: u32, files: u32) -> Result<Figures> {
    let mut f = Figures {
        write: 0.0,
        read: 0.0,
        files: 0.0,
    };
    for line in out.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [step, a, b] = parts.as_slice() else {
            continue;
        };
        // A floor against a zero interval on the host's nanosecond clock.
        let secs = (b.parse::<f64>()? - a.parse::<f64>()?).max(1e-6);
        match *step {
            "write" => f.write = f64::from(mib) / secs,
            "read" => f.read = f64::from(mib) / secs,
            "files" => f.files = f64::from(files) / secs,
            _ => {}
        }
    }
    ensure!(
        f.write > 0.0 && f.read > 0.0 && f.files > 0.0,
        "incomplete: {out:?}"
    );
    Ok(f)
}

fn host_figures(dir: &Path, mib: u32, files: u32) -> Result<Figures> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script(&dir.display().to_string(), mib, files, false))
        .output()
        .context("run the host script")?;
    ensure!(
        out.status.success(),
        "host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    figures(&String::from_utf8_lossy(&out.stdout), mib, files)
}

/// What a run is asked to do.
struct Args {
    mib: u32,
    files: u32,
    swaps: u32,
}

fn parse_args() -> Result<Args> {
    let (mut mib, mut files, mut swaps) = (64, 1000, 5);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = |v: Option<String>| -> Result<u32> {
            v.context("a value is missing")?
                .parse()
                .context("not a number")
        };
        match a.as_str() {
            "--mib" => mib = value(args.next())?,
            "--files" => files = value(args.next())?,
            "--swaps" => swaps = value(args.next())?,
            other => {
                bail!("unknown argument {other:?} (fs-bench [--mib M] [--files N] [--swaps S])")
            }
        }
    }
    ensure!(swaps > 0, "--swaps must be at least 1");
    Ok(Args { mib, files, swaps })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let (setup, mut daemon) = start_cri_daemon("fsbench", "pvfsbench0", "10.88.219.0/24").await?;
    let result = run(&daemon, &setup.image_name, &args).await;
    if result.is_err() {
        eprintln!("{}", daemon.log());
    }
    daemon.stop()?;
    result
}

/// The privileged pod with one idle container holding `volume` at /vol and the configMap
/// `config_map` at /config (read-only); returns the sandbox and container ids.
async fn start_pod(
    rt: &mut Runtime,
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    volume: &Path,
    config_map: &Path,
) -> Result<(String, String)> {
    let privileged = Some(cri::LinuxSandboxSecurityContext {
        privileged: true,
        ..Default::default()
    });
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "fsbench".into(),
            uid: "uid-fsbench".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: privileged,
            ..Default::default()
        }),
        ..Default::default()
    };
    let sandbox = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let image = pull_image(images, image, &pod).await?;
    let config = cri::ContainerConfig {
        mounts: vec![
            cri::Mount {
                container_path: "/vol".into(),
                host_path: volume.display().to_string(),
                ..Default::default()
            },
            cri::Mount {
                container_path: "/config".into(),
                host_path: config_map.display().to_string(),
                readonly: true,
                ..Default::default()
            },
        ],
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..shell_container("bench", &image, IDLE_SCRIPT)
    };
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(config),
            sandbox_config: Some(pod),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    Ok((sandbox, id))
}

async fn run(daemon: &podvisor_tests::cri::Daemon, image: &str, args: &Args) -> Result<()> {
    let Args { mib, files, swaps } = *args;
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let volume = daemon.dir().join("volume");
    std::fs::create_dir_all(&volume)?;
    let config_map = daemon.dir().join("config-map");
    write_configmap(&config_map, "..v0", "v0\n")?;
    let started = Instant::now();
    let (sandbox, id) = start_pod(&mut rt, &mut images, image, &volume, &config_map).await?;
    eprintln!(
        "[fs-bench] pod ready after {:.0} s (not a figure)",
        started.elapsed().as_secs_f64()
    );
    let mut guest = Vec::new();
    for (name, dir) in [
        ("volume (virtio-fs)", "/vol/bench"),
        ("rootfs (overlay)", "/bench"),
    ] {
        let out = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["sh".into(), "-c".into(), script(dir, mib, files, true)],
                timeout: 3600,
            })
            .await?
            .into_inner();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.exit_code == 0,
            "{name}: exit {}: {text}{}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
        let f = figures(&text, mib, files)?;
        eprintln!("[fs-bench] {name}: {f:?}");
        guest.push(f);
    }
    let host = host_figures(&daemon.dir().join("host-bench"), mib, files)?;
    let watch = SwapWatch {
        key_in_container: "/config/greeting".into(),
        marker_in_container: "/vol/seen".into(),
        marker_on_host: volume.join("seen"),
    };
    let mut seen = Vec::new();
    for n in 1..=swaps {
        let took = watch
            .time_swap(&rt, &id, &config_map, &format!("..v{n}"), &format!("v{n}"))
            .await?;
        eprintln!("[fs-bench] configMap swap {n}: {:.3} s", took.as_secs_f64());
        seen.push(took.as_secs_f64());
    }
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sandbox,
    })
    .await?;
    print_table(mib, files, guest[0], guest[1], host);
    seen.sort_by(f64::total_cmp);
    println!(
        "\nconfigMap ..data swap seen in the container (upper bound), {swaps} swaps: \
         median {:.3} s, max {:.3} s (target ≤ 1 s)",
        seen[seen.len() / 2],
        seen[seen.len() - 1]
    );
    Ok(())
}

/// How a row reads its figure.
type Pick = fn(&Figures) -> f64;

fn print_table(mib: u32, files: u32, vol: Figures, rootfs: Figures, host: Figures) {
    println!(
        "\nfs-bench: one run, {mib} MiB sequential, {files} small files, one privileged \
         container\n"
    );
    println!(
        "{:<44}{:>12}{:>12}{:>12}{:>12}{:>12}",
        "", "volume", "rootfs", "host", "vol/rootfs", "vol/host"
    );
    let rows: [(&str, Pick); 3] = [
        ("sequential write (+fsync), MiB/s", |f| f.write),
        ("sequential read (cold cache), MiB/s", |f| f.read),
        ("small files create+stat+unlink, files/s", |f| f.files),
    ];
    for (label, get) in rows {
        println!(
            "{label:<44}{:>12.2}{:>12.2}{:>12.2}{:>12.2}{:>12.4}",
            get(&vol),
            get(&rootfs),
            get(&host),
            get(&vol) / get(&rootfs),
            get(&vol) / get(&host),
        );
    }
}
