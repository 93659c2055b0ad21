//! A node as kubelet runs it: pods' VMMs in kubelet's pod cgroups, with both cgroup
//! drivers, through podvisord's CRI socket on real microVMs.
//!
//! One podvisord, first with `cgroup_driver = "cgroupfs"` (the default), then restarted
//! with `"systemd"`:
//! - RuntimeConfig reports the driver; Status reports RuntimeReady and the handlers, the
//!   default `""` among them;
//! - a pod with kubelet's cgroupfs parent `/kubepods/burstable/pod<uid>` has its VMM in
//!   `<parent>/podvisor-<sandbox>` in every hierarchy; PodSandboxStats and
//!   ListPodSandboxStats (by id prefix and by label) show it busy: CPU and memory from the
//!   VMM's cgroup, traffic on its TAP, its running container; ContainerStats and
//!   ListContainerStats show the megabyte the container wrote into its rootfs as its
//!   writable layer, and no swap (the VM has none); a memory limit set on the pod's
//!   cgroup (as kubelet sets it) applies to the VMM: the guest touching more memory than
//!   the limit gets the VMM killed by the host's OOM killer, counted in that cgroup, and
//!   the sandbox turns NotReady;
//! - a pod with a systemd parent `kubepods-besteffort-pod<uid>.slice` has its VMM in
//!   `kubepods.slice/kubepods-besteffort.slice/<parent>/podvisor-<sandbox>.scope`, and that
//!   leaf is gone once the pod is stopped (kubelet removes the pod's cgroup after);
//! - a parent in the other driver's form is refused with InvalidArgument, leaving nothing;
//! - pods are sized: the second asks for 600 MiB and its guest has at least that (the 1 GiB
//!   size class), a pod over the handler's maximum and a container limit over its VM are
//!   refused; both pods are restored from a template, each of its size class.

// An end-to-end scenario reads top to bottom, step after step.
#![allow(clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_tests::cri::{
    Daemon, IDLE_SCRIPT, cgroup_hierarchies, connect, exec_sync, expect_code, pull_image,
    remove_pod, run_container, run_pod_vm, shell_container, start_cri_daemon,
};
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;

/// How long the guest has to run into the memory limit, and the VMM to be seen gone.
const OOM_DEADLINE: Duration = Duration::from_secs(600);
/// The room the test leaves above the pod cgroup's usage when it sets the limit.
const LIMIT_HEADROOM: u64 = 16 << 20;

