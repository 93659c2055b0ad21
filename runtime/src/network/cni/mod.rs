//! The CNI protocol (spec 1.0.0; 0.3.x and 0.4.0 networks too), spoken by us rather than a
//! library: load a network config ([`config`]), run its plugins ([`exec`]) for ADD, DEL
//! and CHECK, and parse what they return ([`result`]).
//!
//! ADD runs the plugins in order, each getting the previous one's result as `prevResult`;
//! the last result is the network's. DEL runs them in reverse order with the ADD result as
//! `prevResult`: the caller persists that result (it is serializable) to DEL after a
//! restart. A failed ADD is rolled back with a best-effort DEL before the error is returned,
//! so a retry starts clean.

mod error;

pub mod config;
pub mod exec;
pub mod result;
pub mod template;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use config::{CapabilityArgs, NetworkConfigList, PluginConfig, PortMapping};
pub use error::CniError;
pub use exec::Command;
pub use result::{CniResult, Dns, Interface, IpConfig, Route};

/// Where Debian's `containernetworking-plugins` package installs the plugins.
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Where upstream releases (and most CNI installers) put them.
pub const DEFAULT_PLUGIN_DIR: &str = "/opt/cni/bin";
/// The usual config directory.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// How long one plugin run may take by default.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The pod a network attachment is for (sent in `CNI_ARGS` as the `K8S_POD_*` keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One attachment: which sandbox, namespace and interface, and the capability arguments.
/// DEL must be given the same values as ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`: the pod sandbox id.
    pub container_id: String,
    /// `CNI_NETNS`: the namespace file, e.g. `/run/netns/NAME`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`, usually "eth0".
    pub ifname: String,
    pub pod: Option<PodRef>,
    pub capabilities: CapabilityArgs,
}

impl Attachment {
    /// `CNI_ARGS`. `IgnoreUnknown=1` first: plugins that parse CNI_ARGS strictly (host-local)
    /// otherwise reject the K8S_POD_* keys.
    fn cni_args(&self) -> String {
        let mut args = vec!["IgnoreUnknown=1".to_owned()];
        if let Some(pod) = &self.pod {
            args.push(format!("K8S_POD_NAMESPACE={}", pod.namespace));
            args.push(format!("K8S_POD_NAME={}", pod.name));
            args.push(format!("K8S_POD_INFRA_CONTAINER_ID={}", self.container_id));
            args.push(format!("K8S_POD_UID={}", pod.uid));
        }
        args.join(";")
    }
}

/// A loaded network and where its plugins are.
#[derive(Debug, Clone)]
pub struct Cni {
    network: NetworkConfigList,
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
}

impl Cni {
    pub fn new(network: NetworkConfigList, bin_dirs: Vec<PathBuf>) -> Self {
        Self {
            network,
            bin_dirs,
            timeout: DEFAULT_PLUGIN_TIMEOUT,
        }
    }

    /// The first valid network config of `conf_dir` (see [`config::load_dir`]).
    pub fn load(conf_dir: &Path, bin_dirs: Vec<PathBuf>) -> Result<Self, CniError> {
        Ok(Self::new(config::load_dir(conf_dir)?, bin_dirs))
    }

