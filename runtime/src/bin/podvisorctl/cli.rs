//! The command line: `podvisorctl [--socket PATH] COMMAND` and the socket it names.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub(crate) const DEFAULT_SOCKET: &str = "/run/podvisor/podvisord.sock";
pub(crate) const SOCKET_ENV: &str = "PODVISOR_SOCKET";

#[derive(Debug, Parser)]
#[command(name = "podvisorctl", version, about = "A CRI client for podvisord")]
pub(crate) struct Cli {
    /// The CRI socket [env: PODVISOR_SOCKET] [default: /run/podvisor/podvisord.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show the runtime's name and versions.
    Version,
    /// Show the runtime's status and conditions.
    Info,
    /// Run a pod sandbox from a JSON PodSandboxConfig.
    Runp {
        /// The runtime handler (CRI `runtime_handler`).
        #[arg(long, value_name = "HANDLER")]
        runtime: Option<String>,
        /// The pod config file.
        pod_config: PathBuf,
    },
    /// Stop a pod sandbox.
    Stopp { id: String },
    /// Remove a pod sandbox.
    Rmp { id: String },
    /// List pod sandboxes.
    Pods {
        /// Print full IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show a pod sandbox's status.
    Inspectp { id: String },
    /// Create a container in a pod sandbox.
    Create {
        pod_id: String,
        /// The container config file.
        container_config: PathBuf,
        /// The config the pod was run with.
        pod_config: PathBuf,
    },
    /// Start a created container.
    Start { id: String },
    /// Stop a container.
    Stop {
        /// Seconds to wait after the stop signal before killing.
        #[arg(short, long, default_value_t = 10, value_name = "SECS")]
        timeout: i64,
        id: String,
    },
    /// Remove a container.
    Rm { id: String },
    /// List containers.
    Ps {
        /// All containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Print full IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show a container's status.
    Inspect { id: String },
    /// Run a command in a container and wait for it.
    Exec {
        /// Seconds before the command is killed (0: no limit).
        #[arg(long, default_value_t = 0, value_name = "SECS")]
        timeout: i64,
        id: String,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        cmd: Vec<String>,
    },
    /// Print a container's log.
    Logs { id: String },
    /// Pull an image.
    Pull {
        /// Registry credentials.
        #[arg(long, value_name = "USER:PASS")]
        creds: Option<String>,
        image: String,
    },
    /// List images.
    Images {
        /// Print image IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove an image.
    Rmi { image: String },
}

/// `--socket`, else the environment's, else the default.
pub(crate) fn socket_path(arg: Option<PathBuf>, env: Option<OsString>) -> PathBuf {
    arg.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn socket_choice() {
        let arg = Some(PathBuf::from("/a.sock"));
        let env = Some(OsString::from("/b.sock"));
        assert_eq!(socket_path(arg, env.clone()), Path::new("/a.sock"));
        assert_eq!(socket_path(None, env), Path::new("/b.sock"));
        assert_eq!(
            socket_path(None, Some(OsString::new())),
            Path::new(DEFAULT_SOCKET)
        );
        assert_eq!(socket_path(None, None), Path::new(DEFAULT_SOCKET));
    }

    #[test]
    fn exec_command_line() {
        let cli = Cli::try_parse_from(["podvisorctl", "exec", "--timeout", "5", "abc", "ls", "-l"])
            .expect("without --");
        let Command::Exec { timeout, id, cmd } = cli.command else {
            panic!("not exec: {cli:?}");
        };
        assert_eq!((timeout, id.as_str()), (5, "abc"));
        assert_eq!(cmd, ["ls", "-l"]);
        let cli = Cli::try_parse_from(["podvisorctl", "exec", "abc", "--", "sh", "-c", "exit 3"])
            .expect("with --");
        let Command::Exec { cmd, .. } = cli.command else {
            panic!("not exec: {cli:?}");
        };
        assert_eq!(cmd, ["sh", "-c", "exit 3"]);
        Cli::try_parse_from(["podvisorctl", "exec", "abc"]).expect_err("no command");
    }
}
