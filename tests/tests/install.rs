//! podvisor as a node gets it: `scripts/install.sh` (what `make install` runs) and the .deb.
//!
//! `installed_podvisor_runs_a_pod_and_the_deb_holds_the_same_files`, one VM boot (the
//! template) and one restored pod:
//!
//! 1. the install script lays the real files out under a staging DESTDIR (PREFIX=/usr): the
//!    binaries this test runs everywhere else (podvisord, podvisorctl, podvisor-vmm of this
//!    build's profile, debug symbols stripped as the release profile does, so that no release
//!    build is needed), the guest kernel and root image of `make guest`, the unit, the
//!    sysusers.d file, the config; exactly the files `install.sh list` names, with their
//!    modes; a second install keeps a changed config;
//! 2. the unit's ExecStart and `--config` and the config's kernel and image are installed
//!    files, and the installed config is podvisord's defaults spelled out;
//! 3. `systemd-analyze verify --root` passes on the installed unit (and fails once the
//!    installed podvisord is gone: it checks ExecStart under the root);
//! 4. the INSTALLED podvisord, from the installed config with only what must differ for a
//!    test substituted (see [`test_config`]), tells systemd READY=1 through NOTIFY_SOCKET,
//!    runs a pod with one container through CRI with the installed VMM, kernel and image,
//!    removes it, and says STOPPING=1 on SIGTERM;
//! 5. cargo-deb (scripts/cargo-deb.sh; installed into /var/cache/podvisor/tools the first
//!    time) packages the same binaries with `--no-build`; `dpkg --contents` lists exactly the
//!    installed files, each with the same bytes and mode; `dpkg --root` installs it into a
//!    scratch root (maintainer scripts included) and purges it again;
//! 6. `install.sh uninstall` removes every file but a changed config.

// An end-to-end scenario reads top to bottom, step after step; the length limit is for the
// product code.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_runtime::config::Config;
use podvisor_tests::cri::{
    Daemon, Launch, connect, delete_link, pull_image, shell_container, vmm_processes_under,
    write_bridge_conflist,
};
use podvisor_tests::{artifacts, cri as cri_helpers, paths, registry};

const TAG: &str = "install";
const BRIDGE: &str = "pvinst0";
const SUBNET: &str = "10.88.220.0/24";
/// The binaries `make install` and the package hold.
const BINARIES: [&str; 3] = ["podvisord", "podvisorctl", "podvisor-vmm"];
/// How long a container may take to write its line (the pod waits for the template VM).
const LOG_DEADLINE: Duration = Duration::from_secs(300);

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The install script with PREFIX=/usr, DESTDIR `dest` and the binaries of `bin_dir`.
fn install_sh(action: &str, dest: &Path, bin_dir: &Path) -> Command {
    let mut cmd = Command::new(paths::workspace_root().join("scripts/install.sh"));
    cmd.arg(action)
        .env("PREFIX", "/usr")
        .env("DESTDIR", dest)
        .env("BIN_DIR", bin_dir)
        .env_remove("KERNEL")
        .env_remove("ROOTFS");
    cmd
}

/// Every file (and symlink) under `root`, by its path from `root` (`/usr/bin/podvisord`),
/// with its mode bits.
fn files_under(root: &Path) -> anyhow::Result<BTreeMap<String, u32>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                walk(root, &entry.path(), out)?;
            } else {
                let rel = entry.path().strip_prefix(root)?.display().to_string();
                out.insert(format!("/{rel}"), meta.permissions().mode() & 0o7777);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    Ok(read(a)? == read(b)?)
}

/// The build's binaries with their debug sections stripped (as `[profile.release]` does),
/// in `<dir>/release/`: a target directory of its own for cargo-deb's `--no-build`, which
/// packages `target/release/*`.
fn stage_binaries(dir: &Path) -> anyhow::Result<PathBuf> {
    let sources = [
        cri_helpers::podvisord_binary()?,
        cri_helpers::runtime_binary("podvisorctl")?,
        artifacts::vmm_binary()?,
    ];
    let release = dir.join("release");
    std::fs::create_dir_all(&release)?;
    for (name, src) in BINARIES.iter().zip(&sources) {
        ensure!(
            src.file_name().is_some_and(|n| n == *name),
            "{} is not {name}",
            src.display()
        );
        run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(src)
                .arg(release.join(name)),
            &format!("objcopy --strip-debug {}", src.display()),
        )?;
    }
    Ok(release)
}