    /// The time limit of each plugin run.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn network(&self) -> &NetworkConfigList {
        &self.network
    }

    /// Attaches the sandbox to the network; the result is the last plugin's. On failure the
    /// plugins are DELeted (best effort) before the error is returned.
    pub async fn add(&self, att: &Attachment) -> Result<CniResult, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &self.network.plugins {
            let stdout = match self
                .run(plugin, Command::Add, att, prev.as_ref(), false)
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    self.rollback(att, prev.as_ref()).await;
                    return Err(e);
                }
            };
            let value: Value = match serde_json::from_slice(&stdout) {
                Ok(v) => v,
                Err(source) => {
                    self.rollback(att, prev.as_ref()).await;
                    return Err(CniError::InvalidResult {
                        plugin: plugin.plugin_type.clone(),
                        command: Command::Add.as_str(),
                        source,
                    });
                }
            };
            prev = Some(value);
        }
        let last = self
            .network
            .plugins
            .last()
            .map_or_else(String::new, |p| p.plugin_type.clone());
        let result = prev
            .map(serde_json::from_value::<CniResult>)
            .transpose()
            .map_err(|source| CniError::InvalidResult {
                plugin: last,
                command: Command::Add.as_str(),
                source,
            })?
            .unwrap_or_default();
        tracing::debug!(
            container = %att.container_id,
            network = %self.network.name,
            ips = ?result.ips.iter().map(|i| &i.address).collect::<Vec<_>>(),
            "CNI ADD"
        );
        Ok(result)
    }

    /// Detaches the sandbox: every plugin in reverse order, even when one fails (the first
    /// error is returned). `prev` is the ADD result, if known. A namespace that is already
    /// gone is passed as an empty `CNI_NETNS`, which plugins treat as "nothing left inside".
    pub async fn del(&self, att: &Attachment, prev: Option<&CniResult>) -> Result<(), CniError> {
        let prev = prev.and_then(|r| serde_json::to_value(r).ok());
        let mut first_err = None;
        for plugin in self.network.plugins.iter().rev() {
            if let Err(e) = self
                .run(plugin, Command::Del, att, prev.as_ref(), true)
                .await
            {
                tracing::warn!(container = %att.container_id, "{e}");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                tracing::debug!(container = %att.container_id, network = %self.network.name, "CNI DEL");
                Ok(())
            }
        }
    }

    /// Asks every plugin whether the attachment is still as ADD left it. Skipped (Ok) when
    /// the network sets `disableCheck`.
    pub async fn check(&self, att: &Attachment, prev: &CniResult) -> Result<(), CniError> {
        if self.network.disable_check {
            return Ok(());
        }
        if !self.network.has_check() {
            return Err(CniError::CheckUnsupported {
                network: self.network.name.clone(),
                version: self.network.cni_version.clone(),
            });
        }
        let prev = serde_json::to_value(prev).ok();
        for plugin in &self.network.plugins {
            self.run(plugin, Command::Check, att, prev.as_ref(), false)
                .await?;
        }
        Ok(())
    }

    async fn rollback(&self, att: &Attachment, prev: Option<&Value>) {
        let prev = prev.and_then(|v| serde_json::from_value::<CniResult>(v.clone()).ok());
        if let Err(e) = self.del(att, prev.as_ref()).await {
            tracing::warn!(container = %att.container_id, "rollback of a failed CNI ADD: {e}");
        }
    }

    async fn run(
        &self,
        plugin: &PluginConfig,
        command: Command,
        att: &Attachment,
        prev: Option<&Value>,
        missing_netns_ok: bool,
    ) -> Result<Vec<u8>, CniError> {
        let binary = exec::find_plugin(&self.bin_dirs, &plugin.plugin_type)?;
        // Before 0.4.0 DEL had no prevResult.
        let prev = if command == Command::Del && !self.network.has_check() {
            None
        } else {
            prev
        };
        let stdin = self
            .network
            .plugin_stdin(plugin, prev, &att.capabilities)
            .to_string();
        let netns = if missing_netns_ok && !att.netns.exists() {
            String::new()
        } else {
            att.netns.display().to_string()
        };
        let path = std::env::join_paths(&self.bin_dirs)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let args = att.cni_args();
        let env = exec::PluginEnv {
            command,
            container_id: &att.container_id,
            netns: &netns,
            ifname: &att.ifname,
            args: &args,
            path: &path,
        };
        exec::run(
            &binary,
            &plugin.plugin_type,
            &env,
            stdin.as_bytes(),
            self.timeout,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake plugin that logs its command and stdin to `log` and answers ADD with its
    /// prevResult plus one IP (so the chain is visible in the result).
    fn fake_plugin(bin: &Path, name: &str, log: &Path, add_body: &str) {
        let body = format!(
            "#!/bin/sh\nin=$(cat)\necho \"{name} $CNI_COMMAND netns=$CNI_NETNS $in\" >> {log}\n\
             case $CNI_COMMAND in ADD) {add_body} ;; esac\n",
            log = log.display()
        );
        let p = bin.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn attachment(netns: PathBuf) -> Attachment {
        Attachment {
            container_id: "sandbox1".into(),
            netns,
            ifname: "eth0".into(),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web".into(),
                uid: "u-1".into(),
            }),
            capabilities: CapabilityArgs::default(),
        }
    }

    #[tokio::test]
    async fn add_chains_prev_results_and_del_runs_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let log = dir.path().join("log");
        fake_plugin(
            &bin,
            "first",
            &log,
            r#"echo '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.9.0.2/24","interface":0}]}'"#,
        );
        fake_plugin(
            &bin,
            "second",
            &log,
            r#"echo '{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.2/24"},{"address":"fd00::2/64"}]}'"#,
        );
        let list = NetworkConfigList::from_conflist(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"first"},{"type":"second"}]}"#,
            None,
        )
        .unwrap();
        let cni = Cni::new(list, vec![bin.clone()]);
        let netns_file = dir.path().join("ns");
        std::fs::write(&netns_file, "").unwrap();
        let att = attachment(netns_file.clone());

        // The last plugin's result is the network's.
        let r = cni.add(&att).await.unwrap();
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[1].address, "fd00::2/64");
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert!(lines[0].starts_with("first ADD"), "{text}");
        assert!(!lines[0].contains("prevResult"), "{text}");
        assert!(lines[1].starts_with("second ADD"), "{text}");
        assert!(
            lines[1].contains(r#""prevResult":{"cniVersion":"1.0.0","interfaces""#),
            "the first plugin's result is the second's prevResult: {text}"
        );

        // DEL after the namespace vanished: reverse order, empty CNI_NETNS, prevResult.
        std::fs::remove_file(&netns_file).unwrap();
        std::fs::remove_file(&log).unwrap();
        cni.del(&att, Some(&r)).await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert!(lines[0].starts_with("second DEL netns= "), "{text}");
        assert!(lines[1].starts_with("first DEL netns= "), "{text}");
        assert!(
            lines[1].contains("fd00::2/64"),
            "ADD result as prevResult on DEL: {text}"
        );
    }

    #[tokio::test]
    async fn failed_add_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        fake_plugin(
            dir.path(),
            "ok",
            &log,
            r#"echo '{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.3/24"}]}'"#,
        );
        fake_plugin(
            dir.path(),
            "bad",
            &log,
            r#"echo '{"code":7,"msg":"bad config"}'; exit 1"#,
        );
        let list = NetworkConfigList::from_conflist(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ok"},{"type":"bad"}]}"#,
            None,
        )
        .unwrap();
        let cni = Cni::new(list, vec![dir.path().to_owned()]);
        let e = cni
            .add(&attachment(dir.path().to_owned()))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "CNI plugin bad ADD: bad config");
        let text = std::fs::read_to_string(&log).unwrap();
        let cmds: Vec<_> = text
            .lines()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(cmds, ["ok ADD", "bad ADD", "bad DEL", "ok DEL"]);
    }

    #[test]
    fn cni_args_carry_the_pod() {
        let att = attachment(PathBuf::from("/run/netns/x"));
        assert_eq!(
            att.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
             K8S_POD_INFRA_CONTAINER_ID=sandbox1;K8S_POD_UID=u-1"
        );
    }
}
