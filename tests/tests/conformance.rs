//! CRI conformance, detail by detail, as kubelet and crictl's validation suite rely on it:
//! a real podvisord, a real registry, real microVMs (restored from the handler's template).
//!
//! - A pod with no hostname and a 68-byte name (crictl's suite names its pods so) gets the
//!   node's hostname; a hostname or sysctl name that cannot be is refused as InvalidArgument
//!   naming the field before any VM is made.
//! - A sysctl the guest kernel lacks is refused by the agent after a template restore: the
//!   request fails at once with InvalidArgument, without the cold-boot fallback meant for
//!   failed restores, and leaves nothing behind.
//! - Pod names are reserved: of two RunPodSandbox with the same metadata at once one makes
//!   the pod and the other gets AlreadyExists, as does a later one, until the pod is
//!   removed. Container names (with attempt) are reserved in their pod the same way.
//! - CreateContainer makes a missing log directory, as containerd does.
//! - RunAsGroup without RunAsUser is refused at CreateContainer.
//! - A mount whose host path is a symlink is served from its target (kubelet is trusted).
//! - Capabilities as asked, also for ExecSync: drop ALL, drop NET_RAW, add SYS_ADMIN; with
//!   NET_ADMIN the guest kernel makes bridges and veth pairs, and offers TUN and iptables NAT.
//! - A privileged pod's privileged container is privileged inside the VM (every capability,
//!   the VM's devices, /sys and /proc writable); a privileged container needs a privileged
//!   pod; an unprivileged one cannot open a node it makes for the VM's disk.
//! - Seccomp: RuntimeDefault (containerd's profile) in the container and its execs, refusing
//!   user namespaces and AF_VSOCK sockets; Unconfined; a Localhost profile enforced; bad
//!   references and AppArmor profiles refused.
//! - The pod's VMM runs every thread under its seccomp filter, with no_new_privs, as
//!   podvisor in a user namespace of its own, keeping only a file server's capabilities
//!   there (it serves the pod's share).
//! - A hostile image's device node and setuid file are in its container as in the image
//!   (the host never had the node).
//! - No container reaches the guest agent over vsock, not even a privileged one: CID 1, the
//!   VM's own CID and the host's are all refused, and the agent serves on.
//!
//! Every wait has a generous deadline; none is a fixed sleep.

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_tests::cri::{
    CriSetup, Daemon, TEST_CONSOLE_MAX_BYTES, connect, exec_sync as exec, pod_cgroups, pull_image,
    shell_container, start_cri_daemon, vmm_processes_under,
};
use podvisor_tests::registry::{SPECIAL_DEVICE, SPECIAL_SETUID, push_busybox_with_special_files};
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;

/// The pod name crictl's validation suite gives its pods: 68 bytes, too long for a hostname.
const SUITE_POD_NAME: &str = "create-PodSandbox-for-container-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

fn say(what: &str) {
    println!("[conformance] {what}");
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
) -> anyhow::Result<String> {
    podvisor_tests::cri::expect_code("conformance", what, r, code)
}

fn pod_config(name: &str, log_directory: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: "uid-conformance-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_directory.display().to_string(),
        ..Default::default()
    }
}

async fn run_pod(rt: &mut Runtime, pod: &cri::PodSandboxConfig) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(pod.clone()),
        runtime_handler: String::new(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

/// Fails unless podvisord has no pod directory and no VMM left; `after` says after what.
fn ensure_nothing_left(daemon: &Daemon, after: &str) -> anyhow::Result<()> {
    let pods = daemon.state_dir.join("pods");
    let dirs: Vec<String> = std::fs::read_dir(&pods)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let vmms = vmm_processes_under(&pods);
    let cgroups = pod_cgroups();
    ensure!(
        dirs.is_empty() && vmms.is_empty() && cgroups.is_empty(),
        "{after} left pod dirs {dirs:?}, VMMs {vmms:?}, cgroups {cgroups:?}"
    );
    Ok(())
}

/// [name, Seccomp, NoNewPrivs, CapEff, CapBnd] of every thread of process `pid`.
fn thread_security(pid: u32) -> anyhow::Result<Vec<[String; 5]>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        threads.push(["Name:", "Seccomp:", "NoNewPrivs:", "CapEff:", "CapBnd:"].map(field));
    }
    Ok(threads)
}

/// uid:gid of the host user `name`.
fn host_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let fields: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .with_context(|| format!("no user {name} (make setup creates it)"))?;
    Ok((fields[2].parse()?, fields[3].parse()?))
}

