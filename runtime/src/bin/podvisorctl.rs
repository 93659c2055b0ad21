//! `podvisorctl`: a small crictl-like client for `podvisord`, speaking CRI v1 over its
//! Unix socket, so podvisor is usable without crictl.
//!
//! ```text
//! podvisorctl [--socket PATH] COMMAND
//!
//!   version                          runtime name and versions
//!   info                             runtime status and conditions (JSON)
//!   runp [--runtime HANDLER] POD.json          run a pod sandbox, print its ID
//!   stopp ID | rmp ID                stop / remove a pod sandbox
//!   pods [-q]                        list pod sandboxes
//!   inspectp ID                      pod sandbox status (JSON)
//!   create POD_ID CONTAINER.json POD.json      create a container, print its ID
//!   start ID | rm ID                 start / remove a container
//!   stop [-t SECS] ID                stop a container (SIGKILL after SECS, default 10)
//!   ps [-a] [-q]                     list running (-a: all) containers
//!   inspect ID                       container status (JSON)
//!   exec [--timeout SECS] ID -- CMD...         run CMD in the container, exit with its code
//!   logs ID                          print the container's log
//!   pull [--creds USER:PASS] IMAGE   pull an image
//!   images [-q]                      list images
//!   rmi IMAGE                        remove an image
//! ```
//!
//! The socket is `--socket`, else `$PODVISOR_SOCKET`, else `/run/podvisor/podvisord.sock`.
//! Pod and container IDs may be abbreviated to any unique prefix.
//!
//! `POD.json` is a subset of the CRI `PodSandboxConfig`, field names as in the proto
//! (`snake_case`, `lowerCamelCase` accepted too); unknown fields are refused rather than
//! ignored:
//!
//! ```json
//! {"metadata": {"name": "web", "namespace": "default", "uid": "web-1", "attempt": 0},
//!  "hostname": "web", "log_directory": "/var/log/pods/web",
//!  "dns_config": {"servers": ["1.1.1.1"], "searches": [], "options": []},
//!  "labels": {}, "annotations": {},
//!  "linux": {"cgroup_parent": "", "sysctls": {}, "resources": {"memory_limit_in_bytes": 268435456}}}
//! ```
//!
//! `CONTAINER.json` is a subset of `ContainerConfig`:
//!
//! ```json
//! {"metadata": {"name": "nginx", "attempt": 0}, "image": {"image": "nginx:latest"},
//!  "command": [], "args": [], "working_dir": "", "envs": [{"key": "A", "value": "b"}],
//!  "log_path": "nginx/0.log", "labels": {}, "annotations": {},
//!  "linux": {"resources": {"memory_limit_in_bytes": 134217728}}}
//! ```

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::logs::{Stream, parse_line};
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

const DEFAULT_SOCKET: &str = "/run/podvisor/podvisord.sock";
const SOCKET_ENV: &str = "PODVISOR_SOCKET";
/// crictl shows IDs cut to this length.
const SHORT_ID: usize = 13;

