//! podvisor-vmm end to end: real microVMs on /dev/kvm (root needed).
//!
//! Boots are expensive on a kvm_pvm host (tens of seconds each), so one
//! main VM carries most checks in sequence, driven by `PROBE:` markers its
//! guest script (tests/guest/main.sh) prints; a second VM checks the panic
//! path; the rest are negative tests that never boot.
//!
//! Run: `cargo test -p podvisor-tests --test vmm -- --nocapture --test-threads=2`

// An end-to-end scenario reads top to bottom, step after step; the length limit is for
// the product code.
#![allow(clippy::too_many_lines)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use podvisor_tests::netns::NetNs;
use podvisor_tests::sha256_hex;
use podvisor_tests::vm::host_vsock_echo;
use podvisor_tests::{DriveSpec, Pattern, Vm, VmSpec, artifacts, paths};

/// From spawn to the guest's init marker: generous, as a loaded kvm_pvm host
/// can take minutes (override with `PODVISOR_TEST_BOOT_TIMEOUT=<seconds>`).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// From one marker to the next (guest steps include 180 s guest-side timeouts).
const STEP_TIMEOUT: Duration = Duration::from_secs(240);
/// From power-off or panic to the VMM's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

const DATA_SIZE: usize = 4 << 20;
/// Where main.sh writes its pattern on /dev/vdb (sector 2056).
const PATTERN_OFFSET: usize = 2056 * 512;
const SWAP_OLD_SIZE: usize = 64 << 10;
const SWAP_NEW_SIZE: usize = 192 << 10;
const TAP: &str = "pvtap0";

fn boot_timeout() -> Duration {
    std::env::var("PODVISOR_TEST_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(BOOT_TIMEOUT, Duration::from_secs)
}

/// The 512 bytes main.sh writes: `yes podvisor-pattern- | head -c 512`.
fn guest_pattern() -> Vec<u8> {
    b"podvisor-pattern-\n"
        .iter()
        .copied()
        .cycle()
        .take(512)
        .collect()
}

/// A swap image: a 16-byte ASCII head, then filler.
fn swap_image(head: &str, fill: u8, size: usize) -> Vec<u8> {
    let mut v = vec![fill; size];
    v[..head.len()].copy_from_slice(head.as_bytes());
    v
}

/// The value after `key=` in a marker line, up to the next space.
fn field<'a>(line: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let pat = format!("{key}=");
    let start = line
        .find(&pat)
        .ok_or_else(|| anyhow!("no {key}= in {line:?}"))?
        + pat.len();
    Ok(line[start..].split(' ').next().unwrap_or_default())
}

/// Non-fatal checks of one test: all are run and reported, then the test
/// fails if any did.
struct Checks {
    test: &'static str,
    failures: Vec<String>,
}

impl Checks {
    fn new(test: &'static str) -> Self {
        Self {
            test,
            failures: Vec::new(),
        }
    }

    fn check(&mut self, what: &str, result: anyhow::Result<()>) {
        match result {
            Ok(()) => println!("[{}] ok   {what}", self.test),
            Err(e) => {
                println!("[{}] FAIL {what}: {e:#}", self.test);
                self.failures.push(format!("{what}: {e:#}"));
            }
        }
    }

    fn finish(self, fatal: anyhow::Result<()>) {
        let mut failures = self.failures;
        if let Err(e) = fatal {
            failures.push(format!("stopped early: {e:#}"));
        }
        assert!(
            failures.is_empty(),
            "{} failed:\n- {}",
            self.test,
            failures.join("\n- ")
        );
    }
}

/// The host end of guest → host vsock: listens on `<uds>_<port>`, takes one
/// connection, reads one line (or to EOF), echoes it and returns it.
fn host_vsock_listener(
    path: PathBuf,
    deadline: Instant,
) -> anyhow::Result<JoinHandle<anyhow::Result<String>>> {
    let listener = UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let (mut conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("no guest connection on {} in time", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&conn)
            .read_line(&mut line)
            .context("read the guest's message")?;
        conn.write_all(line.as_bytes())
            .context("echo to the guest")?;
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(line.trim_end().to_string())
    }))
}

#[test]
fn main_vm_devices_vsock_net_drive_swap_poweroff() {
    let _slot = podvisor_tests::vm::boot_slot();
    let mut checks = Checks::new("main_vm");
    let mut console = Vec::new();
    let fatal = main_vm(&mut checks, &mut console);
    if !checks.failures.is_empty() || fatal.is_err() {
        println!("[main_vm] --- guest console ---\n{}", console.join("\n"));
    }
    checks.finish(fatal);
}

