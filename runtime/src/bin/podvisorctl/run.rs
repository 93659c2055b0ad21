//! `run [--rm] [-i] [-t] [--mount SRC:DST[:ro]]... IMAGE -- CMD...`: a one-shot pod, what
//! `docker run` is to CI jobs. Pulls the image when it is missing, runs the command as the
//! only container of its own pod (its own microVM), streams its output (attached with
//! `-i`/`-t`, else followed in its CRI log from the first byte), and exits with its exit
//! code. `--rm` removes the pod afterwards, also after Ctrl-C.

use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_cri::v1 as cri;
use podvisor_runtime::logs::parse_line;

use crate::client::{Cri, rpc_error};
use crate::configs::image_spec;
use crate::exec_logs::{LogJoiner, write_line};
use crate::stream::{Interactive, exit_code, run_session};

/// How often a followed log is read again while the container runs.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);
/// Where `run` keeps its pods' logs (the CRI log directory of each).
const LOG_ROOT: &str = "/var/log/podvisor/run";

/// What `run` was asked.
#[derive(Debug, Clone)]
pub(crate) struct RunArgs {
    pub(crate) image: String,
    pub(crate) cmd: Vec<String>,
    pub(crate) rm: bool,
    pub(crate) how: Interactive,
    pub(crate) mounts: Vec<String>,
    pub(crate) runtime: String,
}

/// `SRC:DST[:ro]` as a CRI mount.
fn parse_mount(spec: &str) -> anyhow::Result<cri::Mount> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (src, dst, readonly) = match parts.as_slice() {
        [s, d] => (*s, *d, false),
        [s, d, "ro"] => (*s, *d, true),
        [s, d, "rw"] => (*s, *d, false),
        _ => bail!("--mount {spec:?}: expected SRC:DST or SRC:DST:ro"),
    };
    if !src.starts_with('/') || !dst.starts_with('/') {
        bail!("--mount {spec:?}: both paths must be absolute");
    }
    Ok(cri::Mount {
        host_path: src.to_string(),
        container_path: dst.to_string(),
        readonly,
        ..Default::default()
    })
}

