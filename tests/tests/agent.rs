//! The guest agent end to end (GitHub issue 3): one real microVM booting the guest root image
//! (`build/guest/rootfs.ext4`, init = the static agent, refreshed with `make rootfs`), reached
//! through the VMM's hybrid vsock socket with `podvisor_proto::hybrid::agent_client`.
//!
//! A busybox container image (ext4, built on the host with `mkfs.ext4 -d`) is attached
//! read-only as drive `img0`; the agent finds it by that virtio serial. Every check runs in
//! the same VM (a boot costs tens of seconds on a kvm_pvm host), prints its result and is
//! collected; the test fails at the end if any failed, with the guest console.
//!
//! Run: `cargo test -p podvisor-tests --test agent -- --nocapture`
//! (`PODVISOR_AGENT_CHECKS=1,5` runs only those checks in the VM).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use podvisor_proto::v1::{
    CopyFileRequest, CreateContainerRequest, ExecProcessRequest, HostEntry, LinuxResources,
    ListProcessesRequest, Mount, PingRequest, Process, SetupSandboxRequest, ShutdownRequest,
    StartContainerRequest, StatsRequest,
};
use podvisor_tests::agent::{
    Client, IMAGE_SERIAL, connect, container, delete, drain, exec, exec_ok, process, read_until,
    run, sh, signal, start, wait, wait_req,
};
use podvisor_tests::vm::AGENT_READY;
use podvisor_tests::{DriveSpec, Vm, VmSpec, image};
use tonic::Code;

/// From spawn to the agent's ready line (override: `PODVISOR_TEST_BOOT_TIMEOUT=<seconds>`).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// One check, all its RPCs included: every guest system call and page fault is emulated; a
/// container's create + start takes about 10 s on an idle kvm_pvm host, much more on a loaded one.
const CHECK_TIMEOUT: Duration = Duration::from_secs(900);
/// How often the OOM check prints the container's memory while it waits.
const OOM_REPORT_EVERY: Duration = Duration::from_secs(30);
/// From the agent's ready line to its first answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// From Shutdown to the VMM's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// One vCPU, as pods get by default: on kvm_pvm (the CI host) a guest process that migrates
/// between vCPUs of a busy host can lose writes to its memory (README, "This machine's KVM").
const VCPUS: u8 = 1;
const MEM_MIB: u64 = 256;
const SANDBOX_ID: &str = "agent-e2e";
const HOSTNAME: &str = "agent-e2e-pod";
const RESOLV_CONF: &str = "nameserver 10.0.2.3\nsearch example.test\n";
/// The memory limit of the OOM check.
const OOM_LIMIT: i64 = 16 << 20;

fn boot_timeout() -> Duration {
    std::env::var("PODVISOR_TEST_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(BOOT_TIMEOUT, Duration::from_secs)
}

/// Non-fatal checks: all run and are reported, the test fails at the end if any did.
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    /// Runs one check with a deadline and records its outcome.
    async fn run<F>(&mut self, what: &str, check: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>>,
    {
        let started = Instant::now();
        let result = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("no result within {CHECK_TIMEOUT:?}")),
        };
        let took = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => println!("[agent] ok   {what} ({took:.1} s)"),
            Err(e) => {
                println!("[agent] FAIL {what} ({took:.1} s): {e:#}");
                self.failures.push(format!("{what}: {e:#}"));
            }
        }
    }
}

/// Asserts an RPC failed with `code` and a message.
fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
) -> anyhow::Result<()> {
    match r {
        Ok(v) => bail!("{what}: succeeded ({v:?}), expected {code:?}"),
        Err(s) if s.code() == code && !s.message().is_empty() => {
            println!("[agent]      {what}: {:?} {:?}", s.code(), s.message());
            Ok(())
        }
        Err(s) => bail!(
            "{what}: got {:?} {:?}, expected {code:?} with a message",
            s.code(),
            s.message()
        ),
    }
}

// ---- checks -----------------------------------------------------------------------------------

/// 1. stdout and stderr arrive apart; the exit code is reported.
async fn check_io(mut c: Client) -> anyhow::Result<()> {
    let (out, exit) = run(
        &mut c,
        container("io", sh("echo out; echo err >&2; exit 3")),
    )
    .await?;
    ensure!(
        out.stdout == b"out\n" && out.stderr == b"err\n",
        "stdout {:?} (want \"out\\n\"), stderr {:?} (want \"err\\n\")",
        out.stdout(),
        out.stderr()
    );
    ensure!(
        exit.exit_code == 3 && exit.signal == 0 && !exit.oom_killed,
        "exit {exit:?}, want code 3"
    );
    ensure!(
        exit.finished_at_unix_nanos >= exit.started_at_unix_nanos && exit.started_at_unix_nanos > 0,
        "timestamps {exit:?}"
    );
    delete(&mut c, "io").await
}