fn main_vm(checks: &mut Checks, console: &mut Vec<String>) -> anyhow::Result<()> {
    // The namespace is declared first so it is dropped last, after the VMM is killed.
    let ns = NetNs::create()?;
    ns.add_tap(TAP, "10.213.0.1/24")?;
    let files = tempfile::Builder::new()
        .prefix("podvisor-main-vm-")
        .tempdir()?;
    let data_path = files.path().join("data.img");
    let mut data = vec![0u8; DATA_SIZE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut data))
        .context("read random bytes")?;
    std::fs::write(&data_path, &data)?;
    let swap_old = files.path().join("swap-old.img");
    let swap_new = files.path().join("swap-new.img");
    std::fs::write(
        &swap_old,
        swap_image("swap-old-content", b'o', SWAP_OLD_SIZE),
    )?;

    let spec = VmSpec {
        vcpus: 2,
        mem_mib: 256,
        drives: vec![
            DriveSpec {
                path: data_path.clone(),
                read_only: false,
                id: "data".into(),
            },
            DriveSpec {
                path: swap_old.clone(),
                read_only: false,
                id: "swap".into(),
            },
        ],
        net_tap: Some(TAP.into()),
        vsock_cid: Some(3),
        api: true,
        ..VmSpec::new("main")
    };
    let mut vm = Vm::boot(&spec, Some(&ns))?;
    let uds = vm.vsock_uds()?.to_path_buf();
    let mut uds_5001 = uds.clone().into_os_string();
    uds_5001.push("_5001");
    let listener = host_vsock_listener(
        PathBuf::from(uds_5001),
        Instant::now() + boot_timeout() + 4 * STEP_TIMEOUT,
    )?;

    let init = vm.wait_for_console("PROBE: init=started", boot_timeout())?;
    println!(
        "[main_vm] init after {:.1} s: {init}",
        vm.started().elapsed().as_secs_f64()
    );

    // (a) a static program from the image runs.
    let line = vm.wait_for_console("PROBE: probe=", STEP_TIMEOUT)?;
    let ran = line.contains("probe=ok")
        || vm
            .console_lines()
            .iter()
            .any(|l| l.starts_with("guest-probe: "));
    checks.check("(a) guest-probe (static) runs from the disk image", {
        ensure!(ran, "no output from guest-probe: {line:?}");
        Ok(())
    });
    checks.check(
        "(a) guest-probe exits 0",
        ensure_eq(field(&line, "probe")?, "ok", &line),
    );

    // (e) two vCPUs.
    let line = vm.wait_for_console("PROBE: nproc=", STEP_TIMEOUT)?;
    checks.check(
        "(e) nproc is 2",
        ensure_eq(field(&line, "nproc")?, "2", &line),
    );

    let line = vm.wait_for_console("PROBE: serials=", STEP_TIMEOUT)?;
    checks.check(
        "drive ids are the virtio serials",
        ensure_eq(field(&line, "serials")?, "root,data,swap", &line),
    );

    // (b) the data drive reads back exactly, and a guest write lands in the host file.
    let line = vm.wait_for_console("PROBE: vdb-sha256=", STEP_TIMEOUT)?;
    checks.check(
        "(b) sha256 of /dev/vdb equals the host file's",
        ensure_eq(field(&line, "vdb-sha256")?, &sha256_hex(&data), &line),
    );
    let line = vm.wait_for_console("PROBE: vdb-write=", STEP_TIMEOUT)?;
    println!("[main_vm] {line}");
    checks.check(
        "(b) guest write reaches the host file at the offset",
        (|| {
            ensure_eq(field(&line, "vdb-write")?, "done", &line)?;
            let after = std::fs::read(&data_path)?;
            ensure!(
                after.len() == DATA_SIZE,
                "host file is now {} bytes",
                after.len()
            );
            let got = &after[PATTERN_OFFSET..PATTERN_OFFSET + 512];
            ensure!(
                got == guest_pattern().as_slice(),
                "bytes at {PATTERN_OFFSET}: {:?}...",
                String::from_utf8_lossy(&got[..32])
            );
            let mut expected = data.clone();
            expected[PATTERN_OFFSET..PATTERN_OFFSET + 512].copy_from_slice(&guest_pattern());
            ensure!(
                after == expected,
                "bytes outside the written sector changed"
            );
            Ok(())
        })(),
    );

    // (c) vsock both ways.
    vm.wait_for_console("VSOCK-LISTENING 5000", STEP_TIMEOUT)?;
    checks.check(
        "(c) host -> guest vsock: CONNECT 5000, OK, echo",
        host_vsock_echo(&uds, 5000, "hello-from-host", STEP_TIMEOUT),
    );
    let line = vm.wait_for_console("PROBE: vsock-server=done", STEP_TIMEOUT)?;
    checks.check(
        "(c) guest echo server ended cleanly",
        ensure_eq(field(&line, "rc")?, "0", &line),
    );
    let line = vm.wait_for_console("PROBE: vsock-client=done", STEP_TIMEOUT)?;
    let reply = vm
        .console_lines()
        .iter()
        .find(|l| l.starts_with("VSOCK-REPLY"))
        .cloned();
    checks.check(
        "(c) guest -> host vsock: guest got its echo",
        (|| {
            ensure_eq(field(&line, "rc")?, "0", &line)?;
            ensure!(
                reply.as_deref() == Some("VSOCK-REPLY hello-from-guest"),
                "guest printed {reply:?}"
            );
            Ok(())
        })(),
    );
    checks.check(
        "(c) guest -> host vsock: host listener got the bytes",
        (|| {
            let got = listener
                .join()
                .map_err(|_| anyhow!("listener thread panicked"))??;
            ensure_eq(&got, "hello-from-guest", "host listener")
        })(),
    );

    // (d) network, inside the namespace only.
    let line = vm.wait_for_console("PROBE: ping=", STEP_TIMEOUT)?;
    println!("[main_vm] {line}");
    checks.check(
        "(d) guest pings the TAP address",
        ensure_eq(field(&line, "ping")?, "ok", &line),
    );
    checks.check(
        "(d) TAP counters moved",
        (|| {
            let rx = ns.net_stat(TAP, "rx_packets")?;
            let tx = ns.net_stat(TAP, "tx_packets")?;
            println!("[main_vm] {TAP}: rx_packets={rx} tx_packets={tx}");
            ensure!(
                rx >= 3 && tx >= 3,
                "rx_packets={rx} tx_packets={tx}, expected >= 3 each"
            );
            Ok(())
        })(),
    );

    // (g) drive swap while the guest waits for it.
    let line = vm.wait_for_console("PROBE: swap-before", STEP_TIMEOUT)?;
    checks.check(
        "(g) swap drive before: size and head",
        (|| {
            ensure_eq(
                field(&line, "size")?,
                &(SWAP_OLD_SIZE / 512).to_string(),
                &line,
            )?;
            ensure_eq(field(&line, "head")?, "swap-old-content", &line)
        })(),
    );
    checks.check(
        "GET /vm: devices and counters",
        (|| {
            let info = vm.info()?;
            println!(
                "[main_vm] GET /vm: state={:?} vcpus={} mem_mib={} boot={:?}",
                info.state, info.vcpus, info.mem_mib, info.boot
            );
            for d in &info.devices {
                println!(
                    "[main_vm]   {} state={} counters={:?} transport={:?}",
                    d.name, d.state, d.counters, d.transport
                );
            }
            ensure!(
                info.devices.len() == 5,
                "{} devices, configured 5 (3 drives, net, vsock)",
                info.devices.len()
            );
            ensure!(
                info.vcpus == 2 && info.mem_mib == 256,
                "vcpus={} mem_mib={}",
                info.vcpus,
                info.mem_mib
            );
            let data = info
                .devices
                .iter()
                .find(|d| d.name.contains("data"))
                .ok_or_else(|| anyhow!("no device named like the data drive"))?;
            ensure!(data.counters.completed > 0, "data drive completed = 0");
            ensure!(
                info.boot.first_vcpu_entry_ms.is_some(),
                "boot.first_vcpu_entry_ms missing"
            );
            ensure!(
                info.boot.init_ms.is_some(),
                "boot.init_ms missing: the kernel writes the boot marker before init"
            );
            Ok(())
        })(),
    );
    std::fs::write(
        &swap_new,
        swap_image("swap-new-content", b'n', SWAP_NEW_SIZE),
    )?;
    let body = serde_json::json!({"path": swap_new, "read_only": false}).to_string();
    checks.check(
        "(g) PUT /drives/swap",
        vm.api("PUT", "/drives/swap", Some(&body)).map(drop),
    );
    let line = vm.wait_for_console("PROBE: swap-after", STEP_TIMEOUT)?;
    checks.check(
        "(g) swap drive after: new size and content",
        (|| {
            ensure_eq(
                field(&line, "size")?,
                &(SWAP_NEW_SIZE / 512).to_string(),
                &line,
            )?;
            ensure_eq(field(&line, "head")?, "swap-new-content", &line)
        })(),
    );

    *console = vm.console_lines().to_vec();

    // (f) power-off ends the VMM with 0.
    vm.wait_for_console("PROBE: main=done", STEP_TIMEOUT)?;
    let status = vm.wait_exit(EXIT_TIMEOUT)?;
    let report = vm.report();
    *console = vm.console_lines().to_vec();
    checks.check(
        "(f) poweroff -f: the VMM exits 0",
        (|| {
            ensure!(
                status.code() == Some(0),
                "VMM ended with {status}\n{report}"
            );
            Ok(())
        })(),
    );
    Ok(())
}