#[derive(Debug, Parser)]
#[command(name = "podvisorctl", version, about = "A CRI client for podvisord")]
struct Cli {
    /// The CRI socket [env: PODVISOR_SOCKET] [default: /run/podvisor/podvisord.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the runtime's name and versions.
    Version,
    /// Show the runtime's status and conditions.
    Info,
    /// Run a pod sandbox from a JSON PodSandboxConfig.
    Runp {
        /// The runtime handler (CRI `runtime_handler`).
        #[arg(long, value_name = "HANDLER")]
        runtime: Option<String>,
        /// The pod config file.
        pod_config: PathBuf,
    },
    /// Stop a pod sandbox.
    Stopp { id: String },
    /// Remove a pod sandbox.
    Rmp { id: String },
    /// List pod sandboxes.
    Pods {
        /// Print full IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show a pod sandbox's status.
    Inspectp { id: String },
    /// Create a container in a pod sandbox.
    Create {
        pod_id: String,
        /// The container config file.
        container_config: PathBuf,
        /// The config the pod was run with.
        pod_config: PathBuf,
    },
    /// Start a created container.
    Start { id: String },
    /// Stop a container.
    Stop {
        /// Seconds to wait after the stop signal before killing.
        #[arg(short, long, default_value_t = 10, value_name = "SECS")]
        timeout: i64,
        id: String,
    },
    /// Remove a container.
    Rm { id: String },
    /// List containers.
    Ps {
        /// All containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Print full IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show a container's status.
    Inspect { id: String },
    /// Run a command in a container and wait for it.
    Exec {
        /// Seconds before the command is killed (0: no limit).
        #[arg(long, default_value_t = 0, value_name = "SECS")]
        timeout: i64,
        id: String,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        cmd: Vec<String>,
    },
    /// Print a container's log.
    Logs { id: String },
    /// Pull an image.
    Pull {
        /// Registry credentials.
        #[arg(long, value_name = "USER:PASS")]
        creds: Option<String>,
        image: String,
    },
    /// List images.
    Images {
        /// Print image IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove an image.
    Rmi { image: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("podvisorctl: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = socket_path(cli.socket, std::env::var_os(SOCKET_ENV));
    let mut cri = Cri::connect(&socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))?;
    match cli.command {
        Command::Version => cri.version().await?,
        Command::Info => cri.info().await?,
        Command::Runp {
            runtime,
            pod_config,
        } => {
            cri.run_pod(&pod_config, runtime.unwrap_or_default())
                .await?
        }
        Command::Stopp { id } => cri.stop_pod(&id).await?,
        Command::Rmp { id } => cri.remove_pod(&id).await?,
        Command::Pods { quiet } => cri.pods(quiet).await?,
        Command::Inspectp { id } => cri.inspect_pod(&id).await?,
        Command::Create {
            pod_id,
            container_config,
            pod_config,
        } => cri.create(&pod_id, &container_config, &pod_config).await?,
        Command::Start { id } => cri.start(&id).await?,
        Command::Stop { timeout, id } => cri.stop(&id, timeout).await?,
        Command::Rm { id } => cri.remove(&id).await?,
        Command::Ps { all, quiet } => cri.ps(all, quiet).await?,
        Command::Inspect { id } => cri.inspect(&id).await?,
        Command::Exec { timeout, id, cmd } => return cri.exec(&id, cmd, timeout).await,
        Command::Logs { id } => cri.logs(&id).await?,
        Command::Pull { creds, image } => cri.pull(&image, creds.as_deref()).await?,
        Command::Images { quiet } => cri.images(quiet).await?,
        Command::Rmi { image } => cri.remove_image(&image).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// An error with its causes, `: ` apart. A cause whose text its wrapper already shows
/// (tonic's transport errors repeat the I/O error) is left out.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// `--socket`, else the environment's, else the default.
fn socket_path(arg: Option<PathBuf>, env: Option<OsString>) -> PathBuf {
    arg.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// A failed call as an error: what was asked, the gRPC code and the server's message.
fn rpc_error(what: impl std::fmt::Display) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |status| match status.message() {
        "" => anyhow::anyhow!("{what}: {:?}", status.code()),
        message => anyhow::anyhow!("{what}: {:?}: {message}", status.code()),
    }
}

/// The two CRI services on one connection.
struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let path = socket.to_path_buf();
        // The URI is required by the API but unused: every connection goes to the socket.
        let channel = Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    async fn version(&mut self) -> anyhow::Result<()> {
        let v = self
            .runtime
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(rpc_error("version"))?
            .into_inner();
        println!("Version:  {}", v.version);
        println!("RuntimeName:  {}", v.runtime_name);
        println!("RuntimeVersion:  {}", v.runtime_version);
        println!("RuntimeApiVersion:  {}", v.runtime_api_version);
        Ok(())
    }

    async fn info(&mut self) -> anyhow::Result<()> {
        let status = self
            .runtime
            .status(cri::StatusRequest { verbose: true })
            .await
            .map_err(rpc_error("status"))?
            .into_inner();
        print_json(readable_json(&status)?)
    }

    async fn run_pod(&mut self, config: &Path, runtime_handler: String) -> anyhow::Result<()> {
        let config = read_pod_config(config)?;
        let name = pod_name(&config);
        let id = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler,
            })
            .await
            .map_err(rpc_error(format_args!("run pod {name:?}")))?
            .into_inner()
            .pod_sandbox_id;
        println!("{id}");
        Ok(())
    }

    async fn stop_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.pod_id(id).await?;
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("stop pod {id}")))?;
        println!("Stopped sandbox {id}");
        Ok(())
    }

