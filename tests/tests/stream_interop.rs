//! podvisor's SPDY streaming client against a streaming server that is not ours:
//! containerd 1.6's CRI streaming server (Go, kubelet's `streaming` package, with runc).
//!
//! A local registry serves busybox and a pause image; containerd (started by the test
//! harness in a temporary directory, bridge `pvinterop0` on 10.88.215.0/24) runs one pod
//! with two containers: `app` (sleeps) and `web` (writes `/www/index.html` and 4 MiB of
//! random bytes to `/www/big`, then runs `httpd -f -p 127.0.0.1:8080 -h /www`). Through
//! the URLs containerd's Exec and PortForward RPCs answer, with
//! `podvisor_runtime::stream::client` (what `podvisorctl exec`/`port-forward` use):
//! 1. exec -i `cat` with 4 MiB of random stdin: stdout comes back identical (sha256);
//! 2. exit codes: `sh -c 'exit 7'` is 7, `kill -9 $$` is 137; `echo out; echo err >&2`
//!    keeps stdout and stderr apart;
//! 3. exec -t `stty size` prints the size the client sent on the `resize` stream, and a
//!    later resize;
//! 4. port-forward into the pod's 127.0.0.1: a GET of index.html, a GET of the 4 MiB file
//!    (sha256 equal to `sha256sum` run by ExecSync in the container), and a forward to a
//!    closed port ends with the server's error.
//!
//! What it proves: the client speaks SPDY/3.1 (upgrade, header compression, flow control,
//! stream half-close) and the `v4.channel.k8s.io` and `portforward.k8s.io` subprotocols
//! (stream types and headers, the v4 status with its exit code, the error stream) as a real
//! kubelet-style server expects them, so what `podvisorctl` sends is what kubelet's
//! streaming server understands, and it reads what such a server answers.
//!
//! What it does not prove: that podvisord's *server* matches kubelet's clients (kubectl,
//! client-go); `tests/stream.rs` checks that server with PyPI's `kubernetes` client over
//! WebSocket and with this client over SPDY. Nor does it cover attach, WebSocket, the
//! older `v1`-`v3` channel protocols, TLS, or a server behind the API server's proxy.
//!
//! containerd and runc come from `make setup` (Debian's `containerd` and `runc`). Without
//! them the test prints SKIPPED and passes, as the harness's own test in
//! `tests/src/containerd.rs` does. Needs root and the CNI plugins; no microVM.
//! Run: `cargo test -p podvisor-tests --test stream_interop -- --nocapture`

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::pods::TermSize;
use podvisor_runtime::stream::client::{LocalIo, PortForwarder, remotecommand};
use podvisor_tests::containerd::{Containerd, containerd_available, push_pause};
use podvisor_tests::cri::{connect, exec_sync, pull_image, shell_container};
use podvisor_tests::registry::{Registry, push_busybox};
use podvisor_tests::sha256_hex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;

/// Where `web` serves, inside the pod only.
const WEB_PORT: u16 = 8080;
/// A port nothing listens on in the pod.
const CLOSED_PORT: u16 = 9;
/// The size of the random stdin and of `web`'s big file.
const BIG: usize = 4 << 20;
/// How long one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// The test's containerd network.
const BRIDGE: &str = "pvinterop0";
const SUBNET: &str = "10.88.215.0/24";

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut v)?;
    Ok(v)
}

fn pod_config(log_dir: &std::path::Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "interop".into(),
            uid: "uid-interop".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "interop".into(),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    }
}

/// Creates and starts a container.
async fn start(
    rt: &mut Runtime,
    pod_id: &str,
    pod: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> Result<String> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
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
    Ok(id)
}

async fn exec_url(
    rt: &mut Runtime,
    id: &str,
    cmd: &[&str],
    stdin: bool,
    tty: bool,
) -> Result<String> {
    Ok(rt
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        })
        .await
        .with_context(|| format!("Exec {cmd:?}"))?
        .into_inner()
        .url)
}

/// A local sink and a task reading all of it (so the writer never blocks).
fn sink() -> (
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    let (w, mut r) = tokio::io::duplex(1 << 20);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out).await;
        out
    });
    (Box::new(w), reader)
}