/// 2a. A plain process stops on SIGTERM.
async fn check_sigterm(mut c: Client) -> anyhow::Result<()> {
    let (_, io) = start(&mut c, container("term", process(&["sleep", "1000"]))).await?;
    drop(io);
    signal(&mut c, "term", 15).await?;
    let exit = wait(&mut c, "term").await?;
    ensure!(
        exit.signal == 15 && exit.exit_code == 143,
        "after SIGTERM: {exit:?}, want signal 15 / exit 143"
    );
    delete(&mut c, "term").await
}

/// 2b + 3. A process ignoring SIGTERM survives it (proven by an exec and ListProcesses) and dies
/// on SIGKILL; execs with and without a terminal run in it meanwhile.
async fn check_trap_and_exec(mut c: Client, checks: &mut Checks) -> anyhow::Result<()> {
    let (pid, io) = start(
        &mut c,
        container(
            "trap",
            // A long sleep keeps the guest idle meanwhile (a `sleep 1` loop forks every second,
            // which costs most of a vCPU here); its output goes elsewhere so that the
            // container's output ends when the shell dies.
            sh("trap '' TERM; echo ready; while :; do sleep 1000 >/dev/null 2>&1; done"),
        ),
    )
    .await?;
    // The trap is set once "ready" was printed.
    let (io, _) = read_until(io, "ready").await?;
    drop(io);

    let c2 = c.clone();
    checks
        .run("3a exec without a tty: cat /etc/hostname", async move {
            let mut c = c2;
            let out = exec_ok(
                &mut c,
                "trap",
                "hostname",
                process(&["cat", "/etc/hostname"]),
            )
            .await?;
            ensure!(
                out.trim_end() == HOSTNAME,
                "/etc/hostname is {out:?}, want {HOSTNAME:?}"
            );
            Ok(())
        })
        .await;
    let c2 = c.clone();
    checks
        .run("3b exec with a tty (terminal: true)", async move {
            let mut c = c2;
            let p = Process {
                terminal: true,
                ..sh("test -t 0 && echo isatty; tty")
            };
            let (out, exit) = exec(&mut c, "trap", "tty", p).await?;
            let text = out.stdout();
            ensure!(
                text.contains("isatty") && text.contains("/dev/pts/"),
                "output {text:?} (stderr {:?}), want isatty and /dev/pts/N",
                out.stderr()
            );
            ensure!(exit.exit_code == 0, "exit {exit:?}");
            Ok(())
        })
        .await;

    let c2 = c.clone();
    checks
        .run(
            "2b SIGTERM is ignored by a process trapping it",
            async move {
                let mut c = c2;
                signal(&mut c, "trap", 15).await?;
                // Still there: an exec needs the container's init alive (the agent refuses an
                // exec into an exited container and joins the namespaces of its init's pid).
                let out = exec_ok(&mut c, "trap", "alive", process(&["echo", "alive"])).await?;
                ensure!(out == "alive\n", "exec after SIGTERM printed {out:?}");
                let procs = c
                    .list_processes(ListProcessesRequest {
                        container_id: "trap".into(),
                    })
                    .await
                    .context("ListProcesses")?
                    .into_inner()
                    .processes;
                ensure!(
                    procs.iter().any(|p| p.pid == pid),
                    "init pid {pid} missing after SIGTERM from {procs:?}"
                );
                Ok(())
            },
        )
        .await;

    signal(&mut c, "trap", 9).await?;
    let exit = wait(&mut c, "trap").await?;
    ensure!(
        exit.signal == 9 && exit.exit_code == 137,
        "after SIGKILL: {exit:?}, want signal 9 / exit 137"
    );
    delete(&mut c, "trap").await
}

