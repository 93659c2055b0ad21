//! podvisord end to end, as kubelet drives it: a real podvisord on a Unix socket, a real
//! registry, one real microVM. RunPodSandbox -> PullImage -> CreateContainer ->
//! StartContainer -> logs -> ExecSync -> StopContainer -> RemoveContainer ->
//! StopPodSandbox -> RemovePodSandbox, then nothing left behind; and bad requests answered
//! with their gRPC codes while the daemon keeps serving.
//!
//! One VM boot in the whole file (a boot takes about a minute on a kvm_pvm host); every
//! wait has a generous deadline, none is a fixed sleep.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::logs::{Stream, parse_line};
use podvisor_tests::cri::{Daemon, vmm_processes_under};
use podvisor_tests::registry::{Registry, push_busybox};
use podvisor_tests::{artifacts, paths};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

type Runtime = RuntimeServiceClient<Channel>;
type Images = ImageServiceClient<Channel>;

/// A gRPC channel over podvisord's Unix socket.
async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://podvisord.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .context("connect to podvisord")
}

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
    match r {
        Err(s) if s.code() == code => {
            println!("[cri] {what}: {code:?} {:?}", s.message());
            Ok(s.message().to_string())
        }
        other => bail!("{what}: expected {code:?}, got {other:?}"),
    }
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
        "Exec (streaming)",
        rt.exec(cri::ExecRequest {
            container_id: unknown,
            cmd: vec!["true".into()],
            ..Default::default()
        })
        .await,
        tonic::Code::Unimplemented,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_lifecycle_on_a_real_vm() -> anyhow::Result<()> {
    paths::require_kvm()?;
    let kernel = paths::guest_kernel()?;
    let rootfs = artifacts::agent_rootfs()?;
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "podvisor/busybox", "cri").await?;
    let image_name = registry.reference("podvisor/busybox", "cri");
    println!("[cri] pushed {image_name} ({})", pushed.digest);

    let mut daemon = Daemon::start(&format!(
        "[registry]\ninsecure = [{host:?}]\n\n[handlers.podvisor]\nvcpus = 1\nmemory_mib = 256\n\
         kernel = {kernel:?}\nimage = {rootfs:?}\n",
        host = registry.host(),
        kernel = kernel.display().to_string(),
        rootfs = rootfs.display().to_string(),
    ))?;
    let result = lifecycle(&mut daemon, &image_name).await;
    if result.is_err() {
        println!("[cri] podvisord's log:\n{}", daemon.log());
    }
    result?;
    let status = daemon.stop()?;
    ensure!(status.success(), "podvisord exited {status} on SIGTERM");
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
    let net = cond("NetworkReady").context("no NetworkReady")?;
    ensure!(
        !net.status && net.reason == "NetworkPluginNotReady",
        "{net:?}"
    );

    let step = Step::start("bad requests");
    bad_requests(&mut rt, &mut images).await?;
    step.done();

    // --- RunPodSandbox
    let log_dir = daemon.dir().join("logs/default_web_uid-0001");
    std::fs::create_dir_all(log_dir.join("app"))?;
    let pod = pod_config(&log_dir);
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
    let sb = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: true,
        })
        .await?
        .into_inner();
    let sb_status = sb.status.clone().context("no sandbox status")?;
    ensure!(
        sb_status.state == cri::PodSandboxState::SandboxReady as i32,
        "{sb:?}"
    );
    ensure!(sb_status.metadata.as_ref().is_some_and(|m| m.name == "web"));
    let record: serde_json::Value =
        serde_json::from_str(sb.info.get("info").context("no verbose info")?)?;
    let vmm_pid = record["vmm"]["pid"].as_u64().context("no VMM pid")? as u32;
    let pod_dir = PathBuf::from(record["vmm"]["dir"].as_str().context("no pod dir")?);
    ensure!(pod_dir.is_dir(), "{}", pod_dir.display());
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

    // --- PullImage
    let step = Step::start("PullImage");
    let image_ref = images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image_name.to_string(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(pod.clone()),
        })
        .await
        .context("PullImage")?
        .into_inner()
        .image_ref;
    step.done();

    // --- CreateContainer, StartContainer
    let step = Step::start("CreateContainer");
    let container_id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image_ref.clone(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into()],
                args: vec!["echo hello; echo oops >&2; sleep 1000".into()],
                log_path: "app/0.log".into(),
                labels: [("role".to_string(), "main".to_string())].into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    step.done();
    let st = container_state(&mut rt, &container_id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerCreated as i32,
        "{st:?}"
    );

    let step = Step::start("StartContainer");
    rt.start_container(cri::StartContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .context("StartContainer")?;
    step.done();
    let st = container_state(&mut rt, &container_id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32 && st.started_at > 0,
        "{st:?}"
    );
    ensure!(st.image_id.starts_with("sha256:"), "{st:?}");
    ensure!(!st.image_ref.is_empty(), "{st:?}");
    let log_path = log_dir.join("app/0.log");
    ensure!(st.log_path == log_path.display().to_string(), "{st:?}");

    let step = Step::start("log lines");
    let entries = wait_for_log(
        &log_path,
        &[(Stream::Stdout, "hello"), (Stream::Stderr, "oops")],
        Duration::from_secs(120),
    )
    .await?;
    step.done();
    println!("[cri] log: {entries:?}");

    // --- ExecSync
    let step = Step::start("ExecSync");
    let out = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec!["cat".into(), "/etc/hostname".into()],
            timeout: 120,
        })
        .await
        .context("ExecSync")?
        .into_inner();
    step.done();
    ensure!(
        out.exit_code == 0 && String::from_utf8_lossy(&out.stdout).trim() == "web-host",
        "exec: {out:?}"
    );
    let out = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: container_id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "echo err >&2; exit 3".into()],
            timeout: 120,
        })
        .await
        .context("ExecSync failing")?
        .into_inner();
    ensure!(
        out.exit_code == 3 && String::from_utf8_lossy(&out.stderr) == "err\n",
        "exec: {out:?}"
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
    let listed = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: sandbox_id.clone(),
                label_selector: [("role".to_string(), "main".to_string())].into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
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

    // --- StopPodSandbox, RemovePodSandbox
    let step = Step::start("StopPodSandbox");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    step.done();
    let sb = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    ensure!(
        sb.state == cri::PodSandboxState::SandboxNotready as i32,
        "{sb:?}"
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

    // --- Nothing left.
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

    // Still serving after all that.
    let v = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    ensure!(v.runtime_name == "podvisor", "{v:?}");
    Ok(())
}
