//! `podvisor-vmm`: boots one microVM and runs it until it ends: builds the VM
//! ([`podvisor_vmm::builder`]), starts the control API on its handle when a socket is
//! given, then runs the vCPUs and the device event loop.
//!
//! Exit code: 0 when the guest powers off or reboots (or the API stops it),
//! 2 when the guest kernel panics, 1 on a VMM error.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use podvisor_vmm::devices::console_file::{CappedFile, LOG_RESTARTED};
use podvisor_vmm::exit::ExitReason;
use podvisor_vmm_api::config::{self, SerialOutput, VmConfig};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// A KVM microVM monitor: one process per pod.
#[derive(Debug, Parser)]
#[command(name = "podvisor-vmm", version)]
struct Cli {
    /// A JSON VM configuration (instead of the options below).
    #[arg(long, conflicts_with_all = ["kernel"])]
    config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux with a PVH note, or bzImage.
    #[arg(long, required_unless_present_any = ["config", "restore"])]
    kernel: Option<PathBuf>,
    /// Continue a snapshot instead of booting: state=PATH,mem=PATH. vCPUs and memory come
    /// from the snapshot; give the same kinds of devices in the same order.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "config"])]
    restore: Option<String>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (the VMM adds console, devices and host flags).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long = "mem-mib", default_value_t = 128)]
    mem_mib: u64,
    /// A drive: PATH[,ro][,id=ID]; repeat for more.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Network: tap=NAME[,mac=MAC].
    #[arg(long)]
    net: Option<String>,
    /// vsock: cid=N,uds=PATH.
    #[arg(long)]
    vsock: Option<String>,
    /// virtio-fs: tag=TAG[,dir=PATH] (no dir: the device serves nothing).
    #[arg(long)]
    fs: Option<String>,
    /// Control API socket.
    #[arg(long = "api-sock")]
    api_sock: Option<PathBuf>,
    /// Serial console: stdout, null or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// The VMM's seccomp filters: kill (an unexpected system call ends the VMM), log (allow
    /// and audit-log it) or off.
    #[arg(long, default_value = "kill")]
    seccomp: config::SeccompLevel,
}

fn vm_config(cli: Cli) -> anyhow::Result<VmConfig> {
    if let Some(path) = cli.config {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read config {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("parse config {}", path.display()));
    }
    let drives = cli
        .drives
        .iter()
        .enumerate()
        .map(|(i, d)| config::parse_drive(d, i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmConfig {
        kernel: match (&cli.kernel, &cli.restore) {
            (Some(k), _) => k.clone(),
            (None, Some(_)) => PathBuf::new(),
            (None, None) => anyhow::bail!("--kernel or --restore is required"),
        },
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        mem_mib: cli.mem_mib,
        drives,
        net: cli.net.as_deref().map(config::parse_net).transpose()?,
        vsock: cli.vsock.as_deref().map(config::parse_vsock).transpose()?,
        fs: cli.fs.as_deref().map(config::parse_fs).transpose()?,
        api_sock: cli.api_sock,
        serial: match cli.serial.as_str() {
            "stdout" => SerialOutput::Stdout,
            "null" => SerialOutput::Null,
            path => SerialOutput::File(path.into()),
        },
        restore: cli
            .restore
            .as_deref()
            .map(config::parse_restore)
            .transpose()?,
        seccomp: cli.seccomp,
        jail: None,
        serial_max_bytes: None,
    })
}

/// Builds the VM, serves its control API if asked to, and runs it until it ends.
fn run(config: VmConfig, start: Instant) -> anyhow::Result<ExitReason> {
    podvisor_vmm::seccomp::no_new_privs()?;
    let jail = config.jail.clone();
    if let Some(jail) = &jail {
        podvisor_vmm::jail::enter(jail)?;
    }
    let api_sock = config.api_sock.clone();
    let level = config.seccomp;
    let serves_share = config.fs.as_ref().is_some_and(|f| f.shared_dir.is_some());
    let mut vm = podvisor_vmm::builder::build(config, start)?;
    // Everything that needed root's capabilities (the TAP, KVM, the files) is open: the
    // jail's user from now on, and no capability, before any other thread starts, so that
    // no thread has one.
    if let Some(jail) = &jail {
        podvisor_vmm::jail::drop_user(jail)?;
    }
    podvisor_common::caps::keep_only(podvisor_vmm::jail::kept_caps(jail.as_ref(), serves_share))
        .map_err(std::io::Error::from_raw_os_error)
        .context("drop the VMM's capabilities")?;
    if let Some(path) = api_sock {
        podvisor_vmm::api::server::start(&path, vm.handle(), level)?;
        vm.remove_on_exit(path);
    }
    Ok(vm.run()?)
}

/// The VMM's own log at most: what a guest can make it log is rate-limited per call site,
/// but a VM may run for months.
const LOG_CAP: u64 = 4 << 20;

/// Where the VMM logs: its stderr, capped at [`LOG_CAP`] when that is a file (podvisord
/// points it at the pod's `vmm.log`; a restart keeps the newest lines).
fn log_writer() -> BoxMakeWriter {
    let capped = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
        .and_then(|f| CappedFile::from_file(f, LOG_CAP, LOG_RESTARTED).ok());
    match capped {
        Some(f) => BoxMakeWriter::new(std::sync::Mutex::new(f)),
        None => BoxMakeWriter::new(std::io::stderr),
    }
}

fn main() {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(log_writer())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = vm_config(Cli::parse()).and_then(|c| run(c, start));
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            if code == 0 {
                tracing::info!("VM ended: {reason}");
            } else {
                tracing::error!("VM ended: {reason}");
            }
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("podvisor-vmm: error: {e:#}");
            std::process::exit(1);
        }
    }
}
