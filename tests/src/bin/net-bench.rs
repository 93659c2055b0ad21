//! `net-bench [MIB]` (default 64): TCP throughput from the host into a pod's microVM (busybox
//! `nc -l` in a container, reached by the pod's IP over the CNI bridge, the veth, the tc
//! redirect, the TAP and virtio-net) next to the same transfer into a plain network
//! namespace over a veth pair without a VM (busybox `nc -l` under `ip netns exec`), and the
//! ratio.
//!
//! The host writes MIB MiB of zeros, shuts its side down and waits until the receiver
//! closes the connection after reading everything: the time is connect to close, measured
//! on the host. One transfer each.
//!
//! Everything runs in temporary directories: a local registry with busybox, podvisord with
//! its own configuration and CNI network (Debian's bridge + host-local plugins).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_tests::cri::{
    Daemon, connect, daemon_config, delete_link, pull_image, shell_container, write_bridge_conflist,
};
use podvisor_tests::host::run;
use podvisor_tests::paths;
use podvisor_tests::registry::{Registry, push_busybox};

const PORT: u16 = 9000;
const BRIDGE: &str = "pvnbench0";
const SUBNET: &str = "10.88.211.0/24";
/// The veth baseline: host and namespace ends.
const VETH_HOST: &str = "pvnb-h";
const VETH_NS: &str = "pvnb-n";
const VETH_HOST_IP: &str = "10.88.212.1/30";
const VETH_NS_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 212, 2);
/// How long a listener may take to appear.
const LISTEN_DEADLINE: Duration = Duration::from_secs(120);

/// Connects (retrying while nothing listens yet: a refused connect does not use up the
/// one-shot listener), sends `bytes` zeros, shuts down and waits for the receiver's close.
/// Returns the seconds from the first successful connect to the close.
fn transfer(addr: SocketAddr, bytes: usize) -> anyhow::Result<f64> {
    let deadline = Instant::now() + LISTEN_DEADLINE;
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e).with_context(|| format!("connect to {addr}")),
        }
    };
    let started = Instant::now();
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).context("send")?;
        left -= n;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .context("shutdown")?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("wait for the receiver")?;
    Ok(started.elapsed().as_secs_f64())
}

/// The plain namespace: a veth pair, busybox nc listening inside.
fn veth_baseline(bytes: usize) -> anyhow::Result<f64> {
    let ns = format!("pvnbench-{}", std::process::id());
    let _ = run("ip", &["netns", "del", &ns]);
    run("ip", &["netns", "add", &ns])?;
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            // Deleting the namespace deletes the veth pair.
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    run(
        "ip",
        &[
            "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", &ns,
        ],
    )?;
    run("ip", &["addr", "add", VETH_HOST_IP, "dev", VETH_HOST])?;
    run("ip", &["link", "set", VETH_HOST, "up"])?;
    let ns_ip = format!("{VETH_NS_IP}/30");
    for args in [
        vec!["ip", "addr", "add", &ns_ip, "dev", VETH_NS],
        vec!["ip", "link", "set", VETH_NS, "up"],
        vec!["ip", "link", "set", "lo", "up"],
    ] {
        let mut full = vec!["netns", "exec", &ns];
        full.extend(args);
        run("ip", &full)?;
    }
    // stdin stays open (piped, never written): nc ends on the network's EOF only.
    let port = PORT.to_string();
    let mut nc = Command::new("ip")
        .args(["netns", "exec", &ns, "busybox", "nc", "-l", "-p", &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("start nc in the namespace")?;
    let secs = transfer(SocketAddr::from((VETH_NS_IP, PORT)), bytes);
    let _ = nc.kill();
    let _ = nc.wait();
    secs
}

/// The pod: podvisord, one pod VM, a container with nc listening.
async fn pod(bytes: usize) -> anyhow::Result<f64> {
    paths::require_kvm()?;
    let registry = Registry::start()?;
    push_busybox(&registry, "podvisor/busybox", "bench").await?;
    let image = registry.reference("podvisor/busybox", "bench");
    let cni_dir = tempfile::Builder::new().prefix("pvnbench").tempdir()?;
    let conf_dir = write_bridge_conflist(cni_dir.path(), "pvnbench", BRIDGE, SUBNET)?;
    struct Bridge;
    impl Drop for Bridge {
        fn drop(&mut self) {
            delete_link(BRIDGE);
        }
    }
    let _bridge = Bridge;
    let daemon = Daemon::start(&daemon_config(registry.host(), &conf_dir)?)?;
    let result = pod_transfer(&daemon, &image, bytes).await;
    if result.is_err() {
        eprintln!("podvisord's log:\n{}", daemon.log());
    }
    result
}

async fn pod_transfer(daemon: &Daemon, image: &str, bytes: usize) -> anyhow::Result<f64> {
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "net-bench".into(),
            uid: "uid-net-bench".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    eprintln!("pod booted in {:.1} s", t.elapsed().as_secs_f64());
    let result = async {
        let ip: Ipv4Addr = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .and_then(|s| s.network)
            .context("no pod network status")?
            .ip
            .parse()
            .context("pod IP")?;
        let image_ref = pull_image(&mut images, image, &config).await?;
        let cid = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: id.clone(),
                // stdin stays open: nc ends on the network's EOF only.
                config: Some(shell_container(
                    "sink",
                    &image_ref,
                    &format!("sleep 3600 | nc -l -p {PORT} > /dev/null"),
                )),
                sandbox_config: Some(config.clone()),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest { container_id: cid })
            .await
            .context("StartContainer")?;
        tokio::task::spawn_blocking(move || transfer(SocketAddr::from((ip, PORT)), bytes)).await?
    }
    .await;
    for f in [
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .map(drop),
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .map(drop),
    ] {
        if let Err(e) = f {
            eprintln!("clean up pod {id}: {e}");
        }
    }
    result
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mib: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().with_context(|| format!("MIB: {a:?}"))?,
        None => 64,
    };
    ensure!(mib > 0, "MIB must be positive");
    let bytes = mib << 20;
    let veth = tokio::task::spawn_blocking(move || veth_baseline(bytes)).await??;
    let vm = pod(bytes).await?;
    let rate = |secs: f64| mib as f64 / secs;
    println!("TCP host -> receiver, {mib} MiB through busybox nc, one transfer each:");
    println!(
        "  pod microVM (bridge, veth, tc redirect, TAP, virtio-net): {:9.3} s  {:10.4} MiB/s",
        vm,
        rate(vm)
    );
    println!(
        "  plain netns over veth, no VM:                             {:9.3} s  {:10.4} MiB/s",
        veth,
        rate(veth)
    );
    println!(
        "  throughput ratio pod / plain netns: {:.6} (the pod takes {:.0}x as long)",
        rate(vm) / rate(veth),
        vm / veth
    );
    Ok(())
}
