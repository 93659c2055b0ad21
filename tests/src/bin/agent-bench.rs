//! `agent-bench`: boots one microVM with the guest agent and measures what the CRI runtime will
//! pay per call: a Ping round trip over hybrid vsock, and a busybox container's create, start,
//! run to exit and delete, and an exec into a running container.
//!
//! ```text
//! cargo run --release -p podvisor-tests --bin agent-bench -- [--runs N] [--agent-log FILTER]
//! ```
//!
//! `--agent-log debug` passes `PODVISOR_AGENT_LOG=debug` to the agent (its log goes to the
//! console, printed at the end). On a kvm_pvm host every guest system call and page fault is
//! emulated: compare figures from one run, not across hosts.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use podvisor_proto::v1::{PingRequest, StartContainerRequest};
use podvisor_tests::agent::{
    Client, IMAGE_SERIAL, attach, connect, container, delete, drain, exec, process, wait,
};
use podvisor_tests::vm::AGENT_READY;
use podvisor_tests::{DriveSpec, Vm, VmSpec, image};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
const PINGS: usize = 20;

struct Options {
    runs: usize,
    agent_log: Option<String>,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 3,
        agent_log: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => o.runs = args.next().context("--runs N")?.parse()?,
            "--agent-log" => o.agent_log = Some(args.next().context("--agent-log FILTER")?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(o.runs > 0, "--runs must be at least 1");
    Ok(o)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times of one container's life, in milliseconds.
#[derive(Default)]
struct Life {
    create: f64,
    start: f64,
    exit: f64,
    delete: f64,
}

async fn container_life(c: &mut Client, id: &str) -> anyhow::Result<Life> {
    let mut life = Life::default();
    let t = Instant::now();
    c.create_container(container(id, process(&["true"])))
        .await
        .with_context(|| format!("CreateContainer {id}"))?;
    life.create = ms(t.elapsed());
    let t = Instant::now();
    let io = attach(c, id, "").await?;
    c.start_container(StartContainerRequest {
        container_id: id.to_owned(),
    })
    .await
    .with_context(|| format!("StartContainer {id}"))?;
    life.start = ms(t.elapsed());
    let t = Instant::now();
    drain(io).await?;
    let exit = wait(c, id).await?;
    ensure!(exit.exit_code == 0, "{id}: {exit:?}");
    life.exit = ms(t.elapsed());
    let t = Instant::now();
    delete(c, id).await?;
    life.delete = ms(t.elapsed());
    Ok(life)
}

async fn exec_true(c: &mut Client, id: &str, exec_id: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let (_, exit) = exec(c, id, exec_id, process(&["true"])).await?;
    ensure!(exit.exit_code == 0, "exec {exec_id}: {exit:?}");
    Ok(ms(t.elapsed()))
}

async fn bench(vm: &Vm, runs: usize) -> anyhow::Result<()> {
    let uds = vm.vsock_uds()?.to_path_buf();
    let mut c = connect(&uds, CONNECT_TIMEOUT).await?;

    let mut pings = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        c.ping(PingRequest {}).await.context("Ping")?;
        pings.push(ms(t.elapsed()));
    }
    let ping_min = pings.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "ping over vsock: median {:.1} ms, min {ping_min:.1} ms ({PINGS} calls)",
        median(&mut pings)
    );

    println!("container `true` (ms):  create    start  run+wait   delete");
    let mut lives = Vec::new();
    for run in 0..runs {
        let l = container_life(&mut c, &format!("life-{run}")).await?;
        println!(
            "  run {run}:              {:>7.1}  {:>7.1}  {:>8.1}  {:>7.1}",
            l.create, l.start, l.exit, l.delete
        );
        lives.push(l);
    }
    let col = |f: fn(&Life) -> f64| {
        let mut v: Vec<f64> = lives.iter().map(f).collect();
        median(&mut v)
    };
    println!(
        "  median:             {:>7.1}  {:>7.1}  {:>8.1}  {:>7.1}",
        col(|l| l.create),
        col(|l| l.start),
        col(|l| l.exit),
        col(|l| l.delete)
    );

    c.create_container(container("host", process(&["sleep", "100000"])))
        .await
        .context("CreateContainer host")?;
    let io = attach(&mut c, "host", "").await?;
    c.start_container(StartContainerRequest {
        container_id: "host".into(),
    })
    .await
    .context("StartContainer host")?;
    drop(io);
    let mut execs = Vec::new();
    for run in 0..runs {
        let t = exec_true(&mut c, "host", &format!("exec-{run}")).await?;
        println!("exec `true`: run {run} {t:.1} ms");
        execs.push(t);
    }
    println!("exec `true`: median {:.1} ms", median(&mut execs));
    delete(&mut c, "host").await
}

fn main() -> anyhow::Result<()> {
    let o = parse_options()?;
    let dir = tempfile::Builder::new()
        .prefix("podvisor-agent-bench-")
        .tempdir()
        .context("temporary directory")?;
    let img = dir.path().join("image.ext4");
    image::container_image(&dir.path().join("stage"), &img)?;
    let spec = VmSpec {
        vcpus: 1,
        mem_mib: 256,
        drives: vec![DriveSpec {
            path: img,
            read_only: true,
            id: IMAGE_SERIAL.into(),
        }],
        cmdline_extra: o
            .agent_log
            .as_deref()
            .map(|f| format!("PODVISOR_AGENT_LOG={f}"))
            .unwrap_or_default(),
        ..VmSpec::agent()
    };
    let mut vm = Vm::boot(&spec, None)?;
    if let Err(e) = vm.wait_for_console(AGENT_READY, BOOT_TIMEOUT) {
        bail!("the agent did not come up: {e:#}\n{}", vm.console());
    }
    println!(
        "agent ready {:.1} s after spawn",
        vm.started().elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&vm, o.runs));
    if o.agent_log.is_some() || result.is_err() {
        println!("--- guest console ---\n{}", vm.console());
    }
    vm.kill();
    result
}
