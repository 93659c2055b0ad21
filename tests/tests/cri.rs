//! podvisord end to end, as kubelet drives it: a real podvisord on a Unix socket, a real
//! registry, real microVMs.
//!
//! - `kubelet_lifecycle_on_a_real_vm`: RunPodSandbox (a VM restored from the handler's
//!   template) -> PullImage -> CreateContainer ->
//!   StartContainer (two containers in the pod) -> logs -> ExecSync -> host-path volumes
//!   (a kubelet-style configMap read through its symlinks, read-only honoured, an update
//!   on the host seen by the running container; a read-write directory) -> podvisord restarted
//!   (the pod stays ready, its containers running, exec works, the log keeps being written)
//!   -> StopContainer -> RemoveContainer -> StopPodSandbox -> RemovePodSandbox, then nothing
//!   left behind; and bad requests answered with their gRPC codes while the daemon keeps
//!   serving.
//! - `killed_vmm_makes_the_pod_not_ready`: `kill -9` of a pod's VMM -> the sandbox NOTREADY,
//!   its container EXITED, and stop and remove still clean everything up.
//!
//! Two VM boots in the whole file (a boot takes about a minute on a kvm_pvm host), one at a
//! time; every wait has a generous deadline, none is a fixed sleep.

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::logs::{Stream, parse_line};
use podvisor_tests::configmap::write_configmap;
use podvisor_tests::cri::{
    Daemon, cgroups_of, connect, exec_sync as exec, pull_image, shell_container, start_cri_daemon,
    vmm_processes_under,
};
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;
type Images = ImageServiceClient<Channel>;

/// One VM at a time: the tests of this file run one after the other (the host has 2 cores
/// and emulates the guest kernel).
static ONE_VM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the watcher may take to notice a dead VMM (it checks every few seconds).
const VM_GONE_DEADLINE: Duration = Duration::from_secs(60);

/// Times a step and prints it.
struct Step(&'static str, Instant);

impl Step {
    fn start(name: &'static str) -> Self {
        println!("[cri] {name} ...");
        Self(name, Instant::now())
    }
    fn done(self) -> Duration {
        let d = self.1.elapsed();
        println!("[cri] {} took {:.2} s", self.0, d.as_secs_f64());
        d
    }
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
) -> anyhow::Result<String> {
    podvisor_tests::cri::expect_code("cri", what, r, code)
}

fn pod_config(log_directory: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "web".into(),
            uid: "uid-0001".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web-host".into(),
        log_directory: log_directory.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    }
}