/// The pod's VMM `pid` runs jailed (issue 13's step 4): as the podvisor user with no other
/// group, in a root of its own that holds only its pod directory, files and two devices
/// (read-only, no host mount left), in the pod's cgroup.
fn vmm_is_jailed(pid: u32, sandbox_id: &str) -> anyhow::Result<()> {
    let (uid, gid) = host_user("podvisor")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (uids, gids, groups) = (field("Uid:"), field("Gid:"), field("Groups:"));
    say(&format!(
        "the pod's VMM: Uid {uids:?}, Gid {gids:?}, Groups {groups:?} (podvisor is {uid}:{gid})"
    ));
    ensure!(
        uids == vec![uid.to_string(); 4] && gids == vec![gid.to_string(); 4] && groups.is_empty(),
        "the VMM's ids: uid {uids:?} gid {gids:?} groups {groups:?}"
    );
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    ensure!(
        ino(&format!("/proc/{pid}/root/"))? != ino("/")?,
        "the VMM's root is the host's"
    );
    let mut top: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    top.sort();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((*f.get(4)?, *f.get(5)?))
        })
        .collect();
    say(&format!(
        "the VMM's root holds {top:?}; its mounts: {mounts:?}"
    ));
    let allowed_top = ["boot", "dev", "drives", "pod", "proc", "restore", "share"];
    ensure!(
        top.iter().all(|t| allowed_top.contains(&t.as_str()))
            && ["dev", "drives", "pod"]
                .iter()
                .all(|t| top.iter().any(|x| x == t)),
        "the VMM's root holds {top:?}"
    );
    let jail_mount = |m: &str| {
        m == "/"
            || m == "/pod"
            || m == "/boot/kernel"
            || m == "/proc"
            || m == "/share"
            || m.starts_with("/share/")
            || m.starts_with("/drives/")
            || m.starts_with("/restore/")
    };
    ensure!(
        mounts.iter().all(|(m, _)| jail_mount(m))
            && mounts
                .iter()
                .any(|(m, o)| *m == "/" && o.split(',').any(|x| x == "ro")),
        "the VMM sees host mounts or a writable root: {mounts:?}"
    );
    // It serves the pod's share as root of a user namespace of its own that is podvisor
    // on the host, ids 1..65536 far above every host user's.
    let ns = |p: &str| std::fs::read_link(p).map(|l| l.display().to_string());
    ensure!(
        ns(&format!("/proc/{pid}/ns/user"))? != ns("/proc/self/ns/user")?,
        "the VMM shares the host's user namespace"
    );
    let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map"))?;
    let map: Vec<Vec<&str>> = uid_map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    say(&format!("the VMM's uid map: {map:?}"));
    ensure!(
        map.first() == Some(&vec!["0", &uid.to_string(), "1"])
            && map.get(1).is_some_and(|m| m[0] == "1"
                && m[1].parse::<u64>().is_ok_and(|b| b > 65536)
                && m[2] == "65535"),
        "the VMM's uid map: {uid_map}"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let own = format!("/podvisor/{sandbox_id}");
    ensure!(
        cgroups.lines().all(|l| l.ends_with(&own)),
        "the VMM is not in the pod's cgroup: {cgroups}"
    );
    say(&format!("the VMM's cgroups all end in {own}"));
    Ok(())
}

/// StopPodSandbox then RemovePodSandbox of `id`, as kubelet removes a pod.
async fn remove_pod(rt: &mut Runtime, id: &str) -> anyhow::Result<()> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.to_string(),
    })
    .await
    .with_context(|| format!("StopPodSandbox {id}"))?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.to_string(),
    })
    .await
    .with_context(|| format!("RemovePodSandbox {id}"))?;
    Ok(())
}

/// Bad pod fields are refused before any VM is made.
async fn refused_before_work(rt: &mut Runtime, daemon: &Daemon, logs: &Path) -> anyhow::Result<()> {
    let mut long_host = pod_config("bad-host", logs);
    long_host.hostname = "h".repeat(65);
    let msg = expect_code(
        "RunPodSandbox with a 65-byte hostname",
        run_pod(rt, &long_host).await.map(tonic::Response::new),
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("config.hostname"), "{msg}");

    let mut bad_sysctl = pod_config("bad-sysctl", logs);
    bad_sysctl.linux = Some(cri::LinuxPodSandboxConfig {
        sysctls: [("net/../../etc/x".to_string(), "1".to_string())].into(),
        ..Default::default()
    });
    let msg = expect_code(
        "RunPodSandbox with a sysctl name leaving /proc/sys",
        run_pod(rt, &bad_sysctl).await.map(tonic::Response::new),
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("config.linux.sysctls"), "{msg}");
    ensure_nothing_left(daemon, "a refused request")?;
    Ok(())
}

/// A sysctl the guest kernel lacks: InvalidArgument from the agent after a restore, no
/// cold boot, nothing left.
async fn agent_refusal_is_not_retried(
    rt: &mut Runtime,
    daemon: &Daemon,
    logs: &Path,
) -> anyhow::Result<()> {
    let mut pod = pod_config("unknown-sysctl", logs);
    pod.linux = Some(cri::LinuxPodSandboxConfig {
        sysctls: [(
            "net.ipv4.podvisor_no_such_sysctl".to_string(),
            "1".to_string(),
        )]
        .into(),
        ..Default::default()
    });
    let msg = expect_code(
        "RunPodSandbox with a sysctl the guest kernel lacks",
        run_pod(rt, &pod).await.map(tonic::Response::new),
        tonic::Code::InvalidArgument,
    )?;
    ensure!(
        msg.contains("podvisor_no_such_sysctl") && msg.contains("SetupSandbox"),
        "{msg}"
    );
    let log = daemon.log();
    ensure!(
        !log.contains("booting the kernel"),
        "the request's own error fell back to a cold boot:\n{log}"
    );
    ensure_nothing_left(daemon, "a refused pod")?;
    Ok(())
}

