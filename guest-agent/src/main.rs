//! podvisor-agent: PID 1 of a pod microVM. Mounts the guest's pseudo file systems, reaps
//! orphans and serves the `podvisor.agent.v1` gRPC API on vsock port 1024.
//!
//! Usage: `podvisor-agent [--unix <socket path>]` (the Unix socket is for host tests; the VM
//! always uses vsock).

mod container;
mod files;
mod identity;
mod init;
mod network;
mod paths;
mod portforward;
mod reaper;
mod safepath;
mod sandbox;
mod service;

use std::process::ExitCode;

use anyhow::Context as _;
use podvisor_proto::{AGENT_VSOCK_PORT, AgentServer};
use tonic::transport::Server;

/// Line printed on the console once the listener is bound; the VMM tests wait for it.
const READY_LINE: &str = "podvisor-agent: ready";

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    // The console only exists once devtmpfs is mounted: collect errors until then.
    let mut early_errors = Vec::new();
    if pid1 {
        if let Err(e) = init::mount_pseudo_filesystems() {
            early_errors.push(format!("{:#}", anyhow::Error::from(e)));
        }
        if let Err(e) = init::attach_console() {
            early_errors.push(format!("{:#}", anyhow::Error::from(e)));
        }
        init::set_umask();
    }
    init_logging();
    install_panic_hook();
    for e in &early_errors {
        tracing::error!("init: {e}");
    }

    let result = std::panic::catch_unwind(|| run(pid1));
    let failure = match result {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => "panic in the main thread".to_owned(),
    };
    init::console_line(&format!("podvisor-agent: fatal: {failure}"));
    if pid1 {
        // PID 1 must never exit (the kernel would panic and possibly hang): power off instead.
        let e = init::power_off();
        init::console_line(&format!("podvisor-agent: power off failed: {e}"));
        loop {
            std::thread::park();
        }
    }
    ExitCode::FAILURE
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PODVISOR_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // stderr is /dev/console when PID 1.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        // A single write: tracing may itself be what panicked.
        init::console_line(&format!("podvisor-agent: panic in thread {name}: {info}"));
    }));
}

fn run(pid1: bool) -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut unix_socket = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--unix" => unix_socket = Some(args.next().context("--unix needs a path")?),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }

    let paths = paths::Paths::default();
    paths
        .create_dirs()
        .with_context(|| format!("create {}", paths.run.display()))?;
    if pid1 {
        init::enable_controllers(&paths.cgroup_root)?;
        init::create_cgroup_parent(&paths.cgroup_podvisor())?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build tokio runtime")?;
    rt.block_on(async move {
        let reaper = reaper::Reaper::default();
        // As init we inherit every orphan of the guest: reap them all. (Outside the VM it only
        // collects the agent's own children.)
        let r = reaper.clone();
        tokio::spawn(async move {
            if let Err(e) = r.run().await {
                tracing::error!("reaper stopped: {e}");
            }
        });
        let service = service::AgentService::new(paths, reaper, pid1);
        let router = Server::builder().add_service(AgentServer::new(service));
        if let Some(path) = unix_socket {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("bind unix socket {path}"))?;
            tracing::info!("listening on unix:{path}");
            init::console_line(READY_LINE);
            router
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .context("serve")?;
        } else {
            let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, AGENT_VSOCK_PORT);
            let listener = tokio_vsock::VsockListener::bind(addr)
                .with_context(|| format!("bind vsock port {AGENT_VSOCK_PORT}"))?;
            tracing::info!("listening on vsock port {AGENT_VSOCK_PORT}");
            init::console_line(READY_LINE);
            router
                .serve_with_incoming(host_only(listener.incoming()))
                .await
                .context("serve")?;
        }
        Ok(())
    })
}

/// The host's vsock context id: the only peer the agent answers.
const VMADDR_CID_HOST: u32 = 2;

/// Connections from the host only: one from inside the guest (a container reaching the
/// agent's port through its own CID) is closed at once and counted; the first few and then
/// every thousandth are logged, so a container cannot flood the console.
fn host_only(
    incoming: impl futures::Stream<Item = std::io::Result<tokio_vsock::VsockStream>>,
) -> impl futures::Stream<Item = std::io::Result<tokio_vsock::VsockStream>> {
    use futures::StreamExt;
    let refused = std::sync::atomic::AtomicU64::new(0);
    incoming.filter(move |conn| {
        let keep = match conn {
            Ok(stream) => match stream.peer_addr() {
                Ok(peer) if peer.cid() == VMADDR_CID_HOST => true,
                peer => {
                    let n = refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if n <= 3 || n.is_multiple_of(1000) {
                        tracing::warn!(
                            ?peer,
                            refused = n,
                            "vsock connection not from the host: closed"
                        );
                    }
                    false
                }
            },
            Err(_) => true,
        };
        std::future::ready(keep)
    })
}