/// 4. Containers of the pod share the network namespace, not their root file systems.
async fn check_namespaces(mut c: Client) -> anyhow::Result<()> {
    for id in ["ns-a", "ns-b"] {
        let (_, io) = start(&mut c, container(id, process(&["sleep", "1000"]))).await?;
        drop(io);
    }
    let a = exec_ok(
        &mut c,
        "ns-a",
        "write",
        sh("echo a-was-here > /marker-a && cat /marker-a && readlink /proc/self/ns/net"),
    )
    .await?;
    let b = exec_ok(
        &mut c,
        "ns-b",
        "look",
        sh(
            "if [ -e /marker-a ]; then echo present; else echo absent; fi; \
            readlink /proc/self/ns/net",
        ),
    )
    .await?;
    let net = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("net:["))
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no net:[...] line in {s:?}"))
    };
    let (na, nb) = (net(&a)?, net(&b)?);
    ensure!(na == nb, "network namespaces differ: {na} vs {nb}");
    ensure!(
        a.starts_with("a-was-here\n"),
        "ns-a did not write its file: {a:?}"
    );
    ensure!(
        b.starts_with("absent\n"),
        "a file written in ns-a's rootfs is visible in ns-b: {b:?}"
    );
    println!("[agent]      both in {na}; /marker-a only in ns-a");
    delete(&mut c, "ns-a").await?;
    delete(&mut c, "ns-b").await
}

/// 5. A container over its memory limit is OOM-killed and WaitProcess says so.
async fn check_oom(mut c: Client) -> anyhow::Result<()> {
    let req = CreateContainerRequest {
        resources: Some(LinuxResources {
            memory_limit_bytes: OOM_LIMIT,
            ..Default::default()
        }),
        // dd allocates one 32 MiB buffer and fills it with a single read of /dev/zero: the
        // pages are touched as fast as the (emulated) guest kernel can fault them in, with no
        // user-space copying. It runs from a copy on the overlay's upper layer (a tmpfs): text
        // pages read from the image's ext4 could be reclaimed and read again, which kept the
        // cgroup thrashing at its limit for minutes under emulation; tmpfs pages cannot be
        // reclaimed (no swap), so the kernel runs out of reclaimable memory and kills.
        ..container(
            "oom",
            sh("cp /bin/busybox /tmp/busybox && \
                exec /tmp/busybox dd if=/dev/zero of=/dev/null bs=32M count=1"),
        )
    };
    let (_, io) = start(&mut c, req).await?;
    // While waiting, show how far the container got (the kernel's reclaim before the OOM kill
    // is slow under emulation).
    let mut wait_c = c.clone();
    let waiter = tokio::spawn(async move {
        let out = drain(io).await?;
        let exit = wait(&mut wait_c, "oom").await?;
        anyhow::Ok((out, exit))
    });
    tokio::pin!(waiter);
    let (out, exit) = loop {
        tokio::select! {
            r = &mut waiter => break r.context("OOM wait task")??,
            () = tokio::time::sleep(OOM_REPORT_EVERY) => {
                if let Ok(r) = c.stats(StatsRequest { container_ids: vec!["oom".into()] }).await
                    && let Some(s) = r.into_inner().containers.first().and_then(|s| s.stats)
                {
                    println!(
                        "[agent]      oom container: memory {} B, oom_kills {}, cpu {} us",
                        s.memory_usage_bytes, s.oom_kills, s.cpu_usage_usec
                    );
                }
            }
        }
    };
    ensure!(
        exit.oom_killed && exit.signal == 9,
        "exit {exit:?} (stderr {:?}), want oom_killed and signal 9",
        out.stderr()
    );
    delete(&mut c, "oom").await
}

/// 6. Stats of a running container and of the sandbox.
async fn check_stats(mut c: Client) -> anyhow::Result<()> {
    // Some CPU work first, then idle.
    let (_, io) = start(
        &mut c,
        container(
            "stats",
            sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo busy; exec sleep 1000"),
        ),
    )
    .await?;
    let (io, _) = read_until(io, "busy").await?;
    drop(io);
    let r = c
        .stats(StatsRequest {
            container_ids: vec!["stats".into()],
        })
        .await
        .context("Stats")?
        .into_inner();
    let vm_mem = MEM_MIB << 20;
    let cs = r
        .containers
        .iter()
        .find(|s| s.container_id == "stats")
        .and_then(|s| s.stats)
        .ok_or_else(|| anyhow!("no stats for the container in {r:?}"))?;
    let sb = r
        .sandbox
        .ok_or_else(|| anyhow!("no sandbox stats in {r:?}"))?;
    for (what, s) in [("container", cs), ("sandbox", sb)] {
        println!(
            "[agent]      {what}: cpu {} us, memory {} B, pids {}",
            s.cpu_usage_usec, s.memory_usage_bytes, s.pids_current
        );
        ensure!(s.cpu_usage_usec > 0, "{what} cpu usage 0: {s:?}");
        ensure!(
            s.memory_usage_bytes > 0 && s.memory_usage_bytes < vm_mem,
            "{what} memory {} not in (0, {vm_mem}): {s:?}",
            s.memory_usage_bytes
        );
        ensure!(s.pids_current >= 1, "{what} pids 0: {s:?}");
    }
    ensure!(
        sb.memory_usage_bytes >= cs.memory_usage_bytes && sb.pids_current >= cs.pids_current,
        "sandbox {sb:?} smaller than its container {cs:?}"
    );
    delete(&mut c, "stats").await
}

