//! A client of the guest agent for tests and benchmarks: requests, process output kept apart by
//! stream, and the create/attach/start/wait sequence every check uses.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use podvisor_proto::AgentClient;
use podvisor_proto::v1::{
    CreateContainerRequest, DeleteContainerRequest, ExecProcessRequest, Image, PingRequest,
    Process, ProcessInput, ProcessOutput, SignalProcessRequest, StartContainerRequest, Stream,
    WaitProcessRequest, WaitProcessResponse,
};
use tonic::Streaming;
use tonic::transport::Channel;

/// A connected agent client.
pub type Client = AgentClient<Channel>;

/// Drive id of the container image = its virtio serial in the guest.
pub const IMAGE_SERIAL: &str = "img0";

/// A process running `args` (PATH search in the container).
pub fn process(args: &[&str]) -> Process {
    Process {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// A process running `sh -c script`.
pub fn sh(script: &str) -> Process {
    process(&["sh", "-c", script])
}

/// A container of the busybox image attached as [`IMAGE_SERIAL`].
pub fn container(id: &str, process: Process) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.to_owned(),
        process: Some(process),
        image: Some(Image {
            block_device_serial: IMAGE_SERIAL.to_owned(),
            subpath: String::new(),
            size_bytes: 0,
        }),
        ..Default::default()
    }
}

/// WaitProcess of a container (`exec_id` empty) or of one of its execs.
pub fn wait_req(id: &str, exec_id: &str) -> WaitProcessRequest {
    WaitProcessRequest {
        container_id: id.to_owned(),
        exec_id: exec_id.to_owned(),
    }
}

/// Output of one process, kept apart by stream.
#[derive(Debug, Default)]
pub struct Output {
    /// Bytes written to stdout.
    pub stdout: Vec<u8>,
    /// Bytes written to stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Appends one chunk to its stream.
    pub fn push(&mut self, m: ProcessOutput) -> anyhow::Result<()> {
        if m.data.is_empty() {
            return Ok(());
        }
        match Stream::try_from(m.stream) {
            Ok(Stream::Stdout) => self.stdout.extend_from_slice(&m.data),
            Ok(Stream::Stderr) => self.stderr.extend_from_slice(&m.data),
            _ => bail!("output chunk with stream {}", m.stream),
        }
        Ok(())
    }
}

/// Attaches to a process's output (the agent buffers it until then).
pub async fn attach(
    c: &mut Client,
    id: &str,
    exec_id: &str,
) -> anyhow::Result<Streaming<ProcessOutput>> {
    let first = ProcessInput {
        container_id: id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    };
    Ok(c.process_io(tokio_stream::once(first))
        .await
        .with_context(|| format!("ProcessIo {id}/{exec_id}"))?
        .into_inner())
}

/// Reads the stream to its end.
pub async fn drain(mut s: Streaming<ProcessOutput>) -> anyhow::Result<Output> {
    let mut out = Output::default();
    while let Some(m) = s.message().await.context("read ProcessIo")? {
        out.push(m)?;
    }
    Ok(out)
}

/// Reads until stdout contains `needle` (a readiness line of the process); returns the stream
/// for more reading and what was read.
pub async fn read_until(
    mut s: Streaming<ProcessOutput>,
    needle: &str,
) -> anyhow::Result<(Streaming<ProcessOutput>, Output)> {
    let mut out = Output::default();
    while !out.stdout().contains(needle) {
        match s.message().await.context("read ProcessIo")? {
            Some(m) => out.push(m)?,
            None => bail!(
                "output ended before {needle:?}: stdout {:?} stderr {:?}",
                out.stdout(),
                out.stderr()
            ),
        }
    }
    Ok((s, out))
}

/// Creates and starts a container, attached to its output before it runs.
pub async fn start(
    c: &mut Client,
    req: CreateContainerRequest,
) -> anyhow::Result<(u32, Streaming<ProcessOutput>)> {
    let id = req.container_id.clone();
    let pid = c
        .create_container(req)
        .await
        .with_context(|| format!("CreateContainer {id}"))?
        .into_inner()
        .pid;
    let io = attach(c, &id, "").await?;
    c.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .with_context(|| format!("StartContainer {id}"))?;
    Ok((pid, io))
}

