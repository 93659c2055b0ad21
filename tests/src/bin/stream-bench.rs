//! `stream-bench [N] [--mib M]`: CRI streaming through podvisor's SPDY client (the one
//! `podvisorctl` uses), podvisor beside containerd + runc, one pod each, one run.
//!
//! Per runtime, on one pod with an `app` container (sleeps) and a `web` container (busybox
//! httpd on the pod's 127.0.0.1:8080 for the forwards and on port 8081 for the host,
//! serving a small page and an M MiB file, default 16; waited for, untimed):
//! - exec round trip: Exec RPC + SPDY session of `true` (stdout and stderr, as
//!   `kubectl exec` asks) until its exit code, median of N (default 10); next to ExecSync of
//!   `true` on the same runtime, median of N;
//! - exec throughput: Exec of `cat` with M MiB on stdin until all of it came back on
//!   stdout (Exec RPC included), MiB/s;
//! - port-forward throughput: a GET of the M MiB file through one forward, MiB/s, and
//!   connections/s: N sequential GETs of the page through one `PortForwarder`;
//! - the pod's own TCP: the same GET from the host straight to the pod's IP (the bridge
//!   CNI network), MiB/s, for comparison with the forward.
//!
//! podvisor: a podvisord with its own configuration and CNI network (bridge `pvsbench0`,
//! 10.88.216.0/24), VM templates on (the one pod builds the template; nothing timed
//! includes that). containerd: the test harness's instance (bridge `pvsbenchc0`,
//! 10.88.217.0/24), skipped with a note when containerd or runc is not installed.
//!
//! Prints figures and ratios; asserts no time. Needs root, /dev/kvm, the guest kernel and
//! agent image (`make guest`) and the CNI plugins.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::stream::client::{LocalIo, PortForwarder, remotecommand};
use podvisor_tests::containerd::{Containerd, containerd_available, push_pause};
use podvisor_tests::cri::{
    Daemon, connect, daemon_config, delete_link, pull_image, shell_container, write_bridge_conflist,
};
use podvisor_tests::paths;
use podvisor_tests::registry::{Registry, push_busybox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;

/// Where `web` serves the forwards, on the pod's loopback (as `tests/stream.rs` does).
const WEB_PORT: u16 = 8080;
/// Where `web` also serves on every address, for the host's direct TCP figure.
const TCP_PORT: u16 = 8081;
/// The page of the connections/s figure.
const PAGE: &[u8] = b"ok\n";
/// What `/ready` holds once the big file is complete.
const READY: &[u8] = b"big-ready\n";
/// How long the pod's containers may take to serve (not part of any figure).
const READY_TIMEOUT: Duration = Duration::from_secs(1200);
/// How long one measured operation may take.
const OP_TIMEOUT: Duration = Duration::from_secs(300);

/// The command line.
#[derive(Debug, Clone, Copy)]
struct Args {
    /// Round trips and connections per figure.
    runs: usize,
    /// The size of the bulk transfers.
    mib: usize,
}

fn args() -> Result<Args> {
    let mut out = Args { runs: 10, mib: 16 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--mib" {
            let m = it.next().context("--mib needs a number")?;
            out.mib = m.parse().with_context(|| format!("--mib {m:?}"))?;
        } else {
            out.runs = a.parse().with_context(|| {
                format!("usage: stream-bench [N] [--mib M]; {a:?} is no number")
            })?;
        }
    }
    ensure!(out.runs > 0 && out.mib > 0, "N and M must be at least 1");
    Ok(out)
}

/// One runtime's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Exec + SPDY session of `true`, median, ms.
    exec_ms: f64,
    /// ExecSync of `true`, median, ms.
    exec_sync_ms: f64,
    /// `cat` stdin to stdout, MiB/s.
    cat_mib_s: f64,
    /// The big GET through a forward, MiB/s (`None`: no page came through a forward).
    forward_mib_s: Option<f64>,
    /// Sequential GETs of the page through one forward, per second.
    forward_conns_s: Option<f64>,
    /// The big GET from the host to the pod's IP, MiB/s (`None` if it failed).
    tcp_mib_s: Option<f64>,
}

