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
//!   exec -i|-t|-it ID -- CMD...      the same streamed: stdin, a terminal (raw, resized)
//!   logs ID                          print the container's log
//!   attach [-i] [-t] ID              attach to a running container
//!   port-forward POD [LOCAL:]REMOTE...         forward local ports into the pod
//!   run [--rm] [-i] [-t] [--mount SRC:DST[:ro]] IMAGE [-- CMD...]
//!                                    a one-shot pod: its output, its exit code
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
//!
//! Modules: `cli` (the command line), `client` (the connection and ID prefixes), `pods`
//! (runtime, pod and container commands), `exec_logs` (`exec`, `logs`), `stream`
//! (`exec -i/-t`, `attach`, `port-forward`), `terminal` (raw mode, sizes), `run`, `images` (`pull`,
//! `images`, `rmi`), `configs` (`POD.json`, `CONTAINER.json`) and `output` (tables, units,
//! JSON).

mod cli;
mod client;
mod configs;
mod exec_logs;
mod images;
mod output;
mod pods;
mod run;
mod stream;
mod terminal;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command, SOCKET_ENV, socket_path};
use client::Cri;
use run::RunArgs;
use stream::Interactive;

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
        Command::Exec {
            timeout,
            interactive,
            tty,
            id,
            cmd,
        } => {
            if interactive || tty {
                let how = Interactive {
                    stdin: interactive,
                    tty,
                };
                return cri.exec_stream(&id, cmd, how).await;
            }
            return cri.exec(&id, cmd, timeout).await;
        }
        Command::Logs { id } => cri.logs(&id).await?,
        Command::Attach {
            interactive,
            tty,
            id,
        } => {
            let how = Interactive {
                stdin: interactive,
                tty,
            };
            return cri.attach(&id, how).await;
        }
        Command::PortForward { pod_id, ports } => cri.port_forward(&pod_id, &ports).await?,
        Command::Run {
            rm,
            interactive,
            tty,
            mounts,
            runtime,
            image,
            cmd,
        } => {
            let args = RunArgs {
                image,
                cmd,
                rm,
                how: Interactive {
                    stdin: interactive,
                    tty,
                },
                mounts,
                runtime: runtime.unwrap_or_default(),
            };
            return cri.run(args).await;
        }
        Command::Pull { creds, image } => cri.pull(&image, creds.as_deref()).await?,
        Command::Images { quiet } => cri.images(quiet).await?,
        Command::Rmi { image } => cri.remove_image(&image).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// An error with its causes, `: ` apart, as [`podvisor_common::error_chain`] prints them.
fn error_chain(error: &anyhow::Error) -> String {
    podvisor_common::error_chain(error.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
