//! Starting one pod's VMM: the spec's checks, `vmm.json`, the detached process (a session of
//! its own, in the pod's network namespace) and the reaper thread that waits for it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use podvisor_common::IoError;
use podvisor_vmm_api::config::VmConfig;

use super::cgroup::{PodCgroup, record_cgroup, remove_cgroup};
use super::error::{VmmError, file_err};
use super::handle::VmmHandle;
use super::jail::hand_over_dir;
use super::pod_dir::{clear_stale_socket, create_pod_dir, open_for_write};
use super::process::process_start_time;
use super::spec::{API_SOCK, CONFIG_FILE, CONSOLE_LOG, VMM_LOG, VSOCK_UDS, VmmSpec, vm_config};

/// The VMM's rlimits: open files (its devices, vCPUs, eventfds, and the vsock connections,
/// which the muxer caps far below this) and no core dump (it would hold guest memory).
/// Processes: its seccomp filters refuse every clone once its threads run. RLIMIT_NPROC
/// cannot say that: it counts all processes of the VMMs' shared user, and KVM starts a
/// worker task of the VMM's user at the first KVM_RUN (the NX huge page recovery), which a
/// limit of none fails, and KVM_RUN with it, over and over.
const RLIMITS: [(libc::__rlimit_resource_t, libc::rlim_t); 2] =
    [(libc::RLIMIT_NOFILE, 4096), (libc::RLIMIT_CORE, 0)];

/// `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// The longest suffix the VMM appends to the vsock socket path: `_` and a 32-bit port.
const VSOCK_PORT_SUFFIX: usize = 11;

/// Starts the VMM for `spec` with the executable `binary`, detached (see the module docs).
/// Returns once the process runs; [`VmmHandle::wait_api`] waits for its control API.
pub fn launch(binary: &Path, spec: &VmmSpec) -> Result<VmmHandle, VmmError> {
    let mut handle = new_handle(&spec.dir)?;
    let config = vm_config(spec, &handle)?;

    create_pod_dir(&spec.dir)?;
    if spec.share {
        super::share::create_share(&spec.dir)?;
    }
    clear_stale_socket(&handle.api_sock)?;
    clear_stale_socket(&handle.vsock_uds)?;
    let config_path = write_config(&spec.dir, &config)?;
    if let Some(user) = spec.jail {
        hand_over_dir(&spec.dir, user)?;
    }
    if let Some(path) = &spec.cgroup {
        record_cgroup(&spec.dir, path)?;
    }
    let cgroup = spec.cgroup.as_ref().map(PodCgroup::create).transpose()?;
    handle.cgroup = spec.cgroup.clone();

    let started = spawn_detached(binary, spec, &handle, &config_path, cgroup.as_ref())
        .and_then(|mut child| Ok((start_time_or_kill(&mut child)?, child)));
    let (start_time, child) = match started {
        Ok(s) => s,
        Err(e) => {
            // No VMM ran in it: the cgroup made for it goes too.
            if let Some(name) = &spec.cgroup
                && let Err(r) = remove_cgroup(name)
            {
                tracing::warn!(sandbox = %spec.sandbox_id, "remove the cgroup of a VMM that did not start: {r}");
            }
            return Err(e);
        }
    };
    handle.pid = child.id();
    handle.start_time = start_time;
    spawn_reaper(child, &spec.sandbox_id);
    tracing::info!(
        sandbox = %spec.sandbox_id,
        pid = handle.pid,
        dir = %spec.dir.display(),
        "VMM launched"
    );
    Ok(handle)
}

/// The handle of a VMM to run in `dir`, its pid not known yet. Paths from here on are the
/// handle's: it is what finds this VM again.
fn new_handle(dir: &Path) -> Result<VmmHandle, VmmError> {
    let handle = VmmHandle {
        pid: 0,
        start_time: 0,
        dir: dir.to_path_buf(),
        api_sock: dir.join(API_SOCK),
        vsock_uds: dir.join(VSOCK_UDS),
        console_log: dir.join(CONSOLE_LOG),
        vmm_log: dir.join(VMM_LOG),
        cgroup: None,
    };
    if handle.api_sock.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmmError::SocketPathTooLong(handle.api_sock));
    }
    if handle.vsock_uds.as_os_str().len() + VSOCK_PORT_SUFFIX > MAX_SOCKET_PATH {
        return Err(VmmError::SocketPathTooLong(handle.vsock_uds));
    }
    Ok(handle)
}

