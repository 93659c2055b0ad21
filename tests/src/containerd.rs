//! Debian's containerd (1.6) with runc, as a reference CRI runtime: started with its own
//! configuration, root, state, socket and CNI network in a temporary directory, stopped and
//! cleaned up on drop (its shims and their processes, its mounts and network namespaces, its
//! bridge).
//!
//! Its CRI streaming server (Exec, Attach, PortForward) listens on 127.0.0.1 on a port of
//! its own choosing, without TLS: the URLs its `Exec`/`Attach`/`PortForward` answers carry
//! are plain `http://127.0.0.1:<port>/...`.
//!
//! Two instances can run at once if they are given different bridges and subnets: the
//! pods' network namespaces are mounted under each instance's state directory
//! (`netns_mounts_under_state_dir`), not in the shared `/run/netns`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::cri::{CNI_BIN_DIR, delete_link, write_bridge_conflist};
use crate::procfs::{cmdline, pids, with_descendants};
use crate::registry::busybox_layer;

/// How long containerd may take to serve its socket.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long containerd may take to exit on SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// Whether containerd and runc are installed (on `PATH`).
pub fn containerd_available() -> bool {
    which("containerd") && which("runc")
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(name).is_file()))
}

/// Pushes busybox sleeping forever as `<host>/<repo>:<tag>`: containerd's sandbox ("pause")
/// image, which must stay up doing nothing. Returns the reference.
pub async fn push_pause(host: &str, repo: &str, tag: &str) -> anyhow::Result<String> {
    let (layer, diff_id) = busybox_layer()?;
    let reference_text = format!("{host}/{repo}:{tag}");
    let reference: Reference = reference_text.parse().context("parse pause reference")?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sleep", "2147483647"],
            "Env": ["PATH=/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    });
    client
        .push(
            &reference,
            &[ImageLayer::oci_v1_gzip(layer.clone(), None)],
            Config::oci_v1(config.to_string().into_bytes(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("push {reference_text}: {e}"))?;
    Ok(reference_text)
}

/// containerd with its own configuration, directories and CNI network in a temporary
/// directory; stopped and cleaned up on drop.
pub struct Containerd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The CRI (gRPC) socket.
    pub socket: PathBuf,
    bridge: &'static str,
}

/// containerd's configuration for [`Containerd::start`].
fn config_toml(d: &Path, socket: &Path, pause_image: &str, cni_conf: &Path, host: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # Lowering oom_score_adj (-998 for the pause container) is not allowed on every host.
  restrict_oom_score_adj = true
  # Pods' network namespaces under this instance's state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  # The streaming server (containerd's defaults, spelled out): plain HTTP on loopback, a
  # port of its own choosing.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
"#,
        root = d.join("root").display(),
        state = d.join("state").display(),
        socket = socket.display(),
        opt = d.join("opt").display(),
        cni_bin = CNI_BIN_DIR,
        cni_conf = cni_conf.display(),
    )
}

impl Containerd {
    /// Starts containerd pulling from the plain-HTTP registry `registry_host`, with
    /// `pause_image` (see [`push_pause`]) as its sandbox image and a bridge CNI network
    /// (bridge `bridge`, addresses from `subnet`, e.g. `"10.88.213.0/24"`); returns once
    /// its socket accepts connections. Callers running at the same time need different
    /// bridges and subnets.
    pub fn start(
        registry_host: &str,
        pause_image: &str,
        bridge: &'static str,
        subnet: &str,
    ) -> anyhow::Result<Self> {
        // Short paths: the shims' sockets are named after the address.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .context("temporary directory")?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let cni_dir =
            write_bridge_conflist(&d.join("cni"), &format!("ctrd-{bridge}"), bridge, subnet)?;
        let config_path = d.join("config.toml");
        std::fs::write(
            &config_path,
            config_toml(d, &socket, pause_image, &cni_dir, registry_host),
        )
        .context("write containerd config")?;
        let log = std::fs::File::create(d.join("containerd.log")).context("containerd log")?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let mut me = Self {
            child: Some(child),
            dir,
            socket,
            bridge,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if std::os::unix::net::UnixStream::connect(&me.socket).is_ok() {
                return Ok(me);
            }
            if let Some(c) = me.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                me.child = None;
                bail!("containerd exited ({status}):\n{}", me.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not serve within {START_DEADLINE:?}:\n{}",
                    me.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its temporary directory (configuration, root, state, CNI network, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last 40 lines of containerd's log.
    pub fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Pids of this containerd's shims (they outlive containerd; their command lines name
    /// its address).
    pub fn shims(&self) -> Vec<u32> {
        let address = self.socket.display().to_string();
        pids()
            .into_iter()
            .filter(|p| {
                let c = cmdline(*p);
                c.contains("containerd-shim") && c.contains(&address)
            })
            .collect()
    }
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found
}

fn unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2(2) with a NUL-terminated path that lives across the call.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_DEADLINE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd. Their processes go with them.
        let shims = self.shims();
        for pid in with_descendants(&shims).into_iter().rev() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) on a process of a shim of this containerd.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if !shims.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
        // Root filesystems, shm, and the pods' network namespaces (under the state
        // directory).
        for m in mounts_under(self.dir.path()) {
            unmount(&m);
        }
        delete_link(self.bridge);
    }
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1 as cri;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

    use super::*;
    use crate::cri::connect;
    use crate::registry::Registry;

    /// Whether `pid` is gone (or a zombie nobody reaped yet).
    fn gone(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    }

    /// containerd serves CRI with a pod running; dropping it takes the pod's processes, its
    /// network namespace (under the state directory), the mounts, the directory and the
    /// bridge along.
    #[test]
    fn drop_leaves_nothing_behind() -> anyhow::Result<()> {
        if !containerd_available() {
            println!("[containerd] SKIPPED: containerd or runc is not installed (make setup)");
            return Ok(());
        }
        let bridge = "pvctrdt0";
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let registry = Registry::start()?;
        let pause = rt.block_on(push_pause(registry.host(), "test/pause", "1"))?;
        let ctrd = Containerd::start(registry.host(), &pause, bridge, "10.88.219.0/24")?;
        let dir = ctrd.dir().to_path_buf();
        let sandbox = rt.block_on(async {
            let mut client = RuntimeServiceClient::new(connect(&ctrd.socket).await?);
            let version = client
                .version(cri::VersionRequest::default())
                .await?
                .into_inner();
            assert_eq!(version.runtime_name, "containerd");
            let id = client
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(cri::PodSandboxConfig {
                        metadata: Some(cri::PodSandboxMetadata {
                            name: "harness".into(),
                            uid: "harness-uid".into(),
                            namespace: "default".into(),
                            attempt: 0,
                        }),
                        log_directory: dir.join("pod-logs").display().to_string(),
                        ..Default::default()
                    }),
                    runtime_handler: String::new(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("RunPodSandbox: {e}\n{}", ctrd.log()))?
                .into_inner()
                .pod_sandbox_id;
            anyhow::Ok(id)
        })?;
        let processes = with_descendants(&ctrd.shims());
        assert!(processes.len() >= 2, "no shim and pause for {sandbox}");
        let netns: Vec<PathBuf> = mounts_under(&dir)
            .into_iter()
            .filter(|m| m.to_string_lossy().contains("/netns/"))
            .collect();
        assert!(
            !netns.is_empty(),
            "no network namespace under {}",
            dir.display()
        );
        assert!(Path::new("/sys/class/net").join(bridge).exists());

        drop(ctrd);
        assert!(
            processes.iter().all(|p| gone(*p)),
            "left running: {processes:?}"
        );
        assert!(
            mounts_under(&dir).is_empty(),
            "mounts left under {}",
            dir.display()
        );
        assert!(!dir.exists(), "{} is left", dir.display());
        assert!(!Path::new("/sys/class/net").join(bridge).exists());
        Ok(())
    }
}
