//! Host tests of the whole container path. They need root (mounts, namespaces) and busybox;
//! without them they return early.

// A scenario reads top to bottom, step after step; the length limit is for the product code.
#![allow(clippy::too_many_lines)]

use std::path::Path;
use std::sync::Arc;

use podvisor_proto::v1::*;

use super::Manager;
use crate::paths::Paths;
use crate::reaper::Reaper;
use crate::sandbox::SandboxFiles;

const BUSYBOX: &str = "/bin/busybox";

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() || !Path::new(BUSYBOX).exists() {
        eprintln!("skipping: needs root and {BUSYBOX}");
        return false;
    }
    true
}

/// A minimal image: busybox and a few applet links, passwd and group.
fn busybox_image(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
    for applet in [
        "sh", "cat", "echo", "id", "hostname", "ls", "sleep", "readlink", "wc", "head", "touch",
        "grep", "tty", "mkdir",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink");
    }
    std::fs::create_dir_all(dir.join("etc")).expect("mkdir");
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )
    .expect("group");
}

/// One reaper for the whole test process: two `waitpid(-1)` loops would steal each other's
/// children.
fn shared_reaper() -> Reaper {
    static REAPER: std::sync::OnceLock<Reaper> = std::sync::OnceLock::new();
    REAPER
        .get_or_init(|| {
            let r = Reaper::default();
            let r2 = r.clone();
            std::thread::spawn(move || {
                loop {
                    r2.reap_all();
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            });
            r
        })
        .clone()
}

struct Fixture {
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    manager: Arc<Manager>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image");
    busybox_image(&image);
    let paths = Paths {
        run: dir.path().join("run"),
        // No cgroup v2 controllers on the test host: cgroups are skipped.
        cgroup_root: dir.path().join("no-cgroup"),
    };
    paths.create_dirs().expect("dirs");
    let files = SandboxFiles::new(&paths.sandbox());
    crate::sandbox::setup(
        &files,
        &SetupSandboxRequest {
            sandbox_id: "sb".into(),
            hostname: "podhost".into(),
            resolv_conf: "nameserver 10.0.0.53\n".into(),
            ..Default::default()
        },
        false,
    )
    .expect("sandbox");
    Fixture {
        _dir: dir,
        image,
        manager: Arc::new(Manager::new(paths, files, shared_reaper())),
    }
}

fn request(id: &str, script: &str) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        process: Some(Process {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["GREETING=hi".into()],
            user: Some(User {
                username: "app".into(),
                ..Default::default()
            }),
            no_new_privs: true,
            ..Default::default()
        }),
        namespaces: Some(NamespaceOptions {
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Container as i32,
            uts: NamespaceMode::Container as i32,
        }),
        masked_paths: vec![
            "/proc/kcore".into(),
            "/proc/acpi".into(),
            "/proc/version".into(),
        ],
        readonly_paths: vec!["/proc/sys".into()],
        ..Default::default()
    }
}