/// The bad requests: each gets its code and the daemon goes on serving.
async fn bad_requests(rt: &mut Runtime, images: &mut Images) -> anyhow::Result<()> {
    let mut no_meta = pod_config(Path::new("/nonexistent"));
    no_meta.metadata = None;
    let msg = expect_code(
        "RunPodSandbox without metadata",
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(no_meta),
            runtime_handler: String::new(),
        })
        .await,
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("metadata"), "{msg}");

    let msg = expect_code(
        "RunPodSandbox with an unknown handler",
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(Path::new("/nonexistent"))),
            runtime_handler: "kata-nope".into(),
        })
        .await,
        tonic::Code::InvalidArgument,
    )?;
    ensure!(msg.contains("kata-nope"), "{msg}");

    let mut host_net = pod_config(Path::new("/nonexistent"));
    host_net.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let msg = expect_code(
        "RunPodSandbox with the host network",
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(host_net),
            runtime_handler: String::new(),
        })
        .await,
        tonic::Code::InvalidArgument,
    )?;
    ensure!(
        msg.contains("a VM cannot share the host's network"),
        "{msg}"
    );

    expect_code(
        "CreateContainer in an unknown sandbox",
        rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: "f".repeat(64),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "x".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await,
        tonic::Code::NotFound,
    )?;

    let unknown = "0".repeat(64);
    rt.stop_container(cri::StopContainerRequest {
        container_id: unknown.clone(),
        timeout: 1,
    })
    .await
    .context("StopContainer of an unknown id")?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: unknown.clone(),
    })
    .await
    .context("RemoveContainer of an unknown id")?;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await
    .context("StopPodSandbox of an unknown id")?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await
    .context("RemovePodSandbox of an unknown id")?;
    expect_code(
        "ContainerStatus of an unknown id",
        rt.container_status(cri::ContainerStatusRequest {
            container_id: unknown.clone(),
            verbose: false,
        })
        .await,
        tonic::Code::NotFound,
    )?;
    expect_code(
        "PullImage of an invalid name",
        images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: "Not A Valid/Name:!".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await,
        tonic::Code::InvalidArgument,
    )?;
    expect_code(
        "Exec (streaming) in an unknown container",
        rt.exec(cri::ExecRequest {
            container_id: unknown,
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await,
        tonic::Code::NotFound,
    )?;
    Ok(())
}

/// The log entries (stream, partial, text) once `want` all appear, within `deadline`.
async fn wait_for_log(
    path: &Path,
    want: &[(Stream, &str)],
    deadline: Duration,
) -> anyhow::Result<Vec<(Stream, bool, String)>> {
    let until = Instant::now() + deadline;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let entries: Vec<(Stream, bool, String)> = text
            .lines()
            .map(|l| {
                parse_line(l)
                    .map(|e| (e.stream, e.partial, e.text.to_string()))
                    .with_context(|| format!("not a CRI log line: {l:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        let found = want.iter().all(|(s, t)| {
            entries
                .iter()
                .any(|(es, partial, et)| es == s && !partial && et == t)
        });
        if found {
            return Ok(entries);
        }
        if Instant::now() >= until {
            bail!(
                "{} did not get {want:?} within {deadline:?}; it has:\n{text}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn container_state(rt: &mut Runtime, id: &str) -> anyhow::Result<cri::ContainerStatus> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: true,
    })
    .await
    .context("ContainerStatus")?
    .into_inner()
    .status
    .context("ContainerStatus without status")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A log line the container writes when asked: `app` prints each line an ExecSync writes
/// into the FIFO `/tmp/say`, so a test can make it log a line exactly when it wants. It
/// waits in `open` of the FIFO (no process forked per check: on kvm_pvm a `sleep` loop keeps
/// a host core busy).
const SAY_LOOP: &str =
    "mkfifo /tmp/say; while :; do read -r line < /tmp/say && echo \"$line\"; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_lifecycle_on_a_real_vm() -> anyhow::Result<()> {
    let _one_vm = ONE_VM.lock().await;
    let (setup, mut daemon) = start_cri_daemon("cri", "pvcri1", "10.88.201.0/24").await?;
    let result = lifecycle(&mut daemon, &setup.image_name).await;
    if result.is_err() {
        println!("[cri] podvisord's log:\n{}", daemon.log());
        println!("[cri] the pods' logs:\n{}", daemon.pod_logs());
    }
    result?;
    let status = daemon.stop()?;
    ensure!(status.success(), "podvisord exited {status} on SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vmm_makes_the_pod_not_ready() -> anyhow::Result<()> {
    let _one_vm = ONE_VM.lock().await;
    let (setup, mut daemon) = start_cri_daemon("cri", "pvcri2", "10.88.202.0/24").await?;
    let result = vmm_killed(&daemon, &setup.image_name).await;
    if result.is_err() {
        println!("[cri] podvisord's log:\n{}", daemon.log());
        println!("[cri] the pods' logs:\n{}", daemon.pod_logs());
    }
    result?;
    let status = daemon.stop()?;
    ensure!(status.success(), "podvisord exited {status} on SIGTERM");
    Ok(())
}

async fn sandbox_status(
    rt: &mut Runtime,
    id: &str,
) -> anyhow::Result<(cri::PodSandboxStatus, Option<serde_json::Value>)> {
    let sb = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner();
    let record = match sb.info.get("info") {
        Some(info) => Some(serde_json::from_str(info).context("verbose info")?),
        None => None,
    };
    Ok((sb.status.context("no sandbox status")?, record))
}

/// RunPodSandbox with `pod`; returns the sandbox id, its VMM's pid and its pod directory.
async fn run_pod(
    rt: &mut Runtime,
    pod: &cri::PodSandboxConfig,
) -> anyhow::Result<(String, u32, PathBuf)> {
    let step = Step::start("RunPodSandbox (VM boot)");
    let sandbox_id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    step.done();
    ensure!(
        sandbox_id.len() == 64 && sandbox_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sandbox_id}"
    );
    let (status, record) = sandbox_status(rt, &sandbox_id).await?;
    ensure!(
        status.state == cri::PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    let record = record.context("no verbose info")?;
    let vmm_pid = u32::try_from(record["vmm"]["pid"].as_u64().context("no VMM pid")?)?;
    let pod_dir = PathBuf::from(record["vmm"]["dir"].as_str().context("no pod dir")?);
    ensure!(pod_dir.is_dir(), "{}", pod_dir.display());
    Ok((sandbox_id, vmm_pid, pod_dir))
}

async fn pull(
    images: &mut Images,
    image_name: &str,
    pod: &cri::PodSandboxConfig,
) -> anyhow::Result<String> {
    let step = Step::start("PullImage");
    let image_ref = pull_image(images, image_name, pod).await?;
    step.done();
    Ok(image_ref)
}

/// CreateContainer + StartContainer of a busybox `sh -c script` logging to `<name>/0.log`.
async fn run_container(
    rt: &mut Runtime,
    sandbox_id: &str,
    pod: &cri::PodSandboxConfig,
    image_ref: &str,
    name: &str,
    script: &str,
    mounts: Vec<cri::Mount>,
) -> anyhow::Result<String> {
    let step = Step::start("CreateContainer");
    let container_id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            config: Some(cri::ContainerConfig {
                log_path: format!("{name}/0.log"),
                labels: [("role".to_string(), name.to_string())].into(),
                mounts,
                ..shell_container(name, image_ref, script)
            }),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .with_context(|| format!("CreateContainer {name}"))?
        .into_inner()
        .container_id;
    step.done();
    let st = container_state(rt, &container_id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerCreated as i32,
        "{st:?}"
    );
    let step = Step::start("StartContainer");
    rt.start_container(cri::StartContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .with_context(|| format!("StartContainer {name}"))?;
    step.done();
    let st = container_state(rt, &container_id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32 && st.started_at > 0,
        "{st:?}"
    );
    ensure!(st.image_id.starts_with("sha256:"), "{st:?}");
    ensure!(!st.image_ref.is_empty(), "{st:?}");
    Ok(container_id)
}

/// Makes `app` (running [`SAY_LOOP`]) write `line` to its stdout.
async fn say(rt: &mut Runtime, app: &str, line: &str) -> anyhow::Result<()> {
    // The FIFO is made when `app` starts; until then a write would make a plain file.
    let script = format!("while [ ! -p /tmp/say ]; do sleep 0.2; done; echo {line} > /tmp/say");
    let out = exec(rt, app, &["sh", "-c", &script]).await?;
    ensure!(out.exit_code == 0, "exec: {out:?}");
    Ok(())
}

async fn list_containers(
    rt: &mut Runtime,
    filter: cri::ContainerFilter,
) -> anyhow::Result<Vec<cri::Container>> {
    Ok(rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(filter),
        })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers)
}

/// The sidecar's mounts: a read-only configMap at /etc/config, a read-write directory at
/// /data.
fn sidecar_mounts(dir: &Path) -> anyhow::Result<Vec<cri::Mount>> {
    let config = dir.join("volumes/config");
    let data = dir.join("volumes/data");
    write_configmap(&config, "..2026_x", "hello from a configMap\n")?;
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("seed"), "seed\n")?;
    Ok(vec![
        cri::Mount {
            container_path: "/etc/config".into(),
            host_path: config.display().to_string(),
            readonly: true,
            ..Default::default()
        },
        cri::Mount {
            container_path: "/data".into(),
            host_path: data.display().to_string(),
            readonly: false,
            ..Default::default()
        },
    ])
}

/// The configMap's key reads through its links, the read-only mount refuses writes, the
/// read-write one takes them, and an update of the configMap on the host reaches the
/// running container.
async fn volumes_in_the_sidecar(rt: &mut Runtime, id: &str, dir: &Path) -> anyhow::Result<()> {
    let step = Step::start("volumes: configMap read, read-only refused, read-write");
    let script = "cat /etc/config/greeting; \
        if echo x > /etc/config/new; then echo ro-writable; else echo ro-refused; fi; \
        cat /data/seed; echo rw > /data/f && cat /data/f";
    let out = exec(rt, id, &["sh", "-c", script]).await?;
    step.done();
    ensure!(
        out.exit_code == 0
            && String::from_utf8_lossy(&out.stdout)
                == "hello from a configMap\nro-refused\nseed\nrw\n",
        "exec: {out:?}"
    );

    let step = Step::start("volumes: configMap update reaches the container");
    let config = dir.join("volumes/config");
    write_configmap(&config, "..2026_y", "hello again\n")?;
    std::fs::remove_dir_all(config.join("..2026_x"))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = exec(rt, id, &["cat", "/etc/config/greeting"]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.exit_code == 0 && text == "hello again\n" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the configMap update did not reach the container: {out:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    step.done();
    Ok(())
}

async fn lifecycle(daemon: &mut Daemon, image_name: &str) -> anyhow::Result<()> {
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);

    let v = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    ensure!(
        v.runtime_name == "podvisor" && v.runtime_api_version == "v1",
        "{v:?}"
    );
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .context("Status without status")?;
    let cond = |t: &str| status.conditions.iter().find(|c| c.r#type == t).cloned();
    ensure!(cond("RuntimeReady").is_some_and(|c| c.status), "{status:?}");
    // Ready or not (with its reason) depending on podvisord's CNI support, but reported.
    let net = cond("NetworkReady").context("no NetworkReady")?;
    ensure!(net.status || !net.reason.is_empty(), "{net:?}");

    let step = Step::start("bad requests");
    bad_requests(&mut rt, &mut images).await?;
    step.done();

    // --- RunPodSandbox
    let log_dir = daemon.dir().join("logs/default_web_uid-0001");
    for name in ["app", "sidecar"] {
        std::fs::create_dir_all(log_dir.join(name))?;
    }
    let pod = pod_config(&log_dir);
    let (sandbox_id, vmm_pid, pod_dir) = run_pod(&mut rt, &pod).await?;
    // Everything below runs on a VM restored from the handler's template, as pods are by
    // default.
    let vm = daemon.vmm_config(&sandbox_id)?;
    ensure!(
        vm["restore"].is_object(),
        "the pod was not restored from a template: {vm}"
    );
    let (sb_status, _) = sandbox_status(&mut rt, &sandbox_id).await?;
    ensure!(sb_status.metadata.as_ref().is_some_and(|m| m.name == "web"));
    ensure!(vmm_processes_under(daemon.dir()) == [vmm_pid]);
    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items;
    ensure!(
        listed.len() == 1 && listed[0].id == sandbox_id,
        "{listed:?}"
    );

    // --- PullImage, then two containers
    let image_ref = pull(&mut images, image_name, &pod).await?;
    let container_id = run_container(
        &mut rt,
        &sandbox_id,
        &pod,
        &image_ref,
        "app",
        &format!("echo hello; echo oops >&2; {SAY_LOOP}"),
        Vec::new(),
    )
    .await?;
    let log_path = log_dir.join("app/0.log");
    let st = container_state(&mut rt, &container_id).await?;
    ensure!(st.log_path == log_path.display().to_string(), "{st:?}");
    let sidecar_id = run_container(
        &mut rt,
        &sandbox_id,
        &pod,
        &image_ref,
        "sidecar",
        "echo sidecar up; echo sidecar warn >&2; exec sleep 100000",
        sidecar_mounts(daemon.dir())?,
    )
    .await?;
    let sidecar_log = log_dir.join("sidecar/0.log");

    let step = Step::start("log lines of both containers");
    let entries = wait_for_log(
        &log_path,
        &[(Stream::Stdout, "hello"), (Stream::Stderr, "oops")],
        Duration::from_secs(120),
    )
    .await?;
    println!("[cri] app log: {entries:?}");
    let entries = wait_for_log(
        &sidecar_log,
        &[
            (Stream::Stdout, "sidecar up"),
            (Stream::Stderr, "sidecar warn"),
        ],
        Duration::from_secs(120),
    )
    .await?;
    println!("[cri] sidecar log: {entries:?}");
    step.done();
    ensure!(
        !std::fs::read_to_string(&log_path)?.contains("sidecar"),
        "the sidecar's output reached the app's log"
    );

    // Both running, both listed by pod; one by its label.
    for id in [&container_id, &sidecar_id] {
        let st = container_state(&mut rt, id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "{st:?}"
        );
    }
    let by_pod = list_containers(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: sandbox_id.clone(),
            ..Default::default()
        },
    )
    .await?;
    let mut ids: Vec<&str> = by_pod.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![container_id.as_str(), sidecar_id.as_str()];
    want.sort_unstable();
    ensure!(ids == want, "ListContainers by pod: {by_pod:?}");
    ensure!(
        by_pod
            .iter()
            .all(|c| c.state == cri::ContainerState::ContainerRunning as i32
                && c.pod_sandbox_id == sandbox_id),
        "{by_pod:?}"
    );
    let by_label = list_containers(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: sandbox_id.clone(),
            label_selector: [("role".to_string(), "sidecar".to_string())].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        by_label.len() == 1 && by_label[0].id == sidecar_id,
        "{by_label:?}"
    );
    let other_pod = list_containers(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: "0".repeat(64),
            ..Default::default()
        },
    )
    .await?;
    ensure!(other_pod.is_empty(), "{other_pod:?}");

    // --- ExecSync
    let step = Step::start("ExecSync");
    let out = exec(&mut rt, &container_id, &["cat", "/etc/hostname"]).await?;
    step.done();
    ensure!(
        out.exit_code == 0 && String::from_utf8_lossy(&out.stdout).trim() == "web-host",
        "exec: {out:?}"
    );
    let out = exec(
        &mut rt,
        &container_id,
        &["sh", "-c", "echo err >&2; exit 3"],
    )
    .await?;
    ensure!(
        out.exit_code == 3 && String::from_utf8_lossy(&out.stderr) == "err\n",
        "exec: {out:?}"
    );
    volumes_in_the_sidecar(&mut rt, &sidecar_id, daemon.dir()).await?;
    say(&mut rt, &container_id, "before-restart").await?;
    wait_for_log(
        &log_path,
        &[(Stream::Stdout, "before-restart")],
        Duration::from_secs(120),
    )
    .await?;

    // --- podvisord restarted while the pod runs
    let step = Step::start("podvisord restart");
    drop((rt, images));
    daemon.restart()?;
    step.done();
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel);
    let (status, record) = sandbox_status(&mut rt, &sandbox_id).await?;
    ensure!(
        status.state == cri::PodSandboxState::SandboxReady as i32,
        "after restart: {status:?}"
    );
    let record = record.context("no verbose info")?;
    ensure!(
        record["vmm"]["pid"].as_u64() == Some(u64::from(vmm_pid)),
        "another VMM after restart: {record}"
    );
    ensure!(vmm_processes_under(daemon.dir()) == [vmm_pid]);
    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                state: Some(cri::PodSandboxStateValue {
                    state: cri::PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items;
    ensure!(
        listed.len() == 1 && listed[0].id == sandbox_id,
        "after restart: {listed:?}"
    );
    let running = list_containers(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: sandbox_id.clone(),
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        },
    )
    .await?;
    ensure!(running.len() == 2, "after restart: {running:?}");
    let step = Step::start("ExecSync after restart");
    let out = exec(&mut rt, &sidecar_id, &["cat", "/etc/hostname"]).await?;
    step.done();
    ensure!(
        out.exit_code == 0 && String::from_utf8_lossy(&out.stdout).trim() == "web-host",
        "exec after restart: {out:?}"
    );
    let step = Step::start("log written after restart");
    say(&mut rt, &container_id, "after-restart").await?;
    let entries = wait_for_log(
        &log_path,
        &[(Stream::Stdout, "after-restart")],
        Duration::from_secs(120),
    )
    .await?;
    step.done();
    let count = |text: &str| entries.iter().filter(|(_, _, t)| t == text).count();
    ensure!(
        count("hello") == 1 && count("before-restart") == 1 && count("after-restart") == 1,
        "log after restart: {entries:?}"
    );

    // --- StopContainer, RemoveContainer
    let step = Step::start("StopContainer (timeout 2)");
    rt.stop_container(cri::StopContainerRequest {
        container_id: container_id.clone(),
        timeout: 2,
    })
    .await
    .context("StopContainer")?;
    step.done();
    let st = container_state(&mut rt, &container_id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerExited as i32
            && matches!(st.exit_code, 137 | 143)
            && st.finished_at >= st.started_at,
        "{st:?}"
    );
    println!("[cri] exited: code {} reason {:?}", st.exit_code, st.reason);
    // Stopping again is fine.
    rt.stop_container(cri::StopContainerRequest {
        container_id: container_id.clone(),
        timeout: 2,
    })
    .await
    .context("StopContainer again")?;
    let listed = list_containers(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: sandbox_id.clone(),
            label_selector: [("role".to_string(), "app".to_string())].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.len() == 1 && listed[0].id == container_id,
        "{listed:?}"
    );

    let step = Step::start("RemoveContainer");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .context("RemoveContainer")?;
    step.done();
    expect_code(
        "ContainerStatus after RemoveContainer",
        rt.container_status(cri::ContainerStatusRequest {
            container_id: container_id.clone(),
            verbose: false,
        })
        .await,
        tonic::Code::NotFound,
    )?;

    // --- StopPodSandbox (the sidecar still runs), RemovePodSandbox
    let step = Step::start("StopPodSandbox");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    step.done();
    let (sb, _) = sandbox_status(&mut rt, &sandbox_id).await?;
    ensure!(
        sb.state == cri::PodSandboxState::SandboxNotready as i32,
        "{sb:?}"
    );
    let st = container_state(&mut rt, &sidecar_id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerExited as i32,
        "the sidecar after StopPodSandbox: {st:?}"
    );
    ensure!(
        vmm_processes_under(daemon.dir()).is_empty(),
        "a VMM still runs after StopPodSandbox"
    );
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .context("StopPodSandbox again")?;

    let step = Step::start("RemovePodSandbox");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .context("RemovePodSandbox")?;
    step.done();
    expect_code(
        "PodSandboxStatus after RemovePodSandbox",
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: false,
        })
        .await,
        tonic::Code::NotFound,
    )?;
    expect_code(
        "ContainerStatus of the sidecar after RemovePodSandbox",
        rt.container_status(cri::ContainerStatusRequest {
            container_id: sidecar_id.clone(),
            verbose: false,
        })
        .await,
        tonic::Code::NotFound,
    )?;

    nothing_left(daemon, &sandbox_id, vmm_pid, &pod_dir)?;

    // Still serving after all that.
    let v = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    ensure!(v.runtime_name == "podvisor", "{v:?}");
    Ok(())
}

