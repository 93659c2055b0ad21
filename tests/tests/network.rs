//! Pod networking end to end on real microVMs: podvisord with a CNI network of its own
//! (Debian's bridge + host-local + portmap + loopback plugins, config and IP reservations in
//! this test's temporary directory, never the host's /etc/cni).
//!
//! One test, in order: podvisord builds its handler's VM template as it starts, kills that
//! build on SIGTERM and, started again, removes a stale template (killing the process its
//! build record names); `Status` says the network is ready; pod B (an `httpd` container,
//! container port 8080 published as a host port) and pod A boot one after the other; they
//! get distinct IPs of the subnet, reported by PodSandboxStatus and reserved by
//! host-local; the guest NIC has the MAC of the CNI interface; a container in pod A fetches
//! pod B's page by IP with busybox `nc`; pod A's guest sends raw frames as someone else (a
//! forged source MAC, the gateway's IP, a gratuitous ARP for the gateway's IP) and one
//! honest frame, before and after a podvisord restart, and only the honest ones reach the
//! bridge while the TAP's drop counter counts the others; the host fetches pod B's page
//! through the host port; after
//! StopPodSandbox (twice) and RemovePodSandbox no veth on the bridge, no TAP, no namespace,
//! no IP reservation and no iptables rule or chain of the pods is left.
//!
//! Needs root, /dev/kvm, the guest kernel and agent image (`make guest`), iptables and
//! containernetworking-plugins. Two VM boots (about a minute each where the guest kernel
//! is emulated). Run: `cargo test -p podvisor-tests --test network`

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::network::netns::NetNs;
use podvisor_runtime::network::tap;
use podvisor_runtime::pods::template;
use podvisor_tests::capture::Capture;
use podvisor_tests::cri::{
    CNI_BIN_DIR, Daemon, connect, daemon_config, delete_link, pull_image, shell_container,
    vmm_processes_under,
};
use podvisor_tests::host::run;
use podvisor_tests::paths;
use podvisor_tests::registry::{Registry, push_busybox};
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;

const BRIDGE: &str = "pvnet1";
const SUBNET_PREFIX: [u8; 3] = [10, 88, 210];
const NETWORK: &str = "pvnet-test";
/// Where pod B's httpd listens in the pod.
const POD_PORT: u16 = 8080;
/// The page pod B serves.
const PAGE: &str = "hello from pod b";
/// How long a process in a guest may take: exec and fork are slow where the guest kernel
/// is emulated and other VMs share the two cores.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

fn step(name: &str, since: Instant) {
    println!("[net] {name}: {:.1} s", since.elapsed().as_secs_f64());
}

/// The network: bridge (gateway on the host, masquerading so its iptables rules are
/// checked too), host-local, portmap, loopback.
fn write_conflist(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let conf_dir = dir.join("net.d");
    let ipam_dir = dir.join("ipam");
    std::fs::create_dir_all(&conf_dir)?;
    let subnet = format!(
        "{}.{}.{}.0/24",
        SUBNET_PREFIX[0], SUBNET_PREFIX[1], SUBNET_PREFIX[2]
    );
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "loopback"}
        ]
    });
    std::fs::write(
        conf_dir.join("10-pvnet.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    Ok((conf_dir, ipam_dir))
}

fn pod_config(name: &str, ports: Vec<cri::PortMapping>) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // As kubelet gives it (a pod without one gets the node's hostname).
        hostname: name.into(),
        port_mappings: ports,
        ..Default::default()
    }
}

