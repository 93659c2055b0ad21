//! Port forwarding dialled inside the pod (issue 14), end to end: one real microVM booting the
//! guest root image with the agent as init; a container runs `guest-probe tcp-echo-server`,
//! which listens on 127.0.0.1 only (unreachable from the host); podvisord's
//! [`PortForwardConn`] reaches it through the agent's PortForward stream.
//!
//! The echo server echoes until the client half-closes, then writes `ECHO-EOF <n>\n` and
//! closes: that reply only arrives if the client's half-close works. The greeting server
//! (`tcp-greet-server`, same container) half-closes first and prints how much it then
//! received: the other direction.
//!
//! Run: `cargo test -p podvisor-tests --test portforward -- --nocapture`

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use podvisor_proto::v1::{
    ConfigureNetworkRequest, PingRequest, PortForwardInput, ProcessOutput, SetupSandboxRequest,
    ShutdownRequest,
};
use podvisor_runtime::pods::{PortForwardConn, PortForwardReceiver};
use podvisor_tests::agent::{Client, IMAGE_SERIAL, Output, connect, container, delete, sh};
use podvisor_tests::vm::AGENT_READY;
use podvisor_tests::{DriveSpec, Vm, VmSpec, artifacts, image};
use sha2::{Digest, Sha256};
use tonic::{Code, Streaming};

/// From spawn to the agent's ready line (override: `PODVISOR_TEST_BOOT_TIMEOUT=<seconds>`).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// One check, all its RPCs included (every guest system call is emulated on kvm_pvm).
const CHECK_TIMEOUT: Duration = Duration::from_secs(600);
/// From the agent's ready line to its first answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// From Shutdown to the VMM's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// A refused connect must be answered within this (the agent never waits on it).
const REFUSED_WITHIN: Duration = Duration::from_secs(10);
const MEM_MIB: u64 = 256;
/// The echo server's port (127.0.0.1 in the VM).
const ECHO_PORT: u16 = 8080;
/// A port nothing listens on.
const CLOSED_PORT: u16 = 8081;
/// The greeting server's port (127.0.0.1 in the VM).
const GREET_PORT: u16 = 8082;
/// The large transfer.
const LARGE: usize = 4 << 20;
const CONCURRENT: usize = 8;