fn pod_config(name: &str, cgroup_parent: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        labels: [("pod".to_string(), name.to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn step(name: &str) -> Instant {
    println!("[node] {name} ...");
    Instant::now()
}

fn done(name: &str, t: Instant) {
    println!("[node] {name} took {:.2} s", t.elapsed().as_secs_f64());
}

async fn cgroup_driver(rt: &mut Runtime) -> anyhow::Result<i32> {
    Ok(rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await?
        .into_inner()
        .linux
        .context("no linux runtime config")?
        .cgroup_driver)
}

/// The pids in cgroup `relative` of every hierarchy; each must exist.
fn pids_in(relative: &Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let hierarchies = cgroup_hierarchies();
    ensure!(!hierarchies.is_empty(), "no cgroup hierarchy is mounted");
    hierarchies
        .iter()
        .map(|h| {
            let procs = h.join(relative).join("cgroup.procs");
            let text = std::fs::read_to_string(&procs)
                .with_context(|| format!("read {}", procs.display()))?;
            Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        })
        .collect()
}

/// `relative` in no hierarchy.
fn gone_everywhere(relative: &Path) -> bool {
    cgroup_hierarchies()
        .iter()
        .all(|h| !h.join(relative).exists())
}

/// Removes cgroup `top` and what is below it in every hierarchy (deepest first).
fn remove_tree(top: &str) {
    fn rm(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rm(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for h in cgroup_hierarchies() {
        rm(&h.join(top));
    }
}

/// The memory controller's directory of cgroup `relative`, with its version's file names:
/// (dir, usage file, limit file, events file holding `oom_kill N`).
fn memory_cgroup(
    relative: &Path,
) -> anyhow::Result<(PathBuf, &'static str, &'static str, &'static str)> {
    for h in cgroup_hierarchies() {
        let dir = h.join(relative);
        if dir.join("memory.limit_in_bytes").exists() {
            return Ok((
                dir,
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
                "memory.oom_control",
            ));
        }
        if dir.join("memory.max").exists() {
            return Ok((dir, "memory.current", "memory.max", "memory.events"));
        }
    }
    bail!("no memory controller holds {}", relative.display())
}

fn read_u64(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: {text:?}", path.display()))
}

/// The `oom_kill N` count of a memory cgroup's events file.
fn oom_kills(events: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(events)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("podvisor-vmm"))
}

async fn sandbox_state(rt: &mut Runtime, id: &str) -> anyhow::Result<i32> {
    Ok(rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no status")?
        .state)
}

/// RunPodSandbox of `pod`, which must be refused with InvalidArgument; the message.
async fn run_refused(
    rt: &mut Runtime,
    pod: cri::PodSandboxConfig,
    what: &str,
) -> anyhow::Result<String> {
    let r = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod),
            runtime_handler: String::new(),
        })
        .await;
    expect_code("node", what, r, tonic::Code::InvalidArgument)
}

fn value(v: Option<&cri::UInt64Value>) -> u64 {
    v.map_or(0, |v| v.value)
}

async fn pod_ip(rt: &mut Runtime, id: &str) -> anyhow::Result<std::net::IpAddr> {
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    let ip = status.network.context("no network status")?.ip;
    ip.parse().with_context(|| format!("pod IP {ip:?}"))
}

/// What the busy container writes into its own rootfs, so its writable layer holds at least
/// that.
const LAYER_BYTES: u64 = 1 << 20;

/// The writable layer's bytes and inodes of running container `id` once it holds
/// [`LAYER_BYTES`] (waited for: the container writes them as it starts), from
/// ContainerStats, checked against ListContainerStats; its swap figures are those of a VM
/// without swap (none used, none available).
async fn container_layer(rt: &mut Runtime, id: &str) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let stats = rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            })
            .await?
            .into_inner()
            .stats
            .context("no container stats")?;
        let swap = stats.swap.as_ref().context("no swap figures")?;
        ensure!(
            swap.swap_usage_bytes.as_ref().map(|v| v.value) == Some(0)
                && swap.swap_available_bytes.as_ref().map(|v| v.value) == Some(0),
            "swap in a VM without swap: {swap:?}"
        );
        let layer = stats.writable_layer.as_ref().context("no writable layer")?;
        let (bytes, inodes) = (
            value(layer.used_bytes.as_ref()),
            value(layer.inodes_used.as_ref()),
        );
        if bytes >= LAYER_BYTES {
            ensure!(inodes >= 1, "{layer:?}");
            let listed = rt
                .list_container_stats(cri::ListContainerStatsRequest {
                    filter: Some(cri::ContainerStatsFilter {
                        id: id.into(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner()
                .stats;
            let listed_bytes = listed
                .first()
                .and_then(|s| s.writable_layer.as_ref())
                .map(|w| value(w.used_bytes.as_ref()));
            ensure!(
                listed.len() == 1 && listed_bytes >= Some(LAYER_BYTES),
                "ListContainerStats for {id}: {listed:?}"
            );
            return Ok((bytes, inodes));
        }
        ensure!(
            Instant::now() < deadline,
            "the writable layer never reached {LAYER_BYTES} bytes: {layer:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// PodSandboxStats of `id`, checked to be what ListPodSandboxStats gives for the id and
/// for the pod's label.
async fn pod_stats(rt: &mut Runtime, id: &str, name: &str) -> anyhow::Result<cri::PodSandboxStats> {
    let one = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: id.into(),
        })
        .await?
        .into_inner()
        .stats
        .context("no stats")?;
    ensure!(
        one.attributes.as_ref().is_some_and(|a| a.id == id),
        "{one:?}"
    );
    for filter in [
        cri::PodSandboxStatsFilter {
            id: id[..12].into(),
            ..Default::default()
        },
        cri::PodSandboxStatsFilter {
            label_selector: [("pod".to_string(), name.to_string())].into(),
            ..Default::default()
        },
    ] {
        let listed = rt
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
                filter: Some(filter.clone()),
            })
            .await?
            .into_inner()
            .stats;
        ensure!(
            listed.len() == 1 && listed[0].attributes.as_ref().is_some_and(|a| a.id == id),
            "{filter:?} listed {listed:?}"
        );
    }
    Ok(one)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_live_in_kubelets_cgroups() -> anyhow::Result<()> {
    let (setup, mut daemon) = start_cri_daemon("node", "pvnode0", "10.88.221.0/24").await?;
    let result = scenario(&mut daemon, &setup.image_name).await;
    if result.is_err() {
        println!("{}", daemon.log());
    }
    daemon.stop()?;
    remove_tree("kubepods");
    remove_tree("kubepods.slice");
    result
}

async fn scenario(daemon: &mut Daemon, image_name: &str) -> anyhow::Result<()> {
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);

    // What kubelet asks first.
    ensure!(cgroup_driver(&mut rt).await? == cri::CgroupDriver::Cgroupfs as i32);
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner();
    let conditions = status.status.context("no runtime status")?.conditions;
    ensure!(
        conditions
            .iter()
            .any(|c| c.r#type == "RuntimeReady" && c.status),
        "{conditions:?}"
    );
    let handlers: Vec<&str> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    ensure!(handlers == ["", "podvisor"], "{handlers:?}");

    // cgroupfs: a slice is refused, nothing made.
    let pod_dirs = |d: &Daemon| {
        std::fs::read_dir(d.state_dir.join("pods")).map_or(0, std::iter::Iterator::count)
    };
    let pods_before = pod_dirs(daemon);
    let msg = run_refused(
        &mut rt,
        pod_config("wrong", "kubepods-besteffort-podx.slice"),
        "a slice under cgroupfs",
    )
    .await?;
    ensure!(msg.contains("cgroup_driver is cgroupfs"), "{msg}");
    ensure!(
        pod_dirs(daemon) == pods_before,
        "a refused pod left its directory"
    );
    ensure!(gone_everywhere(Path::new("kubepods.slice")));

    // cgroupfs: the VMM in a leaf of kubelet's pod cgroup.
    let t = step("cgroupfs pod");
    let parent = "/kubepods/burstable/poduid-fs";
    let pod = pod_config("fs", parent);
    let vm = run_pod_vm(&mut rt, &pod).await?;
    ensure!(vm.restored, "not restored from the template");
    let leaf = PathBuf::from(format!("kubepods/burstable/poduid-fs/podvisor-{}", vm.id));
    for pids in pids_in(&leaf)? {
        ensure!(pids == [vm.vmm_pid], "{pids:?} in {}", leaf.display());
    }
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.vmm_pid))?;
    ensure!(
        own.lines()
            .any(|l| l.ends_with(&format!(":/{}", leaf.display()))),
        "{own}"
    );
    done("cgroupfs pod", t);

    // Statistics of a busy pod: its VMM's cgroup and TAP, its container's.
    let t = step("pod statistics");
    let image = pull_image(&mut images, image_name, &pod).await?;
    let busy = run_container(
        &mut rt,
        &vm.id,
        &pod,
        shell_container(
            "busy",
            &image,
            &format!("head -c {LAYER_BYTES} /dev/zero > /layer-file; while :; do :; done"),
        ),
    )
    .await?;
    let layer = container_layer(&mut rt, &busy).await?;
    let ip = pod_ip(&mut rt, &vm.id).await?;
    // Traffic both ways: a SYN in, the guest's RST out.
    let refused = std::net::TcpStream::connect_timeout(&(ip, 9).into(), Duration::from_secs(30));
    ensure!(refused.is_err(), "port 9 of the pod answered");
    let stats = pod_stats(&mut rt, &vm.id, "fs").await?;
    let linux = stats.linux.as_ref().context("no linux stats")?;
    let cpu = value(
        linux
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref()),
    );
    let memory = value(
        linux
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref()),
    );
    let eth0 = linux
        .network
        .as_ref()
        .and_then(|n| n.default_interface.as_ref())
        .context("no network stats")?;
    let (rx, tx) = (value(eth0.rx_bytes.as_ref()), value(eth0.tx_bytes.as_ref()));
    println!(
        "[node] pod stats: cpu {:.2} s, working set {} MiB, eth0 rx {rx} B tx {tx} B, {} \
         container(s)",
        cpu as f64 / 1e9,
        memory >> 20,
        linux.containers.len()
    );
    ensure!(cpu > 0 && memory > 0 && rx > 0 && tx > 0, "{stats:?}");
    ensure!(
        linux
            .containers
            .iter()
            .any(|c| c.attributes.as_ref().is_some_and(|a| a.id == busy) && c.cpu.is_some()),
        "the busy container is not in its pod's stats: {stats:?}"
    );
    ensure!(
        linux.containers.iter().any(|c| c
            .writable_layer
            .as_ref()
            .and_then(|w| w.used_bytes.as_ref())
            .is_some_and(|b| b.value >= LAYER_BYTES)),
        "the busy container's writable layer is not in its pod's stats: {stats:?}"
    );
    println!(
        "[node] container stats: writable layer {} KiB in {} inodes",
        layer.0 >> 10,
        layer.1
    );
    let none = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: String::new(),
                label_selector: [("pod".to_string(), "nobody".to_string())].into(),
            }),
        })
        .await?
        .into_inner()
        .stats;
    ensure!(
        none.is_empty(),
        "a label selector matched no pod, yet: {none:?}"
    );
    rt.stop_container(cri::StopContainerRequest {
        container_id: busy,
        timeout: 0,
    })
    .await?;
    done("pod statistics", t);

    // The pod cgroup's memory limit holds the VMM.
    let t = step("memory limit on the pod's cgroup");
    let (mem, usage_file, limit_file, events_file) =
        memory_cgroup(Path::new("kubepods/burstable/poduid-fs"))?;
    let usage = read_u64(&mem.join(usage_file))?;
    ensure!(
        usage > 0,
        "the VMM's memory is not charged to the pod's cgroup"
    );
    let limit = usage + LIMIT_HEADROOM;
    std::fs::write(mem.join(limit_file), limit.to_string())?;
    println!(
        "[node] the pod's cgroup holds {} MiB; limit set to {} MiB",
        usage >> 20,
        limit >> 20
    );
    // 160 MiB of a 256 MiB guest: more than the template VM ever touched, so the host
    // backs most of it with new pages charged to the pod.
    run_container(
        &mut rt,
        &vm.id,
        &pod,
        shell_container(
            "hog",
            &image,
            "dd if=/dev/zero of=/dev/null bs=160M count=1; sleep 3600",
        ),
    )
    .await?;
    let deadline = Instant::now() + OOM_DEADLINE;
    while alive(vm.vmm_pid) {
        ensure!(
            Instant::now() < deadline,
            "the VMM outlived a {} MiB limit: usage {} MiB",
            limit >> 20,
            read_u64(&mem.join(usage_file))? >> 20
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // cgroup v1 counts a kill in the victim's own cgroup (the leaf), v2 up the tree too.
    let kills = oom_kills(&mem.join(events_file))?
        + oom_kills(
            &mem.join(leaf.file_name().context("leaf")?)
                .join(events_file),
        )?;
    ensure!(
        kills >= 1,
        "the VMM ended but the pod's cgroup counts no OOM kill"
    );
    while sandbox_state(&mut rt, &vm.id).await? != cri::PodSandboxState::SandboxNotready as i32 {
        ensure!(
            Instant::now() < deadline,
            "the sandbox stays ready without its VM"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done("memory limit on the pod's cgroup", t);
    remove_pod(&mut rt, &vm.id).await?;
    ensure!(gone_everywhere(&leaf), "{} is left", leaf.display());
    ensure!(!vm.dir.exists(), "{} is left", vm.dir.display());

    // systemd: the same with a slice, after a restart with the other driver.
    let t = step("systemd pod");
    daemon.restart_with("cgroup_driver = \"systemd\"")?;
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    ensure!(cgroup_driver(&mut rt).await? == cri::CgroupDriver::Systemd as i32);
    let msg = run_refused(
        &mut rt,
        pod_config("wrong", "/kubepods/besteffort/podx"),
        "a path under systemd",
    )
    .await?;
    ensure!(msg.contains("not a systemd slice"), "{msg}");
    // Sized too: its containers ask for 600 MiB, so it gets the 1 GiB class (its own
    // template, built now), while the first pod had the default 256 MiB one.
    let slice = "kubepods-burstable-poduid_sd.slice";
    let mut pod = pod_config("sd", slice);
    let too_big = cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 30,
                ..Default::default()
            }),
            ..pod.linux.clone().unwrap_or_default()
        }),
        ..pod.clone()
    };
    let msg = run_refused(&mut rt, too_big, "a 64 GiB pod").await?;
    ensure!(msg.contains("MiB of memory"), "{msg}");
    if let Some(linux) = pod.linux.as_mut() {
        linux.resources = Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 600 << 20,
            ..Default::default()
        });
    }
    let vm = run_pod_vm(&mut rt, &pod).await?;
    ensure!(vm.restored, "not restored from its size class's template");
    let image = pull_image(&mut images, image_name, &pod).await?;
    let idle = run_container(
        &mut rt,
        &vm.id,
        &pod,
        shell_container("idle", &image, IDLE_SCRIPT),
    )
    .await?;
    let out = exec_sync(&mut rt, &idle, &["cat", "/proc/meminfo"]).await?;
    let meminfo = String::from_utf8_lossy(&out.stdout);
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no MemTotal in {meminfo:?}"))?;
    println!(
        "[node] a pod asking for 600 MiB has a guest of {} MiB",
        total_kib >> 10
    );
    ensure!(total_kib >> 10 >= 600, "the guest has {total_kib} KiB");
    let refused = rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: idle.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 2 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let msg = expect_code(
        "node",
        "a limit over the VM",
        refused,
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("does not fit"), "{msg}");
    let leaf = PathBuf::from(format!(
        "kubepods.slice/kubepods-burstable.slice/{slice}/podvisor-{}.scope",
        vm.id
    ));
    for pids in pids_in(&leaf)? {
        ensure!(pids == [vm.vmm_pid], "{pids:?} in {}", leaf.display());
    }
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: vm.id.clone(),
    })
    .await?;
    ensure!(
        gone_everywhere(&leaf),
        "{} outlives StopPodSandbox",
        leaf.display()
    );
    remove_pod(&mut rt, &vm.id).await?;
    ensure!(!vm.dir.exists(), "{} is left", vm.dir.display());
    done("systemd pod", t);
    Ok(())
}