/// Writes `config` to `vmm.json` in `dir`; returns its path.
fn write_config(dir: &Path, config: &VmConfig) -> Result<PathBuf, VmmError> {
    let config_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(config)
        .map_err(|e| VmmError::File(IoError::new("serialize", &config_path, e.into())))?;
    io::Write::write_all(&mut open_for_write(&config_path, false, 0o600)?, &json)
        .map_err(file_err("write", &config_path))?;
    Ok(config_path)
}

/// Spawns the VMM in a session of its own and, if `spec` names one, in its network
/// namespace, its output appended to `vmm.log`.
fn spawn_detached(
    binary: &Path,
    spec: &VmmSpec,
    handle: &VmmHandle,
    config_path: &Path,
    cgroup: Option<&PodCgroup>,
) -> Result<Child, VmmError> {
    let log = open_for_write(&handle.vmm_log, true, 0o640)?;
    let log_for_stdout = log
        .try_clone()
        .map_err(file_err("duplicate", &handle.vmm_log))?;
    let netns = spec
        .netns
        .as_ref()
        .map(|path| {
            File::open(path).map_err(|source| VmmError::Netns {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;

    let mut cmd = Command::new(binary);
    // A clean environment: nothing of podvisord's but the log filter.
    cmd.env_clear();
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    cmd.arg("--config")
        .arg(config_path)
        .current_dir("/")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_for_stdout)
        .stderr(log);
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let cgroup_fds = cgroup.map(PodCgroup::procs_fds).unwrap_or_default();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls setsid(2), write(2), setns(2) and setrlimit(2), on
    // descriptors that stay open in the parent (`netns` lives until after spawn, `cgroup`
    // is borrowed for the call) and so are valid in the child; it allocates nothing (the
    // descriptor list was built before the fork) and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own: no controlling terminal, not in podvisord's process group.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // The pod's cgroup, before the VMM runs a single instruction of its own.
            for fd in &cgroup_fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) < 0
            {
                return Err(io::Error::last_os_error());
            }
            for (resource, limit) in RLIMITS {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(resource, &l) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| VmmError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    drop(netns);
    Ok(child)
}

/// The start time of the just spawned `child`; kills it when that cannot be read. Until the
/// reaper waits for it, the pid cannot be reused (an ended child stays a zombie), so this
/// start time is our VMM's.
fn start_time_or_kill(child: &mut Child) -> Result<u64, VmmError> {
    let pid = child.id();
    match process_start_time(pid) {
        Ok(Some(t)) => Ok(t),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            Err(VmmError::Process {
                pid,
                what: "read start time",
                source: other
                    .err()
                    .unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
            })
        }
    }
}

/// A thread that waits for the VMM while podvisord runs, so an ended VMM never stays a
/// zombie, and logs how it ended.
fn spawn_reaper(mut child: Child, sandbox_id: &str) {
    let pid = child.id();
    let sandbox = sandbox_id.to_string();
    let reaper = std::thread::Builder::new()
        .name(format!("vmm-reaper-{pid}"))
        .stack_size(256 * 1024)
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => {
                tracing::info!(sandbox = %sandbox, pid, "VMM ended: {status}");
            }
            Ok(status) => tracing::warn!(sandbox = %sandbox, pid, "VMM ended: {status}"),
            Err(e) => tracing::warn!(sandbox = %sandbox, pid, "wait for the VMM: {e}"),
        });
    if let Err(e) = reaper {
        // The VMM still runs; it stays a zombie after it ends, until podvisord exits.
        tracing::warn!(sandbox = %sandbox_id, pid, "no reaper thread for the VMM: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::StopOutcome;
    use crate::vmm::process::read_proc_stat;
    use crate::vmm::spec::{BASE_CMDLINE, DriveSpec, GUEST_CID, ROOT_DRIVE_ID};
    use crate::vmm::test_support::{FakeVmm, reaped};
    use podvisor_vmm_api::config::{SerialOutput, VmConfig};
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    #[test]
    fn launch_detaches_writes_the_config_and_kill_reaps() {
        // The script notes how it was started, then becomes the long-running process.
        let fake = FakeVmm::new(
            "{ printf '%s\\n' \"$@\"; pwd; echo \"HOME=${HOME-unset}\"; ulimit -n; ulimit -c; \
             echo \"NO_COLOR=$NO_COLOR\"; } > \"$0.args\"\nexec sleep 30",
        );
        let cgroup =
            crate::vmm::CgroupPath::podvisor(&format!("unit-launch-{}", std::process::id()))
                .unwrap();
        let spec = VmmSpec {
            cgroup: Some(cgroup.clone()),
            ..fake.spec()
        };
        let handle = fake.launch(&spec).unwrap();
        assert!(handle.is_alive());
        assert_eq!(handle.dir, spec.dir);
        assert_eq!(handle.api_sock, spec.dir.join("api.sock"));
        assert_eq!(handle.vsock_uds, spec.dir.join("vsock.sock"));
        assert_eq!(handle.console_log, spec.dir.join("console.log"));
        let mode = spec.dir.metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let stat = read_proc_stat(handle.pid).unwrap().unwrap();
        assert_eq!(stat.start_time, handle.start_time);
        assert_eq!(stat.session, handle.pid as i32, "a session of its own");
        let args_file = PathBuf::from(format!("{}.args", fake.binary.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&args_file).map_or(true, |a| !a.contains("NO_COLOR")) {
            assert!(Instant::now() < deadline, "the fake VMM never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let config_arg = spec.dir.join("vmm.json").display().to_string();
        assert_eq!(
            std::fs::read_to_string(&args_file).unwrap(),
            format!("--config\n{config_arg}\n/\nHOME=unset\n4096\n0\nNO_COLOR=1\n"),
            "a clean environment, the file and core limits"
        );
        assert_eq!(handle.cgroup.as_ref(), Some(&cgroup));
        assert_eq!(crate::vmm::cgroup_pids(&cgroup).unwrap(), [handle.pid]);

        let config: VmConfig =
            serde_json::from_slice(&std::fs::read(spec.dir.join("vmm.json")).unwrap()).unwrap();
        assert_eq!(config.kernel, spec.kernel);
        assert_eq!(config.cmdline, format!("{BASE_CMDLINE} debug"));
        assert_eq!((config.vcpus, config.mem_mib), (2, 256));
        let drives: Vec<_> = config
            .drives
            .iter()
            .map(|d| (d.id.as_str(), d.path.clone(), d.read_only))
            .collect();
        assert_eq!(
            drives,
            [
                ("root", spec.rootfs.clone(), true),
                ("img0", spec.drives[0].path.clone(), true)
            ]
        );
        assert_eq!(config.net.as_ref().unwrap().tap, "tap0");
        let vsock = config.vsock.as_ref().unwrap();
        assert_eq!((vsock.cid, &vsock.uds), (GUEST_CID, &handle.vsock_uds));
        assert_eq!(config.api_sock.as_ref(), Some(&handle.api_sock));
        assert_eq!(
            config.serial,
            SerialOutput::File(handle.console_log.clone())
        );

        handle.kill().unwrap();
        assert!(!handle.is_alive());
        assert!(reaped(handle.pid), "the reaper thread waited for it");
        handle.remove_dir().unwrap();
        assert!(!spec.dir.exists());
        assert!(
            crate::vmm::cgroup_pids(&cgroup).unwrap().is_empty(),
            "the cgroup is gone"
        );
        handle.kill().unwrap();
        assert_eq!(
            handle.stop(Duration::from_secs(1)).unwrap(),
            StopOutcome::AlreadyGone
        );
    }

    #[test]
    fn launch_enters_the_network_namespace() {
        // A network namespace held by a process of its own.
        let mut holder = Command::new("unshare")
            .args(["--net", "sh", "-c", "echo ready; exec sleep 30"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready, "ready\n");
        let netns = PathBuf::from(format!("/proc/{}/ns/net", holder.id()));

        let fake = FakeVmm::new("exec sleep 30");
        let spec = VmmSpec {
            netns: Some(netns.clone()),
            ..fake.spec()
        };
        let handle = fake.launch(&spec).unwrap();
        let ns_of = |p: &Path| p.metadata().unwrap().ino();
        let vmm_ns = ns_of(Path::new(&format!("/proc/{}/ns/net", handle.pid)));
        assert_eq!(vmm_ns, ns_of(&netns));
        assert_ne!(vmm_ns, ns_of(Path::new("/proc/self/ns/net")));
        handle.kill().unwrap();
        holder.kill().unwrap();
        holder.wait().unwrap();

        let spec = VmmSpec {
            netns: Some(fake.dir.path().join("no-such-netns")),
            ..fake.spec()
        };
        assert!(matches!(fake.launch(&spec), Err(VmmError::Netns { .. })));
        // A file that is not a network namespace: setns fails in the child, spawn reports it.
        let spec = VmmSpec {
            netns: Some(fake.kernel.clone()),
            ..fake.spec()
        };
        let e = fake.launch(&spec).unwrap_err();
        assert!(
            matches!(&e, VmmError::Spawn { source, .. } if source.raw_os_error() == Some(libc::EINVAL)),
            "{e:?}"
        );
    }

    #[test]
    fn launch_refuses_what_cannot_work() {
        let fake = FakeVmm::new("exec sleep 30");
        let missing = VmmSpec {
            kernel: fake.dir.path().join("no-vmlinux"),
            ..fake.spec()
        };
        let e = fake.launch(&missing).unwrap_err();
        assert!(matches!(e, VmmError::Config { .. }), "{e:?}");
        assert!(!missing.dir.exists(), "nothing created for a bad spec");

        let dup = VmmSpec {
            drives: vec![DriveSpec {
                id: ROOT_DRIVE_ID.into(),
                path: "/x".into(),
                read_only: false,
            }],
            ..fake.spec()
        };
        assert!(matches!(fake.launch(&dup), Err(VmmError::Config { .. })));

        let long = VmmSpec {
            dir: fake.dir.path().join("d".repeat(100)),
            ..fake.spec()
        };
        assert!(matches!(
            fake.launch(&long),
            Err(VmmError::SocketPathTooLong(_))
        ));

        let cgroup = format!("unit-nostart-{}", std::process::id());
        let with_cgroup = VmmSpec {
            cgroup: Some(crate::vmm::CgroupPath::podvisor(&cgroup).unwrap()),
            ..fake.spec()
        };
        let e = launch(&fake.dir.path().join("no-vmm"), &with_cgroup).unwrap_err();
        assert!(
            matches!(&e, VmmError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(e.to_string().contains("no-vmm"), "{e}");
        assert!(
            !Path::new("/sys/fs/cgroup/pids/podvisor")
                .join(&cgroup)
                .exists()
                && !Path::new("/sys/fs/cgroup/podvisor").join(&cgroup).exists(),
            "the cgroup of a VMM that never started is left"
        );

        // A symlink in place of the pod directory is not followed.
        let elsewhere = fake.dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let spec = VmmSpec {
            dir: fake.dir.path().join("pods").join("linked"),
            ..fake.spec()
        };
        std::fs::create_dir_all(spec.dir.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &spec.dir).unwrap();
        assert!(matches!(
            fake.launch(&spec),
            Err(VmmError::NotADirectory(_))
        ));
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn stale_sockets_are_cleared_and_live_ones_refused() {
        let fake = FakeVmm::new("exec sleep 30");
        let spec = fake.spec();
        std::fs::create_dir_all(&spec.dir).unwrap();
        // A socket nobody serves any more (its listener is gone).
        drop(UnixListener::bind(spec.dir.join(API_SOCK)).unwrap());
        std::fs::write(spec.dir.join(VSOCK_UDS), "").unwrap();
        let handle = fake.launch(&spec).unwrap();
        assert!(!handle.api_sock.exists() && !handle.vsock_uds.exists());
        handle.kill().unwrap();

        let live = UnixListener::bind(spec.dir.join(API_SOCK)).unwrap();
        assert!(matches!(fake.launch(&spec), Err(VmmError::SocketInUse(_))));
        drop(live);
    }
}