async fn run_pod(rt: &mut Runtime, pod: &cri::PodSandboxConfig) -> Result<(String, Vec<String>)> {
    let t = Instant::now();
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    step("RunPodSandbox (VM boot)", t);
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    ensure!(
        status.state == cri::PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    let net = status.network.context("no network status")?;
    let mut ips = vec![net.ip];
    ips.extend(net.additional_ips.into_iter().map(|p| p.ip));
    Ok((id, ips))
}

async fn start_container(
    rt: &mut Runtime,
    sandbox_id: &str,
    pod: &cri::PodSandboxConfig,
    image: &str,
    name: &str,
    script: &str,
) -> Result<String> {
    let t = Instant::now();
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(shell_container(name, image, script)),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("StartContainer")?;
    step(&format!("container {name} created and started"), t);
    Ok(id)
}

async fn exec(rt: &mut Runtime, container: &str, script: &str) -> Result<(i32, String)> {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: EXEC_TIMEOUT.as_secs() as i64,
        })
        .await
        .context("ExecSync")?
        .into_inner();
    Ok((
        r.exit_code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ),
    ))
}

/// Runs `script` in `container` until its output contains `want` (the server in the other
/// VM may still be starting), within [`EXEC_TIMEOUT`].
async fn exec_until(rt: &mut Runtime, container: &str, script: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + EXEC_TIMEOUT;
    loop {
        let (code, out) = exec(rt, container, script).await?;
        if out.contains(want) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{script:?} never printed {want:?}; last exit {code}: {out}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One HTTP/1.0 GET from the host.
fn http_get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(EXEC_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// [`http_get`] until the page comes, within [`EXEC_TIMEOUT`] (httpd may still start).
async fn http_get_until(addr: SocketAddr) -> Result<String> {
    let deadline = Instant::now() + EXEC_TIMEOUT;
    loop {
        let got = tokio::task::spawn_blocking(move || http_get(addr)).await?;
        match got {
            Ok(page) if page.contains(PAGE) => return Ok(page),
            other if Instant::now() >= deadline => {
                bail!("no page from {addr} within {EXEC_TIMEOUT:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

fn netns_path(sandbox_id: &str) -> PathBuf {
    Path::new("/run/netns").join(format!("podvisor-{sandbox_id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_talk_over_the_bridge_and_the_host_port() -> Result<()> {
    paths::require_kvm()?;
    ensure!(
        Path::new(CNI_BIN_DIR).join("bridge").exists(),
        "containernetworking-plugins missing in {CNI_BIN_DIR}"
    );
    let registry = Registry::start()?;
    push_busybox(&registry, "podvisor/busybox", "net").await?;
    let image = registry.reference("podvisor/busybox", "net");
    let dir = tempfile::Builder::new().prefix("pvnet").tempdir()?;
    let (conf_dir, ipam_dir) = write_conflist(dir.path())?;
    struct Bridge;
    impl Drop for Bridge {
        fn drop(&mut self) {
            delete_link(BRIDGE);
        }
    }
    let _bridge = Bridge;
    let mut daemon = Daemon::start(&daemon_config(registry.host(), &conf_dir)?)?;
    let mut created = Vec::new();
    let result = match templates_at_start(&mut daemon) {
        Ok(()) => pods(&mut daemon, &image, &ipam_dir, &mut created).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        println!("[net] podvisord's log:\n{}", daemon.log());
        // Release the pods' networks (iptables rules, namespaces) before the daemon goes.
        if let Ok(channel) = connect(&daemon.socket).await {
            let mut rt = RuntimeServiceClient::new(channel);
            for id in created {
                let stop = cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                };
                let remove = cri::RemovePodSandboxRequest { pod_sandbox_id: id };
                let _ = rt.stop_pod_sandbox(stop).await;
                let _ = rt.remove_pod_sandbox(remove).await;
            }
        }
    }
    result
}

async fn pods(
    daemon: &mut Daemon,
    image: &str,
    ipam_dir: &Path,
    created: &mut Vec<String>,
) -> Result<()> {
    let started = Instant::now();
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);

    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .context("no NetworkReady")?;
    ensure!(
        ready.status,
        "NetworkReady false with a CNI config: {ready:?}"
    );

    // A free host port, derived from the pid so parallel runs do not clash.
    let host_port = u16::try_from(30_000 + std::process::id() % 20_000)?;
    let pod_b = pod_config(
        "net-b",
        vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: i32::from(POD_PORT),
            host_port: i32::from(host_port),
            host_ip: String::new(),
        }],
    );
    let pod_a = pod_config("net-a", vec![]);

    // Both pods at once: the first RunPodSandbox builds the handler's VM template (the only
    // kernel boot), then both restore it.
    let mut rt2 = rt.clone();
    let (rb, ra) = tokio::join!(run_pod(&mut rt, &pod_b), run_pod(&mut rt2, &pod_a));
    if let Ok((id, _)) = &rb {
        created.push(id.clone());
    }
    if let Ok((id, _)) = &ra {
        created.push(id.clone());
    }
    let ((b, b_ips), (a, a_ips)) = (rb?, ra?);
    step(
        "both RunPodSandbox (template build + two restores)",
        started,
    );
    let image = pull_image(&mut images, image, &pod_b).await?;
    let image = image.as_str();
    let server = start_container(
        &mut rt,
        &b,
        &pod_b,
        image,
        "server",
        &format!("mkdir -p /tmp/www && echo '{PAGE}' > /tmp/www/index.html && exec httpd -f -p {POD_PORT} -h /tmp/www"),
    )
    .await?;
    let client = start_container(&mut rt, &a, &pod_a, image, "client", "exec sleep 3600").await?;

    // Distinct IPv4s of the subnet, reserved by host-local.
    println!("[net] pod A {a_ips:?}, pod B {b_ips:?}");
    ensure!(a_ips.len() == 1 && b_ips.len() == 1, "one IP each");
    let ip_a: Ipv4Addr = a_ips[0].parse()?;
    let ip_b: Ipv4Addr = b_ips[0].parse()?;
    ensure!(ip_a != ip_b, "distinct IPs");
    for ip in [ip_a, ip_b] {
        ensure!(ip.octets()[..3] == SUBNET_PREFIX, "{ip} outside the subnet");
        ensure!(
            ipam_dir.join(NETWORK).join(ip.to_string()).exists(),
            "no host-local reservation for {ip}"
        );
    }

    // The pods' namespaces hold the CNI interface and the TAP; the guest NIC has eth0's MAC.
    for id in [&a, &b] {
        ensure!(netns_path(id).exists(), "no netns for {id}");
    }
    let ns_a = format!("podvisor-{a}");
    let links = run("ip", &["-n", &ns_a, "-o", "link", "show"])?;
    ensure!(
        links.contains("tap0_pv"),
        "no TAP in pod A's netns: {links}"
    );
    let eth0 = run("ip", &["-n", &ns_a, "-o", "link", "show", "eth0"])?;
    let (code, guest_mac) = exec(&mut rt, &client, "cat /sys/class/net/eth0/address").await?;
    ensure!(
        code == 0 && eth0.contains(guest_mac.trim()),
        "guest MAC {guest_mac:?} is not eth0's: {eth0}"
    );
    let (_, addrs) = exec(&mut rt, &client, "cat /proc/net/fib_trie").await?;
    ensure!(
        addrs.contains(&ip_a.to_string()),
        "guest has no {ip_a}: {addrs}"
    );

    // Restored from one template, the pods share no identity: each has its hostname, its
    // random numbers (the agent reseeded the guest RNG), its own files.
    for id in [&a, &b] {
        let config = daemon.vmm_config(id)?;
        ensure!(
            config["restore"].is_object(),
            "pod {id} was not restored from a template: {config}"
        );
    }
    let mut seen = Vec::new();
    for (c, host) in [(&client, "net-a"), (&server, "net-b")] {
        let (_, name) = exec(&mut rt, c, "cat /proc/sys/kernel/hostname").await?;
        ensure!(name.trim() == host, "hostname {name:?}, expected {host}");
        let (_, uuid) = exec(&mut rt, c, "cat /proc/sys/kernel/random/uuid").await?;
        ensure!(uuid.trim().len() == 36, "no random uuid: {uuid:?}");
        seen.push(uuid.trim().to_owned());
    }
    println!("[net] random uuids in pods A and B: {seen:?}");
    ensure!(
        seen[0] != seen[1],
        "two restored pods drew the same random numbers"
    );
    let (code, _) = exec(
        &mut rt,
        &client,
        "echo a > /tmp/only-in-a && cat /tmp/only-in-a",
    )
    .await?;
    ensure!(code == 0, "write a file in pod A");
    let (code, _) = exec(&mut rt, &server, "test ! -e /tmp/only-in-a").await?;
    ensure!(code == 0, "pod A's file is visible in pod B");

    // Host -> pod B by IP, over the bridge (waits for httpd).
    let t = Instant::now();
    http_get_until(SocketAddr::from((ip_b, POD_PORT)))
        .await
        .context("host -> pod B")?;
    step("the host fetched pod B's page", t);

    // Pod A -> pod B by IP, over the bridge.
    let t = Instant::now();
    exec_until(
        &mut rt,
        &client,
        &format!("echo -e 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip_b} {POD_PORT}"),
        PAGE,
    )
    .await
    .context("pod A -> pod B")?;
    step("pod A fetched pod B's page", t);

    let gateway = Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], SUBNET_PREFIX[2], 1);
    let t = Instant::now();
    forged_frames_stop_at_the_tap(daemon, &mut rt, &client, &ns_a, ip_a, gateway).await?;
    step(
        "forged frames of pod A stopped at its TAP, before and after a restart",
        t,
    );

    // Host -> pod B through the host port (on the bridge's address: a local address, so
    // portmap's DNAT in OUTPUT applies).
    let t = Instant::now();
    http_get_until(SocketAddr::from((gateway, host_port)))
        .await
        .with_context(|| format!("host -> {gateway}:{host_port}"))?;
    step("the host fetched pod B's page through the host port", t);

    // The pods' iptables chains (portmap's DNAT, bridge's masquerading), found by the
    // sandbox ids in their rules' comments.
    let mut chains = Vec::new();
    for table in ["nat", "filter"] {
        let rules = run("iptables-save", &["-t", table])?;
        for line in rules.lines().filter(|l| l.contains(&a) || l.contains(&b)) {
            if let Some(chain) = line.split(" -j ").nth(1).map(str::trim)
                && chain.starts_with("CNI-")
                && !chain.starts_with("CNI-HOSTPORT-")
            {
                chains.push((table, chain.to_owned()));
            }
        }
    }
    println!("[net] the pods' iptables chains: {chains:?}");
    ensure!(
        chains.iter().any(|(_, c)| c.starts_with("CNI-DN-")),
        "no portmap chain for pod B"
    );

    // Teardown: stop (twice: idempotent), then remove.
    let t = Instant::now();
    for id in [&a, &b, &a, &b] {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .with_context(|| format!("StopPodSandbox {id}"))?;
    }
    for ip in [ip_a, ip_b] {
        ensure!(
            !ipam_dir.join(NETWORK).join(ip.to_string()).exists(),
            "{ip} still reserved after StopPodSandbox"
        );
    }
    let ports = run("ip", &["-o", "link", "show", "master", BRIDGE])?;
    ensure!(ports.trim().is_empty(), "veths left on {BRIDGE}: {ports}");
    for id in [&a, &b] {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .with_context(|| format!("RemovePodSandbox {id}"))?;
        ensure!(!netns_path(id).exists(), "netns of {id} left");
    }
    step("stop and remove both pods", t);
    let netns = run("ip", &["netns", "list"])?;
    ensure!(
        !netns.contains(&a) && !netns.contains(&b),
        "namespaces left: {netns}"
    );
    let taps = run("ip", &["-o", "link", "show"])?;
    ensure!(!taps.contains("tap0_pv"), "a TAP on the host: {taps}");
    for table in ["nat", "filter"] {
        let rules = run("iptables-save", &["-t", table])?;
        for id in [&a, &b] {
            ensure!(
                !rules.contains(id.as_str()),
                "iptables {table} rules of {id} left:\n{rules}"
            );
        }
        ensure!(
            !rules.contains(&format!("--dport {host_port}")),
            "host port {host_port} still mapped:\n{rules}"
        );
    }
    for (table, chain) in &chains {
        let rules = run("iptables-save", &["-t", table])?;
        ensure!(
            !rules.contains(&format!(":{chain} ")),
            "chain {chain} left in {table}"
        );
    }
    template_fallback(daemon, &mut rt).await?;
    step("whole test", started);
    Ok(())
}

/// The marker prefix of `guest-probe spoof`'s frames.
const SPOOF_MARK: &str = "PVSPOOF-";

/// What the TAP's ingress qdisc in pod namespace `ns` dropped so far.
async fn tap_drops(ns: &str) -> Result<u64> {
    let ns = NetNs::open(ns)?;
    let drops =
        tokio::task::spawn_blocking(move || tap::guest_drops(&ns, tap::DEFAULT_TAP_NAME)).await??;
    drops.context("no TAP with an ingress qdisc in pod A's namespace")
}

/// One `guest-probe spoof` run in `container` (round `tag`) while `capture` reads the bridge
/// until the run's honest frame arrives; the markers seen meanwhile.
async fn spoof_round(
    rt: &mut Runtime,
    container: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    tag: &str,
    capture: Capture,
) -> Result<(Capture, Vec<String>)> {
    let honest = vec![format!("{SPOOF_MARK}{tag}-ok")];
    let deadline = Instant::now() + EXEC_TIMEOUT;
    let reader = tokio::task::spawn_blocking(move || {
        let seen = capture.markers_until(SPOOF_MARK, &honest, deadline);
        (capture, seen)
    });
    let (code, out) = exec(
        rt,
        container,
        &format!("guest-probe spoof eth0 {ip} {gateway} {tag}"),
    )
    .await?;
    println!(
        "[net] guest-probe spoof (round {tag}): exit {code}\n{}",
        out.trim_end()
    );
    ensure!(
        code == 0 && out.matches("SPOOF-SENT ").count() == 4,
        "guest-probe spoof did not send its 4 frames: exit {code}: {out}"
    );
    let (capture, seen) = reader.await?;
    Ok((capture, seen?))
}

/// Pod A's guest (a container with the default capabilities, CAP_NET_RAW among them: raw
/// frames need no more) sends frames as someone else and one as itself, once before and
/// once after a podvisord restart (the filter lives in the pod's namespace). On the bridge
/// only the honest frames arrive. Both rounds go through one capture that reads on until
/// the second honest frame: a forged frame of round 1 would have had the whole restart to
/// show up. The TAP's drop counter counts (at least) the 6 forged frames.
async fn forged_frames_stop_at_the_tap(
    daemon: &mut Daemon,
    rt: &mut Runtime,
    client: &str,
    ns_a: &str,
    ip_a: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<()> {
    let drops_before = tap_drops(ns_a).await?;
    let capture = Capture::open(BRIDGE)?;
    let (capture, mut seen) = spoof_round(rt, client, ip_a, gateway, "r1", capture).await?;
    daemon.restart()?;
    *rt = RuntimeServiceClient::new(connect(&daemon.socket).await?);
    let (_, more) = spoof_round(rt, client, ip_a, gateway, "r2", capture).await?;
    seen.extend(more);
    let dropped = tap_drops(ns_a).await? - drops_before;
    println!("[net] on the bridge: {seen:?}; dropped at pod A's TAP: {dropped}");
    ensure!(
        seen == [format!("{SPOOF_MARK}r1-ok"), format!("{SPOOF_MARK}r2-ok")],
        "frames on the bridge: {seen:?}"
    );
    ensure!(
        dropped >= 6,
        "pod A's TAP dropped {dropped} frames, not the 6 forged ones"
    );
    Ok(())
}

/// Templates at podvisord's start, before any pod: the daemon builds its handler's
/// template on its own; SIGTERM during that build kills the template VM and leaves no
/// namespace; the next start removes a template no handler uses and kills the process its
/// build record names (a template VM an earlier podvisord left when it died).
fn templates_at_start(daemon: &mut Daemon) -> Result<()> {
    let started = Instant::now();
    let templates = daemon.root_dir.join("templates");
    let deadline = Instant::now() + Duration::from_secs(120);
    while vmm_processes_under(&templates).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "podvisord built no template on its own within 120 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A stale template with the build record of a live process.
    let mut leftover = Command::new("sleep").arg("600").spawn()?;
    let pid = leftover.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let start_time: u64 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .context("no start time in /proc/pid/stat")?
        .parse()?;
    let stale = templates.join("00000000deadbeef");
    std::fs::create_dir_all(stale.join("build"))?;
    std::fs::write(stale.join("vm.state"), b"an old template")?;
    let build = stale.join("build");
    let record = serde_json::json!({
        "pid": pid,
        "start_time": start_time,
        "dir": build,
        "api_sock": build.join("api.sock"),
        "vsock_uds": build.join("vsock.sock"),
        "console_log": build.join("console.log"),
        "vmm_log": build.join("vmm.log"),
    });
    std::fs::write(stale.join("build.json"), record.to_string())?;

    let status = daemon.stop()?;
    ensure!(status.success(), "podvisord exited {status} on SIGTERM");
    let left = vmm_processes_under(&templates);
    let netns = build_namespaces(daemon)?;
    let mut dirs: Vec<String> = std::fs::read_dir(&templates)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    daemon.start_again()?;
    ensure!(left.is_empty(), "template VMs left after SIGTERM: {left:?}");
    ensure!(
        netns.is_empty(),
        "template namespace left after SIGTERM: {netns:?}"
    );
    ensure!(
        dirs == ["00000000deadbeef"],
        "the unfinished template was kept: {dirs:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let exited = leftover.try_wait()?;
        if exited.is_some() && !stale.exists() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = leftover.kill();
            let _ = leftover.wait();
            bail!(
                "stale template {} (process exited: {exited:?}) still there after 60 s:\n{}",
                stale.display(),
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    step(
        "template built at start, stopped on SIGTERM, stale one pruned",
        started,
    );
    Ok(())
}

/// A template whose state file is corrupt: the VMM refuses it, the pod boots the kernel
/// instead and runs, the log says why, and the template is dropped for a new one.
async fn template_fallback(daemon: &Daemon, rt: &mut Runtime) -> Result<()> {
    let templates = daemon.root_dir.join("templates");
    let mut states = Vec::new();
    for e in std::fs::read_dir(&templates)? {
        let state = e?.path().join("vm.state");
        if state.is_file() {
            states.push(state);
        }
    }
    ensure!(states.len() == 1, "templates: {states:?}");
    let mut bytes = std::fs::read(&states[0])?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&states[0], bytes)?;
    let t = Instant::now();
    let (c, _) = run_pod(rt, &pod_config("net-c", vec![])).await?;
    step(
        "RunPodSandbox from a corrupt template (falls back to a boot)",
        t,
    );
    let config = daemon.vmm_config(&c)?;
    let log = daemon.log();
    let fell_back = log.contains("restore from the VM template failed, booting the kernel");
    let removed = !states[0].exists();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: c.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: c.clone(),
    })
    .await?;
    ensure!(
        config["restore"].is_null(),
        "pod C still runs the corrupt template: {config}"
    );
    ensure!(fell_back, "no fallback in the log:\n{log}");
    ensure!(removed, "the corrupt template was kept");
    let netns = run("ip", &["netns", "list"])?;
    ensure!(!netns.contains(&c), "namespaces left: {netns}");
    let building = build_namespaces(daemon)?;
    ensure!(
        building.is_empty(),
        "template build namespaces left: {building:?}"
    );
    Ok(())
}

/// The network namespaces of `daemon`'s template builds (other podvisords on the host have
/// their own, with another tag).
fn build_namespaces(daemon: &Daemon) -> Result<Vec<String>> {
    let templates = daemon.root_dir.join("templates");
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| template::is_build_netns_of(n, &templates))
        .map(str::to_string)
        .collect())
}