/// Nothing of a removed pod is left: no VMM process, pod directory (with the VMM's
/// sockets), record or network namespace.
fn nothing_left(
    daemon: &Daemon,
    sandbox_id: &str,
    vmm_pid: u32,
    pod_dir: &Path,
) -> anyhow::Result<()> {
    ensure!(
        !Path::new(&format!("/proc/{vmm_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{vmm_pid}/cmdline"))
                .is_ok_and(|c| !c.contains("podvisor-vmm")),
        "VMM {vmm_pid} still exists"
    );
    ensure!(vmm_processes_under(daemon.dir()).is_empty());
    ensure!(!pod_dir.exists(), "{} is left", pod_dir.display());
    ensure!(
        files_in(&daemon.state_dir.join("pods")).is_empty(),
        "pod directories left: {:?}",
        files_in(&daemon.state_dir.join("pods"))
    );
    for d in ["sandboxes", "containers"] {
        let left = files_in(&daemon.state_dir.join(d));
        ensure!(left.is_empty(), "records left in {d}: {left:?}");
    }
    let netns: Vec<PathBuf> = files_in(Path::new("/run/netns"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(sandbox_id))
        .collect();
    ensure!(netns.is_empty(), "network namespaces left: {netns:?}");
    let cgroups = cgroups_of(sandbox_id);
    ensure!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    let mounts = podvisor_tests::cri::mounts_under(daemon.dir());
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    Ok(())
}

/// `kill -9` of the pod's VMM: the watcher makes the sandbox NOTREADY and its container
/// EXITED; stop and remove still work and leave nothing.
async fn vmm_killed(daemon: &Daemon, image_name: &str) -> anyhow::Result<()> {
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let log_dir = daemon.dir().join("logs/default_victim_uid-0002");
    std::fs::create_dir_all(log_dir.join("app"))?;
    let mut pod = pod_config(&log_dir);
    pod.metadata = Some(cri::PodSandboxMetadata {
        name: "victim".into(),
        uid: "uid-0002".into(),
        namespace: "default".into(),
        attempt: 0,
    });
    let (sandbox_id, vmm_pid, pod_dir) = run_pod(&mut rt, &pod).await?;
    let (_, record) = sandbox_status(&mut rt, &sandbox_id).await?;
    let record = record.context("no verbose info")?;
    let sockets: Vec<PathBuf> = ["api_sock", "vsock_uds"]
        .iter()
        .map(|k| record["vmm"][k].as_str().map(PathBuf::from))
        .collect::<Option<_>>()
        .context("no VMM sockets in the record")?;
    let image_ref = pull(&mut images, image_name, &pod).await?;
    let container_id = run_container(
        &mut rt,
        &sandbox_id,
        &pod,
        &image_ref,
        "app",
        "echo up; exec sleep 100000",
        Vec::new(),
    )
    .await?;
    wait_for_log(
        &log_dir.join("app/0.log"),
        &[(Stream::Stdout, "up")],
        Duration::from_secs(120),
    )
    .await?;

    println!("[cri] kill -9 {vmm_pid}");
    ensure!(vmm_processes_under(daemon.dir()) == [vmm_pid]);
    // SAFETY: kill(2) on the pid of the VMM podvisord reported for this pod, just checked to
    // be a podvisor-vmm under this test's directory.
    let killed = unsafe { libc::kill(libc::pid_t::try_from(vmm_pid)?, libc::SIGKILL) };
    ensure!(
        killed == 0,
        "kill -9 {vmm_pid}: {}",
        std::io::Error::last_os_error()
    );

    let step = Step::start("sandbox NOTREADY after kill -9");
    let until = Instant::now() + VM_GONE_DEADLINE;
    loop {
        let (status, _) = sandbox_status(&mut rt, &sandbox_id).await?;
        if status.state == cri::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        ensure!(
            Instant::now() < until,
            "the sandbox is still {status:?} {VM_GONE_DEADLINE:?} after its VMM was killed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    step.done();
    // Its container is marked exited right after (within the same deadline).
    let st = loop {
        let st = container_state(&mut rt, &container_id).await?;
        if st.state == cri::ContainerState::ContainerExited as i32 || Instant::now() >= until {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "[cri] after kill -9: container {:?} exit {} reason {:?} message {:?}",
        cri::ContainerState::try_from(st.state),
        st.exit_code,
        st.reason,
        st.message
    );
    ensure!(
        st.state == cri::ContainerState::ContainerExited as i32
            && st.reason == "Error"
            && st.message.contains("VM exited")
            && st.exit_code != 0
            && st.finished_at >= st.started_at,
        "{st:?}"
    );
    let exited = list_containers(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: sandbox_id.clone(),
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerExited as i32,
            }),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        exited.len() == 1 && exited[0].id == container_id,
        "{exited:?}"
    );
    // An exec into the dead pod fails with a message, and the daemon goes on.
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec!["true".into()],
            timeout: 10,
        })
        .await;
    ensure!(r.is_err(), "exec in a dead pod: {r:?}");

    let step = Step::start("StopPodSandbox + RemovePodSandbox of the dead pod");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .context("StopPodSandbox of a dead pod")?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .context("RemovePodSandbox of a dead pod")?;
    step.done();
    expect_code(
        "PodSandboxStatus after RemovePodSandbox",
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: false,
        })
        .await,
        tonic::Code::NotFound,
    )?;
    expect_code(
        "ContainerStatus after RemovePodSandbox",
        rt.container_status(cri::ContainerStatusRequest {
            container_id,
            verbose: false,
        })
        .await,
        tonic::Code::NotFound,
    )?;
    for s in &sockets {
        ensure!(s.symlink_metadata().is_err(), "{} is left", s.display());
    }
    nothing_left(daemon, &sandbox_id, vmm_pid, &pod_dir)
}