fn ensure_eq(got: &str, want: &str, context: &str) -> anyhow::Result<()> {
    ensure!(got == want, "got {got:?}, want {want:?} (in {context:?})");
    Ok(())
}

#[test]
fn panic_vm_exits_2() {
    let _slot = podvisor_tests::vm::boot_slot();
    let result = (|| -> anyhow::Result<()> {
        let mut vm = Vm::boot(&VmSpec::new("panic"), None)?;
        vm.wait_for_console("PROBE: panic=exiting-init", boot_timeout())?;
        vm.wait_for_console(
            Pattern::regex(r"Kernel panic.*Attempted to kill init"),
            EXIT_TIMEOUT,
        )?;
        let status = vm.wait_exit(EXIT_TIMEOUT)?;
        ensure!(
            status.code() == Some(2),
            "VMM ended with {status}, want exit code 2\n{}",
            vm.report()
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("panic_vm: {e:#}");
    }
}

/// Runs the VMM with `args`; it must exit 1 quickly, naming `needle` on stderr.
fn expect_vmm_error(args: &[&str], needle: &str) {
    let result = (|| -> anyhow::Result<()> {
        let vmm = artifacts::vmm_binary()?;
        let mut child = Command::new(&vmm)
            .args(args)
            .args(["--serial", "null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", vmm.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "podvisor-vmm {args:?} still ran after 60 s (expected a quick error); killed"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut stderr)?;
        }
        ensure!(
            status.code() == Some(1),
            "podvisor-vmm {args:?}: {status}, want exit 1; stderr: {stderr}"
        );
        ensure!(
            stderr.contains("podvisor-vmm: error:") && stderr.contains(needle),
            "podvisor-vmm {args:?}: stderr does not name {needle:?}: {stderr}"
        );
        println!("podvisor-vmm {args:?} -> {}", stderr.trim());
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// A kernel file for tests that fail before loading it.
fn some_kernel() -> String {
    paths::guest_kernel()
        .or_else(|_| artifacts::vmm_binary())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| panic!("no file to pass as --kernel: {e:#}"))
}

#[test]
fn missing_kernel_exits_1() {
    expect_vmm_error(
        &["--kernel", "/nonexistent/pvtest-vmlinux"],
        "/nonexistent/pvtest-vmlinux",
    );
}

#[test]
fn zero_memory_exits_1() {
    let k = some_kernel();
    expect_vmm_error(&["--kernel", &k, "--mem-mib", "0"], "mem-mib 0");
}

#[test]
fn zero_vcpus_exits_1() {
    let k = some_kernel();
    expect_vmm_error(&["--kernel", &k, "--vcpus", "0"], "vcpus 0");
}

#[test]
fn bad_drive_spec_exits_1() {
    let k = some_kernel();
    expect_vmm_error(
        &["--kernel", &k, "--drive", "/tmp/pvtest.img,bogus"],
        "bogus",
    );
}

#[test]
fn missing_drive_file_exits_1() {
    let k = some_kernel();
    expect_vmm_error(
        &[
            "--kernel",
            &k,
            "--drive",
            "/nonexistent/pvtest-disk.img,id=d",
        ],
        "/nonexistent/pvtest-disk.img",
    );
}