    async fn remove_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.pod_id(id).await?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("remove pod {id}")))?;
        println!("Removed sandbox {id}");
        Ok(())
    }

    async fn list_pods(&mut self) -> anyhow::Result<Vec<cri::PodSandbox>> {
        Ok(self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .map_err(rpc_error("list pods"))?
            .into_inner()
            .items)
    }

    async fn pods(&mut self, quiet: bool) -> anyhow::Result<()> {
        let mut pods = self.list_pods().await?;
        pods.sort_by_key(|p| std::cmp::Reverse(p.created_at));
        if quiet {
            for p in &pods {
                println!("{}", p.id);
            }
            return Ok(());
        }
        let now = now_nanos();
        let mut rows = vec![row([
            "POD ID",
            "CREATED",
            "STATE",
            "NAME",
            "NAMESPACE",
            "ATTEMPT",
            "RUNTIME",
        ])];
        for p in &pods {
            let meta = p.metadata.clone().unwrap_or_default();
            rows.push(vec![
                short_id(&p.id),
                ago(now, p.created_at),
                pod_state(p.state).to_string(),
                meta.name,
                meta.namespace,
                meta.attempt.to_string(),
                handler_or_default(&p.runtime_handler),
            ]);
        }
        print!("{}", format_table(&rows));
        Ok(())
    }

    async fn inspect_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.pod_id(id).await?;
        let status = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            })
            .await
            .map_err(rpc_error(format_args!("pod status {id}")))?
            .into_inner();
        print_json(readable_json(&status)?)
    }

    async fn create(
        &mut self,
        pod_id: &str,
        container_config: &Path,
        pod_config: &Path,
    ) -> anyhow::Result<()> {
        let pod_id = self.pod_id(pod_id).await?;
        let config = read_container_config(container_config)?;
        let sandbox_config = read_pod_config(pod_config)?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(rpc_error(format_args!(
                "create container {name:?} in pod {pod_id}"
            )))?
            .into_inner()
            .container_id;
        println!("{id}");
        Ok(())
    }

    async fn start(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("start container {id}")))?;
        println!("{id}");
        Ok(())
    }

    async fn stop(&mut self, id: &str, timeout: i64) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout,
            })
            .await
            .map_err(rpc_error(format_args!("stop container {id}")))?;
        println!("{id}");
        Ok(())
    }

    async fn remove(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("remove container {id}")))?;
        println!("{id}");
        Ok(())
    }

    async fn list_containers(&mut self) -> anyhow::Result<Vec<cri::Container>> {
        Ok(self
            .runtime
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .map_err(rpc_error("list containers"))?
            .into_inner()
            .containers)
    }

    async fn ps(&mut self, all: bool, quiet: bool) -> anyhow::Result<()> {
        let mut containers = self.list_containers().await?;
        if !all {
            containers.retain(|c| c.state == cri::ContainerState::ContainerRunning as i32);
        }
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        if quiet {
            for c in &containers {
                println!("{}", c.id);
            }
            return Ok(());
        }
        let pod_names: HashMap<String, String> = self
            .list_pods()
            .await?
            .into_iter()
            .map(|p| (p.id, p.metadata.map(|m| m.name).unwrap_or_default()))
            .collect();
        let now = now_nanos();
        let mut rows = vec![row([
            "CONTAINER",
            "IMAGE",
            "CREATED",
            "STATE",
            "NAME",
            "ATTEMPT",
            "POD ID",
            "POD",
        ])];
        for c in &containers {
            let meta = c.metadata.clone().unwrap_or_default();
            let image = c
                .image
                .as_ref()
                .map(|i| i.image.as_str())
                .filter(|i| !i.is_empty())
                .unwrap_or(&c.image_ref);
            rows.push(vec![
                short_id(&c.id),
                short_image(image),
                ago(now, c.created_at),
                container_state(c.state).to_string(),
                meta.name,
                meta.attempt.to_string(),
                short_id(&c.pod_sandbox_id),
                pod_names
                    .get(&c.pod_sandbox_id)
                    .cloned()
                    .unwrap_or_default(),
            ]);
        }
        print!("{}", format_table(&rows));
        Ok(())
    }

    async fn container_status(&mut self, id: &str) -> anyhow::Result<cri::ContainerStatusResponse> {
        Ok(self
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            })
            .await
            .map_err(rpc_error(format_args!("container status {id}")))?
            .into_inner())
    }

    async fn inspect(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        let status = self.container_status(&id).await?;
        print_json(readable_json(&status)?)
    }

    async fn exec(&mut self, id: &str, cmd: Vec<String>, timeout: i64) -> anyhow::Result<ExitCode> {
        let id = self.container_id(id).await?;
        let out = self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd,
                timeout,
            })
            .await
            .map_err(rpc_error(format_args!("exec in container {id}")))?
            .into_inner();
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&out.stdout).context("write stdout")?;
        stdout.flush().context("write stdout")?;
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(&out.stderr).context("write stderr")?;
        stderr.flush().context("write stderr")?;
        // A code outside 0..=255 (a runtime's -1 for "unknown") still means failure.
        Ok(ExitCode::from(
            u8::try_from(out.exit_code).unwrap_or(u8::MAX),
        ))
    }

    async fn logs(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        let status = self
            .container_status(&id)
            .await?
            .status
            .with_context(|| format!("container {id}: no status"))?;
        if status.log_path.is_empty() {
            bail!("container {id} has no log path");
        }
        let path = PathBuf::from(&status.log_path);
        let file =
            std::fs::File::open(&path).with_context(|| format!("open log {}", path.display()))?;
        let mut joiner = LogJoiner::default();
        let mut malformed = 0usize;
        let mut stdout = std::io::stdout().lock();
        let mut stderr = std::io::stderr().lock();
        for line in BufReader::new(file).split(b'\n') {
            let line = line.with_context(|| format!("read log {}", path.display()))?;
            let line = String::from_utf8_lossy(&line);
            let Some(entry) = parse_line(&line) else {
                malformed += 1;
                continue;
            };
            if let Some((stream, text)) = joiner.push(entry.stream, entry.partial, entry.text) {
                write_line(&mut stdout, &mut stderr, stream, &text, true)?;
            }
        }
        // Output the container did not end with a newline.
        for (stream, text) in joiner.finish() {
            write_line(&mut stdout, &mut stderr, stream, &text, false)?;
        }
        stdout.flush().context("write stdout")?;
        if malformed > 0 {
            eprintln!(
                "podvisorctl: skipped {malformed} malformed lines of {}",
                path.display()
            );
        }
        Ok(())
    }

    async fn pull(&mut self, image: &str, creds: Option<&str>) -> anyhow::Result<()> {
        let auth = creds.map(parse_creds).transpose()?;
        let image_ref = self
            .images
            .pull_image(cri::PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config: None,
            })
            .await
            .map_err(rpc_error(format_args!("pull image {image:?}")))?
            .into_inner()
            .image_ref;
        println!("Image is up to date for {image_ref}");
        Ok(())
    }

    async fn images(&mut self, quiet: bool) -> anyhow::Result<()> {
        let mut images = self
            .images
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .map_err(rpc_error("list images"))?
            .into_inner()
            .images;
        if quiet {
            for i in &images {
                println!("{}", i.id);
            }
            return Ok(());
        }
        images.sort_by(|a, b| a.repo_tags.cmp(&b.repo_tags));
        let mut rows = vec![row(["IMAGE", "TAG", "IMAGE ID", "SIZE"])];
        for image in &images {
            for (repo, tag) in image_names(image) {
                rows.push(vec![
                    repo,
                    tag,
                    short_image_id(&image.id),
                    human_size(image.size),
                ]);
            }
        }
        print!("{}", format_table(&rows));
        Ok(())
    }

    async fn remove_image(&mut self, image: &str) -> anyhow::Result<()> {
        let found = self
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .map_err(rpc_error(format_args!("image status {image:?}")))?
            .into_inner()
            .image
            .with_context(|| format!("no such image {image:?}"))?;
        self.images
            .remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(&found.id)),
            })
            .await
            .map_err(rpc_error(format_args!("remove image {image:?}")))?;
        if found.repo_tags.is_empty() {
            println!("Deleted: {}", found.id);
        }
        for tag in &found.repo_tags {
            println!("Deleted: {tag}");
        }
        Ok(())
    }

    /// The full ID of the pod `given` is a unique prefix of.
    async fn pod_id(&mut self, given: &str) -> anyhow::Result<String> {
        let pods = self.list_pods().await?;
        resolve_id("pod", given, pods.iter().map(|p| p.id.as_str()))
    }

    /// The full ID of the container `given` is a unique prefix of.
    async fn container_id(&mut self, given: &str) -> anyhow::Result<String> {
        let containers = self.list_containers().await?;
        resolve_id("container", given, containers.iter().map(|c| c.id.as_str()))
    }
}