/// The installed config with what a test must change, and nothing else: the socket and the
/// directories (the node's own /run/podvisor and /var/lib/podvisor are not the test's), the
/// registry (the test's, plain HTTP on a free port), the CNI conf dir (the test's bridge
/// `pvinst0`), and the installed kernel and image (under DESTDIR rather than /). vmm_binary,
/// vmm_user, CNI plugins, the handler's size and its template stay as installed: the VMM is
/// the installed one next to podvisord.
fn test_config(
    installed: &str,
    dest: &Path,
    socket: &Path,
    root_dir: &Path,
    state_dir: &Path,
    registry_host: &str,
    conf_dir: &Path,
) -> anyhow::Result<String> {
    let subs: [(&str, String); 5] = [
        (
            "socket = ",
            format!("socket = {:?}", socket.display().to_string()),
        ),
        (
            "root_dir = ",
            format!("root_dir = {:?}", root_dir.display().to_string()),
        ),
        (
            "state_dir = ",
            format!("state_dir = {:?}", state_dir.display().to_string()),
        ),
        ("insecure = ", format!("insecure = [{registry_host:?}]")),
        (
            "conf_dir = ",
            format!("conf_dir = {:?}", conf_dir.display().to_string()),
        ),
    ];
    let mut lines: Vec<String> = installed.lines().map(str::to_string).collect();
    for (prefix, line) in subs {
        let hits: Vec<usize> = (0..lines.len())
            .filter(|i| lines[*i].starts_with(prefix))
            .collect();
        ensure!(
            hits.len() == 1,
            "the installed config has {} lines `{prefix}...`, not one",
            hits.len()
        );
        lines[hits[0]] = line;
    }
    let share = format!("{}/usr/share/podvisor/", dest.display());
    let text = lines
        .join("\n")
        .replace("\"/usr/share/podvisor/", &format!("\"{share}"));
    ensure!(
        text.matches(&share).count() == 2,
        "the installed config names the kernel and the image in /usr/share/podvisor:\n{text}"
    );
    Ok(text + "\n")
}