/// A RunPodSandbox its client gives up on mid-boot (the call dropped, as kubelet drops a
/// call whose deadline passed): podvisord finishes or undoes it on its own, and once it is
/// done nothing of the pod is left (no VMM, pod directory, cgroup, namespace, record or IP
/// lease); the same pod can then be created for real.
async fn cancelled_run_leaves_nothing(
    channel: &Channel,
    daemon: &Daemon,
    setup: &CriSetup,
    logs: &Path,
) -> anyhow::Result<()> {
    let leases_before = setup.ip_leases();
    let netns_before = podvisor_netns();
    let pod = pod_config("cancelled", logs);
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let cut = Duration::from_millis(300);
    let call = tokio::time::timeout(cut, run_pod(&mut rt, &pod)).await;
    ensure!(
        call.is_err(),
        "RunPodSandbox answered within {cut:?}: {call:?}"
    );
    drop(rt);
    say("RunPodSandbox dropped by its client after 300 ms");
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let took = wait_until_nothing_left(
        &mut rt,
        daemon,
        setup,
        (&leases_before, &netns_before),
        "RunPodSandbox was cancelled by its caller",
    )
    .await?;
    say(&format!(
        "nothing of the cancelled pod left {took:.1} s after the cancel (leases {leases_before:?})"
    ));
    let id = run_pod(&mut rt, &pod)
        .await
        .context("RunPodSandbox after the cancel")?;
    remove_pod(&mut rt, &id).await?;
    ensure_nothing_left(daemon, "the pod made after the cancel")?;
    Ok(())
}

/// Waits (up to 300 s) until podvisord's log has `logged` and nothing of a pod is left: no
/// pod directory, VMM, cgroup or pod, and the IP leases and namespaces are `before`'s.
/// Returns the seconds it took.
async fn wait_until_nothing_left(
    rt: &mut Runtime,
    daemon: &Daemon,
    setup: &CriSetup,
    before: (&[String], &[String]),
    logged: &str,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    loop {
        let leftover = (
            ensure_nothing_left(daemon, "the pod").err(),
            setup.ip_leases(),
            podvisor_netns(),
            list_pods(rt).await?,
        );
        let done = daemon.log().contains(logged);
        if done
            && leftover.0.is_none()
            && leftover.1 == before.0
            && leftover.2 == before.1
            && leftover.3.is_empty()
        {
            return Ok(started.elapsed().as_secs_f64());
        }
        ensure!(
            Instant::now() < deadline,
            "left ({logged:?} logged: {done}): {leftover:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// podvisord SIGKILLed during a RunPodSandbox (after its network is set up): the next
/// podvisord finds the pod directory no record names, kills its VMM, releases its network
/// (CNI DEL: the IP lease) and removes its namespace, cgroup and directory.
async fn crash_during_run_is_swept(
    daemon: &mut Daemon,
    setup: &CriSetup,
    logs: &Path,
) -> anyhow::Result<()> {
    let leases_before = setup.ip_leases();
    let netns_before = podvisor_netns();
    let pod = pod_config("crashed", logs);
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel);
    {
        let call = run_pod(&mut rt, &pod);
        tokio::pin!(call);
        // Until the network is set up (its lease taken), then podvisord dies.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            tokio::select! {
                r = &mut call => bail!("RunPodSandbox ended before the crash: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if setup.ip_leases().len() > leases_before.len() {
                break;
            }
            ensure!(Instant::now() < deadline, "no IP lease taken within 120 s");
        }
        daemon.kill()?;
    }
    let during = (setup.ip_leases(), podvisor_netns());
    say(&format!(
        "podvisord SIGKILLed mid-RunPodSandbox; leases and namespaces then: {during:?}"
    ));
    ensure!(
        during.0.len() > leases_before.len(),
        "the crash left no lease to sweep"
    );
    daemon.start_again()?;
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel);
    let took = wait_until_nothing_left(
        &mut rt,
        daemon,
        setup,
        (&leases_before, &netns_before),
        "a pod directory no sandbox record names",
    )
    .await?;
    say(&format!(
        "the restarted podvisord swept it: nothing left after {took:.1} s"
    ));
    Ok(())
}

/// The host's pod network namespaces (template ones left out).
fn podvisor_netns() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("podvisor-") && !n.starts_with("podvisor-tpl-"))
        .collect();
    names.sort();
    names
}

/// The ids of the pods podvisord lists.
async fn list_pods(rt: &mut Runtime) -> anyhow::Result<Vec<String>> {
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    Ok(pods.into_iter().map(|p| p.id).collect())
}