/// The ID among `ids` that is `given` or, failing that, the only one starting with it.
fn resolve_id<'a>(
    what: &str,
    given: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<String> {
    if given.is_empty() {
        bail!("empty {what} ID");
    }
    let mut matches = Vec::new();
    for id in ids {
        if id == given {
            return Ok(id.to_string());
        }
        if id.starts_with(given) {
            matches.push(id);
        }
    }
    match matches.as_slice() {
        [] => bail!("no {what} with ID {given:?}"),
        [only] => Ok(only.to_string()),
        many => bail!(
            "{what} ID {given:?} is ambiguous: it matches {}",
            many.join(", ")
        ),
    }
}

// ---- configs ----

/// The subset of `PodSandboxConfig` read from `POD.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodConfigFile {
    metadata: PodMetadataFile,
    hostname: String,
    #[serde(alias = "logDirectory")]
    log_directory: String,
    #[serde(alias = "dnsConfig")]
    dns_config: Option<DnsConfigFile>,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    linux: Option<PodLinuxFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodMetadataFile {
    name: String,
    namespace: String,
    uid: String,
    attempt: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DnsConfigFile {
    servers: Vec<String>,
    searches: Vec<String>,
    options: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodLinuxFile {
    #[serde(alias = "cgroupParent")]
    cgroup_parent: String,
    sysctls: HashMap<String, String>,
    resources: Option<ResourcesFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ResourcesFile {
    #[serde(alias = "cpuPeriod")]
    cpu_period: i64,
    #[serde(alias = "cpuQuota")]
    cpu_quota: i64,
    #[serde(alias = "cpuShares")]
    cpu_shares: i64,
    #[serde(alias = "memoryLimitInBytes")]
    memory_limit_in_bytes: i64,
}

/// The subset of `ContainerConfig` read from `CONTAINER.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerConfigFile {
    metadata: ContainerMetadataFile,
    image: ImageFile,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(alias = "workingDir")]
    working_dir: String,
    envs: Vec<KeyValueFile>,
    #[serde(alias = "logPath")]
    log_path: String,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    linux: Option<ContainerLinuxFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerMetadataFile {
    name: String,
    attempt: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ImageFile {
    image: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyValueFile {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerLinuxFile {
    resources: Option<ResourcesFile>,
}

impl From<ResourcesFile> for cri::LinuxContainerResources {
    fn from(r: ResourcesFile) -> Self {
        cri::LinuxContainerResources {
            cpu_period: r.cpu_period,
            cpu_quota: r.cpu_quota,
            cpu_shares: r.cpu_shares,
            memory_limit_in_bytes: r.memory_limit_in_bytes,
            ..Default::default()
        }
    }
}

fn read_pod_config(path: &Path) -> anyhow::Result<cri::PodSandboxConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_pod_config(&text).with_context(|| format!("pod config {}", path.display()))
}

fn read_container_config(path: &Path) -> anyhow::Result<cri::ContainerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_container_config(&text).with_context(|| format!("container config {}", path.display()))
}

/// A `PodSandboxConfig` from the JSON of `POD.json`.
fn parse_pod_config(json: &str) -> anyhow::Result<cri::PodSandboxConfig> {
    let file: PodConfigFile = serde_json::from_str(json)?;
    if file.metadata.name.is_empty() {
        bail!("metadata.name is required");
    }
    Ok(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: file.metadata.name,
            uid: file.metadata.uid,
            namespace: file.metadata.namespace,
            attempt: file.metadata.attempt,
        }),
        hostname: file.hostname,
        log_directory: file.log_directory,
        dns_config: file.dns_config.map(|d| cri::DnsConfig {
            servers: d.servers,
            searches: d.searches,
            options: d.options,
        }),
        labels: file.labels,
        annotations: file.annotations,
        linux: file.linux.map(|l| cri::LinuxPodSandboxConfig {
            cgroup_parent: l.cgroup_parent,
            sysctls: l.sysctls,
            resources: l.resources.map(Into::into),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A `ContainerConfig` from the JSON of `CONTAINER.json`.
fn parse_container_config(json: &str) -> anyhow::Result<cri::ContainerConfig> {
    let file: ContainerConfigFile = serde_json::from_str(json)?;
    if file.metadata.name.is_empty() {
        bail!("metadata.name is required");
    }
    if file.image.image.is_empty() {
        bail!("image.image is required");
    }
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: file.metadata.name,
            attempt: file.metadata.attempt,
        }),
        image: Some(image_spec(&file.image.image)),
        command: file.command,
        args: file.args,
        working_dir: file.working_dir,
        envs: file
            .envs
            .into_iter()
            .map(|kv| cri::KeyValue {
                key: kv.key,
                value: kv.value,
            })
            .collect(),
        labels: file.labels,
        annotations: file.annotations,
        log_path: file.log_path,
        linux: file.linux.map(|l| cri::LinuxContainerConfig {
            resources: l.resources.map(Into::into),
            security_context: None,
        }),
        ..Default::default()
    })
}

fn pod_name(config: &cri::PodSandboxConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// `--creds USER:PASS` as CRI credentials.
fn parse_creds(creds: &str) -> anyhow::Result<cri::AuthConfig> {
    let Some((user, pass)) = creds.split_once(':').filter(|(u, _)| !u.is_empty()) else {
        bail!("--creds must be USER:PASSWORD");
    };
    Ok(cri::AuthConfig {
        username: user.to_string(),
        password: pass.to_string(),
        ..Default::default()
    })
}

// ---- logs ----

/// Joins the `P` (partial) entries of a CRI log into whole lines, per stream.
#[derive(Debug, Default)]
struct LogJoiner {
    /// Text of partial entries not yet ended by an `F` entry: stdout, stderr.
    pending: [String; 2],
}

impl LogJoiner {
    /// Takes one entry; returns a line once its `F` entry arrives.
    fn push(&mut self, stream: Stream, partial: bool, text: &str) -> Option<(Stream, String)> {
        let pending = &mut self.pending[stream_index(stream)];
        pending.push_str(text);
        if partial {
            None
        } else {
            Some((stream, std::mem::take(pending)))
        }
    }

    /// What is left: output that did not end with a newline.
    fn finish(self) -> Vec<(Stream, String)> {
        let [out, err] = self.pending;
        [(Stream::Stdout, out), (Stream::Stderr, err)]
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .collect()
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn write_line(
    stdout: &mut impl Write,
    stderr: &mut impl Write,
    stream: Stream,
    text: &str,
    newline: bool,
) -> anyhow::Result<()> {
    let out: &mut dyn Write = match stream {
        Stream::Stdout => stdout,
        Stream::Stderr => stderr,
    };
    out.write_all(text.as_bytes())
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("write {}", stream.as_str()))
}

// ---- output ----

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Rows as aligned columns, three spaces apart, as crictl prints them.
fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < r.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn short_id(id: &str) -> String {
    id.chars().take(SHORT_ID).collect()
}

fn short_image_id(id: &str) -> String {
    short_id(id.strip_prefix("sha256:").unwrap_or(id))
}

/// An image for the `ps` table: an image ID shortened, a name as it is.
fn short_image(image: &str) -> String {
    match image.strip_prefix("sha256:") {
        Some(hex) => short_id(hex),
        None => image.to_string(),
    }
}

/// `(repository, tag)` rows for an image: one per tag, else its digest's repository
/// with `<none>`.
fn image_names(image: &cri::Image) -> Vec<(String, String)> {
    let none = || "<none>".to_string();
    if !image.repo_tags.is_empty() {
        return image
            .repo_tags
            .iter()
            .map(|t| match split_tag(t) {
                Some((repo, tag)) => (repo.to_string(), tag.to_string()),
                None => (t.clone(), none()),
            })
            .collect();
    }
    match image.repo_digests.first().and_then(|d| d.split_once('@')) {
        Some((repo, _)) => vec![(repo.to_string(), none())],
        None => vec![(none(), none())],
    }
}

/// `repo:tag` into its parts; a `:` before the last `/` is a registry port.
fn split_tag(repo_tag: &str) -> Option<(&str, &str)> {
    let (repo, tag) = repo_tag.rsplit_once(':')?;
    (!tag.contains('/')).then_some((repo, tag))
}

/// Bytes with three significant digits and decimal units (`4.27MB`), as crictl shows.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    // Display only: the precision lost converting to f64 does not show.
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let mut number = format!("{value:.decimals$}");
    if number.contains('.') {
        number = number
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string();
    }
    format!("{number}{}", UNITS[unit])
}

fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// How long ago `then` was, both in nanoseconds since the epoch (`2 minutes ago`).
fn ago(now: i64, then: i64) -> String {
    let secs = now.saturating_sub(then).max(0) / 1_000_000_000;
    let minutes = secs / 60;
    let hours = minutes / 60;
    let text = if secs < 1 {
        "Less than a second".to_string()
    } else if secs == 1 {
        "1 second".to_string()
    } else if secs < 60 {
        format!("{secs} seconds")
    } else if minutes == 1 {
        "About a minute".to_string()
    } else if minutes < 60 {
        format!("{minutes} minutes")
    } else if hours == 1 {
        "About an hour".to_string()
    } else if hours < 48 {
        format!("{hours} hours")
    } else if hours < 24 * 7 * 2 {
        format!("{} days", hours / 24)
    } else if hours < 24 * 30 * 2 {
        format!("{} weeks", hours / 24 / 7)
    } else if hours < 24 * 365 * 2 {
        format!("{} months", hours / 24 / 30)
    } else {
        format!("{} years", hours / 24 / 365)
    };
    format!("{text} ago")
}

fn pod_state(state: i32) -> &'static str {
    match cri::PodSandboxState::try_from(state) {
        Ok(cri::PodSandboxState::SandboxReady) => "Ready",
        Ok(cri::PodSandboxState::SandboxNotready) => "NotReady",
        Err(_) => "?",
    }
}

fn container_state(state: i32) -> &'static str {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => "Created",
        Ok(cri::ContainerState::ContainerRunning) => "Running",
        Ok(cri::ContainerState::ContainerExited) => "Exited",
        Ok(cri::ContainerState::ContainerUnknown) | Err(_) => "Unknown",
    }
}

