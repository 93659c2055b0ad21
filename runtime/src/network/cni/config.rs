//! CNI network configuration: the first valid `.conflist`, `.conf` or `.json` file of a
//! config directory (sorted by file name, as libcni and kubelet do), and the per-plugin
//! JSON written to each plugin's stdin.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::CniError;

/// Versions whose configs we run: the result formats of 0.3.0 to 1.1.0 are the same for
/// ADD/DEL/CHECK up to fields [`super::CniResult`] keeps verbatim.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A network: an ordered list of plugins.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped.
    pub disable_check: bool,
    pub plugins: Vec<PluginConfig>,
    /// The file it was loaded from, if any.
    pub source: Option<PathBuf>,
}

/// One plugin's entry of the list.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// `type`: the plugin binary's name.
    pub plugin_type: String,
    /// Capabilities the plugin declares (`"capabilities": {"portMappings": true}`).
    pub capabilities: BTreeSet<String>,
    /// The entry as written, passed on to the plugin.
    pub raw: Map<String, Value>,
}

/// Capability arguments, sent in `runtimeConfig` to the plugins declaring them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityArgs {
    /// `portMappings`.
    pub port_mappings: Vec<PortMapping>,
}

/// A port to publish on the host (the `portMappings` capability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    /// Empty: all host addresses.
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

impl NetworkConfigList {
    /// Parses a `.conflist`: `{"name", "cniVersion", "plugins": [...]}`.
    pub fn from_conflist(bytes: &[u8], source: Option<&Path>) -> Result<Self, CniError> {
        let invalid = |reason: String| invalid(source, reason);
        let top: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let name = string_field(&top, "name").ok_or_else(|| invalid("no name".into()))?;
        let cni_version =
            string_field(&top, "cniVersion").ok_or_else(|| invalid("no cniVersion".into()))?;
        check_version(&cni_version).map_err(invalid)?;
        let disable_check = top
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let entries = top
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("no plugins list".into()))?;
        if entries.is_empty() {
            return Err(invalid("empty plugins list".into()));
        }
        let plugins = entries
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let raw = v
                    .as_object()
                    .ok_or_else(|| invalid(format!("plugin {i} is not an object")))?;
                PluginConfig::from_raw(raw.clone())
                    .map_err(|reason| invalid(format!("plugin {i}: {reason}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins,
            source: source.map(Path::to_path_buf),
        })
    }

    /// Parses a single-plugin `.conf` and wraps it as a list of one.
    pub fn from_conf(bytes: &[u8], source: Option<&Path>) -> Result<Self, CniError> {
        let invalid = |reason: String| invalid(source, reason);
        let raw: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let name = string_field(&raw, "name").ok_or_else(|| invalid("no name".into()))?;
        let cni_version =
            string_field(&raw, "cniVersion").ok_or_else(|| invalid("no cniVersion".into()))?;
        check_version(&cni_version).map_err(invalid)?;
        let plugin = PluginConfig::from_raw(raw).map_err(invalid)?;
        Ok(Self {
            name,
            cni_version,
            disable_check: false,
            plugins: vec![plugin],
            source: source.map(Path::to_path_buf),
        })
    }

    /// The JSON for `plugin`'s stdin: its entry with the network's `name` and `cniVersion`,
    /// `prevResult` when given, and `runtimeConfig` with the capability arguments it
    /// declares.
    pub fn plugin_stdin(
        &self,
        plugin: &PluginConfig,
        prev_result: Option<&Value>,
        args: &CapabilityArgs,
    ) -> Value {
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        match prev_result {
            Some(prev) => conf.insert("prevResult".into(), prev.clone()),
            None => conf.remove("prevResult"),
        };
        let mut runtime = match conf.remove("runtimeConfig") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        if plugin.capabilities.contains("portMappings") {
            let maps = serde_json::to_value(&args.port_mappings).unwrap_or(Value::Null);
            runtime.insert("portMappings".into(), maps);
        }
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Value::Object(conf)
    }

    /// Whether this network's version knows CHECK and `prevResult` on DEL (0.4.0 and later).
    pub fn has_check(&self) -> bool {
        version_tuple(&self.cni_version) >= Some((0, 4, 0))
    }
}

impl PluginConfig {
    fn from_raw(raw: Map<String, Value>) -> Result<Self, String> {
        let plugin_type = string_field(&raw, "type").ok_or("no type")?;
        if plugin_type.contains('/') || plugin_type.starts_with('.') {
            return Err(format!("invalid type {plugin_type:?}"));
        }
        let capabilities = match raw.get("capabilities") {
            None => BTreeSet::new(),
            Some(Value::Object(caps)) => caps
                .iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .map(|(k, _)| k.clone())
                .collect(),
            Some(_) => return Err("capabilities is not an object".into()),
        };
        Ok(Self {
            plugin_type,
            capabilities,
            raw,
        })
    }
}

