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
    /// Run a command in a container and wait for it (streamed with -i or -t).
    Exec {
        /// Seconds before the command is killed (0: no limit; not with -i/-t).
        #[arg(long, default_value_t = 0, value_name = "SECS")]
        timeout: i64,
        /// Send stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal (the local one in raw mode).
        #[arg(short, long)]
        tty: bool,
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
    /// Attach to a running container's output (and stdin with -i).
    Attach {
        /// Send stdin to the container (it must have been created with stdin).
        #[arg(short, long)]
        interactive: bool,
        /// The container has a terminal (the local one in raw mode).
        #[arg(short, long)]
        tty: bool,
        id: String,
    },
    /// Forward local ports to ports inside a pod (dialled in the pod), until Ctrl-C.
    PortForward {
        pod_id: String,
        /// `LOCAL:REMOTE`, `PORT` or `:REMOTE` (any free local port).
        #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<String>,
    },
    /// Run a command in a new pod of its own and exit with its exit code.
    Run {
        /// Remove the pod when the command has ended (also after Ctrl-C).
        #[arg(long)]
        rm: bool,
        /// Send stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// A host path for the container: `SRC:DST` or `SRC:DST:ro`.
        #[arg(long = "mount", value_name = "SRC:DST[:ro]")]
        mounts: Vec<String>,
        /// The runtime handler (CRI `runtime_handler`).
        #[arg(long, value_name = "HANDLER")]
        runtime: Option<String>,
        image: String,
        /// The command and its arguments (else the image's).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        cmd: Vec<String>,
    },
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
        let Command::Exec {
            timeout, id, cmd, ..
        } = cli.command
        else {
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
        let cli = Cli::try_parse_from(["podvisorctl", "exec", "-it", "abc", "sh"]).expect("-it");
        assert!(matches!(
            cli.command,
            Command::Exec {
                interactive: true,
                tty: true,
                ..
            }
        ));
    }

    #[test]
    fn run_command_line() {
        let cli = Cli::try_parse_from([
            "podvisorctl",
            "run",
            "--rm",
            "-i",
            "--mount",
            "/a:/b:ro",
            "busybox",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .expect("run");
        let Command::Run {
            rm,
            interactive,
            tty,
            mounts,
            image,
            cmd,
            ..
        } = cli.command
        else {
            panic!("not run: {cli:?}");
        };
        assert!(rm && interactive && !tty);
        assert_eq!(mounts, ["/a:/b:ro"]);
        assert_eq!(image, "busybox");
        assert_eq!(cmd, ["sh", "-c", "exit 3"]);
    }
}
