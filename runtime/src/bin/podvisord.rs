//! `podvisord [--config FILE]`: the podvisor CRI runtime daemon.
//!
//! Loads the configuration, opens the record and image stores, finds the pods of an earlier
//! run again, and serves CRI v1 on the configured Unix socket. SIGTERM and SIGINT stop
//! serving; pod VMs keep running and are found again at the next start.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use podvisor_runtime::config::{Config, DEFAULT_CONFIG_PATH};
use podvisor_runtime::image::{ImageStore, RegistryConfig};
use podvisor_runtime::pods::PodManager;
use podvisor_runtime::state::StateStore;
use podvisor_runtime::stream::StreamServer;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "podvisor: a CRI runtime running every pod in its own microVM"
)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("podvisord: {}", podvisor_common::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("podvisord")
        .build()
        .context("start the async runtime")?;
    let result = runtime.block_on(serve(config));
    // Tasks still copying container output end with the process; the VMs keep running.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = StateStore::open(&config.state_dir)
        .with_context(|| format!("open the state directory {}", config.state_dir.display()))?;
    let registries = RegistryConfig {
        insecure: config.registry.insecure.clone(),
        mirrors: config.registry.mirrors.clone(),
    };
    let root_dir = config.root_dir.clone();
    let limits = config.images;
    let images = tokio::task::spawn_blocking(move || {
        ImageStore::open_with_limits(&root_dir, registries, limits)
    })
    .await
    .context("image store task")?
    .with_context(|| format!("open the image store in {}", config.root_dir.display()))?;
    let socket = config.socket.clone();
    let streaming = config.streaming.clone();
    let pods = PodManager::new(config, state, images).context("set up the pod manager")?;
    pods.recover().await.context("recover pods")?;
    pods.prepare_templates();
    let streams = StreamServer::start(&streaming, pods.clone())
        .await
        .context("start the streaming server")?;
    let listener = podvisor_runtime::cri::bind(&socket)?;
    tracing::info!(socket = %socket.display(), version = env!("CARGO_PKG_VERSION"), "podvisord serving CRI");
    // systemd's Type=notify readiness (packaging/podvisord.service): the socket is bound, so a
    // client connecting from now on is served. Without NOTIFY_SOCKET (not under systemd) this
    // does nothing; a failure to tell systemd is logged, never fatal.
    notify_systemd(&[NotifyState::Ready, NotifyState::Status("serving CRI")]);

    let mut term = signal(SignalKind::terminate()).context("watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watch SIGINT")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping; pod VMs keep running"),
            _ = int.recv() => tracing::info!("SIGINT: stopping; pod VMs keep running"),
        }
        notify_systemd(&[NotifyState::Stopping]);
    };
    let served = podvisor_runtime::cri::serve(listener, pods.clone(), streams, shutdown).await;
    pods.shutdown().await;
    served?;
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!("remove {}: {e}", socket.display());
    }
    Ok(())
}

/// Tells systemd about podvisord's state when it runs podvisord as a Type=notify service.
fn notify_systemd(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("notify systemd: {e}");
    }
}