/// Loads the first valid network config of `dir`: files ending in `.conflist`, `.conf` or
/// `.json`, sorted by name; invalid ones are logged and skipped.
pub fn load_dir(dir: &Path) -> Result<NetworkConfigList, CniError> {
    let entries = fs::read_dir(dir).map_err(|source| CniError::ReadConfig {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            ) && p.is_file()
        })
        .collect();
    files.sort();
    for path in files {
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %path.display(), "skipping CNI config: {e}");
                continue;
            }
        };
        let parsed = if path.extension().and_then(|e| e.to_str()) == Some("conflist") {
            NetworkConfigList::from_conflist(&bytes, Some(&path))
        } else {
            NetworkConfigList::from_conf(&bytes, Some(&path))
        };
        match parsed {
            Ok(list) => {
                tracing::debug!(path = %path.display(), network = %list.name, "CNI config");
                return Ok(list);
            }
            Err(e) => tracing::warn!("skipping CNI config: {e}"),
        }
    }
    Err(CniError::NoConfig(dir.to_owned()))
}

fn invalid(source: Option<&Path>, reason: String) -> CniError {
    CniError::InvalidConfig {
        source_name: source.map_or_else(|| "(inline)".to_owned(), |p| p.display().to_string()),
        reason,
    }
}

fn string_field(m: &Map<String, Value>, key: &str) -> Option<String> {
    m.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn check_version(v: &str) -> Result<(), String> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(format!("unsupported cniVersion {v:?}"))
    }
}

fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST: &str = r#"{
      "cniVersion": "1.0.0", "name": "podnet",
      "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}},
        {"type": "firewall", "runtimeConfig": {"keep": 1}}
      ]}"#;

    #[test]
    fn conflist_and_plugin_stdin() {
        let l = NetworkConfigList::from_conflist(LIST.as_bytes(), None).unwrap();
        assert_eq!(
            (l.name.as_str(), l.cni_version.as_str()),
            ("podnet", "1.0.0")
        );
        assert!(l.has_check() && !l.disable_check);
        let types: Vec<_> = l.plugins.iter().map(|p| p.plugin_type.as_str()).collect();
        assert_eq!(types, ["bridge", "portmap", "firewall"]);
        assert_eq!(
            l.plugins[1].capabilities.iter().collect::<Vec<_>>(),
            ["portMappings"]
        );

        let args = CapabilityArgs {
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        };
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]});
        let bridge = l.plugin_stdin(&l.plugins[0], None, &args);
        assert_eq!(bridge["name"], "podnet");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(
            bridge.get("runtimeConfig").is_none(),
            "no capability declared"
        );
        assert!(bridge.get("prevResult").is_none());

        let portmap = l.plugin_stdin(&l.plugins[1], Some(&prev), &args);
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
        );
        let firewall = l.plugin_stdin(&l.plugins[2], Some(&prev), &args);
        assert_eq!(firewall["runtimeConfig"], json!({"keep": 1}));
    }

    #[test]
    fn single_conf_is_wrapped() {
        let conf = br#"{"cniVersion": "0.4.0", "name": "n", "type": "bridge"}"#;
        let l = NetworkConfigList::from_conf(conf, None).unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].plugin_type, "bridge");
        assert!(l.has_check());
        let old = br#"{"cniVersion": "0.3.1", "name": "n", "type": "bridge"}"#;
        assert!(!NetworkConfigList::from_conf(old, None).unwrap().has_check());
    }

    #[test]
    fn invalid_configs() {
        for bad in [
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": []}"#,
            r#"{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}"#,
            r#"{"cniVersion": "0.2.0", "name": "n", "plugins": [{"type": "bridge"}]}"#,
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]}"#,
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../../bin/sh"}]}"#,
            "not json",
        ] {
            assert!(
                matches!(
                    NetworkConfigList::from_conflist(bad.as_bytes(), None),
                    Err(CniError::InvalidConfig { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn load_dir_takes_the_first_valid_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load_dir(dir.path()), Err(CniError::NoConfig(_))));
        fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        fs::write(dir.path().join("07-ignored.txt"), LIST).unwrap();
        fs::write(
            dir.path().join("20-single.conf"),
            r#"{"cniVersion": "1.0.0", "name": "single", "type": "ptp"}"#,
        )
        .unwrap();
        fs::write(dir.path().join("10-list.conflist"), LIST).unwrap();
        let l = load_dir(dir.path()).unwrap();
        assert_eq!(l.name, "podnet");
        assert_eq!(
            l.source.as_deref(),
            Some(dir.path().join("10-list.conflist").as_path())
        );
        fs::remove_file(dir.path().join("10-list.conflist")).unwrap();
        assert_eq!(load_dir(dir.path()).unwrap().name, "single");
    }
}