/// Two RunPodSandbox with the same metadata at once: one pod, one AlreadyExists. Returns
/// the pod's id.
async fn one_pod_per_name(
    channel: &Channel,
    pod: &cri::PodSandboxConfig,
) -> anyhow::Result<String> {
    let (mut a, mut b) = (
        RuntimeServiceClient::new(channel.clone()),
        RuntimeServiceClient::new(channel.clone()),
    );
    let started = Instant::now();
    let (ra, rb) = tokio::join!(run_pod(&mut a, pod), run_pod(&mut b, pod));
    say(&format!(
        "two RunPodSandbox of one name at once took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let (id, refused) = match (ra, rb) {
        (Ok(id), Err(s)) | (Err(s), Ok(id)) => (id, s),
        other => bail!("expected one pod and one refusal, got {other:?}"),
    };
    ensure!(
        refused.code() == tonic::Code::AlreadyExists && refused.message().contains("reserved"),
        "{refused:?}"
    );
    say(&format!("the second: {:?}", refused.message()));
    Ok(id)
}

/// Creates and starts `config` in the pod; returns the container's id.
async fn start(
    rt: &mut Runtime,
    create: &dyn Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    config: cri::ContainerConfig,
) -> anyhow::Result<String> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = rt
        .create_container(create(config))
        .await
        .with_context(|| format!("CreateContainer {name}"))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .with_context(|| format!("StartContainer {name}"))?;
    Ok(id)
}

/// A container with `add` and `drop` capabilities, sleeping.
fn with_caps(name: &str, image: &str, add: &[&str], drop: &[&str]) -> cri::ContainerConfig {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_string()).collect();
    cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: strings(add),
                    drop_capabilities: strings(drop),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..shell_container(name, image, "exec sleep 1000")
    }
}

/// What crictl's suite checks of capabilities, through ExecSync (an exec gets no more than
/// its container): dropping ALL empties the bounding set, dropping NET_RAW makes ping fail
/// with "permission denied" while the output before it still comes back, adding SYS_ADMIN
/// lets `hostname NAME` work. The last renames the pod's VM: run after the hostname check.
async fn capabilities_as_asked(
    rt: &mut Runtime,
    create: &dyn Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    image: &str,
) -> anyhow::Result<()> {
    let none = start(rt, create, with_caps("nocaps", image, &[], &["ALL"])).await?;
    let out = exec(rt, &none, &["grep", "CapBnd", "/proc/self/status"]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.exit_code == 0 && text.trim_end() == "CapBnd:\t0000000000000000",
        "drop ALL: {out:?}"
    );
    say(&format!("drop ALL: {:?}", text.trim_end()));

    let noraw = start(rt, create, with_caps("noraw", image, &[], &["NET_RAW"])).await?;
    let out = exec(
        rt,
        &noraw,
        &["sh", "-c", "echo before-ping; ping -c 1 -W 2 127.0.0.1"],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    ensure!(
        out.exit_code != 0
            && String::from_utf8_lossy(&out.stdout).starts_with("before-ping\n")
            && stderr.contains("permission denied"),
        "drop NET_RAW: {out:?}"
    );
    say(&format!(
        "drop NET_RAW: exit {}, {:?}",
        out.exit_code,
        stderr.trim_end()
    ));

    // What a node kernel offers pods, inside the VM: with NET_ADMIN a bridge (crictl's
    // suite: `brctl addbr`), a veth pair; TUN; iptables' NAT targets and matches.
    let net = start(
        rt,
        create,
        with_caps("netadmin", image, &["NET_ADMIN"], &[]),
    )
    .await?;
    let script = "brctl addbr foobar && echo bridge-made; \
                  ip link add pvveth0 type veth && echo veth-made; \
                  cat /sys/class/misc/tun/dev; \
                  cat /proc/net/ip_tables_targets /proc/net/ip_tables_matches";
    let out = exec(rt, &net, &["sh", "-c", script]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "bridge-made",
        "veth-made",
        "10:200",
        "REDIRECT",
        "MASQUERADE",
        "owner",
        "conntrack",
    ] {
        ensure!(lines.contains(&want), "NET_ADMIN: no {want:?} in {out:?}");
    }
    say("NET_ADMIN: bridge, veth, TUN, iptables NAT targets and matches");

    let admin = start(rt, create, with_caps("admin", image, &["SYS_ADMIN"], &[])).await?;
    let out = exec(
        rt,
        &admin,
        &["sh", "-c", "hostname renamed-by-admin && hostname"],
    )
    .await?;
    ensure!(
        out.exit_code == 0 && out.stdout == b"renamed-by-admin\n",
        "add SYS_ADMIN: {out:?}"
    );
    Ok(())
}

fn privileged_linux() -> cri::LinuxContainerConfig {
    cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A privileged pod: its privileged container has every capability, the VM's devices, and
/// /sys and /proc writable; its other container none of that. The pod is removed after.
async fn privileged_inside_the_vm(
    rt: &mut Runtime,
    image: &str,
    logs: &Path,
    pods_dir: &Path,
) -> anyhow::Result<()> {
    let mut pod = pod_config("privileged", logs);
    pod.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = run_pod(rt, &pod)
        .await
        .context("RunPodSandbox privileged")?;
    let create = |config: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: id.clone(),
        config: Some(config),
        sandbox_config: Some(pod.clone()),
    };
    let probe = "grep CapBnd /proc/self/status; cat /proc/sys/kernel/cap_last_cap; \
                 ls /dev/vda; grep ' /sys ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1; \
                 echo 1 > /proc/sys/net/ipv4/ip_forward && echo proc-sys-written";
    let privileged = cri::ContainerConfig {
        linux: Some(privileged_linux()),
        ..shell_container("priv", image, "exec sleep 1000")
    };
    let priv_id = start(rt, &create, privileged).await?;
    let out = exec(rt, &priv_id, &["sh", "-c", probe]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&format!("privileged container: {text:?}"));
    let lines: Vec<&str> = text.lines().collect();
    let [capbnd, last_cap, vda, sys, written] = lines[..] else {
        bail!("privileged container: {out:?}");
    };
    let last: u32 = last_cap.parse().context("cap_last_cap")?;
    let all = format!("CapBnd:\t{:016x}", (1u64 << (last + 1)) - 1);
    ensure!(
        capbnd == all && vda == "/dev/vda" && sys == "rw" && written == "proc-sys-written",
        "privileged container: {out:?}"
    );

    let plain = start(
        rt,
        &create,
        shell_container("plain", image, "exec sleep 1000"),
    )
    .await?;
    let out = exec(rt, &plain, &["sh", "-c", probe]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&format!("its unprivileged neighbour: {text:?}"));
    ensure!(
        !text.contains("/dev/vda") && text.contains("\nro\n"),
        "an unprivileged container of a privileged pod: {out:?}"
    );
    // A node it makes for the VM's disk (it has CAP_MKNOD) does not open: the device
    // cgroup lets it open only the standard devices. The privileged one reads it.
    let disk = "echo x > /dev/null && echo null-writable; \
                mknod /tmp/disk b $(tr : ' ' < /sys/block/vda/dev) && echo node-made; \
                head -c 512 /tmp/disk | wc -c";
    let out = exec(rt, &plain, &["sh", "-c", disk]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&format!(
        "the VM's disk from an unprivileged container: {text:?} {:?}",
        String::from_utf8_lossy(&out.stderr)
    ));
    ensure!(
        text == "null-writable\nnode-made\n0\n"
            && String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "an unprivileged container opened the VM's disk: {out:?}"
    );
    let out = exec(rt, &priv_id, &["sh", "-c", disk]).await?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "null-writable\nnode-made\n512\n",
        "the privileged container could not read the VM's disk: {out:?}"
    );
    // The strongest container there is (root, every capability, no seccomp, /dev/vsock)
    // cannot reach the guest agent: no vsock loopback in the guest kernel, and the VMM
    // forwards only packets addressed to the host.
    let out = exec(rt, &priv_id, &["guest-probe", "vsock-attack", "1024"]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&format!("vsock from a privileged container: {text:?}"));
    ensure_vsock_refused(&text, true)?;
    let out = exec(rt, &priv_id, &["true"]).await?;
    ensure!(out.exit_code == 0, "the agent no longer serves: {out:?}");
    console_flood_is_capped(rt, &priv_id, &pods_dir.join(&id[..16])).await?;
    silent_guest_does_not_hold_stats(rt, &priv_id, &pods_dir.join(&id[..16])).await?;
    remove_pod(rt, &id).await
}