fn handler_or_default(handler: &str) -> String {
    if handler.is_empty() {
        "(default)".to_string()
    } else {
        handler.to_string()
    }
}

/// A status response as JSON for people: `info` values that hold JSON are nested as
/// JSON, and state numbers are shown by name.
fn readable_json(response: &impl serde::Serialize) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(response).context("encode response")?;
    if let Some(info) = value.get_mut("info").and_then(|i| i.as_object_mut()) {
        for v in info.values_mut() {
            if let Some(parsed) = v.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                *v = parsed;
            }
        }
    }
    // PodSandboxStatusResponse: the pod's state; its containers' states.
    let pod_response = value.get("containers_statuses").is_some();
    if let Some(status) = value.get_mut("status") {
        if pod_response {
            name_state(status, pod_state);
        } else {
            name_state(status, container_state);
        }
    }
    if let Some(list) = value
        .get_mut("containers_statuses")
        .and_then(|l| l.as_array_mut())
    {
        for c in list {
            name_state(c, container_state);
        }
    }
    Ok(value)
}

fn name_state(status: &mut serde_json::Value, name: fn(i32) -> &'static str) {
    if let Some(state) = status.get_mut("state")
        && let Some(n) = state.as_i64().and_then(|n| i32::try_from(n).ok())
    {
        *state = serde_json::Value::from(name(n));
    }
}