/// Collects all output of a process until both eofs.
async fn output(m: &Manager, id: &str) -> (String, String) {
    let p = m.process(id, "").expect("process");
    let mut rx =
        p.io.output
            .lock()
            .expect("lock")
            .take()
            .expect("not attached");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(o) = rx.recv().await {
        if o.stream == Stream::Stdout as i32 {
            out.extend(o.data);
        } else {
            err.extend(o.data);
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_busybox_in_new_namespaces() {
    if !can_run() {
        return;
    }
    let f = fixture();
    let m = f.manager.clone();
    let script = "echo pid=$$; id -u; id -G; hostname; cat /etc/resolv.conf; \
                  echo $GREETING; readlink /proc/1/exe; echo err >&2; \
                  echo masked=$(cat /proc/version); grep -q \" /proc/sys ro,\" /proc/self/mountinfo && echo rosys; \
                  grep -E '^Sig(Ign|Blk):' /proc/self/status; exit 3";
    let pid = m
        .create_from_dir(&request("c1", script), &f.image)
        .expect("create");
    assert!(pid > 1);
    // Duplicate ids are refused.
    let dup = m
        .clone()
        .create(request("c1", "true"))
        .await
        .expect_err("dup");
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup:?}");

    let collector = {
        let m = m.clone();
        tokio::spawn(async move { output(&m, "c1").await })
    };
    m.start("c1").await.expect("start");
    let again = m.start("c1").await.expect_err("started twice");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let exit = m.wait("c1", "").await.expect("wait");
    let (out, err) = collector.await.expect("collector");
    assert_eq!(exit.exit_code, 3, "stdout: {out}\nstderr: {err}");
    assert_eq!(exit.signal, 0);
    assert!(!exit.oom_killed);
    assert!(exit.finished_at_unix_nanos >= exit.started_at_unix_nanos);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=1", "{out}");
    assert_eq!(lines[1], "1000");
    assert_eq!(lines[2], "1000 2000");
    assert_eq!(lines[3], "podhost");
    assert_eq!(lines[4], "nameserver 10.0.0.53");
    assert_eq!(lines[5], "hi");
    assert_eq!(lines[6], "/bin/busybox");
    assert_eq!(
        lines[7], "masked=",
        "masked /proc/version is /dev/null: {out}"
    );
    assert_eq!(lines[8], "rosys");
    // Neither the agent's ignored SIGPIPE nor the spawner's blocked mask leaks into the container
    // (busybox sh ignores nothing when started with default dispositions).
    assert_eq!(lines[9], "SigBlk:\t0000000000000000", "{out}");
    assert_eq!(lines[10], "SigIgn:\t0000000000000000", "{out}");
    assert_eq!(err, "err\n");

    m.delete("c1", false).await.expect("delete");
    let gone = m.wait("c1", "").await.expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_exec_and_bad_input() {
    if !can_run() {
        return;
    }
    let f = fixture();
    let m = f.manager.clone();
    let mut req = request("c2", "echo started; sleep 60");
    req.mounts = vec![Mount {
        source: f.image.join("etc").display().to_string(),
        destination: "/mnt/etc".into(),
        r#type: "bind".into(),
        readonly: true,
        ..Default::default()
    }];
    m.create_from_dir(&req, &f.image).expect("create");
    m.start("c2").await.expect("start");

    // exec in the running container: same namespaces, sees the read-only bind mount.
    let exec_pid = m
        .clone()
        .exec(ExecProcessRequest {
            container_id: "c2".into(),
            exec_id: "e1".into(),
            process: Some(Process {
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    "cat /mnt/etc/group | head -1; touch /mnt/etc/x 2>/dev/null || echo ro".into(),
                ],
                ..Default::default()
            }),
        })
        .await
        .expect("exec");
    assert!(exec_pid > 0);
    let p = m.process("c2", "e1").expect("exec process");
    let mut rx = p.io.output.lock().expect("lock").take().expect("output");
    let mut out = Vec::new();
    while let Some(o) = rx.recv().await {
        out.extend(o.data);
    }
    let e = m.wait("c2", "e1").await.expect("wait exec");
    assert_eq!(e.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "root:x:0:\nro\n");

    let bad_exec = m
        .clone()
        .exec(ExecProcessRequest {
            container_id: "c2".into(),
            exec_id: "e2".into(),
            process: Some(Process {
                args: vec!["/no/such/binary".into()],
                ..Default::default()
            }),
        })
        .await
        .expect_err("missing binary");
    assert_eq!(bad_exec.code(), tonic::Code::FailedPrecondition);
    assert!(
        bad_exec.message().contains("Exec"),
        "{}",
        bad_exec.message()
    );

    // Running containers are not deleted without force.
    let busy = m.delete("c2", false).await.expect_err("running");
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition);
    m.signal(&SignalProcessRequest {
        container_id: "c2".into(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    })
    .expect("kill");
    let exit = m.wait("c2", "").await.expect("wait");
    assert_eq!((exit.exit_code, exit.signal), (137, 9));
    m.delete("c2", false).await.expect("delete");

    // Bad input.
    let mut esc = request("c3", "true");
    esc.mounts = vec![Mount {
        source: "/tmp".into(),
        destination: "/../../etc".into(),
        r#type: "bind".into(),
        ..Default::default()
    }];
    let e = m.clone().create(esc).await.expect_err("escape");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut bad_id = request("../x", "true");
    bad_id.container_id = "../x".into();
    assert_eq!(
        m.clone().create(bad_id).await.expect_err("id").code(),
        tonic::Code::InvalidArgument
    );
    let mut no_args = request("c4", "true");
    no_args.process = Some(Process::default());
    assert_eq!(
        m.clone().create(no_args).await.expect_err("args").code(),
        tonic::Code::InvalidArgument
    );
    // A symlink in the image pointing out of the rootfs is not followed for a mount target.
    std::os::unix::fs::symlink("/", f.image.join("escape")).expect("symlink");
    let mut sym = request("c5", "true");
    sym.mounts = vec![Mount {
        source: f.image.join("etc").display().to_string(),
        destination: "/escape/tmp/podvisor-escape".into(),
        r#type: "bind".into(),
        ..Default::default()
    }];
    let e = m
        .create_from_dir(&sym, &f.image)
        .expect_err("symlink escape");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(!Path::new("/tmp/podvisor-escape").exists());
    assert_eq!(
        m.start("nope").await.expect_err("unknown").code(),
        tonic::Code::NotFound
    );
}

/// Reads a process's (single, pty) output stream to its end.
async fn pty_output(m: &Manager, id: &str, exec_id: &str) -> String {
    let p = m.process(id, exec_id).expect("process");
    let mut rx = p.io.output.lock().expect("lock").take().expect("output");
    let mut out = Vec::new();
    while let Some(o) = rx.recv().await {
        out.extend(o.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A terminal is a pty of the container's own devpts, so `ttyname(3)` finds it at
/// /dev/pts/N inside the container (it used to come from the agent's devpts: `tty` printed
/// "not a tty" although stdin was a terminal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_are_named_inside_the_container() {
    if !can_run() {
        return;
    }
    let f = fixture();
    let m = f.manager.clone();
    let mut req = request(
        "t1",
        "tty; test -t 0 && echo isatty; echo started; sleep 60",
    );
    if let Some(p) = req.process.as_mut() {
        p.terminal = true;
    }
    m.create_from_dir(&req, &f.image).expect("create");
    // The init's output, and word once it printed "started": it is killed only after that
    // (killed earlier, its lines were missing about once in 15 runs).
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let init_out = {
        let m = m.clone();
        tokio::spawn(async move {
            let p = m.process("t1", "").expect("process");
            let mut rx = p.io.output.lock().expect("lock").take().expect("output");
            let mut out = Vec::new();
            let mut started_tx = Some(started_tx);
            while let Some(o) = rx.recv().await {
                out.extend(o.data);
                if String::from_utf8_lossy(&out).contains("started")
                    && let Some(tx) = started_tx.take()
                {
                    let _ = tx.send(());
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    m.start("t1").await.expect("start");

    m.clone()
        .exec(ExecProcessRequest {
            container_id: "t1".into(),
            exec_id: "e1".into(),
            process: Some(Process {
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    "tty; test -t 1 && echo isatty".into(),
                ],
                terminal: true,
                ..Default::default()
            }),
        })
        .await
        .expect("exec");
    let out = pty_output(&m, "t1", "e1").await;
    let e = m.wait("t1", "e1").await.expect("wait exec");
    assert_eq!(e.exit_code, 0, "{out}");
    assert!(
        out.starts_with("/dev/pts/") && out.contains("isatty"),
        "exec: {out:?}"
    );

    tokio::time::timeout(std::time::Duration::from_secs(60), started_rx)
        .await
        .expect("the init printed its lines within 60 s")
        .expect("the init's output ended before \"started\"");
    m.signal(&SignalProcessRequest {
        container_id: "t1".into(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    })
    .expect("kill");
    m.wait("t1", "").await.expect("wait");
    let out = init_out.await.expect("output");
    assert!(
        out.starts_with("/dev/pts/0\r\nisatty\r\n"),
        "container init: {out:?}"
    );
    m.delete("t1", false).await.expect("delete");
}

/// A program failing mkdir and mkdirat with EOPNOTSUPP, allowing everything else.
fn deny_mkdir() -> Vec<u8> {
    let insns: [(u16, u8, u8, u32); 5] = [
        (0x20, 0, 0, 0),                                     // A = nr
        (0x15, 1, 0, 83),                                    // mkdir -> deny
        (0x15, 0, 1, 258),                                   // mkdirat -> deny, else allow
        (0x06, 0, 0, 0x0005_0000 | libc::EOPNOTSUPP as u32), // ERRNO
        (0x06, 0, 0, 0x7fff_0000),                           // ALLOW
    ];
    insns
        .iter()
        .flat_map(|(code, jt, jf, k)| {
            let mut b = code.to_le_bytes().to_vec();
            b.extend([*jt, *jf]);
            b.extend(k.to_le_bytes());
            b
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_program_holds_with_and_without_no_new_privs() {
    if !can_run() {
        return;
    }
    let f = fixture();
    let m = f.manager.clone();
    for (id, nnp) in [("nnp", true), ("privs", false)] {
        let mut req = request(
            id,
            "grep Seccomp: /proc/self/status; mkdir /made; echo rc=$?",
        );
        let p = req.process.as_mut().expect("process");
        p.no_new_privs = nnp;
        p.seccomp_filter = deny_mkdir();
        m.create_from_dir(&req, &f.image).expect("create");
        let collector = {
            let m = m.clone();
            let id = id.to_string();
            tokio::spawn(async move { output(&m, &id).await })
        };
        m.start(id).await.expect("start");
        m.wait(id, "").await.expect("wait");
        let (out, err) = collector.await.expect("collector");
        assert!(out.contains("Seccomp:\t2"), "{id}: {out}");
        assert!(out.contains("rc=1"), "{id}: {out}");
        assert!(
            err.contains("not supported"),
            "{id}: the filter's errno: {err}"
        );
        m.delete(id, false).await.expect("delete");
    }
    // A program that is not whole instructions is refused before anything runs.
    let mut req = request("bad", "true");
    req.process.as_mut().expect("process").seccomp_filter = vec![0; 12];
    let err = m.create_from_dir(&req, &f.image).expect_err("bad program");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}
