//! `exec -i/-t`, `attach` and `port-forward`: the CRI Exec, Attach and PortForward RPCs,
//! then a SPDY session on the URL they answer, with the local terminal in raw mode for
//! `-t`.

use std::process::ExitCode;

use anyhow::Context;
use k8s_cri::v1 as cri;
use podvisor_runtime::stream::client::{LocalIo, PortForwarder, remotecommand};
use tokio::net::TcpListener;

use crate::client::{Cri, rpc_error};
use crate::terminal::{RawMode, sizes};

/// The exit code of a remote code (outside 0..=255 still means failure).
pub(crate) fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

/// Which local streams a session uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interactive {
    /// Send local stdin.
    pub(crate) stdin: bool,
    /// A terminal: raw mode, sizes, no separate stderr.
    pub(crate) tty: bool,
}

impl Interactive {
    fn local_io(self) -> LocalIo {
        LocalIo {
            stdin: self.stdin.then(|| {
                Box::new(tokio::io::stdin()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
            }),
            stdout: Some(Box::new(tokio::io::stdout())),
            stderr: (!self.tty).then(|| {
                Box::new(tokio::io::stderr()) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>
            }),
            tty: self.tty.then(sizes),
        }
    }
}

/// Runs a session at `url` with the local terminal as `how` says.
pub(crate) async fn run_session(url: &str, how: Interactive) -> anyhow::Result<i32> {
    let _raw = if how.tty && how.stdin {
        RawMode::enter()
    } else {
        None
    };
    remotecommand(url, how.local_io())
        .await
        .context("streaming session")
}

impl Cri {
    /// `exec -i/-t`: a streaming exec.
    pub(crate) async fn exec_stream(
        &mut self,
        id: &str,
        cmd: Vec<String>,
        how: Interactive,
    ) -> anyhow::Result<ExitCode> {
        let id = self.container_id(id).await?;
        let url = self
            .runtime
            .exec(cri::ExecRequest {
                container_id: id.clone(),
                cmd,
                tty: how.tty,
                stdin: how.stdin,
                stdout: true,
                stderr: !how.tty,
            })
            .await
            .map_err(rpc_error(format_args!("exec in container {id}")))?
            .into_inner()
            .url;
        Ok(exit_code(run_session(&url, how).await?))
    }

    /// `attach`: the container's output (and stdin with `-i`) until it exits or Ctrl-C.
    pub(crate) async fn attach(&mut self, id: &str, how: Interactive) -> anyhow::Result<ExitCode> {
        let id = self.container_id(id).await?;
        let url = self.attach_url(&id, how).await?;
        Ok(exit_code(run_session(&url, how).await?))
    }

    pub(crate) async fn attach_url(
        &mut self,
        id: &str,
        how: Interactive,
    ) -> anyhow::Result<String> {
        Ok(self
            .runtime
            .attach(cri::AttachRequest {
                container_id: id.to_string(),
                stdin: how.stdin,
                tty: how.tty,
                stdout: true,
                stderr: !how.tty,
            })
            .await
            .map_err(rpc_error(format_args!("attach to container {id}")))?
            .into_inner()
            .url)
    }

    /// `port-forward POD [LOCAL:]REMOTE...`: listens on 127.0.0.1 and forwards each
    /// connection into the pod until Ctrl-C.
    pub(crate) async fn port_forward(&mut self, pod: &str, specs: &[String]) -> anyhow::Result<()> {
        let pod = self.pod_id(pod).await?;
        let pairs = specs
            .iter()
            .map(|s| parse_forward(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let url = self
            .runtime
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: pairs.iter().map(|(_, r)| i32::from(*r)).collect(),
            })
            .await
            .map_err(rpc_error(format_args!("port-forward to pod {pod}")))?
            .into_inner()
            .url;
        let forwarder = std::sync::Arc::new(PortForwarder::connect(&url).await?);
        let mut listeners = Vec::new();
        for (local, remote) in pairs {
            let l = TcpListener::bind(("127.0.0.1", local))
                .await
                .with_context(|| format!("listen on 127.0.0.1:{local}"))?;
            let addr = l.local_addr().context("listener address")?;
            println!("Forwarding from {addr} -> {remote}");
            listeners.push(tokio::spawn(serve_forward(l, remote, forwarder.clone())));
        }
        tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
        for l in listeners {
            l.abort();
        }
        Ok(())
    }
}

/// Accepts local connections and forwards each to `remote`.
async fn serve_forward(
    listener: TcpListener,
    remote: u16,
    forwarder: std::sync::Arc<PortForwarder>,
) {
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            continue;
        };
        let f = forwarder.clone();
        tokio::spawn(async move {
            if let Err(e) = f.forward(remote, conn).await {
                eprintln!(
                    "podvisorctl: forwarding {peer} -> {remote}: {}",
                    podvisor_common::error_chain(&e)
                );
            }
        });
    }
}

/// `LOCAL:REMOTE` or `PORT` (the same port both sides; `:REMOTE` picks a free local port).
fn parse_forward(spec: &str) -> anyhow::Result<(u16, u16)> {
    let port = |s: &str| -> anyhow::Result<u16> {
        s.parse::<u16>()
            .ok()
            .with_context(|| format!("{spec:?}: {s:?} is not a port"))
    };
    match spec.split_once(':') {
        None => {
            let p = port(spec)?;
            anyhow::ensure!(p > 0, "{spec:?}: port 0");
            Ok((p, p))
        }
        Some((l, r)) => {
            let local = if l.is_empty() { 0 } else { port(l)? };
            let remote = port(r)?;
            anyhow::ensure!(remote > 0, "{spec:?}: remote port 0");
            Ok((local, remote))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        assert_eq!(parse_forward("8080").unwrap(), (8080, 8080));
        assert_eq!(parse_forward("9000:80").unwrap(), (9000, 80));
        assert_eq!(parse_forward(":80").unwrap(), (0, 80));
        assert!(parse_forward("80:0").is_err());
        assert!(parse_forward("http").is_err());
    }
}