/// The VM in `pod_dir` stops answering (its VMM SIGSTOPped): ListContainerStats for the
/// node still answers, well within the old per-call deadline (180 s), with the other pods'
/// statistics and none for the silent pod's container `cid`; once it runs again, so do its
/// statistics.
async fn silent_guest_does_not_hold_stats(
    rt: &mut Runtime,
    cid: &str,
    pod_dir: &Path,
) -> anyhow::Result<()> {
    let vmms = vmm_processes_under(pod_dir);
    ensure!(vmms.len() == 1, "the pod's VMM: {vmms:?}");
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &vmms[0].to_string()])
            .status()
    };
    ensure!(signal("-STOP")?.success(), "SIGSTOP the VMM");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(90),
        rt.list_container_stats(cri::ListContainerStatsRequest { filter: None }),
    )
    .await;
    let took = started.elapsed();
    ensure!(signal("-CONT")?.success(), "SIGCONT the VMM");
    let stats = answer
        .context("ListContainerStats with a silent guest did not answer within 90 s")??
        .into_inner()
        .stats;
    let has_cpu = |s: &cri::ContainerStats| s.cpu.is_some();
    let silent: Vec<_> = stats
        .iter()
        .filter(|s| s.attributes.as_ref().is_some_and(|a| a.id == cid))
        .collect();
    let others = stats
        .iter()
        .filter(|s| s.attributes.as_ref().is_some_and(|a| a.id != cid) && has_cpu(s))
        .count();
    say(&format!(
        "ListContainerStats with one VM stopped: {:.1} s, {} containers, {others} others with \
         statistics, the silent one's: {:?}",
        took.as_secs_f64(),
        stats.len(),
        silent.iter().map(|s| has_cpu(s)).collect::<Vec<_>>()
    ));
    ensure!(
        silent.len() == 1 && !has_cpu(silent[0]) && others > 0,
        "stats with a silent guest: {stats:?}"
    );
    let again = rt
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await?
        .into_inner()
        .stats;
    ensure!(
        again
            .iter()
            .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == cid) && has_cpu(s)),
        "the resumed VM's container has no statistics: {again:?}"
    );
    Ok(())
}