/// 7. Bad input gets the documented code and a message; the agent keeps serving.
async fn check_errors(mut c: Client) -> anyhow::Result<()> {
    let mut errs = Vec::new();
    let mut note = |r: anyhow::Result<()>| {
        if let Err(e) = r {
            errs.push(format!("{e:#}"));
        }
    };
    note(expect_code(
        "StartContainer of an unknown id",
        c.start_container(StartContainerRequest {
            container_id: "no-such".into(),
        })
        .await,
        Code::NotFound,
    ));
    note(expect_code(
        "WaitProcess of an unknown id",
        c.wait_process(wait_req("no-such", "")).await,
        Code::NotFound,
    ));
    note(expect_code(
        "ExecProcess in an unknown id",
        c.exec_process(ExecProcessRequest {
            container_id: "no-such".into(),
            exec_id: "x".into(),
            process: Some(process(&["true"])),
        })
        .await,
        Code::NotFound,
    ));
    note(expect_code(
        "CreateContainer with empty args",
        c.create_container(container("bad-args", process(&[])))
            .await,
        Code::InvalidArgument,
    ));
    note(expect_code(
        "CreateContainer with a mount destination escaping with ..",
        c.create_container(CreateContainerRequest {
            mounts: vec![Mount {
                source: "tmpfs".into(),
                destination: "/data/../../etc".into(),
                r#type: "tmpfs".into(),
                ..Default::default()
            }],
            ..container("bad-mount", process(&["true"]))
        })
        .await,
        Code::InvalidArgument,
    ));
    // proto/agent.proto: CopyFile never leaves its root; `..` is a malformed path
    // (INVALID_ARGUMENT, as guest-agent/src/files.rs's unit test asserts).
    note(expect_code(
        "CopyFile escaping its root with ..",
        c.copy_file(CopyFileRequest {
            path: "/run/podvisor/sandbox/../../../etc/podvisor-escape".into(),
            mode: 0o644,
            contents: b"x".to_vec(),
            create_parents: true,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    ));
    // A duplicate id: the first one is created (not started), the second refused.
    match c
        .create_container(container("dup", process(&["sleep", "1000"])))
        .await
    {
        Ok(_) => {
            note(expect_code(
                "CreateContainer with an existing id",
                c.create_container(container("dup", process(&["sleep", "1000"])))
                    .await,
                Code::AlreadyExists,
            ));
            note(delete(&mut c, "dup").await);
        }
        Err(s) => note(Err(anyhow!("first CreateContainer dup: {s:?}"))),
    }
    // Still serving.
    note(
        c.ping(PingRequest {})
            .await
            .map(|_| ())
            .context("Ping after the bad requests"),
    );
    let good = run(&mut c, container("good", process(&["echo", "still-good"]))).await;
    note(match good {
        Ok((out, exit)) if out.stdout == b"still-good\n" && exit.exit_code == 0 => {
            delete(&mut c, "good").await
        }
        Ok((out, exit)) => Err(anyhow!(
            "good container after bad requests: {exit:?} stdout {:?} stderr {:?}",
            out.stdout(),
            out.stderr()
        )),
        Err(e) => Err(e.context("good container after bad requests")),
    });
    ensure!(errs.is_empty(), "{}", errs.join("; "));
    Ok(())
}

// ---- the test ---------------------------------------------------------------------------------

/// Whether check `n` runs: all by default, or those listed in `PODVISOR_AGENT_CHECKS`
/// (e.g. `5` or `1,4,7`; 2b/3 run with 2).
fn wanted(n: &str) -> bool {
    match std::env::var("PODVISOR_AGENT_CHECKS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|x| x.trim() == n),
        _ => true,
    }
}

async fn drive(vm_uds: &Path, checks: &mut Checks) -> anyhow::Result<()> {
    let mut c = connect(vm_uds, CONNECT_TIMEOUT).await?;
    c.setup_sandbox(SetupSandboxRequest {
        sandbox_id: SANDBOX_ID.into(),
        hostname: HOSTNAME.into(),
        resolv_conf: RESOLV_CONF.into(),
        hosts: vec![HostEntry {
            ip: "10.0.2.15".into(),
            hostnames: vec!["db".into(), "db.example.test".into()],
        }],
        sysctls: Default::default(),
        random_seed: Vec::new(),
        time_unix_nanos: 0,
    })
    .await
    .context("SetupSandbox")?;
    println!("[agent] ok   SetupSandbox");

    if wanted("1") {
        checks
            .run("1 stdout/stderr apart and exit code 3", check_io(c.clone()))
            .await;
    }
    if wanted("2") {
        checks
            .run("2a SIGTERM stops sleep 1000", check_sigterm(c.clone()))
            .await;
        // Runs 2b and 3 as nested checks.
        let mut nested = Checks {
            failures: Vec::new(),
        };
        checks
            .run(
                "2c a SIGTERM-ignoring container dies on SIGKILL",
                check_trap_and_exec(c.clone(), &mut nested),
            )
            .await;
        checks.failures.append(&mut nested.failures);
    }
    if wanted("4") {
        checks
            .run(
                "4 shared network namespace, separate rootfs",
                check_namespaces(c.clone()),
            )
            .await;
    }
    if wanted("6") {
        checks
            .run(
                "6 stats of a container and the sandbox",
                check_stats(c.clone()),
            )
            .await;
    }
    if wanted("7") {
        checks
            .run(
                "7 bad input: gRPC codes, agent keeps serving",
                check_errors(c.clone()),
            )
            .await;
    }
    // Last: the OOM kill takes minutes under emulation.
    if wanted("5") {
        checks
            .run("5 OOM kill under a 16 MiB limit", check_oom(c.clone()))
            .await;
    }

    // The reply may race the power-off; the VMM's exit status is what counts.
    match tokio::time::timeout(CHECK_TIMEOUT, c.shutdown(ShutdownRequest {})).await {
        Ok(Ok(_)) => println!("[agent] ok   Shutdown answered"),
        Ok(Err(s)) => println!("[agent] Shutdown: {s:?} (checking the VMM's exit)"),
        Err(_) => println!("[agent] Shutdown: no answer (checking the VMM's exit)"),
    }
    Ok(())
}

// One microVM for every check (a boot costs about a minute on a kvm_pvm host); part of
// `make test`, about 5 minutes there.
#[test]
fn agent_runs_containers_in_a_microvm() {
    let _slot = podvisor_tests::vm::boot_slot();
    let dir = tempfile::Builder::new()
        .prefix("podvisor-agent-test-")
        .tempdir()
        .expect("create a temporary directory");
    let img = dir.path().join("image.ext4");
    image::container_image(&dir.path().join("stage"), &img).expect("build the container image");

    let spec = VmSpec {
        vcpus: VCPUS,
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
        "[agent] agent ready {:.1} s after spawn",
        vm.started().elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut checks = Checks {
        failures: Vec::new(),
    };
    let uds = vm.vsock_uds().expect("vsock socket").to_path_buf();
    let fatal = rt.block_on(drive(&uds, &mut checks));
    if let Err(e) = fatal {
        println!("[agent] FAIL stopped early: {e:#}");
        checks.failures.push(format!("stopped early: {e:#}"));
    } else {
        match vm.wait_exit(EXIT_TIMEOUT) {
            Ok(s) if s.success() => println!("[agent] ok   the VMM exited 0 after Shutdown"),
            Ok(s) => checks
                .failures
                .push(format!("the VMM exited with {s} after Shutdown")),
            Err(e) => checks
                .failures
                .push(format!("the VMM did not exit after Shutdown: {e:#}")),
        }
    }
    drop(rt);
    if !checks.failures.is_empty() {
        println!(
            "--- guest console ---\n{}\n--- VMM stderr ---\n{}",
            vm.console(),
            vm.stderr()
        );
    }
    vm.kill();
    assert!(
        checks.failures.is_empty(),
        "agent checks failed:\n- {}",
        checks.failures.join("\n- ")
    );
}
