//! CRI streaming end to end on real microVMs: podvisord's Exec, Attach and PortForward URLs
//! driven over SPDY by podvisor's client (the one `podvisorctl` uses, checked against
//! containerd's server in `stream_interop`) and over WebSocket by PyPI's `kubernetes`
//! client, which is not ours.
//!
//! One pod, three containers: `web` (busybox httpd bound to 127.0.0.1 only, a 16 MiB file),
//! `once` (`stdin: true, stdin_once: true`, reads a line) and `tty` (a terminal, a line
//! a second). In order:
//! 1. exec -i: 8 MiB of random bytes through `cat` come back identical (SPDY and WebSocket);
//! 2. exit codes: `exit 7` is 7, `kill -9 $$` is 137 (both protocols);
//! 3. exec -t: `stty size` prints the size sent, then the size of a resize;
//! 4. attach: `once` reads a line from the first attach and then sees its stdin closed; two
//!    attachers of `tty` at once (SPDY and WebSocket) both see its lines and the CRI log
//!    still has every line;
//! 5. port-forward into 127.0.0.1 of the pod: an HTTP GET, 8 connections at once, the 16 MiB
//!    file (sha256 equal to the pod's), a closed port answers an error (SPDY and WebSocket);
//! 6. tokens: a reused, a forged and an expired token get 404, a missing or unknown
//!    subprotocol 4xx with a message; an exec in a stopped container is refused; the daemon
//!    serves on;
//! 7. `podvisorctl run --rm IMAGE -- sh -c 'echo hi; exit 3'` prints hi, exits 3 and leaves
//!    no pod.
//!
//! Needs root, /dev/kvm, the guest kernel and agent image (`make guest`), the CNI plugins
//! and PyPI (once, for the cached venv). Run: `cargo test -p podvisor-tests --test stream`

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::pods::TermSize;
use podvisor_runtime::stream::client::{LocalIo, PortForwarder, remotecommand};
use podvisor_tests::cri::{
    Daemon, connect, exec_sync_within, expect_code, pull_image, runtime_binary, shell_container,
    start_cri_daemon,
};
use podvisor_tests::python::kubernetes_python;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

type Runtime = RuntimeServiceClient<Channel>;

/// Where `web` serves, inside the pod only.
const WEB_PORT: u16 = 8080;
/// A port nothing listens on in the pod.
const CLOSED_PORT: u16 = 9;
/// Makes `web`'s big file, 16 MiB and a few bytes: 256 KiB from /dev/urandom doubled six
/// times with a marker line after each doubling (random bytes cost guest kernel work,
/// which is emulated here: 16 MiB of them took ten minutes).
const MAKE_BIG: &str = "head -c 262144 /dev/urandom > /tmp/b0 && for i in 1 2 3 4 5 6; do \
    cat /tmp/b$((i-1)) /tmp/b$((i-1)) > /tmp/b$i && echo level-$i >> /tmp/b$i && rm /tmp/b$((i-1)); \
    done && mv /tmp/b6 /www/big";
/// The size of `web`'s big file, at least.
const BIG: usize = 16 << 20;
/// How long a step in the guest may take where its kernel is emulated.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `web` may take to make its big file, from the port-forward step on (it starts
/// with the container; seen to take over 15 minutes with the volumes test beside it).
const BIG_FILE_TIMEOUT: Duration = Duration::from_secs(1800);
/// The Python client beside this file.
const PY_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/stream_client.py");

fn sha256_hex(data: &[u8]) -> String {
    hex_string(&Sha256::digest(data))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pod_config(log_dir: &std::path::Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "stream".into(),
            uid: "uid-stream".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "stream".into(),
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

async fn attach_url(rt: &mut Runtime, id: &str, stdin: bool, tty: bool) -> Result<String> {
    Ok(rt
        .attach(cri::AttachRequest {
            container_id: id.into(),
            stdin,
            tty,
            stdout: true,
            stderr: !tty,
        })
        .await
        .context("Attach")?
        .into_inner()
        .url)
}

async fn port_forward_url(rt: &mut Runtime, pod_id: &str, port: u16) -> Result<String> {
    Ok(rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: vec![i32::from(port)],
        })
        .await
        .context("PortForward")?
        .into_inner()
        .url)
}

/// A local sink whose bytes the test reads afterwards.
fn sink() -> (
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    tokio::io::DuplexStream,
) {
    let (w, r) = tokio::io::duplex(1 << 20);
    (Box::new(w), r)
}