/// Waits for one datagram on the NOTIFY_SOCKET and returns it.
fn notification(socket: &UnixDatagram) -> anyhow::Result<String> {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .context("no notification from podvisord on NOTIFY_SOCKET")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Runs a pod with one container through CRI on `daemon`, checks its output and that its VMM
/// is `vmm`, and removes it; nothing of it is left running.
async fn run_one_pod(daemon: &Daemon, image: &str, vmm: &Path) -> anyhow::Result<()> {
    let channel = connect(&daemon.socket).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let logs = daemon.dir().join("logs");
    std::fs::create_dir_all(&logs)?;
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "installed".into(),
            uid: "uid-install".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        ..Default::default()
    };
    let image_ref = pull_image(&mut images, image, &pod).await?;
    let started = Instant::now();
    let sandbox = cri_helpers::run_pod_vm(&mut rt, &pod).await?.id;
    println!(
        "[{TAG}] pod {sandbox} ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let pids = vmm_processes_under(daemon.dir());
    ensure!(!pids.is_empty(), "no podvisor-vmm runs for the pod");
    for pid in &pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        ensure!(
            exe == vmm,
            "VMM {pid} runs {}, not the installed {}",
            exe.display(),
            vmm.display()
        );
    }
    let container = cri_helpers::run_container(
        &mut rt,
        &sandbox,
        &pod,
        cri::ContainerConfig {
            log_path: "hello.log".into(),
            ..shell_container("hello", &image_ref, "echo installed podvisor says hello")
        },
    )
    .await?;
    let log = logs.join("hello.log");
    let deadline = Instant::now() + LOG_DEADLINE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("stdout F installed podvisor says hello") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the container's line is not in {} after {LOG_DEADLINE:?}: {text:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rt.stop_container(cri::StopContainerRequest {
        container_id: container.clone(),
        timeout: 10,
    })
    .await
    .context("StopContainer")?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: container,
    })
    .await
    .context("RemoveContainer")?;
    cri_helpers::remove_pod(&mut rt, &sandbox).await?;
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    ensure!(
        pods.is_empty(),
        "pods left after RemovePodSandbox: {pods:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vmm_processes_under(&daemon.pod_dir(&sandbox)).is_empty() {
        ensure!(Instant::now() < deadline, "the pod's VMM still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The maintainer-script tools' view of `dest`: a root where dpkg can install (its
/// database, the host's package status so that Depends are met as on this host) and where
/// no service is ever started (policy-rc.d says 101).
fn scratch_root(root: &Path) -> anyhow::Result<()> {
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d))?;
    }
    std::fs::copy("/var/lib/dpkg/status", admin.join("status"))
        .context("copy the host's dpkg status")?;
    std::fs::write(admin.join("available"), "")?;
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::create_dir_all(policy.parent().unwrap_or(root))?;
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn dpkg_root(root: &Path) -> Command {
    let mut cmd = Command::new("dpkg");
    // Maintainer scripts run on the host with DPKG_ROOT set (the scratch root has no shell
    // to chroot into); cargo-deb's scripts honour it: systemd-sysusers --root,
    // deb-systemd-helper and deb-systemd-invoke (policy-rc.d of the root).
    cmd.arg(format!("--root={}", root.display()))
        .arg("--force-script-chrootless")
        .env_remove("DPKG_ROOT");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_podvisor_runs_a_pod_and_the_deb_holds_the_same_files() -> anyhow::Result<()> {
    paths::require_kvm()?;
    let work = tempfile::Builder::new()
        .prefix("pvinst")
        .tempdir_in("/tmp")?;
    let dest = work.path().join("dest");
    // The guest image `make install` takes: `make rootfs` brings it up to date.
    artifacts::agent_rootfs()?;
    let kernel = paths::guest_kernel()?;
    let bin_dir = stage_binaries(&work.path().join("target"))?;

    // 1. The install, and the files it lays out.
    let step = Instant::now();
    let rootfs = paths::agent_rootfs_path();
    // By content: another test's `make rootfs` touches an up-to-date image, and a rebuild
    // from the same agent is byte for byte the same image.
    let rootfs_id = |p: &Path| std::fs::read(p).map(|bytes| podvisor_tests::sha256_hex(&bytes));
    let rootfs_before = rootfs_id(&rootfs)?;
    run(
        &mut install_sh("install", &dest, &bin_dir),
        "install.sh install",
    )?;
    let listed = run(&mut install_sh("list", &dest, &bin_dir), "install.sh list")?;
    let mut listed: Vec<String> = String::from_utf8(listed.stdout)?
        .lines()
        .map(str::to_string)
        .collect();
    listed.sort();
    let installed = files_under(&dest)?;
    ensure!(
        installed.keys().cloned().collect::<Vec<_>>() == listed,
        "installed files {:?} are not those install.sh lists {listed:?}",
        installed.keys()
    );
    for (path, mode) in &installed {
        let want = if path.starts_with("/usr/bin/") {
            0o755
        } else {
            0o644
        };
        ensure!(*mode == want, "{path} has mode {mode:o}, not {want:o}");
    }
    for name in BINARIES {
        ensure!(
            same_bytes(&bin_dir.join(name), &dest.join("usr/bin").join(name))?,
            "/usr/bin/{name} is not the build's"
        );
    }
    ensure!(
        same_bytes(&kernel, &dest.join("usr/share/podvisor/vmlinux"))?,
        "the installed kernel is not build/guest/vmlinux"
    );
    let config_path = dest.join("etc/podvisor/config.toml");
    let shipped = std::fs::read_to_string(&config_path)?;
    std::fs::write(&config_path, format!("{shipped}# changed by the admin\n"))?;
    run(
        &mut install_sh("install", &dest, &bin_dir),
        "install.sh install (again)",
    )?;
    ensure!(
        std::fs::read_to_string(&config_path)?.ends_with("# changed by the admin\n"),
        "a second install overwrote the changed config"
    );
    std::fs::write(&config_path, &shipped)?;
    println!(
        "[{TAG}] install.sh laid out {} files in {:.1} s: {listed:?}",
        listed.len(),
        step.elapsed().as_secs_f64()
    );

    // 2. What the unit and the config name is what was installed.
    let unit_path = dest.join("usr/lib/systemd/system/podvisord.service");
    let unit = std::fs::read_to_string(&unit_path)?;
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("the unit has no ExecStart")?;
    ensure!(
        exec_start == "/usr/bin/podvisord --config /etc/podvisor/config.toml",
        "ExecStart={exec_start}"
    );
    for line in [
        "Type=notify",
        "KillMode=process",
        "Delegate=yes",
        "Restart=on-failure",
    ] {
        ensure!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let config = Config::parse(&shipped).context("the installed config does not parse")?;
    ensure!(
        config == Config::parse("")?,
        "the installed config is not podvisord's defaults spelled out: {config:?}"
    );
    let handler = config.handler("")?;
    for p in [&handler.kernel, &handler.image] {
        ensure!(
            listed.iter().any(|l| Path::new(l) == p),
            "the config names {}, which is not installed",
            p.display()
        );
    }
    ensure!(config.socket == Path::new("/run/podvisor/podvisord.sock"));

    // 3. systemd-analyze verify, under a root holding the install and systemd's own units
    // (the targets the unit is ordered against); it checks that ExecStart exists there.
    let verify_root = work.path().join("verify-root");
    run(
        Command::new("cp").arg("-al").arg(&dest).arg(&verify_root),
        "cp -al DESTDIR",
    )?;
    let host_units = Path::new("/usr/lib/systemd/system");
    let root_units = verify_root.join("usr/lib/systemd/system");
    run(
        Command::new("cp")
            .arg("-an")
            .arg(format!("{}/.", host_units.display()))
            .arg(&root_units),
        "copy systemd's units",
    )?;
    let verify = |what: &str| {
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", verify_root.display()))
            .arg(root_units.join("podvisord.service"))
            .output()
            .with_context(|| format!("run systemd-analyze verify ({what}; package systemd)"))
    };
    let out = verify("the install")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && !said.contains("podvisord"),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    println!(
        "[{TAG}] systemd-analyze verify --root: {} {said:?}",
        out.status
    );
    std::fs::remove_file(verify_root.join("usr/bin/podvisord"))?;
    let out = verify("without podvisord")?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("/usr/bin/podvisord"),
        "systemd-analyze verify passed without the installed podvisord: {said}"
    );

    // 4. The installed podvisord runs a pod.
    let registry = registry::Registry::start()?;
    let pushed = registry::push_busybox(&registry, "podvisor/busybox", TAG).await?;
    let image = registry.reference("podvisor/busybox", TAG);
    println!("[{TAG}] pushed {image} ({})", pushed.digest);
    let cni_dir = work.path().join("cni");
    write_bridge_conflist(&cni_dir, BRIDGE, BRIDGE, SUBNET)?;
    struct Bridge;
    impl Drop for Bridge {
        fn drop(&mut self) {
            delete_link(BRIDGE);
        }
    }
    let _bridge = Bridge;
    let notify_path = work.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;
    let installed_podvisord = dest.join("usr/bin/podvisord");
    let launch = Launch {
        binary: Some(installed_podvisord.clone()),
        env: vec![("NOTIFY_SOCKET".into(), notify_path.display().to_string())],
        // The installed VMM is a stripped copy: its templates are its own.
        shared_templates: false,
    };
    let mut config_text = String::new();
    let mut daemon = Daemon::start_with(launch, |socket, root_dir, state_dir| {
        match test_config(
            &shipped,
            &dest,
            socket,
            root_dir,
            state_dir,
            registry.host(),
            &cni_dir,
        ) {
            Ok(text) => {
                config_text = text.clone();
                text
            }
            // An invalid config makes podvisord exit, and start_with report it.
            Err(e) => format!("# {e:#}\ninvalid config\n"),
        }
    })?;
    println!("[{TAG}] installed podvisord serves with:\n{config_text}");
    let ready = notification(&notify)?;
    ensure!(
        ready.lines().any(|l| l == "READY=1"),
        "podvisord's first notification is not READY=1: {ready:?}"
    );
    println!("[{TAG}] NOTIFY_SOCKET got {ready:?}");
    let vmm = dest.join("usr/bin/podvisor-vmm");
    let result = run_one_pod(&daemon, &image, &vmm).await;
    if result.is_err() {
        println!("[{TAG}] podvisord's log:\n{}", daemon.log());
        println!("[{TAG}] the pods' logs:\n{}", daemon.pod_logs());
    }
    result?;
    let status = daemon.stop()?;
    ensure!(status.success(), "podvisord exited {status} on SIGTERM");
    let stopping = notification(&notify)?;
    ensure!(stopping.contains("STOPPING=1"), "{stopping:?}");
    drop(daemon);

    // 5. The package: the same files, byte for byte; dpkg installs and purges it.
    let step = Instant::now();
    let cargo_deb = run(
        &mut Command::new(paths::workspace_root().join("scripts/cargo-deb.sh")),
        "scripts/cargo-deb.sh",
    )?;
    let cargo_deb = PathBuf::from(String::from_utf8(cargo_deb.stdout)?.trim());
    let deb_dir = work.path().join("deb");
    run(
        Command::new(&cargo_deb)
            .current_dir(paths::workspace_root())
            // The staged binaries are its target/release (`--no-build`: nothing is compiled).
            .env("CARGO_TARGET_DIR", work.path().join("target"))
            .args([
                "-p",
                "podvisor-runtime",
                "--no-build",
                "--no-strip",
                "--fast",
                "-o",
            ])
            .arg(format!("{}/", deb_dir.display())),
        "cargo-deb",
    )?;
    ensure!(
        rootfs_id(&rootfs)? == rootfs_before,
        "build/guest/rootfs.ext4 changed while this test ran (another test's `make rootfs` \
         from another agent): the install and the package hold different images"
    );
    let deb = std::fs::read_dir(&deb_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo-deb wrote no .deb")?;
    println!(
        "[{TAG}] {} built in {:.1} s",
        deb.display(),
        step.elapsed().as_secs_f64()
    );
    let contents = run(
        Command::new("dpkg").arg("--contents").arg(&deb),
        "dpkg --contents",
    )?;
    let contents = String::from_utf8(contents.stdout)?;
    println!("[{TAG}] dpkg --contents:\n{contents}");
    let mut packaged: Vec<String> = contents
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    packaged.sort();
    ensure!(
        packaged == listed,
        "the package holds {packaged:?}, the install {listed:?}"
    );
    let unpacked = work.path().join("unpacked");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "dpkg-deb -x",
    )?;
    ensure!(files_under(&unpacked)? == installed, "modes differ");
    for path in &listed {
        let rel = path.trim_start_matches('/');
        ensure!(
            same_bytes(&unpacked.join(rel), &dest.join(rel))?,
            "{path} differs between the package and the install"
        );
    }
    let conffiles = run(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
        "dpkg-deb -I conffiles",
    )?;
    ensure!(String::from_utf8(conffiles.stdout)?.trim() == "/etc/podvisor/config.toml");

    let scratch = work.path().join("scratch");
    scratch_root(&scratch)?;
    let out = run(dpkg_root(&scratch).arg("-i").arg(&deb), "dpkg --root -i")?;
    println!(
        "[{TAG}] dpkg --root -i:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for path in &listed {
        let rel = path.trim_start_matches('/');
        ensure!(
            same_bytes(&scratch.join(rel), &dest.join(rel))?,
            "{path} as dpkg installed it differs from the install"
        );
    }
    let passwd = std::fs::read_to_string(scratch.join("etc/passwd")).unwrap_or_default();
    ensure!(
        passwd.lines().any(|l| l.starts_with("podvisor:")),
        "postinst did not create the podvisor user (systemd-sysusers): {passwd:?}"
    );
    let wants = scratch.join("etc/systemd/system/multi-user.target.wants/podvisord.service");
    ensure!(
        wants.symlink_metadata().is_ok(),
        "postinst did not enable podvisord.service ({} is missing)",
        wants.display()
    );
    run(
        dpkg_root(&scratch).args(["--purge", "podvisor"]),
        "dpkg --root --purge",
    )?;
    for path in &listed {
        ensure!(
            !scratch.join(path.trim_start_matches('/')).exists(),
            "{path} is left after dpkg --purge"
        );
    }
    ensure!(
        wants.symlink_metadata().is_err(),
        "the enable link is left after --purge"
    );

    // 6. Uninstall: every file goes but the config the admin changed.
    std::fs::write(&config_path, format!("{shipped}# changed by the admin\n"))?;
    run(
        &mut install_sh("uninstall", &dest, &bin_dir),
        "install.sh uninstall",
    )?;
    let left = files_under(&dest)?;
    ensure!(
        left.keys().collect::<Vec<_>>() == ["/etc/podvisor/config.toml"],
        "left after uninstall: {left:?}"
    );
    Ok(())
}