fn print_json(value: serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&value).context("encode JSON")?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_config_subset() {
        let config = parse_pod_config(
            r#"{"metadata": {"name": "web", "namespace": "default", "uid": "u1", "attempt": 2},
                "hostname": "web-host", "logDirectory": "/var/log/pods/web",
                "dns_config": {"servers": ["1.1.1.1"], "searches": ["svc"], "options": ["ndots:5"]},
                "labels": {"app": "web"}, "annotations": {"a": "b"},
                "linux": {"cgroup_parent": "/kubepods", "sysctls": {"net.ipv4.ip_forward": "1"},
                          "resources": {"memory_limit_in_bytes": 268435456, "cpuQuota": 50000}}}"#,
        )
        .expect("parse");
        let meta = config.metadata.expect("metadata");
        assert_eq!(
            (
                meta.name.as_str(),
                meta.namespace.as_str(),
                meta.uid.as_str()
            ),
            ("web", "default", "u1")
        );
        assert_eq!(meta.attempt, 2);
        assert_eq!(config.hostname, "web-host");
        assert_eq!(config.log_directory, "/var/log/pods/web");
        let dns = config.dns_config.expect("dns");
        assert_eq!(dns.servers, ["1.1.1.1"]);
        assert_eq!(dns.options, ["ndots:5"]);
        assert_eq!(config.labels["app"], "web");
        assert_eq!(config.annotations["a"], "b");
        let linux = config.linux.expect("linux");
        assert_eq!(linux.cgroup_parent, "/kubepods");
        assert_eq!(linux.sysctls["net.ipv4.ip_forward"], "1");
        let resources = linux.resources.expect("resources");
        assert_eq!(resources.memory_limit_in_bytes, 268_435_456);
        assert_eq!(resources.cpu_quota, 50_000);

        // The smallest config crictl users write.
        let minimal = parse_pod_config(r#"{"metadata": {"name": "p"}}"#).expect("minimal");
        assert!(minimal.linux.is_none() && minimal.dns_config.is_none());

        let err = parse_pod_config(r#"{"metadata": {"namespace": "x"}}"#).expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = parse_pod_config(r#"{"metadata": {"name": "p"}, "port_mappings": []}"#)
            .expect_err("unsupported field");
        assert!(err.to_string().contains("port_mappings"), "{err}");
        parse_pod_config("{").expect_err("not JSON");
    }

    #[test]
    fn container_config_subset() {
        let config = parse_container_config(
            r#"{"metadata": {"name": "nginx", "attempt": 1}, "image": {"image": "nginx:1.27"},
                "command": ["/bin/sh", "-c"], "args": ["echo hi"], "working_dir": "/srv",
                "envs": [{"key": "A", "value": "1"}, {"key": "EMPTY"}],
                "log_path": "nginx/1.log", "labels": {"l": "v"}, "annotations": {"k": "v"},
                "linux": {"resources": {"memoryLimitInBytes": 134217728}}}"#,
        )
        .expect("parse");
        let meta = config.metadata.expect("metadata");
        assert_eq!((meta.name.as_str(), meta.attempt), ("nginx", 1));
        assert_eq!(config.image.expect("image").image, "nginx:1.27");
        assert_eq!(config.command, ["/bin/sh", "-c"]);
        assert_eq!(config.args, ["echo hi"]);
        assert_eq!(config.working_dir, "/srv");
        let envs: Vec<(&str, &str)> = config
            .envs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(envs, [("A", "1"), ("EMPTY", "")]);
        assert_eq!(config.log_path, "nginx/1.log");
        assert_eq!(config.labels["l"], "v");
        assert_eq!(config.annotations["k"], "v");
        let resources = config
            .linux
            .and_then(|l| l.resources)
            .expect("linux resources");
        assert_eq!(resources.memory_limit_in_bytes, 134_217_728);

        let err = parse_container_config(r#"{"metadata": {"name": "c"}}"#).expect_err("no image");
        assert!(err.to_string().contains("image.image"), "{err}");
        let err =
            parse_container_config(r#"{"image": {"image": "busybox"}}"#).expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
        let err = parse_container_config(
            r#"{"metadata": {"name": "c"}, "image": {"image": "busybox"}, "mounts": []}"#,
        )
        .expect_err("unsupported field");
        assert!(err.to_string().contains("mounts"), "{err}");
    }

    #[test]
    fn id_prefixes() {
        let ids = ["abc123", "abd456", "ff00", "ff"];
        let resolve = |given: &str| resolve_id("pod", given, ids);
        assert_eq!(resolve("abc").expect("unique"), "abc123");
        assert_eq!(resolve("abd456").expect("whole"), "abd456");
        // A whole ID wins over being a prefix of another.
        assert_eq!(resolve("ff").expect("exact"), "ff");
        let err = resolve("ab").expect_err("ambiguous");
        assert!(err.to_string().contains("ambiguous"), "{err}");
        assert!(err.to_string().contains("abc123") && err.to_string().contains("abd456"));
        let err = resolve("zz").expect_err("none");
        assert!(err.to_string().contains("no pod"), "{err}");
        resolve("").expect_err("empty");
    }

    #[test]
    fn socket_choice() {
        let arg = Some(PathBuf::from("/a.sock"));
        let env = Some(OsString::from("/b.sock"));
        assert_eq!(socket_path(arg, env.clone()), Path::new("/a.sock"));
        assert_eq!(socket_path(None, env), Path::new("/b.sock"));
        assert_eq!(
            socket_path(None, Some(OsString::new())),
            Path::new(DEFAULT_SOCKET)
        );
        assert_eq!(socket_path(None, None), Path::new(DEFAULT_SOCKET));
    }

    #[test]
    fn error_chain_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = anyhow::Error::new(io)
            .context("transport error: no such file")
            .context("connect to /x.sock");
        assert_eq!(
            error_chain(&error),
            "connect to /x.sock: transport error: no such file"
        );
        let error = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&error), "outer: inner");
    }

    #[test]
    fn exec_command_line() {
        let cli = Cli::try_parse_from(["podvisorctl", "exec", "--timeout", "5", "abc", "ls", "-l"])
            .expect("without --");
        let Command::Exec { timeout, id, cmd } = cli.command else {
            panic!("not exec: {cli:?}");
        };
        assert_eq!((timeout, id.as_str()), (5, "abc"));
        assert_eq!(cmd, ["ls", "-l"]);
        let cli = Cli::try_parse_from(["podvisorctl", "exec", "abc", "--", "sh", "-c", "exit 3"])
            .expect("with --");
        let Command::Exec { cmd, .. } = cli.command else {
            panic!("not exec: {cli:?}");
        };
        assert_eq!(cmd, ["sh", "-c", "exit 3"]);
        Cli::try_parse_from(["podvisorctl", "exec", "abc"]).expect_err("no command");
    }

    #[test]
    fn creds() {
        let auth = parse_creds("me:pa:ss").expect("creds");
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("me", "pa:ss")
        );
        parse_creds("me").expect_err("no password");
        parse_creds(":x").expect_err("no user");
    }

    #[test]
    fn log_lines_joined() {
        let log = "\
2024-05-01T12:00:00.1Z stdout F whole\n\
2024-05-01T12:00:00.2Z stderr P err-a\n\
2024-05-01T12:00:00.3Z stdout P out-a\n\
2024-05-01T12:00:00.4Z stderr F err-b\n\
2024-05-01T12:00:00.5Z stdout P out-b\n";
        let mut joiner = LogJoiner::default();
        let lines: Vec<(Stream, String)> = log
            .lines()
            .filter_map(|l| {
                let e = parse_line(l).expect("valid line");
                joiner.push(e.stream, e.partial, e.text)
            })
            .collect();
        assert_eq!(
            lines,
            [
                (Stream::Stdout, "whole".to_string()),
                (Stream::Stderr, "err-aerr-b".to_string()),
            ]
        );
        assert_eq!(
            joiner.finish(),
            [(Stream::Stdout, "out-aout-b".to_string())]
        );
    }

    #[test]
    fn tables_and_units() {
        let table = format_table(&[
            row(["POD ID", "NAME"]),
            row(["0123456789abc", "web"]),
            row(["x", ""]),
        ]);
        assert_eq!(table, "POD ID          NAME\n0123456789abc   web\nx\n");
        assert_eq!(human_size(100), "100B");
        assert_eq!(human_size(1234), "1.23kB");
        assert_eq!(human_size(4_270_000), "4.27MB");
        assert_eq!(human_size(12_000_000), "12MB");
        assert_eq!(human_size(150_400_000), "150MB");
        let s = 1_000_000_000;
        assert_eq!(ago(10 * s, 10 * s), "Less than a second ago");
        assert_eq!(ago(10 * s, 9 * s), "1 second ago");
        assert_eq!(ago(100 * s, 10 * s), "About a minute ago");
        assert_eq!(ago(3600 * s, 0), "About an hour ago");
        assert_eq!(ago(3 * 86_400 * s, 0), "3 days ago");
        assert_eq!(ago(0, 5 * s), "Less than a second ago");
        assert_eq!(
            short_image_id(&format!("sha256:{}", "a".repeat(64))),
            "a".repeat(13)
        );
        assert_eq!(
            split_tag("localhost:5000/app:v1"),
            Some(("localhost:5000/app", "v1"))
        );
        assert_eq!(split_tag("localhost:5000/app"), None);
    }

    #[test]
    fn image_rows() {
        let image = cri::Image {
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            ..Default::default()
        };
        assert_eq!(
            image_names(&image),
            [(
                "docker.io/library/busybox".to_string(),
                "latest".to_string()
            )]
        );
        let untagged = cri::Image {
            repo_digests: vec!["docker.io/library/busybox@sha256:00".into()],
            ..Default::default()
        };
        assert_eq!(
            image_names(&untagged),
            [(
                "docker.io/library/busybox".to_string(),
                "<none>".to_string()
            )]
        );
    }

    #[test]
    fn readable_status_json() {
        let response = cri::PodSandboxStatusResponse {
            status: Some(cri::PodSandboxStatus {
                id: "p1".into(),
                state: cri::PodSandboxState::SandboxNotready as i32,
                ..Default::default()
            }),
            info: HashMap::from([
                ("info".to_string(), r#"{"vm_pid": 42}"#.to_string()),
                ("note".to_string(), "plain text".to_string()),
            ]),
            containers_statuses: vec![cri::ContainerStatus {
                state: cri::ContainerState::ContainerExited as i32,
                ..Default::default()
            }],
            timestamp: 0,
        };
        let json = readable_json(&response).expect("json");
        assert_eq!(json["status"]["state"], "NotReady");
        assert_eq!(json["containers_statuses"][0]["state"], "Exited");
        assert_eq!(json["info"]["info"]["vm_pid"], 42);
        assert_eq!(json["info"]["note"], "plain text");
    }
}