/// Runs a container to its end: its output and exit.
pub async fn run(
    c: &mut Client,
    req: CreateContainerRequest,
) -> anyhow::Result<(Output, WaitProcessResponse)> {
    let id = req.container_id.clone();
    let (_, io) = start(c, req).await?;
    let out = drain(io).await?;
    let exit = c
        .wait_process(wait_req(&id, ""))
        .await
        .with_context(|| format!("WaitProcess {id}"))?
        .into_inner();
    Ok((out, exit))
}

/// Runs an exec in a running container to its end.
pub async fn exec(
    c: &mut Client,
    id: &str,
    exec_id: &str,
    p: Process,
) -> anyhow::Result<(Output, WaitProcessResponse)> {
    c.exec_process(ExecProcessRequest {
        container_id: id.to_owned(),
        exec_id: exec_id.to_owned(),
        process: Some(p),
    })
    .await
    .with_context(|| format!("ExecProcess {id}/{exec_id}"))?;
    let out = drain(attach(c, id, exec_id).await?).await?;
    let exit = c
        .wait_process(wait_req(id, exec_id))
        .await
        .with_context(|| format!("WaitProcess {id}/{exec_id}"))?
        .into_inner();
    Ok((out, exit))
}

/// An exec that must exit 0; its stdout.
pub async fn exec_ok(
    c: &mut Client,
    id: &str,
    exec_id: &str,
    p: Process,
) -> anyhow::Result<String> {
    let (out, exit) = exec(c, id, exec_id, p).await?;
    ensure!(
        exit.exit_code == 0 && exit.signal == 0,
        "exec {id}/{exec_id} ended with {exit:?}; stdout {:?} stderr {:?}",
        out.stdout(),
        out.stderr()
    );
    Ok(out.stdout())
}

/// DeleteContainer with force.
pub async fn delete(c: &mut Client, id: &str) -> anyhow::Result<()> {
    c.delete_container(DeleteContainerRequest {
        container_id: id.to_owned(),
        force: true,
    })
    .await
    .with_context(|| format!("DeleteContainer {id}"))?;
    Ok(())
}

/// Signals a container's init.
pub async fn signal(c: &mut Client, id: &str, sig: u32) -> anyhow::Result<()> {
    c.signal_process(SignalProcessRequest {
        container_id: id.to_owned(),
        exec_id: String::new(),
        signal: sig,
        all: false,
    })
    .await
    .with_context(|| format!("SignalProcess {id} {sig}"))?;
    Ok(())
}

/// Waits for a container's init to exit.
pub async fn wait(c: &mut Client, id: &str) -> anyhow::Result<WaitProcessResponse> {
    Ok(c.wait_process(wait_req(id, ""))
        .await
        .with_context(|| format!("WaitProcess {id}"))?
        .into_inner())
}

/// Connects and pings until the agent answers (it printed its ready line already).
pub async fn connect(uds: &Path, timeout: Duration) -> anyhow::Result<Client> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut c = podvisor_proto::hybrid::agent_client(uds).await?;
            let pong = c.ping(PingRequest {}).await?.into_inner();
            anyhow::Ok((c, pong))
        };
        match tokio::time::timeout(Duration::from_secs(60), attempt).await {
            Ok(Ok((c, pong))) => {
                println!(
                    "[agent] connected: agent {} boot_id {} uptime {:.1} s",
                    pong.agent_version,
                    pong.boot_id,
                    pong.uptime_ns as f64 / 1e9
                );
                return Ok(c);
            }
            Ok(Err(e)) if Instant::now() < deadline => {
                println!("[agent] connect: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(e)) => return Err(e.context("connect to the agent")),
            Err(_) => bail!("the agent did not answer Ping within 60 s"),
        }
    }
}