/// Reads all of `r` on a task (so the writer never blocks).
fn collect(mut r: tokio::io::DuplexStream) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out).await;
        out
    })
}

/// Runs the Python client; its JSON answer.
fn python(args: &[&str]) -> Result<serde_json::Value> {
    let py = kubernetes_python()?;
    let out = Command::new(&py)
        .arg(PY_CLIENT)
        .args(args)
        .output()
        .context("run the python client")?;
    ensure!(
        out.status.success(),
        "python client {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "python client output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn python_async(args: Vec<String>) -> Result<serde_json::Value> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        python(&args)
    })
    .await?
}

/// Runs `cmd` in `id` over SPDY with `stdin` sent; (exit code, stdout, stderr).
async fn spdy_exec(
    rt: &mut Runtime,
    id: &str,
    cmd: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<(i32, Vec<u8>, Vec<u8>)> {
    let url = exec_url(rt, id, cmd, stdin.is_some(), false).await?;
    let (out_w, out_r) = sink();
    let (err_w, err_r) = sink();
    let (out, err) = (collect(out_r), collect(err_r));
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
        .context("exec timed out")??;
    Ok((code, out.await?, err.await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_end_to_end() -> Result<()> {
    let (setup, mut daemon) = start_cri_daemon("stream", "pvstream1", "10.88.214.0/24").await?;
    let result = scenario(&setup, &mut daemon).await;
    if result.is_err() {
        println!("[stream] podvisord's log:\n{}", daemon.log());
    }
    result
}

async fn scenario(setup: &podvisor_tests::cri::CriSetup, daemon: &mut Daemon) -> Result<()> {
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let logs = tempfile::tempdir()?;
    let pod = pod_config(logs.path());
    let image = pull_image(&mut images, &setup.image_name, &pod).await?;
    let t = Instant::now();
    let pod_id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    println!(
        "[stream] pod {pod_id} ready after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // A URL taken now is used after the token's minute (step 6).
    let early = exec_url(&mut rt, "missing", &["true"], false, false)
        .await
        .err();
    ensure!(early.is_some(), "Exec in an unknown container must fail");

    let web = start(
        &mut rt,
        &pod_id,
        &pod,
        shell_container(
            "web",
            &image,
            &format!(
                "mkdir -p /www && echo hello-from-web > /www/index.html && {MAKE_BIG} \
                 && exec httpd -f -p 127.0.0.1:{WEB_PORT} -h /www"
            ),
        ),
    )
    .await?;
    let once = start(
        &mut rt,
        &pod_id,
        &pod,
        cri::ContainerConfig {
            stdin: true,
            stdin_once: true,
            log_path: "once.log".into(),
            ..shell_container(
                "once",
                &image,
                "read line; echo \"got $line\"; while read more; do echo \"more $more\"; done; echo stdin-closed; exec sleep 100000",
            )
        },
    )
    .await?;
    let tty = start(
        &mut rt,
        &pod_id,
        &pod,
        cri::ContainerConfig {
            tty: true,
            log_path: "tty.log".into(),
            ..shell_container(
                "tty",
                &image,
                "i=0; while :; do i=$((i+1)); echo line-$i; sleep 1; done",
            )
        },
    )
    .await?;
    let expired_url = exec_url(&mut rt, &web, &["true"], false, false).await?;
    let expired_since = Instant::now();
    println!(
        "[stream] containers started after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    exec_stdin(&mut rt, &web).await?;
    exit_codes(&mut rt, &web).await?;
    exec_tty(&mut rt, &web).await?;
    attach_once(&mut rt, &once, &logs.path().join("once.log")).await?;
    attach_tty(&mut rt, &tty, &logs.path().join("tty.log")).await?;
    port_forward(&mut rt, &pod_id, &web).await?;
    tokens(&mut rt, &web, &pod_id, &expired_url, expired_since).await?;

    // Exec in a stopped container is refused.
    rt.stop_container(cri::StopContainerRequest {
        container_id: once.clone(),
        timeout: 0,
    })
    .await
    .context("StopContainer")?;
    let refused = rt
        .exec(cri::ExecRequest {
            container_id: once.clone(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await;
    expect_code(
        "stream",
        "Exec in a stopped container",
        refused,
        tonic::Code::FailedPrecondition,
    )?;

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await?;
    podvisorctl_run(daemon, &setup.image_name, &mut rt).await?;
    ensure!(daemon.running(), "podvisord died");
    Ok(())
}

/// 1. exec -i: 8 MiB through `cat`, both protocols.
async fn exec_stdin(rt: &mut Runtime, web: &str) -> Result<()> {
    let data: Vec<u8> = {
        let mut v = vec![0u8; 8 << 20];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut v)?;
        v
    };
    let t = Instant::now();
    let (code, out, err) = spdy_exec(rt, web, &["cat"], Some(data.clone())).await?;
    ensure!(
        code == 0,
        "cat exited {code}: {}",
        String::from_utf8_lossy(&err)
    );
    ensure!(
        out.len() == data.len() && sha256_hex(&out) == sha256_hex(&data),
        "SPDY: 8 MiB through cat came back as {} bytes, sha256 {}",
        out.len(),
        sha256_hex(&out)
    );
    println!(
        "[stream] SPDY exec -i: 8 MiB through cat identical ({:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let url = exec_url(rt, web, &["cat"], true, false).await?;
    let t = Instant::now();
    let r = python_async(vec!["exec".into(), url, (8usize << 20).to_string()]).await?;
    println!(
        "[stream] WebSocket ({}) exec -i: {} bytes back ({:.1} s)",
        r["protocol"],
        r["stdout_len"],
        t.elapsed().as_secs_f64()
    );
    ensure!(r["protocol"] == "v5.channel.k8s.io", "{r}");
    ensure!(
        r["sent_sha256"] == r["stdout_sha256"],
        "WebSocket: cat changed the bytes: {r}"
    );
    ensure!(r["returncode"] == 0, "{r}");
    Ok(())
}

/// 2. exit codes, both protocols.
async fn exit_codes(rt: &mut Runtime, web: &str) -> Result<()> {
    for (script, want) in [
        ("exit 7", 7),
        ("kill -9 $$", 137),
        ("echo out; echo err >&2", 0),
    ] {
        let (code, out, err) = spdy_exec(rt, web, &["sh", "-c", script], None).await?;
        ensure!(
            code == want,
            "SPDY {script:?}: exit {code}, expected {want}"
        );
        if want == 0 {
            ensure!(
                out == b"out\n" && err == b"err\n",
                "stdout {out:?} stderr {err:?} not apart"
            );
        }
        let url = exec_url(rt, web, &["sh", "-c", script], false, false).await?;
        let r = python_async(vec!["exec".into(), url]).await?;
        ensure!(r["returncode"] == want, "WebSocket {script:?}: {r}");
        if want == 0 {
            ensure!(r["stdout"] == "out\n" && r["stderr"] == "err\n", "{r}");
        }
        println!("[stream] {script:?} exits {want} over SPDY and WebSocket");
    }
    Ok(())
}

/// 3. exec -t: the size sent, then a resize.
async fn exec_tty(rt: &mut Runtime, web: &str) -> Result<()> {
    let url = exec_url(
        rt,
        web,
        &["sh", "-c", "stty size; while read x; do stty size; done"],
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
    let (stdin_w, stdin_r) = tokio::io::duplex(1024);
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let io = LocalIo {
        stdin: Some(Box::new(stdin_r)),
        stdout: Some(Box::new(out_w)),
        stderr: None,
        tty: Some(sizes_rx),
    };
    let session = tokio::spawn(async move { remotecommand(&url, io).await });
    let mut seen = Vec::new();
    read_until(&mut out_r, &mut seen, "40 100").await?;
    sizes_tx
        .send(TermSize {
            width: 132,
            height: 50,
        })
        .await?;
    // The resize and the newline travel apart: ask again until the new size shows.
    let mut stdin_w = stdin_w;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        stdin_w.write_all(b"\n").await?;
        if tokio::time::timeout(
            Duration::from_secs(5),
            read_until(&mut out_r, &mut seen, "50 132"),
        )
        .await
        .is_ok()
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no resize seen: {}",
            String::from_utf8_lossy(&seen)
        );
    }
    // A terminal has no end of input but its EOF character: Ctrl-D ends the loop.
    stdin_w.write_all(b"\x04").await?;
    let code = tokio::time::timeout(STEP_TIMEOUT, session)
        .await
        .with_context(|| {
            format!(
                "the tty exec did not end after Ctrl-D: {:?}",
                String::from_utf8_lossy(&seen)
            )
        })???;
    ensure!(code == 0, "tty exec exited {code}");
    println!("[stream] exec -t: stty size 40x100, then 50x132 after a resize");
    Ok(())
}

/// Reads `r` into `seen` until it holds `want`.
async fn read_until(r: &mut tokio::io::DuplexStream, seen: &mut Vec<u8>, want: &str) -> Result<()> {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(want) {
        let n = tokio::time::timeout(STEP_TIMEOUT, r.read(&mut buf))
            .await
            .with_context(|| {
                format!(
                    "waiting for {want:?}, got: {:?}",
                    String::from_utf8_lossy(seen)
                )
            })??;
        if n == 0 {
            bail!(
                "output ended before {want:?}: {}",
                String::from_utf8_lossy(seen)
            );
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// The CRI log's text at `path`.
fn log_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the log at `path` holds `want`.
async fn log_has(path: &std::path::Path, want: &str) -> Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !log_text(path).contains(want) {
        ensure!(
            Instant::now() < deadline,
            "{} never had {want:?}:\n{}",
            path.display(),
            log_text(path)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// 4a. stdin_once: the first attach's line, then stdin closed.
async fn attach_once(rt: &mut Runtime, once: &str, log: &std::path::Path) -> Result<()> {
    let url = attach_url(rt, once, true, false).await?;
    let (out_w, out_r) = sink();
    let (err_w, _err_r) = sink();
    let out = collect(out_r);
    let io = LocalIo {
        stdin: Some(Box::new(std::io::Cursor::new(b"hello\n".to_vec()))),
        stdout: Some(out_w),
        stderr: Some(err_w),
        tty: None,
    };
    // The container keeps running after its stdin closed (stdin_once), so the attach
    // does not end by itself: the test ends it once the log shows the close.
    let session = tokio::spawn(async move { remotecommand(&url, io).await });
    log_has(log, "got hello").await?;
    log_has(log, "stdin-closed").await?;
    session.abort();
    let out = tokio::time::timeout(STEP_TIMEOUT, out).await??;
    ensure!(
        String::from_utf8_lossy(&out).contains("got hello"),
        "the attacher did not see the container's answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(
        !log_text(log).contains("more "),
        "a second line reached the container"
    );
    println!(
        "[stream] attach: stdin_once container read the first attach's line, then its stdin closed"
    );
    Ok(())
}

/// 4b. Two attachers of a terminal at once; the log still has every line.
async fn attach_tty(rt: &mut Runtime, tty: &str, log: &std::path::Path) -> Result<()> {
    let url = attach_url(rt, tty, false, true).await?;
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    // A terminal session has a resize stream, as kubectl opens one.
    let (sizes_tx, sizes_rx) = mpsc::channel(1);
    sizes_tx
        .send(TermSize {
            width: 80,
            height: 24,
        })
        .await?;
    let io = LocalIo {
        stdin: None,
        stdout: Some(Box::new(out_w)),
        stderr: None,
        tty: Some(sizes_rx),
    };
    let spdy = tokio::spawn(async move { remotecommand(&url, io).await });
    let ws_url = attach_url(rt, tty, false, true).await?;
    // The Python client reads until the connection ends: end it by the attach's close.
    let ws = tokio::spawn(python_async(vec!["exec".into(), ws_url]));
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + STEP_TIMEOUT;
    while String::from_utf8_lossy(&seen).matches("line-").count() < 20 {
        ensure!(Instant::now() < deadline, "SPDY attacher saw too little");
        let n = tokio::time::timeout(STEP_TIMEOUT, out_r.read(&mut buf)).await??;
        ensure!(n > 0, "SPDY attach ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // Stop the container: both attachments end with its output.
    rt.stop_container(cri::StopContainerRequest {
        container_id: tty.into(),
        timeout: 0,
    })
    .await?;
    let code = tokio::time::timeout(STEP_TIMEOUT, spdy).await???;
    let r = tokio::time::timeout(STEP_TIMEOUT, ws).await???;
    let ws_lines = r["stdout"]
        .as_str()
        .unwrap_or_default()
        .matches("line-")
        .count();
    ensure!(ws_lines > 0, "the WebSocket attacher saw nothing: {r}");
    // Every line from the first to the last in the log, in order.
    let text = log_text(log);
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.rsplit("line-").next().and_then(|n| n.trim().parse().ok()))
        .collect();
    ensure!(numbers.len() > 20, "the log has too few lines:\n{text}");
    for (i, n) in numbers.iter().enumerate() {
        ensure!(
            *n == i as u64 + 1,
            "the log misses a line before line-{n}:\n{text}"
        );
    }
    println!(
        "[stream] attach -t: SPDY (exit {code}) and WebSocket ({ws_lines} lines) at once; the log has lines 1..{} in order",
        numbers.len()
    );
    Ok(())
}

/// One HTTP/1.0 GET through `f` for `path`; the whole answer.
async fn http_get(f: &PortForwarder, path: &str) -> Result<Vec<u8>> {
    let (local, mut test) = tokio::io::duplex(1 << 20);
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    // The local end is closed once the answer is read (as curl closes its connection):
    // the forward ends when both sides have.
    let (fwd, answer) = tokio::join!(f.forward(WEB_PORT, local), async move {
        test.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        test.read_to_end(&mut out).await?;
        drop(test);
        Ok::<_, std::io::Error>(out)
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

/// 5. port-forward into the pod's loopback.
async fn port_forward(rt: &mut Runtime, pod_id: &str, web: &str) -> Result<()> {
    // The file is moved into place whole once made. One exec waits for it in the guest,
    // asleep between looks: execs polling from here would each take guest time from the
    // making, which beside other VMs takes many minutes of emulated guest kernel. If the
    // making fails, `web` exits and the exec with it.
    let r = exec_sync_within(
        rt,
        web,
        &[
            "sh",
            "-c",
            "while [ ! -e /www/big ]; do sleep 10; done; sha256sum /www/big",
        ],
        BIG_FILE_TIMEOUT,
    )
    .await?;
    let want = String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    ensure!(
        r.exit_code == 0 && want.len() == 64,
        "no sha256 of the big file: {r:?}"
    );

    let url = port_forward_url(rt, pod_id, WEB_PORT).await?;
    let f = PortForwarder::connect(&url).await?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let page = loop {
        let attempt = tokio::time::timeout(Duration::from_secs(60), http_get(&f, "/index.html"));
        match attempt
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 60 s")))
        {
            Ok(a) if body(&a) == b"hello-from-web\n" => break a,
            other => {
                let shown = other
                    .as_ref()
                    .map(|a| String::from_utf8_lossy(a).into_owned());
                println!("[stream] no page through the forward yet: {shown:?}");
                ensure!(
                    Instant::now() < deadline,
                    "no page through the forward: {shown:?}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    println!(
        "[stream] SPDY port-forward GET: {}",
        String::from_utf8_lossy(&page).lines().next().unwrap_or("")
    );
    // Eight connections at once, each its own pair of streams on the one session.
    let gets = (0..8).map(|_| http_get(&f, "/index.html"));
    for a in futures::future::join_all(gets).await {
        ensure!(body(&a?) == b"hello-from-web\n", "a concurrent GET failed");
    }
    let t = Instant::now();
    let big = http_get(&f, "/big").await?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        body(&big).len() >= BIG && sha256_hex(body(&big)) == want,
        "16 MiB through the forward differ ({} bytes)",
        body(&big).len()
    );
    println!(
        "[stream] SPDY port-forward: 8 GETs at once, 16 MiB identical ({:.2} MiB/s)",
        16.0 / secs
    );

    let (local, _test) = tokio::io::duplex(1024);
    let closed = tokio::time::timeout(STEP_TIMEOUT, f.forward(CLOSED_PORT, local)).await?;
    match closed {
        Err(e) => println!("[stream] SPDY port-forward to a closed port: {e}"),
        Ok(()) => bail!("a forward to closed port {CLOSED_PORT} reported no error"),
    }

    let url = port_forward_url(rt, pod_id, WEB_PORT).await?;
    let r = python_async(vec![
        "portforward".into(),
        url,
        WEB_PORT.to_string(),
        "GET /big HTTP/1.0\r\n\r\n".into(),
    ])
    .await?;
    ensure!(r["error"].is_null(), "{r}");
    let len = r["len"].as_u64().unwrap_or(0);
    ensure!(
        r["body_sha256"] == want.as_str(),
        "WebSocket forward: {len} bytes, not the file: {r}"
    );
    println!(
        "[stream] WebSocket port-forward: {len} bytes, head {:?}",
        r["head"].as_str().unwrap_or("").lines().next()
    );
    let url = port_forward_url(rt, pod_id, CLOSED_PORT).await?;
    let r = python_async(vec![
        "portforward".into(),
        url,
        CLOSED_PORT.to_string(),
        "x".into(),
    ])
    .await?;
    ensure!(
        r["error"].as_str().is_some_and(|e| !e.is_empty()),
        "no error for a closed port: {r}"
    );
    println!(
        "[stream] WebSocket port-forward to a closed port: {}",
        r["error"]
    );
    Ok(())
}

/// An HTTP request to the streaming server without an upgrade: its status and body.
async fn plain_request(url: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}

/// 6. Tokens and subprotocols.
async fn tokens(
    rt: &mut Runtime,
    web: &str,
    pod_id: &str,
    expired: &str,
    since: Instant,
) -> Result<()> {
    let spdy = [
        ("Connection", "Upgrade"),
        ("Upgrade", "SPDY/3.1"),
        ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
    ];
    // Used once: a second connection gets 404.
    let url = exec_url(rt, web, &["true"], false, false).await?;
    let (code, out, _) = {
        let (out_w, out_r) = sink();
        let out = collect(out_r);
        let io = LocalIo {
            stdout: Some(out_w),
            ..Default::default()
        };
        let code = remotecommand(&url, io).await?;
        (code, out.await?, ())
    };
    ensure!(code == 0 && out.is_empty(), "exec true: {code} {out:?}");
    let (status, text) = plain_request(&url, &spdy).await?;
    ensure!(status == 404, "a reused token: {text}");
    let forged = format!(
        "{}/exec/{}",
        url.rsplit_once("/exec/").map_or("", |(b, _)| b),
        "0".repeat(32)
    );
    let (status, text) = plain_request(&forged, &spdy).await?;
    ensure!(status == 404, "a forged token: {text}");
    let (status, text) = plain_request(&url.replace("/exec/", "/nothing/"), &spdy).await?;
    ensure!(status == 404, "an unknown path: {text}");
    // The token's minute: a real wait on the clock the server expires tokens by.
    let age = since.elapsed();
    if age < Duration::from_secs(61) {
        tokio::time::sleep(Duration::from_secs(61) - age).await;
    }
    let (status, text) = plain_request(expired, &spdy).await?;
    ensure!(status == 404, "an expired token: {text}");
    // Subprotocols: missing and unknown.
    let url = exec_url(rt, web, &["true"], false, false).await?;
    let (status, text) = plain_request(&url, &spdy[..2]).await?;
    ensure!(
        (400..500).contains(&status) && text.contains("subprotocol"),
        "no subprotocol: {text}"
    );
    let url = exec_url(rt, web, &["true"], false, false).await?;
    let (status, text) = plain_request(
        &url,
        &[
            spdy[0],
            spdy[1],
            ("X-Stream-Protocol-Version", "v9.channel.k8s.io"),
        ],
    )
    .await?;
    ensure!(
        (400..500).contains(&status) && text.contains("v9.channel.k8s.io"),
        "a bad subprotocol: {text}"
    );
    let url = port_forward_url(rt, pod_id, WEB_PORT).await?;
    let (status, text) = plain_request(&url, &[]).await?;
    ensure!(
        status == 400 && text.contains("upgrade"),
        "no upgrade at all: {text}"
    );
    // Bad requests: no output stream at all, a terminal with stderr, a bad port.
    let r = rt
        .exec(cri::ExecRequest {
            container_id: web.into(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
        .await;
    expect_code(
        "stream",
        "Exec without streams",
        r,
        tonic::Code::InvalidArgument,
    )?;
    let r = rt
        .exec(cri::ExecRequest {
            container_id: web.into(),
            cmd: vec!["true".into()],
            tty: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await;
    expect_code(
        "stream",
        "Exec with tty and stderr",
        r,
        tonic::Code::InvalidArgument,
    )?;
    let r = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: vec![70000],
        })
        .await;
    expect_code(
        "stream",
        "PortForward to port 70000",
        r,
        tonic::Code::InvalidArgument,
    )?;
    println!(
        "[stream] tokens: reused, forged, expired -> 404; subprotocols missing/unknown -> 4xx"
    );
    Ok(())
}

/// 7. `podvisorctl run --rm`.
async fn podvisorctl_run(daemon: &Daemon, image: &str, rt: &mut Runtime) -> Result<()> {
    let ctl = runtime_binary("podvisorctl")?;
    let socket = daemon.socket.clone();
    let image = image.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(ctl)
            .arg("--socket")
            .arg(&socket)
            .args(["run", "--rm", &image, "--", "sh", "-c", "echo hi; exit 3"])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(3),
        "podvisorctl run exited {:?}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout == "hi\n", "podvisorctl run printed {stdout:?}");
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    ensure!(pods.is_empty(), "podvisorctl run --rm left pods: {pods:?}");
    println!("[stream] podvisorctl run --rm: printed hi, exit 3, no pod left");
    Ok(())
}