impl Cri {
    /// `run`.
    pub(crate) async fn run(&mut self, args: RunArgs) -> anyhow::Result<ExitCode> {
        let mounts = args
            .mounts
            .iter()
            .map(|m| parse_mount(m))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name = format!("run-{}", std::process::id());
        let log_dir = PathBuf::from(LOG_ROOT).join(format!("{name}-{}", unique()));
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("create {}", log_dir.display()))?;
        let pod = tokio::select! {
            r = self.start_run(&args, &name, &log_dir, mounts) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        let (pod_id, container_id) = match pod {
            Ok(ids) => ids,
            Err(e) => {
                // A cancelled RunPodSandbox is undone by podvisord itself.
                let _ = std::fs::remove_dir_all(&log_dir);
                return Err(e);
            }
        };
        let result = tokio::select! {
            r = self.watch_run(&container_id, args.how, &log_dir) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        if args.rm {
            self.remove_run_pod(&pod_id).await?;
            let _ = std::fs::remove_dir_all(&log_dir);
        } else {
            eprintln!("podvisorctl: pod {pod_id} kept (no --rm)");
        }
        result
    }

    /// Pulls if needed, runs the pod and starts its container.
    async fn start_run(
        &mut self,
        args: &RunArgs,
        name: &str,
        log_dir: &Path,
        mounts: Vec<cri::Mount>,
    ) -> anyhow::Result<(String, String)> {
        self.pull_if_missing(&args.image).await?;
        let pod_config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_string(),
                namespace: "podvisorctl".into(),
                uid: format!("{name}-{}", unique()),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_dir.display().to_string(),
            ..Default::default()
        };
        let pod_id = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: args.runtime.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("run pod {name}")))?
            .into_inner()
            .pod_sandbox_id;
        let interactive = args.how.stdin;
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "run".into(),
                attempt: 0,
            }),
            image: Some(image_spec(&args.image)),
            command: args.cmd.clone(),
            log_path: "run.log".into(),
            stdin: interactive,
            stdin_once: interactive,
            tty: args.how.tty,
            mounts,
            ..Default::default()
        };
        let container_id = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config),
            })
            .await
            .map_err(rpc_error(format_args!(
                "create the container in pod {pod_id}"
            )))?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: container_id.clone(),
            })
            .await
            .map_err(rpc_error(format_args!("start container {container_id}")))?;
        Ok((pod_id, container_id))
    }

    /// Stops and removes the pod (quietly: stdout is the command's).
    async fn remove_run_pod(&mut self, id: &str) -> anyhow::Result<()> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
            .map_err(rpc_error(format_args!("stop pod {id}")))?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
            .map_err(rpc_error(format_args!("remove pod {id}")))?;
        Ok(())
    }

    async fn pull_if_missing(&mut self, image: &str) -> anyhow::Result<()> {
        let present = self
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .map_err(rpc_error(format_args!("image status of {image}")))?
            .into_inner()
            .image
            .is_some();
        if !present {
            eprintln!("podvisorctl: pulling {image}");
            self.images
                .pull_image(cri::PullImageRequest {
                    image: Some(image_spec(image)),
                    auth: None,
                    sandbox_config: None,
                })
                .await
                .map_err(rpc_error(format_args!("pull {image}")))?;
        }
        Ok(())
    }

    /// Streams the container's output until it exits; its exit code.
    async fn watch_run(
        &mut self,
        id: &str,
        how: Interactive,
        log_dir: &Path,
    ) -> anyhow::Result<ExitCode> {
        if how.stdin || how.tty {
            let url = self.attach_url(id, how).await?;
            run_session(&url, how).await?;
        } else {
            self.follow_log(id, &log_dir.join("run.log")).await?;
        }
        let status = self.wait_exited(id).await?;
        Ok(exit_code(status.exit_code))
    }

    /// The container's status once it has exited.
    async fn wait_exited(&mut self, id: &str) -> anyhow::Result<cri::ContainerStatus> {
        loop {
            let status = self
                .container_status(id)
                .await?
                .status
                .with_context(|| format!("container {id}: no status"))?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    }

    /// Prints the log at `path` as it grows, until the container has exited and the log
    /// has been read to its end.
    async fn follow_log(&mut self, id: &str, path: &Path) -> anyhow::Result<()> {
        let mut joiner = LogJoiner::default();
        let mut offset = 0u64;
        loop {
            // Whether it had exited before this read: then this read is the last.
            let exited = self
                .container_status(id)
                .await?
                .status
                .is_some_and(|s| s.state == cri::ContainerState::ContainerExited as i32);
            offset = print_new_lines(path, offset, &mut joiner)?;
            if exited {
                break;
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        for (stream, text) in joiner.finish() {
            write_line(&mut out, &mut err, stream, &text, false)?;
        }
        out.flush().context("write stdout")?;
        Ok(())
    }
}

/// Prints the whole lines of `path` from `offset` on; the offset after them.
fn print_new_lines(path: &Path, offset: u64, joiner: &mut LogJoiner) -> anyhow::Result<u64> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("seek {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let mut offset = offset;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // the rest is a line still being written
        }
        offset += n as u64;
        let text = String::from_utf8_lossy(&line[..n - 1]);
        if let Some(entry) = parse_line(&text)
            && let Some((stream, text)) = joiner.push(entry.stream, entry.partial, entry.text)
        {
            write_line(&mut out, &mut err, stream, &text, true)?;
        }
    }
    out.flush().context("write stdout")?;
    Ok(offset)
}

/// A value unlikely to repeat between runs: the time in nanoseconds.
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts() {
        let m = parse_mount("/data:/in:ro").unwrap();
        assert_eq!(
            (m.host_path.as_str(), m.container_path.as_str(), m.readonly),
            ("/data", "/in", true)
        );
        assert!(!parse_mount("/a:/b").unwrap().readonly);
        assert!(parse_mount("a:/b").is_err());
        assert!(parse_mount("/a:/b:x").is_err());
        assert!(parse_mount("/a").is_err());
    }
}