fn boot_timeout() -> Duration {
    std::env::var("PODVISOR_TEST_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(BOOT_TIMEOUT, Duration::from_secs)
}

/// `n` bytes that differ with `seed` (xorshift, no randomness needed).
fn payload(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads until the server's side ends.
async fn read_all(rx: &mut PortForwardReceiver) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::new();
    while let Some(chunk) = rx.recv().await {
        got.extend_from_slice(&chunk.context("receive")?);
    }
    Ok(got)
}

/// Sends `data` in 256 KiB pieces through a forward while reading the echo, then half-closes;
/// checks the echo and the server's count.
async fn echo(c: &Client, data: Vec<u8>) -> anyhow::Result<()> {
    let conn = PortForwardConn::open(c.clone(), ECHO_PORT)
        .await
        .context("open the forward")?;
    let (mut tx, mut rx) = conn.split();
    let n = data.len();
    let want = sha256(&data);
    let sender = tokio::spawn(async move {
        for piece in data.chunks(256 << 10) {
            tx.send(Bytes::copy_from_slice(piece)).await?;
        }
        tx.close_write();
        anyhow::Ok(())
    });
    let got = read_all(&mut rx).await?;
    sender.await.context("sender task")??;
    ensure!(got.len() >= n, "got {} bytes back, sent {n}", got.len());
    let (echoed, trailer) = got.split_at(n);
    let trailer = String::from_utf8_lossy(trailer);
    ensure!(
        trailer == format!("ECHO-EOF {n}\n"),
        "server's reply after our half-close: {trailer:?}, want \"ECHO-EOF {n}\\n\""
    );
    let have = sha256(echoed);
    ensure!(have == want, "sha256 of the echo {have}, sent {want}");
    Ok(())
}

/// The servers' output so far, and more of it.
struct ServerOutput {
    io: Streaming<ProcessOutput>,
    seen: Output,
}

impl ServerOutput {
    /// Reads until stdout contains `needle` (a line a server prints when it is ready or done).
    async fn wait_for(&mut self, needle: &str) -> anyhow::Result<()> {
        while !self.seen.stdout().contains(needle) {
            match self
                .io
                .message()
                .await
                .context("read the servers' output")?
            {
                Some(m) => self.seen.push(m)?,
                None => bail!(
                    "the servers ended before {needle:?}: stdout {:?} stderr {:?}",
                    self.seen.stdout(),
                    self.seen.stderr()
                ),
            }
        }
        Ok(())
    }
}

// ---- checks -----------------------------------------------------------------------------------

/// Round trip before any half-close, then half-close: the reply written after the server
/// read EOF still arrives, then the server's EOF.
async fn check_round_trip(c: &Client) -> anyhow::Result<()> {
    let (mut tx, mut rx) = PortForwardConn::open(c.clone(), ECHO_PORT).await?.split();
    tx.send(Bytes::from_static(b"hello")).await?;
    let mut got = Vec::new();
    while got.len() < 5 {
        match rx.recv().await {
            Some(chunk) => got.extend_from_slice(&chunk?),
            None => bail!("EOF before the echo (got {got:?})"),
        }
    }
    ensure!(got == b"hello", "echo {:?}", String::from_utf8_lossy(&got));
    tx.close_write();
    let rest = read_all(&mut rx).await?;
    ensure!(
        rest == b"ECHO-EOF 5\n",
        "after the half-close: {:?}",
        String::from_utf8_lossy(&rest)
    );
    ensure!(rx.recv().await.is_none(), "data after EOF");
    Ok(())
}

/// The server half-closes first: its EOF arrives, and data sent after it still reaches it.
async fn check_server_half_close(c: &Client, out: &mut ServerOutput) -> anyhow::Result<()> {
    let (mut tx, mut rx) = PortForwardConn::open(c.clone(), GREET_PORT).await?.split();
    let greeting = read_all(&mut rx).await?;
    ensure!(
        greeting == b"GREETING\n",
        "greeting {:?}",
        String::from_utf8_lossy(&greeting)
    );
    let late = payload(100_000, 7);
    tx.send(Bytes::from(late))
        .await
        .context("send after the server's EOF")?;
    tx.close_write();
    out.wait_for("TCP-GOT ").await?;
    ensure!(
        out.seen.stdout().contains("TCP-GOT 100000\n"),
        "the greeting server says {:?}, want TCP-GOT 100000",
        out.seen.stdout()
    );
    Ok(())
}

/// A port nothing listens on: UNAVAILABLE, promptly, saying why.
async fn check_closed_port(c: &Client) -> anyhow::Result<()> {
    let started = Instant::now();
    let r = tokio::time::timeout(
        REFUSED_WITHIN,
        PortForwardConn::open(c.clone(), CLOSED_PORT),
    )
    .await
    .map_err(|_| anyhow!("no answer within {REFUSED_WITHIN:?}"))?;
    let e = match r {
        Ok(_) => bail!("a forward to closed port {CLOSED_PORT} connected"),
        Err(e) => e,
    };
    println!(
        "[portfwd]      closed port after {:.2} s: {:?} {e}",
        started.elapsed().as_secs_f64(),
        e.code()
    );
    ensure!(e.code() == Code::Unavailable, "code {:?}: {e}", e.code());
    let want = format!("connect 127.0.0.1:{CLOSED_PORT}: Connection refused");
    ensure!(e.to_string().contains(&want), "{e}: does not say {want:?}");
    Ok(())
}

/// Ports outside 1..=65535 are INVALID_ARGUMENT and the agent keeps serving.
async fn check_bad_port(c: &Client) -> anyhow::Result<()> {
    for port in [0, 65536] {
        let first = PortForwardInput {
            port,
            ..Default::default()
        };
        match c.clone().port_forward(tokio_stream::once(first)).await {
            Ok(_) => bail!("PortForward to port {port} was accepted"),
            Err(s) if s.code() == Code::InvalidArgument => {}
            Err(s) => bail!("port {port}: {:?} {:?}", s.code(), s.message()),
        }
    }
    c.clone().ping(PingRequest {}).await.context("Ping")?;
    Ok(())
}

/// Eight forwards at once, each with its own data.
async fn check_concurrent(c: &Client) -> anyhow::Result<()> {
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { echo(&c, payload(64 << 10, i as u64 + 100)).await })
        })
        .collect();
    let mut errs = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if let Err(e) = t.await.context("task")? {
            errs.push(format!("forward {i}: {e:#}"));
        }
    }
    ensure!(errs.is_empty(), "{}", errs.join("; "));
    Ok(())
}

// ---- the test ---------------------------------------------------------------------------------

async fn run_check(
    failures: &mut Vec<String>,
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) {
    let started = Instant::now();
    let r = tokio::time::timeout(CHECK_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(anyhow!("no result within {CHECK_TIMEOUT:?}")));
    let took = started.elapsed().as_secs_f64();
    match r {
        Ok(()) => println!("[portfwd] ok   {what} ({took:.1} s)"),
        Err(e) => {
            println!("[portfwd] FAIL {what} ({took:.1} s): {e:#}");
            failures.push(format!("{what}: {e:#}"));
        }
    }
}