/// The privileged container writes to the guest's serial console for a minute: the pod's
/// `console.log` on the host never holds more than the handler's cap, reaches it, starts
/// over keeping the newest output, and the agent still serves.
async fn console_flood_is_capped(
    rt: &mut Runtime,
    cid: &str,
    pod_dir: &Path,
) -> anyhow::Result<()> {
    let console = pod_dir.join("console.log");
    ensure!(console.is_file(), "no {}", console.display());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, console) = (stop.clone(), console.clone());
        std::thread::spawn(move || {
            let mut largest = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                largest = largest.max(std::fs::metadata(&console).map_or(0, |m| m.len()));
                std::thread::sleep(Duration::from_millis(50));
            }
            largest
        })
    };
    let flood = "[ -c /dev/ttyS0 ] || mknod /dev/ttyS0 c 4 64; \
                 timeout 60 yes podvisor-console-flood-0123456789abcdefghijklmnopqrstuvwxyz \
                 > /dev/ttyS0; echo flooded";
    let started = Instant::now();
    let out = exec(rt, cid, &["sh", "-c", flood]).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let largest = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let out = out?;
    let text = std::fs::read_to_string(&console)?;
    say(&format!(
        "console flood for {:.0} s: console.log at most {largest} bytes (cap {TEST_CONSOLE_MAX_BYTES}), now {} bytes",
        started.elapsed().as_secs_f64(),
        text.len()
    ));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("flooded"),
        "the flood did not run: {out:?}"
    );
    ensure!(
        largest <= TEST_CONSOLE_MAX_BYTES && text.len() as u64 <= TEST_CONSOLE_MAX_BYTES,
        "console.log grew to {largest} bytes, past the cap {TEST_CONSOLE_MAX_BYTES}"
    );
    ensure!(
        text.contains("console output reached its cap") && text.contains("podvisor-console-flood"),
        "the flood never reached the cap ({} bytes now)",
        text.len()
    );
    let out = exec(rt, cid, &["true"]).await?;
    ensure!(
        out.exit_code == 0,
        "the agent no longer serves after the flood: {out:?}"
    );
    Ok(())
}

/// `guest-probe vsock-attack` output: no connection made; `own_cid`: the VM's own CID was
/// tried too.
fn ensure_vsock_refused(text: &str, own_cid: bool) -> anyhow::Result<()> {
    let tried = |prefix: &str| {
        text.lines()
            .any(|l| l.starts_with(&format!("VSOCK-ATTACK {prefix}")) && l.contains(" refused: "))
    };
    ensure!(
        !text.contains("connected") && tried("cid-1") && tried("host"),
        "vsock attack: {text:?}"
    );
    ensure!(
        !own_cid || tried("own-cid-"),
        "vsock attack on the VM's own CID: {text:?}"
    );
    Ok(())
}

/// A container sleeping under `seccomp`, its init's seccomp mode in /tmp/init-seccomp.
fn with_seccomp(
    name: &str,
    image: &str,
    seccomp: Option<cri::SecurityProfile>,
    apparmor: Option<cri::SecurityProfile>,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp,
                apparmor,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..shell_container(
            name,
            image,
            "grep Seccomp: /proc/self/status > /tmp/init-seccomp; exec sleep 1000",
        )
    }
}

fn profile(kind: cri::security_profile::ProfileType, path: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: path.to_string(),
    })
}

/// A Localhost profile: everything allowed but changing modes and making directories.
const DENY_CHMOD_MKDIR: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "architectures": ["SCMP_ARCH_X86_64"],
  "syscalls": [
    {"names": ["chmod", "fchmod", "fchmodat", "fchmodat2", "mkdir", "mkdirat"],
     "action": "SCMP_ACT_ERRNO"}
  ]
}"#;

/// A hostile image's special files (pushed beside busybox): the container has them as the
/// image does, a character device and a setuid-root file; reading the device (1:3, null)
/// works, as the device program allows it.
async fn special_files_in_the_container(
    rt: &mut Runtime,
    images: &mut ImageServiceClient<Channel>,
    create: &dyn Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    pod: &cri::PodSandboxConfig,
    reference: &str,
) -> anyhow::Result<()> {
    let image = pull_image(images, reference, pod).await?;
    let id = start(
        rt,
        create,
        shell_container("special", &image, "exec sleep 1000"),
    )
    .await?;
    let script = format!(
        "stat -c '%F %t:%T %a' /{SPECIAL_DEVICE}; stat -c %a /{SPECIAL_SETUID}; \
         head -c 1 /{SPECIAL_DEVICE} | wc -c"
    );
    let out = exec(rt, &id, &["sh", "-c", &script]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&format!(
        "a hostile image's special files in its container: {text:?}"
    ));
    ensure!(
        text == "character special file 1:3 666\n4755\n0\n",
        "special files: {out:?}"
    );
    Ok(())
}

/// Starts container `name` under seccomp `kind` and runs the probe in it: its init's seccomp
/// mode (written when it started), the exec's own, whether it may make a user namespace, and
/// vsock attacks. Returns the probe's stdout.
async fn seccomp_probe(
    rt: &mut Runtime,
    create: &dyn Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    image: &str,
    name: &str,
    kind: cri::security_profile::ProfileType,
) -> anyhow::Result<String> {
    let probe = "until [ -s /tmp/init-seccomp ]; do sleep 0.1; done; \
                 cat /tmp/init-seccomp; grep Seccomp: /proc/self/status; \
                 unshare -U true; echo unshare=$?; guest-probe vsock-attack 1024";
    let id = start(
        rt,
        create,
        with_seccomp(name, image, profile(kind, ""), None),
    )
    .await?;
    let out = exec(rt, &id, &["sh", "-c", probe]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&format!(
        "{kind:?}: {text:?} {:?}",
        String::from_utf8_lossy(&out.stderr)
    ));
    Ok(text)
}

