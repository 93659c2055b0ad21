//! Why a CNI operation failed: reading a network config, finding or running a plugin, or
//! what it answered. A leaf of [`super`]: the config loader and the plugin runner both
//! return it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("read CNI config {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no valid CNI network config in {0}")]
    NoConfig(PathBuf),
    #[error("invalid CNI config {source_name}: {reason}")]
    InvalidConfig { source_name: String, reason: String },
    #[error("CNI plugin {plugin} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("run CNI plugin {plugin}")]
    Spawn {
        plugin: String,
        #[source]
        source: io::Error,
    },
    #[error("CNI plugin {plugin} {command} timed out after {timeout:?}")]
    Timeout {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    /// The plugin failed; `code` and `details` come from its error object when it printed
    /// one (`msg` is then its message, else its stderr and exit status).
    #[error("CNI plugin {plugin} {command}: {msg}{}", details_suffix(.details))]
    Plugin {
        plugin: String,
        command: &'static str,
        code: Option<u32>,
        msg: String,
        details: String,
    },
    #[error("CNI plugin {plugin} {command}: invalid result")]
    InvalidResult {
        plugin: String,
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("CHECK needs cniVersion 0.4.0 or later, network {network} has {version}")]
    CheckUnsupported { network: String, version: String },
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}