async fn drive(uds: &Path, failures: &mut Vec<String>) -> anyhow::Result<()> {
    let mut c = connect(uds, CONNECT_TIMEOUT).await?;
    // Brings up lo, as podvisord's RunPodSandbox does.
    c.configure_network(ConfigureNetworkRequest::default())
        .await
        .context("ConfigureNetwork")?;
    c.setup_sandbox(SetupSandboxRequest {
        sandbox_id: "portfwd-e2e".into(),
        hostname: "portfwd-e2e".into(),
        ..Default::default()
    })
    .await
    .context("SetupSandbox")?;
    let script = format!(
        "guest-probe tcp-greet-server {GREET_PORT} & exec guest-probe tcp-echo-server {ECHO_PORT}"
    );
    let (_, io) = podvisor_tests::agent::start(&mut c, container("servers", sh(&script))).await?;
    let mut out = ServerOutput {
        io,
        seen: Output::default(),
    };
    out.wait_for(&format!("TCP-LISTENING {ECHO_PORT}")).await?;
    out.wait_for(&format!("TCP-LISTENING {GREET_PORT}")).await?;
    println!("[portfwd] ok   servers listening on 127.0.0.1:{ECHO_PORT} and :{GREET_PORT}");

    run_check(
        failures,
        "round trip, then half-close",
        check_round_trip(&c),
    )
    .await;
    run_check(
        failures,
        "4 MiB echoed, sha256 equal",
        echo(&c, payload(LARGE, 1)),
    )
    .await;
    run_check(
        failures,
        "the server half-closes first, then still receives",
        check_server_half_close(&c, &mut out),
    )
    .await;
    run_check(
        failures,
        "closed port refused promptly",
        check_closed_port(&c),
    )
    .await;
    run_check(failures, "bad ports refused", check_bad_port(&c)).await;
    run_check(failures, "8 concurrent forwards", check_concurrent(&c)).await;

    delete(&mut c, "servers").await?;
    match tokio::time::timeout(CHECK_TIMEOUT, c.shutdown(ShutdownRequest {})).await {
        Ok(Ok(_)) => println!("[portfwd] ok   Shutdown answered"),
        Ok(Err(s)) => println!("[portfwd] Shutdown: {s:?} (checking the VMM's exit)"),
        Err(_) => println!("[portfwd] Shutdown: no answer (checking the VMM's exit)"),
    }
    Ok(())
}

// One microVM for every check; part of `make test` (e2e-vm).
#[test]
fn port_forward_reaches_loopback_inside_the_pod() {
    let _slot = podvisor_tests::vm::boot_slot();
    let dir = tempfile::Builder::new()
        .prefix("podvisor-portfwd-test-")
        .tempdir()
        .expect("create a temporary directory");
    // The busybox container image, with guest-probe added to its /bin.
    let stage = dir.path().join("stage");
    std::fs::create_dir_all(stage.join("bin")).expect("create the staging directory");
    let probe = artifacts::guest_probe().expect("build guest-probe");
    std::fs::copy(&probe, stage.join("bin/guest-probe")).expect("copy guest-probe");
    let img = dir.path().join("image.ext4");
    image::container_image(&stage, &img).expect("build the container image");

    let spec = VmSpec {
        vcpus: 1,
        mem_mib: MEM_MIB,
        drives: vec![DriveSpec {
            path: img,
            read_only: true,
            id: IMAGE_SERIAL.into(),
        }],
        ..VmSpec::agent()
    };
    let mut vm = Vm::boot(&spec, None).expect("boot the agent VM");
    if let Err(e) = vm.wait_for_console(AGENT_READY, boot_timeout()) {
        panic!(
            "the agent did not come up: {e:#}\n--- console ---\n{}",
            vm.console()
        );
    }
    println!(
        "[portfwd] agent ready {:.1} s after spawn",
        vm.started().elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut failures = Vec::new();
    let uds = vm.vsock_uds().expect("vsock socket").to_path_buf();
    if let Err(e) = rt.block_on(drive(&uds, &mut failures)) {
        println!("[portfwd] FAIL stopped early: {e:#}");
        failures.push(format!("stopped early: {e:#}"));
    } else {
        match vm.wait_exit(EXIT_TIMEOUT) {
            Ok(s) if s.success() => println!("[portfwd] ok   the VMM exited 0 after Shutdown"),
            Ok(s) => failures.push(format!("the VMM exited with {s} after Shutdown")),
            Err(e) => failures.push(format!("the VMM did not exit after Shutdown: {e:#}")),
        }
    }
    drop(rt);
    if !failures.is_empty() {
        println!(
            "--- guest console ---\n{}\n--- VMM stderr ---\n{}",
            vm.console(),
            vm.stderr()
        );
    }
    vm.kill();
    assert!(
        failures.is_empty(),
        "port-forward checks failed:\n- {}",
        failures.join("\n- ")
    );
}