/// Seccomp as CRI asks for it, in the container and its execs: RuntimeDefault (containerd's
/// profile: no user namespaces without SYS_ADMIN, no AF_VSOCK sockets), Unconfined, and a
/// Localhost profile; bad references and AppArmor profiles are refused.
async fn seccomp_as_asked(
    rt: &mut Runtime,
    create: &dyn Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    image: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    use cri::security_profile::ProfileType;
    let default =
        seccomp_probe(rt, create, image, "sc-default", ProfileType::RuntimeDefault).await?;
    let lines: Vec<&str> = default.lines().collect();
    ensure!(
        lines.get(..3) == Some(&["Seccomp:\t2", "Seccomp:\t2", "unshare=1"][..])
            && lines.contains(
                &"VSOCK-ATTACK socket-high-bits refused: Operation not permitted (os error 1)"
            ),
        "RuntimeDefault: {default:?}"
    );
    ensure_vsock_refused(&default, false)?;
    ensure!(
        default.contains("VSOCK-ATTACK cid-1 refused: socket(AF_VSOCK): Operation not permitted"),
        "RuntimeDefault lets AF_VSOCK sockets be made: {default:?}"
    );
    let unconfined =
        seccomp_probe(rt, create, image, "sc-unconfined", ProfileType::Unconfined).await?;
    ensure!(
        unconfined.starts_with("Seccomp:\t0\nSeccomp:\t0\nunshare=0\n"),
        "Unconfined: {unconfined:?}"
    );
    ensure_vsock_refused(&unconfined, false)?;

    let path = dir.join("deny-chmod-mkdir.json");
    std::fs::write(&path, DENY_CHMOD_MKDIR)?;
    let local = start(
        rt,
        create,
        with_seccomp(
            "sc-localhost",
            image,
            profile(ProfileType::Localhost, &path.display().to_string()),
            None,
        ),
    )
    .await?;
    let script = "chmod 400 /; echo chmod=$?; mkdir /made; echo mkdir=$?; echo still-runs";
    let out = exec(rt, &local, &["sh", "-c", script]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    say(&format!(
        "Localhost denying chmod and mkdir: {:?} {stderr:?}",
        String::from_utf8_lossy(&out.stdout)
    ));
    ensure!(
        out.stdout == b"chmod=1\nmkdir=1\nstill-runs\n" && stderr.contains("not permitted"),
        "Localhost profile: {out:?}"
    );

    for (what, config, want) in [
        (
            "a relative Localhost profile",
            with_seccomp(
                "sc-rel",
                image,
                profile(ProfileType::Localhost, "deny.json"),
                None,
            ),
            "not an absolute path",
        ),
        (
            "a missing Localhost profile",
            with_seccomp(
                "sc-missing",
                image,
                profile(ProfileType::Localhost, "/nonexistent/podvisor-profile.json"),
                None,
            ),
            "/nonexistent/podvisor-profile.json",
        ),
        (
            "an AppArmor Localhost profile",
            with_seccomp(
                "aa-local",
                image,
                None,
                profile(ProfileType::Localhost, "podvisor-test-profile"),
            ),
            "AppArmor",
        ),
    ] {
        let msg = expect_code(
            &format!("CreateContainer with {what}"),
            rt.create_container(create(config)).await,
            tonic::Code::InvalidArgument,
        )?;
        ensure!(msg.contains(want), "{what}: {msg}");
    }
    Ok(())
}

async fn conformance(daemon: &Daemon, setup: &CriSetup, special: &str) -> anyhow::Result<()> {
    let image_name = setup.image_name.as_str();
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel.clone());
    let logs = daemon.dir().join("logs");

    refused_before_work(&mut rt, daemon, &logs).await?;
    agent_refusal_is_not_retried(&mut rt, daemon, &logs).await?;
    cancelled_run_leaves_nothing(&channel, daemon, setup, &logs).await?;

    // No hostname, crictl's long pod name, a log directory that does not exist yet.
    let pod_logs = logs.join("default_suite_uid").join("deeper");
    let pod = pod_config(SUITE_POD_NAME, &pod_logs);
    let id = one_pod_per_name(&channel, &pod).await?;
    let msg = expect_code(
        "RunPodSandbox of a name in use",
        run_pod(&mut rt, &pod).await.map(tonic::Response::new),
        tonic::Code::AlreadyExists,
    )?;
    ensure!(msg.contains(&id), "{msg}");

    let image = pull_image(&mut images, image_name, &pod).await?;
    let mut no_user = shell_container("grouped", &image, "true");
    no_user.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 100 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let create = |config: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: id.clone(),
        config: Some(config),
        sandbox_config: Some(pod.clone()),
    };
    let msg = expect_code(
        "CreateContainer with RunAsGroup and no RunAsUser",
        rt.create_container(create(no_user)).await,
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("run_as_group"), "{msg}");

    ensure!(
        !pod_logs.exists(),
        "{} exists before CreateContainer",
        pod_logs.display()
    );
    // Its volume's host path is a symlink to a directory, as hostPath volumes may be.
    let volume = daemon.dir().join("volume");
    std::fs::create_dir_all(&volume)?;
    std::fs::write(volume.join("hello"), "hello through a link\n")?;
    let volume_link = daemon.dir().join("volume-link");
    std::os::unix::fs::symlink(&volume, &volume_link)?;
    let app = cri::ContainerConfig {
        log_path: "app/0.log".into(),
        mounts: vec![cri::Mount {
            container_path: "/data".into(),
            host_path: volume_link.display().to_string(),
            readonly: true,
            ..Default::default()
        }],
        ..shell_container("app", &image, "echo started; exec sleep 1000")
    };
    let cid = rt
        .create_container(create(app.clone()))
        .await
        .context("CreateContainer with a missing log directory")?
        .into_inner()
        .container_id;
    ensure!(
        pod_logs.join("app").is_dir(),
        "CreateContainer did not make {}",
        pod_logs.join("app").display()
    );
    let msg = expect_code(
        "CreateContainer of a name in use in the pod",
        rt.create_container(create(app)).await,
        tonic::Code::AlreadyExists,
    )?;
    ensure!(msg.contains(&cid), "{msg}");

    rt.start_container(cri::StartContainerRequest {
        container_id: cid.clone(),
    })
    .await
    .context("StartContainer")?;
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string();
    let out = exec(&mut rt, &cid, &["hostname"]).await?;
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.exit_code == 0 && got == node,
        "the pod's hostname is {got:?}, the node's {node:?}: {out:?}"
    );
    say(&format!(
        "the pod without a hostname has the node's: {got:?}"
    ));
    // The pod's VMM (the only pod now): every thread under its seccomp filter, with
    // no_new_privs.
    let vmms = vmm_processes_under(&daemon.state_dir.join("pods"));
    ensure!(vmms.len() == 1, "the pod's VMM processes: {vmms:?}");
    let threads = thread_security(vmms[0])?;
    say(&format!(
        "the pod's VMM threads (name, Seccomp, NoNewPrivs, CapEff, CapBnd): {threads:?}"
    ));
    // A VMM serving a share keeps the file server's capabilities (chown, dac_override,
    // fowner, fsetid, setgid, setuid), in its own user namespace only; nothing else.
    let fs_caps = "00000000000000db";
    ensure!(
        threads.len() >= 3
            && threads.iter().all(|[_, seccomp, nnp, eff, bnd]| {
                seccomp == "2" && nnp == "1" && eff == fs_caps && bnd == fs_caps
            }),
        "the pod's VMM is not confined: {threads:?}"
    );
    vmm_is_jailed(vmms[0], &id)?;
    let out = exec(&mut rt, &cid, &["cat", "/data/hello"]).await?;
    ensure!(
        out.exit_code == 0 && out.stdout == b"hello through a link\n",
        "a mount whose host path is a symlink: {out:?}"
    );
    capabilities_as_asked(&mut rt, &create, &image).await?;
    seccomp_as_asked(&mut rt, &create, &image, daemon.dir()).await?;
    special_files_in_the_container(&mut rt, &mut images, &create, &pod, special).await?;
    let mut privileged = shell_container("priv", &image, "exec sleep 1000");
    privileged.linux = Some(privileged_linux());
    let msg = expect_code(
        "CreateContainer of a privileged container in a pod that is not",
        rt.create_container(create(privileged)).await,
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("privileged pod"), "{msg}");
    privileged_inside_the_vm(&mut rt, &image, &logs, &daemon.state_dir.join("pods")).await?;
    let log = pod_logs.join("app/0.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("stdout F started")
    {
        ensure!(
            Instant::now() < deadline,
            "{} never got the output",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Removal frees the name: the same metadata makes a new pod.
    remove_pod(&mut rt, &id).await?;
    let again = run_pod(&mut rt, &pod)
        .await
        .context("RunPodSandbox of a removed pod's name")?;
    ensure!(again != id, "the same id again");
    remove_pod(&mut rt, &again).await?;
    ensure_nothing_left(daemon, "removed pods")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_details_as_kubelet_and_crictl_expect() -> anyhow::Result<()> {
    let (setup, mut daemon) = start_cri_daemon("conformance", "pvconf1", "10.88.203.0/24").await?;
    let special =
        push_busybox_with_special_files(&setup.registry, "podvisor/special", "conformance").await?;
    let logs = daemon.dir().join("logs");
    let mut result = crash_during_run_is_swept(&mut daemon, &setup, &logs).await;
    if result.is_ok() {
        result = conformance(&daemon, &setup, &special).await;
    }
    if result.is_err() {
        println!("[conformance] podvisord's log:\n{}", daemon.log());
        println!("[conformance] the pods' logs:\n{}", daemon.pod_logs());
    }
    result?;
    let status = daemon.stop()?;
    ensure!(status.success(), "podvisord exited {status} on SIGTERM");
    Ok(())
}
