//! Running one CNI plugin binary: found by `type` in the plugin directories, the network
//! config on stdin, the `CNI_*` variables in its environment, the result (or a CNI error
//! object) on stdout, within a time limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::error::CniError;

/// The CNI operation, as `CNI_COMMAND` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
        }
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone)]
pub struct PluginEnv<'a> {
    pub command: Command,
    pub container_id: &'a str,
    /// Empty when the namespace is gone (DEL).
    pub netns: &'a str,
    pub ifname: &'a str,
    /// `CNI_ARGS`: "K=V;K=V".
    pub args: &'a str,
    /// `CNI_PATH`: the plugin directories, for plugins that call other plugins (IPAM).
    pub path: &'a str,
}

/// The error object a failing plugin prints on stdout.
#[derive(Debug, Deserialize)]
struct PluginErrorObject {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// The first `dir/type` that is an executable file.
pub fn find_plugin(bin_dirs: &[PathBuf], plugin_type: &str) -> Result<PathBuf, CniError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in bin_dirs {
        let p = dir.join(plugin_type);
        if let Ok(m) = std::fs::metadata(&p)
            && m.is_file()
            && m.permissions().mode() & 0o111 != 0
        {
            return Ok(p);
        }
    }
    Err(CniError::PluginNotFound {
        plugin: plugin_type.to_owned(),
        dirs: bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
    })
}

/// Runs the plugin at `binary` and returns its stdout. The plugin inherits our environment
/// (it may need `PATH` to find `iptables`) plus the `CNI_*` variables; it is killed when it
/// takes longer than `timeout`. A non-zero exit becomes [`CniError::Plugin`] with the
/// message of the plugin's error object, or its stderr when it printed none.
pub async fn run(
    binary: &Path,
    plugin: &str,
    env: &PluginEnv<'_>,
    stdin: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, CniError> {
    let command = env.command.as_str();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", env.container_id)
        .env("CNI_NETNS", env.netns)
        .env("CNI_IFNAME", env.ifname)
        .env("CNI_ARGS", env.args)
        .env("CNI_PATH", env.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = spawn(&mut cmd).await.map_err(|source| CniError::Spawn {
        plugin: plugin.to_owned(),
        source,
    })?;
    let mut child_stdin = child.stdin.take();
    let write = async move {
        if let Some(w) = child_stdin.as_mut() {
            // A plugin that exits without reading its config closes the pipe: its exit
            // status tells what happened, not our write error.
            let _ = w.write_all(stdin).await;
        }
        drop(child_stdin);
    };
    // On timeout the future owning the child is dropped, which kills it (kill_on_drop).
    let output = tokio::time::timeout(timeout, async {
        let ((), out) = tokio::join!(write, child.wait_with_output());
        out
    })
    .await
    .map_err(|_| CniError::Timeout {
        plugin: plugin.to_owned(),
        command,
        timeout,
    })?
    .map_err(|source| CniError::Spawn {
        plugin: plugin.to_owned(),
        source,
    })?;

    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        tracing::debug!(plugin, command, "CNI plugin stderr: {}", stderr.trim());
    }
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(
        match serde_json::from_slice::<PluginErrorObject>(&output.stdout) {
            Ok(e) if !e.msg.is_empty() => CniError::Plugin {
                plugin: plugin.to_owned(),
                command,
                code: Some(e.code),
                msg: e.msg,
                details: e.details,
            },
            _ => CniError::Plugin {
                plugin: plugin.to_owned(),
                command,
                code: None,
                msg: format!("{} ({})", stderr.trim(), output.status),
                details: String::new(),
            },
        },
    )
}

/// Spawns `cmd`, retrying briefly on ETXTBSY: a plugin binary being installed right now
/// (or a file another thread's fork still holds open for writing) is busy for a moment.
async fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut attempts = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn env() -> PluginEnv<'static> {
        PluginEnv {
            command: Command::Add,
            container_id: "c1",
            netns: "/run/netns/x",
            ifname: "eth0",
            args: "IgnoreUnknown=1",
            path: "/opt/cni/bin",
        }
    }

    #[tokio::test]
    async fn passes_env_and_stdin_and_returns_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            dir.path(),
            "echo",
            r#"printf '%s|%s|%s|%s|%s|%s|' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" "$CNI_PATH"; cat"#,
        );
        let out = run(&p, "echo", &env(), b"{\"x\":1}", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ADD|c1|/run/netns/x|eth0|IgnoreUnknown=1|/opt/cni/bin|{\"x\":1}"
        );
    }

    #[tokio::test]
    async fn plugin_errors_carry_name_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            dir.path(),
            "fail",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","code":11,"msg":"no more addresses","details":"range full"}'; exit 1"#,
        );
        let e = run(&p, "fail", &env(), b"{}", Duration::from_secs(10))
            .await
            .unwrap_err();
        let CniError::Plugin {
            plugin, code, msg, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (plugin.as_str(), *code, msg.as_str()),
            ("fail", Some(11), "no more addresses")
        );
        assert!(e.to_string().contains("fail ADD: no more addresses"), "{e}");

        let p = script(dir.path(), "crash", "echo boom >&2; exit 3");
        let e = run(&p, "crash", &env(), b"{}", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
    }

    #[tokio::test]
    async fn slow_plugins_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "slow", "exec sleep 30");
        let start = std::time::Instant::now();
        let e = run(&p, "slow", &env(), b"{}", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, CniError::Timeout { .. }), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn finds_executables_in_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("bridge"), "not executable").unwrap();
        let want = script(b.path(), "bridge", "true");
        let dirs = vec![a.path().to_owned(), b.path().to_owned()];
        assert_eq!(find_plugin(&dirs, "bridge").unwrap(), want);
        assert!(matches!(
            find_plugin(&dirs, "nope"),
            Err(CniError::PluginNotFound { .. })
        ));
    }
}