/// A running pod to measure.
struct Pod {
    rt: Runtime,
    pod_id: String,
    app: String,
    web: String,
    ip: String,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / f64::from(1 << 20) / d.as_secs_f64()
}

/// A local sink and a task counting what reaches it.
fn counting_sink() -> (
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    tokio::task::JoinHandle<usize>,
) {
    let (w, mut r) = tokio::io::duplex(1 << 20);
    let counter = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0;
        while let Ok(k) = r.read(&mut buf).await {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    (Box::new(w), counter)
}

async fn exec_url(rt: &mut Runtime, id: &str, cmd: &[&str], stdin: bool) -> Result<String> {
    Ok(rt
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            tty: false,
            stdin,
            stdout: true,
            stderr: true,
        })
        .await
        .with_context(|| format!("Exec {cmd:?}"))?
        .into_inner()
        .url)
}

/// Exec of `cmd` with `stdin` sent, timed from the Exec RPC to the exit code; (time,
/// stdout bytes).
async fn timed_exec(
    rt: &mut Runtime,
    id: &str,
    cmd: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<(Duration, usize)> {
    let t = Instant::now();
    let url = exec_url(rt, id, cmd, stdin.is_some()).await?;
    let (out_w, out) = counting_sink();
    let (err_w, _err) = counting_sink();
    let io = LocalIo {
        stdin: stdin.map(|b| {
            Box::new(std::io::Cursor::new(b)) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
        }),
        stdout: Some(out_w),
        stderr: Some(err_w),
        tty: None,
    };
    let code = tokio::time::timeout(OP_TIMEOUT, remotecommand(&url, io))
        .await
        .with_context(|| format!("exec {cmd:?} timed out"))??;
    let elapsed = t.elapsed();
    ensure!(code == 0, "exec {cmd:?} exited {code}");
    Ok((elapsed, out.await?))
}

/// Median streaming exec and median ExecSync of `true`, ms.
async fn exec_round_trips(pod: &mut Pod, runs: usize) -> Result<(f64, f64)> {
    let mut streamed = Vec::new();
    let mut synced = Vec::new();
    for _ in 0..runs {
        streamed.push(timed_exec(&mut pod.rt, &pod.app, &["true"], None).await?.0);
        let t = Instant::now();
        let r = pod
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: pod.app.clone(),
                cmd: vec!["true".into()],
                timeout: 120,
            })
            .await
            .context("ExecSync true")?
            .into_inner();
        synced.push(t.elapsed());
        ensure!(r.exit_code == 0, "ExecSync true exited {}", r.exit_code);
    }
    Ok((ms(median(streamed)), ms(median(synced))))
}

/// `cat` of `mib` MiB, MiB/s.
async fn cat_throughput(pod: &mut Pod, mib: usize) -> Result<f64> {
    let data = vec![0x5au8; mib << 20];
    let (t, n) = timed_exec(&mut pod.rt, &pod.app, &["cat"], Some(data)).await?;
    ensure!(n == mib << 20, "cat gave back {n} of {} bytes", mib << 20);
    Ok(mib_per_s(n, t))
}

/// Reads one HTTP answer from `r`: the headers, then `Content-Length` bytes of body (or
/// to EOF without one), as curl does before it closes its connection.
async fn read_answer<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..i]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if length.is_some_and(|n| out.len() >= i + 4 + n) {
                return Ok(out);
            }
        }
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// One HTTP/1.0 GET of `path` through `f`: the answer's body. The local end closes once
/// the answer is complete, as curl's does: containerd ends a forwarded connection when
/// both directions have ended, or 1 s after the first one did.
async fn forward_get(f: &PortForwarder, path: &str) -> Result<Vec<u8>> {
    let (local, mut test) = tokio::io::duplex(1 << 20);
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let (fwd, answer) = tokio::join!(f.forward(WEB_PORT, local), async move {
        test.write_all(request.as_bytes()).await?;
        let answer = read_answer(&mut test).await;
        drop(test);
        answer
    });
    fwd?;
    Ok(body(answer?))
}

