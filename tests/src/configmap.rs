//! A configMap volume as kubelet lays it out, and how long its `..data` swap takes to be
//! seen inside a container.
//!
//! The timing does not poll with ExecSync (each call costs seconds of emulated guest
//! kernel here). One ExecSync runs a watcher in the container: it reads the key every
//! 50 ms (`read -t` on a FIFO, so no process is spawned per check) and, when the value
//! changes, writes it to a marker file on a read-write volume. The host swaps `..data`
//! and polls the marker's host side every 2 ms. The figure therefore includes the
//! guest's write-back of the marker: it is an upper bound of the swap's visibility.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// Writes version `version` of a configMap volume with the key `greeting` as kubelet does:
/// a `..<timestamp>` directory, `..data` pointing at it (a new link renamed over the old),
/// and `greeting -> ..data/greeting`.
pub fn write_configmap(dir: &Path, version: &str, greeting: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join(version))?;
    std::fs::write(dir.join(version).join("greeting"), greeting)?;
    std::os::unix::fs::symlink(version, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    if dir.join("greeting").symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/greeting", dir.join("greeting"))?;
    }
    Ok(())
}

/// Where the watcher reads and writes: the key's path in the container, the marker's path
/// in the container, and the marker's path on the host.
pub struct SwapWatch {
    pub key_in_container: String,
    pub marker_in_container: String,
    pub marker_on_host: PathBuf,
}

/// How long the watcher and the host wait for a swap before giving up.
const SWAP_DEADLINE: Duration = Duration::from_secs(120);

impl SwapWatch {
    /// The watcher: writes the key's current value to the marker (the host's sign that it
    /// runs), then checks every 50 ms until the value changes (at most `SWAP_DEADLINE`),
    /// writes the new value to the marker and prints it.
    fn script(&self) -> String {
        let checks = SWAP_DEADLINE.as_millis() / 50;
        format!(
            "set -e; f=/tmp/.swap-tick.$$; mkfifo $f; exec 3<>$f; rm $f; \
             read -r v < {key}; echo \"$v\" > {marker}; old=$v; i=0; \
             while [ \"$v\" = \"$old\" ] && [ $i -lt {checks} ]; do \
               read -t 0.05 -r _ <&3 || true; read -r v < {key}; i=$((i+1)); done; \
             echo \"$v\" > {marker}; echo \"$v\"",
            key = self.key_in_container,
            marker = self.marker_in_container,
        )
    }

    /// Swaps configMap `dir` to `version` holding `greeting` (one line) while the watcher
    /// runs in container `id`; returns the time from the swap to the marker's new value on
    /// the host.
    pub async fn time_swap(
        &self,
        rt: &RuntimeServiceClient<Channel>,
        id: &str,
        dir: &Path,
        version: &str,
        greeting: &str,
    ) -> anyhow::Result<Duration> {
        let _ = std::fs::remove_file(&self.marker_on_host);
        let mut client = rt.clone();
        let request = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), self.script()],
            timeout: SWAP_DEADLINE.as_secs() as i64 * 2,
        };
        let watcher = tokio::spawn(async move { client.exec_sync(request).await });
        // The watcher's first marker: it has read the old value and is checking.
        let started = Instant::now();
        while read_marker(&self.marker_on_host).is_none() {
            if watcher.is_finished() || started.elapsed() > SWAP_DEADLINE {
                let out = watcher.await?.context("the swap watcher")?.into_inner();
                bail!(
                    "the swap watcher never started: exit {} {}",
                    out.exit_code,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        write_configmap(dir, version, &format!("{greeting}\n"))?;
        let swapped = Instant::now();
        let seen = loop {
            if read_marker(&self.marker_on_host).as_deref() == Some(greeting) {
                break swapped.elapsed();
            }
            if swapped.elapsed() > SWAP_DEADLINE {
                bail!("the container never saw the swap to {greeting:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let out = watcher.await?.context("the swap watcher")?.into_inner();
        let printed = String::from_utf8_lossy(&out.stdout);
        if out.exit_code != 0 || printed.trim() != greeting {
            bail!(
                "the swap watcher: exit {}, printed {printed:?} {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(seen)
    }
}

/// The marker's one line, once it is whole.
fn read_marker(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.strip_suffix('\n').map(str::to_string)
}