/// Runs `cmd` in `id` with `stdin` sent; (exit code, stdout, stderr).
async fn exec(
    rt: &mut Runtime,
    id: &str,
    cmd: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<(i32, Vec<u8>, Vec<u8>)> {
    let url = exec_url(rt, id, cmd, stdin.is_some(), false).await?;
    ensure!(
        url.starts_with("http://127.0.0.1:") && url.contains("/exec/"),
        "containerd's Exec answered {url:?}"
    );
    let (out_w, out) = sink();
    let (err_w, err) = sink();
    let io = LocalIo {
        stdin: stdin.map(|b| {
            Box::new(std::io::Cursor::new(b)) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
        }),
        stdout: Some(out_w),
        stderr: Some(err_w),
        tty: None,
    };
    let code = tokio::time::timeout(STEP_TIMEOUT, remotecommand(&url, io))
        .await
        .with_context(|| format!("exec {cmd:?} timed out"))??;
    Ok((code, out.await?, err.await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_serves_our_streaming_client() -> Result<()> {
    if !containerd_available() {
        // As the harness's own test does (tests/src/containerd.rs).
        println!("[stream_interop] SKIPPED: containerd or runc is not installed (make setup)");
        return Ok(());
    }
    let registry = Registry::start()?;
    let busybox = push_busybox(&registry, "interop/busybox", "1").await?;
    let pause = push_pause(registry.host(), "interop/pause", "1").await?;
    let ctrd = Containerd::start(registry.host(), &pause, BRIDGE, SUBNET)?;
    let result = scenario(&ctrd, &busybox.reference, &pause).await;
    if result.is_err() {
        println!("[stream_interop] containerd's log (end):\n{}", ctrd.log());
    }
    drop(ctrd);
    result
}

async fn scenario(ctrd: &Containerd, image: &str, pause: &str) -> Result<()> {
    let channel = connect(&ctrd.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let version = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    println!(
        "[stream_interop] {} {} (CRI {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );
    let logs = tempfile::tempdir()?;
    let pod = pod_config(logs.path());
    pull_image(&mut images, pause, &pod).await?;
    let image = pull_image(&mut images, image, &pod).await?;
    let pod_id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let app = start(
        &mut rt,
        &pod_id,
        &pod,
        cri::ContainerConfig {
            log_path: "app.log".into(),
            ..shell_container("app", &image, "trap 'exit 0' TERM; sleep 100000 & wait")
        },
    )
    .await?;
    let web = start(
        &mut rt,
        &pod_id,
        &pod,
        cri::ContainerConfig {
            log_path: "web.log".into(),
            ..shell_container(
                "web",
                &image,
                &format!(
                    "mkdir -p /www && head -c {BIG} /dev/urandom > /www/big \
                     && echo hello-from-web > /www/index.html \
                     && exec httpd -f -p 127.0.0.1:{WEB_PORT} -h /www"
                ),
            )
        },
    )
    .await?;
    println!("[stream_interop] pod {pod_id}: app and web started");

    exec_stdin(&mut rt, &app).await?;
    exit_codes(&mut rt, &app).await?;
    exec_tty(&mut rt, &app).await?;
    port_forward(&mut rt, &pod_id, &web).await?;

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod_id,
    })
    .await
    .context("RemovePodSandbox")?;
    Ok(())
}

/// 1. exec -i: 4 MiB of random bytes through `cat` come back identical.
async fn exec_stdin(rt: &mut Runtime, app: &str) -> Result<()> {
    let data = random_bytes(BIG)?;
    let t = Instant::now();
    let (code, out, err) = exec(rt, app, &["cat"], Some(data.clone())).await?;
    ensure!(
        code == 0,
        "cat exited {code}: {}",
        String::from_utf8_lossy(&err)
    );
    ensure!(
        out.len() == data.len() && sha256_hex(&out) == sha256_hex(&data),
        "4 MiB through cat came back as {} bytes, sha256 {} (sent {})",
        out.len(),
        sha256_hex(&out),
        sha256_hex(&data)
    );
    println!(
        "[stream_interop] exec -i: 4 MiB through cat identical, sha256 {} ({:.2} s)",
        sha256_hex(&out),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 2. Exit codes, and stdout apart from stderr.
async fn exit_codes(rt: &mut Runtime, app: &str) -> Result<()> {
    for (script, want) in [
        ("exit 7", 7),
        ("kill -9 $$", 137),
        ("echo out; echo err >&2", 0),
    ] {
        let (code, out, err) = exec(rt, app, &["sh", "-c", script], None).await?;
        ensure!(code == want, "{script:?}: exit {code}, expected {want}");
        if want == 0 {
            ensure!(
                out == b"out\n" && err == b"err\n",
                "stdout {:?} stderr {:?} not apart",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        println!("[stream_interop] {script:?} exits {code}");
    }
    println!("[stream_interop] stdout and stderr arrive apart");
    Ok(())
}

/// Reads `r` into `seen` until it holds `want`.
async fn read_until(r: &mut tokio::io::DuplexStream, seen: &mut Vec<u8>, want: &str) -> Result<()> {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(want) {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            bail!(
                "output ended before {want:?}: {:?}",
                String::from_utf8_lossy(seen)
            );
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// Sends newlines until the output shows `want`: the size travels on the `resize` stream,
/// apart from stdin, and containerd applies it to the terminal on its own time.
async fn ask_until(
    stdin: &mut tokio::io::DuplexStream,
    out: &mut tokio::io::DuplexStream,
    seen: &mut Vec<u8>,
    want: &str,
) -> Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        stdin.write_all(b"\n").await?;
        if tokio::time::timeout(Duration::from_secs(2), read_until(out, seen, want))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{want:?} never showed: {:?}",
            String::from_utf8_lossy(seen)
        );
    }
}

/// 3. exec -t: `stty size` prints the size sent, then a resize.
async fn exec_tty(rt: &mut Runtime, app: &str) -> Result<()> {
    let url = exec_url(
        rt,
        app,
        &[
            "sh",
            "-c",
            "stty size; while read x; do [ \"$x\" = q ] && exit 0; stty size; done",
        ],
        true,
        true,
    )
    .await?;
    let (sizes_tx, sizes_rx) = mpsc::channel(4);
    sizes_tx
        .send(TermSize {
            width: 100,
            height: 40,
        })
        .await?;
    let (mut stdin_w, stdin_r) = tokio::io::duplex(1024);
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let io = LocalIo {
        stdin: Some(Box::new(stdin_r)),
        stdout: Some(Box::new(out_w)),
        stderr: None,
        tty: Some(sizes_rx),
    };
    let session = tokio::spawn(async move { remotecommand(&url, io).await });
    let mut seen = Vec::new();
    ask_until(&mut stdin_w, &mut out_r, &mut seen, "40 100").await?;
    sizes_tx
        .send(TermSize {
            width: 132,
            height: 50,
        })
        .await?;
    ask_until(&mut stdin_w, &mut out_r, &mut seen, "50 132").await?;
    stdin_w.write_all(b"q\n").await?;
    let code = tokio::time::timeout(STEP_TIMEOUT, session)
        .await
        .context("the tty exec did not end")???;
    ensure!(code == 0, "tty exec exited {code}");
    // containerd applies the first size after the process started: what it printed before
    // is shown, not judged.
    println!(
        "[stream_interop] exec -t: stty size 40x100 as sent, then 50x132 after a resize; \
         output {:?}",
        String::from_utf8_lossy(&seen)
    );
    Ok(())
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

/// One HTTP/1.0 GET of `path` through `f`: the whole answer. The local end closes once
/// the answer is complete, as curl's does: containerd ends a forwarded connection when
/// both directions have ended, or 1 s after the first one did.
async fn http_get(f: &PortForwarder, path: &str) -> Result<Vec<u8>> {
    let (local, mut test) = tokio::io::duplex(1 << 20);
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let (fwd, answer) = tokio::join!(f.forward(WEB_PORT, local), async move {
        test.write_all(request.as_bytes()).await?;
        let answer = read_answer(&mut test).await;
        drop(test);
        answer
    });
    fwd?;
    Ok(answer?)
}

/// The body of an HTTP answer.
fn body(answer: &[u8]) -> &[u8] {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |i| &answer[i + 4..])
}

/// 4. Port-forward into the pod's loopback.
async fn port_forward(rt: &mut Runtime, pod_id: &str, web: &str) -> Result<()> {
    let url = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: vec![i32::from(WEB_PORT)],
        })
        .await
        .context("PortForward")?
        .into_inner()
        .url;
    ensure!(
        url.starts_with("http://127.0.0.1:") && url.contains("/portforward/"),
        "containerd's PortForward answered {url:?}"
    );
    let f = PortForwarder::connect(&url).await?;
    // httpd starts after the big file is written: the page shows it is all there.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let page = loop {
        match tokio::time::timeout(STEP_TIMEOUT, http_get(&f, "/index.html")).await {
            Ok(Ok(a)) if body(&a) == b"hello-from-web\n" => break a,
            other => {
                ensure!(
                    Instant::now() < deadline,
                    "no page through the forward: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    println!(
        "[stream_interop] port-forward GET /index.html: {}",
        String::from_utf8_lossy(&page).lines().next().unwrap_or("")
    );

    let want = exec_sync(rt, web, &["busybox", "sha256sum", "/www/big"]).await?;
    ensure!(
        want.exit_code == 0,
        "sha256sum: {}",
        String::from_utf8_lossy(&want.stderr)
    );
    let want = String::from_utf8_lossy(&want.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    ensure!(want.len() == 64, "no sha256 of the big file: {want:?}");
    let t = Instant::now();
    let big = tokio::time::timeout(STEP_TIMEOUT, http_get(&f, "/big"))
        .await
        .context("the big GET timed out")??;
    let secs = t.elapsed().as_secs_f64();
    let got = sha256_hex(body(&big));
    ensure!(
        got == want,
        "4 MiB through the forward differ: {} bytes, sha256 {got}, sha256sum in the pod {want}",
        body(&big).len()
    );
    println!(
        "[stream_interop] port-forward GET /big: {} bytes, sha256 {got} as sha256sum in the pod \
         ({:.1} MiB/s)",
        body(&big).len(),
        (BIG as f64 / f64::from(1 << 20)) / secs
    );

    let (local, _test) = tokio::io::duplex(1024);
    let closed = tokio::time::timeout(STEP_TIMEOUT, f.forward(CLOSED_PORT, local))
        .await
        .context("a forward to a closed port did not end")?;
    match closed {
        Err(e) => println!("[stream_interop] port-forward to closed port {CLOSED_PORT}: {e}"),
        Ok(()) => bail!("a forward to closed port {CLOSED_PORT} reported no error"),
    }
    // The session serves on after the error.
    let again = http_get(&f, "/index.html").await?;
    ensure!(
        body(&again) == b"hello-from-web\n",
        "no page after the error"
    );
    Ok(())
}