/// The body of an HTTP answer.
fn body(mut answer: Vec<u8>) -> Vec<u8> {
    match answer.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => answer.split_off(i + 4),
        None => Vec::new(),
    }
}

/// Waits (untimed) until `web` wrote its big file, asking by ExecSync: the guest kernel of
/// a podvisor pod is emulated on this machine and writes it slowly, and a forward tried
/// before httpd listens is not part of what is measured.
async fn wait_for_web(pod: &mut Pod) -> Result<()> {
    let t = Instant::now();
    loop {
        let r = pod
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: pod.web.clone(),
                cmd: vec!["cat".into(), "/www/ready".into()],
                timeout: 120,
            })
            .await
            .context("ExecSync cat /www/ready")?
            .into_inner();
        if r.stdout == READY {
            println!(
                "[bench] web ready after {:.0} s (not a figure)",
                t.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        ensure!(t.elapsed() < READY_TIMEOUT, "web never got ready");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A forward to `web` that served the page (a new session per try, five tries, not
/// timed).
async fn ready_forwarder(pod: &mut Pod) -> Result<PortForwarder> {
    for _ in 0..5 {
        let url = pod
            .rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.pod_id.clone(),
                port: vec![i32::from(WEB_PORT)],
            })
            .await
            .context("PortForward")?
            .into_inner()
            .url;
        let f = PortForwarder::connect(&url).await?;
        let got = tokio::time::timeout(OP_TIMEOUT, forward_get(&f, "/index.html")).await;
        match got {
            Ok(Ok(b)) if b == PAGE => return Ok(f),
            other => {
                println!("[bench] the page through a forward: {other:?}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    anyhow::bail!("no page through a forward in five tries")
}

/// The big GET through `f` (MiB/s) and `runs` sequential page GETs (per second).
async fn forward_figures(f: &PortForwarder, args: Args) -> Result<(f64, f64)> {
    let t = Instant::now();
    let big = tokio::time::timeout(OP_TIMEOUT, forward_get(f, "/big")).await??;
    let big_t = t.elapsed();
    ensure!(
        big.len() == args.mib << 20,
        "the forward gave {} bytes",
        big.len()
    );
    let t = Instant::now();
    for _ in 0..args.runs {
        let page = tokio::time::timeout(OP_TIMEOUT, forward_get(f, "/index.html")).await??;
        ensure!(page == PAGE, "a page GET gave {page:?}");
    }
    let conns = args.runs as f64 / t.elapsed().as_secs_f64();
    Ok((mib_per_s(big.len(), big_t), conns))
}

/// The big GET from the host to the pod's IP, MiB/s.
async fn tcp_throughput(ip: &str, mib: usize) -> Result<f64> {
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect((ip, TCP_PORT))
        .await
        .with_context(|| format!("connect to {ip}:{TCP_PORT}"))?;
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(OP_TIMEOUT, s.read_to_end(&mut answer)).await??;
    let elapsed = t.elapsed();
    let big = body(answer);
    ensure!(
        big.len() == mib << 20,
        "the pod's IP gave {} bytes",
        big.len()
    );
    Ok(mib_per_s(big.len(), elapsed))
}

/// Every figure of one runtime's pod.
async fn measure(name: &str, pod: &mut Pod, args: Args) -> Result<Figures> {
    wait_for_web(pod).await?;
    println!("[bench] {name}: pod {} serves ({})", pod.pod_id, pod.ip);
    // One untimed exec first: the first session may set things up.
    timed_exec(&mut pod.rt, &pod.app, &["true"], None).await?;
    let (exec_ms, exec_sync_ms) = exec_round_trips(pod, args.runs).await?;
    println!("[bench] {name}: exec true {exec_ms:.1} ms, ExecSync true {exec_sync_ms:.1} ms");
    let cat_mib_s = cat_throughput(pod, args.mib).await?;
    println!("[bench] {name}: cat {} MiB: {cat_mib_s:.1} MiB/s", args.mib);
    let (forward_mib_s, forward_conns_s) = match ready_forwarder(pod).await {
        Ok(f) => {
            let (mib_s, conns_s) = forward_figures(&f, args).await?;
            println!("[bench] {name}: port-forward {mib_s:.1} MiB/s, {conns_s:.1} connections/s");
            (Some(mib_s), Some(conns_s))
        }
        Err(e) => {
            println!("[bench] {name}: NO port-forward figures: {e:#}");
            (None, None)
        }
    };
    let tcp_mib_s = match tcp_throughput(&pod.ip, args.mib).await {
        Ok(v) => {
            println!("[bench] {name}: TCP to the pod's IP {v:.1} MiB/s");
            Some(v)
        }
        Err(e) => {
            println!("[bench] {name}: no TCP figure: {e:#}");
            None
        }
    };
    Ok(Figures {
        exec_ms,
        exec_sync_ms,
        cat_mib_s,
        forward_mib_s,
        forward_conns_s,
        tcp_mib_s,
    })
}

/// Runs the pod (`app` and `web`) on the runtime at `socket`, pulling `prepull` first
/// (containerd's sandbox image), and measures it; the pod is removed afterwards.
async fn bench_runtime(
    name: &str,
    socket: &Path,
    image: &str,
    prepull: Option<&str>,
    args: Args,
) -> Result<Figures> {
    let channel = connect(socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let v = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    println!("[bench] {name}: {} {}", v.runtime_name, v.runtime_version);
    let logs = tempfile::Builder::new().prefix("pvsbench-logs").tempdir()?;
    let config = pod_config(logs.path());
    if let Some(p) = prepull {
        pull_image(&mut images, p, &config).await?;
    }
    let image = pull_image(&mut images, image, &config).await?;
    let t = Instant::now();
    let mut pod = run_pod(rt, &config, &image, args.mib).await?;
    println!(
        "[bench] {name}: pod started in {:.1} s (not a figure)",
        t.elapsed().as_secs_f64()
    );
    let figures = measure(name, &mut pod, args).await;
    let id = pod.pod_id.clone();
    let _ = pod
        .rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await;
    let _ = pod
        .rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
        .await;
    figures
}

fn pod_config(log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "sbench".into(),
            uid: "uid-sbench".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "sbench".into(),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    }
}

/// RunPodSandbox, `app` and `web` started; the pod's IP.
async fn run_pod(
    mut rt: Runtime,
    config: &cri::PodSandboxConfig,
    image: &str,
    mib: usize,
) -> Result<Pod> {
    let pod_id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let web_script = format!(
        "mkdir -p /www && echo ok > /www/index.html && httpd -p 127.0.0.1:{WEB_PORT} -h /www \
         && httpd -p {TCP_PORT} -h /www && head -c {} /dev/zero > /www/big \
         && echo big-ready > /www/ready && exec sleep 100000",
        mib << 20
    );
    let mut ids = Vec::new();
    for (name, script) in [
        ("app", "trap 'exit 0' TERM; sleep 100000 & wait"),
        ("web", web_script.as_str()),
    ] {
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(cri::ContainerConfig {
                    log_path: format!("{name}.log"),
                    ..shell_container(name, image, script)
                }),
                sandbox_config: Some(config.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .with_context(|| format!("StartContainer {name}"))?;
        ids.push(id);
    }
    let ip = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    ensure!(!ip.is_empty(), "pod {pod_id} has no IP");
    Ok(Pod {
        rt,
        pod_id,
        web: ids.pop().unwrap_or_default(),
        app: ids.pop().unwrap_or_default(),
        ip,
    })
}

/// podvisord's CNI network; its bridge goes with it.
struct Net {
    dir: tempfile::TempDir,
    bridge: &'static str,
}

impl Drop for Net {
    fn drop(&mut self) {
        delete_link(self.bridge);
    }
}

/// podvisord (templates on) with its own CNI network, one pod measured.
async fn bench_podvisor(registry: &Registry, image: &str, args: Args) -> Result<Figures> {
    paths::require_kvm()?;
    let net = Net {
        dir: tempfile::Builder::new().prefix("pvcni").tempdir()?,
        bridge: "pvsbench0",
    };
    let conf_dir = write_bridge_conflist(net.dir.path(), "sbench", net.bridge, "10.88.216.0/24")?;
    let config = format!(
        "{}template = true\n",
        daemon_config(registry.host(), &conf_dir)?
    );
    let mut daemon = Daemon::start(&config)?;
    let figures = bench_runtime("podvisor", &daemon.socket, image, None, args).await;
    if figures.is_err() {
        eprintln!("[bench] podvisord's log:\n{}", daemon.log());
    }
    daemon.stop()?;
    figures
}

/// containerd + runc with the harness's configuration, one pod measured; `None` without
/// containerd.
async fn bench_containerd(registry: &Registry, image: &str, args: Args) -> Result<Option<Figures>> {
    if !containerd_available() {
        println!("[bench] containerd or runc is not installed (make setup): podvisor only");
        return Ok(None);
    }
    let pause = push_pause(registry.host(), "sbench/pause", "1").await?;
    let ctrd = Containerd::start(registry.host(), &pause, "pvsbenchc0", "10.88.217.0/24")?;
    let figures = bench_runtime("containerd", &ctrd.socket, image, Some(&pause), args).await;
    if figures.is_err() {
        eprintln!("[bench] containerd's log (end):\n{}", ctrd.log());
    }
    drop(ctrd);
    figures.map(Some)
}

fn print_table(args: Args, p: Option<&Figures>, c: Option<&Figures>) {
    println!();
    println!(
        "stream-bench: one run, N = {}, {} MiB transfers, podvisor's SPDY client against both",
        args.runs, args.mib
    );
    let cell = |v: Option<f64>| v.map_or_else(|| format!("{:>12}", "-"), |v| format!("{v:>12.2}"));
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "", "podvisor", "containerd", "pv/ctrd"
    );
    type Field = fn(&Figures) -> Option<f64>;
    let rows: [(&str, Field); 8] = [
        ("exec `true` over streaming, median ms", |f| Some(f.exec_ms)),
        ("ExecSync `true`, median ms", |f| Some(f.exec_sync_ms)),
        ("streaming exec / ExecSync", |f| {
            Some(f.exec_ms / f.exec_sync_ms)
        }),
        ("exec -i cat stdin->stdout, MiB/s", |f| Some(f.cat_mib_s)),
        ("port-forward GET, MiB/s", |f| f.forward_mib_s),
        ("port-forward sequential GETs, conn/s", |f| {
            f.forward_conns_s
        }),
        ("TCP GET host->pod IP (no forward), MiB/s", |f| f.tcp_mib_s),
        ("port-forward / direct TCP", |f| {
            Some(f.forward_mib_s? / f.tcp_mib_s?)
        }),
    ];
    for (name, field) in rows {
        let (a, b) = (p.and_then(field), c.and_then(field));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b.abs() > f64::EPSILON => Some(a / b),
            _ => None,
        };
        println!("{name:<44} {} {} {}", cell(a), cell(b), cell(ratio));
    }
}

async fn run() -> Result<()> {
    let args = args()?;
    let registry = Registry::start()?;
    let pushed = push_busybox(&registry, "sbench/busybox", "1").await?;
    println!("[bench] pushed {}", pushed.reference);
    let p = bench_podvisor(&registry, &pushed.reference, args).await?;
    let c = bench_containerd(&registry, &pushed.reference, args).await?;
    print_table(args, Some(&p), c.as_ref());
    Ok(())
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run())
}
