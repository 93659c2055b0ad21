//! A Python virtual environment with PyPI's `kubernetes` client, for interoperability tests
//! against its WebSocket stream client (`kubernetes.stream.ws_client.WSClient`,
//! `PortForward`).
//!
//! Built once per machine from Debian's `/usr/bin/python3 -m venv` (python3-venv) and
//! `pip install` of [`REQUIREMENTS`] (exact pins), then kept in
//! `/var/cache/podvisor/pyvenv-<key>`, `<key>` the first 16 hex digits of the SHA-256 of the
//! requirements and the Python version: other pins or another Python make another venv.
//! It is built in a temporary directory beside that and renamed into place once it imports
//! the client, so a half-built venv is never used; a lock file there keeps two test
//! processes from building it at once.
//!
//! Only the venv's `bin/python3` is meant to be run (`python3 -m pip`, `python3 script.py`):
//! the rename leaves its scripts (`bin/pip`, `bin/activate`) naming the temporary
//! directory.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use sha2::{Digest, Sha256};

/// What the venv holds: exact versions (they are also part of its cache key).
pub const REQUIREMENTS: &str = "kubernetes==37.0.3\nwebsocket-client==1.9.2\n";
/// The `kubernetes` version [`REQUIREMENTS`] pins, checked after the install.
const KUBERNETES_VERSION: &str = "37.0.3";
/// Debian's Python, with its venv module (python3-venv).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Where the venvs are kept, beside the guest kernel cache.
const CACHE_DIR: &str = "/var/cache/podvisor";
/// What proves the venv usable.
const IMPORT_CHECK: &str = "import kubernetes, kubernetes.stream.ws_client\n\
    from kubernetes.stream.ws_client import WSClient, PortForward\n\
    print(kubernetes.__version__)";
/// How long [`pypi_reachable`] waits for a connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `python3` of the venv with the `kubernetes` client, built first if this machine has
/// none yet (needs PyPI then); once per process.
pub fn kubernetes_python() -> anyhow::Result<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| ensure_venv().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The venv's `python3` if it was built already (nothing is built here).
pub fn cached_kubernetes_python() -> anyhow::Result<Option<PathBuf>> {
    let python = venv_dir()?.join("bin/python3");
    Ok(python.exists().then_some(python))
}

/// The venv's directory: `/var/cache/podvisor/pyvenv-<key>`.
pub fn venv_dir() -> anyhow::Result<PathBuf> {
    Ok(Path::new(CACHE_DIR).join(format!("pyvenv-{}", cache_key(&python_version()?))))
}

/// `sys.version` of the system Python.
fn python_version() -> anyhow::Result<String> {
    static VERSION: OnceLock<Result<String, String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            run_python(Path::new(SYSTEM_PYTHON), "import sys; print(sys.version)")
                .map(|v| v.trim().to_string())
                .map_err(|e| {
                    format!("{e:#} (install Debian's python3 and python3-venv: make setup)")
                })
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The first 16 hex digits of the SHA-256 of the requirements and the Python version.
fn cache_key(python_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(REQUIREMENTS.as_bytes());
    h.update(b"\npython ");
    h.update(python_version.as_bytes());
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `python -c code`; its standard output.
fn run_python(python: &Path, code: &str) -> anyhow::Result<String> {
    let out = Command::new(python)
        .arg("-c")
        .arg(code)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", python.display()))?;
    ensure!(
        out.status.success(),
        "{} -c {code:?} failed ({}):\n{}",
        python.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An exclusive `flock` on a file, released when dropped (the file is closed).
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> anyhow::Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        let fd = file.as_raw_fd();
        // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Self { _file: file });
        }
        println!(
            "[python] waiting for another process building the venv ({})",
            path.display()
        );
        loop {
            // SAFETY: as above; blocks until the other holder closes its descriptor.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                return Ok(Self { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("flock {}", path.display()));
            }
        }
    }
}

/// Builds the venv unless it is there; returns its `python3`.
fn ensure_venv() -> anyhow::Result<PathBuf> {
    let dir = venv_dir()?;
    let python = dir.join("bin/python3");
    if python.exists() {
        return Ok(python);
    }
    std::fs::create_dir_all(CACHE_DIR).with_context(|| format!("create {CACHE_DIR}"))?;
    let _lock = Lock::take(&Path::new(CACHE_DIR).join("pyvenv.lock"))?;
    // Another process may have built it while this one waited.
    if python.exists() {
        return Ok(python);
    }
    let name = dir
        .file_name()
        .context("venv directory without a name")?
        .to_string_lossy()
        .into_owned();
    remove_stale_builds(&name);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.build-"))
        .tempdir_in(CACHE_DIR)
        .with_context(|| format!("temporary directory in {CACHE_DIR}"))?;
    build_venv(tmp.path(), &dir)?;
    let built = tmp.keep();
    if let Err(e) = std::fs::rename(&built, &dir) {
        let _ = std::fs::remove_dir_all(&built);
        return Err(e).with_context(|| format!("rename {} to {}", built.display(), dir.display()));
    }
    println!("[python] {} is ready", dir.display());
    Ok(python)
}

/// Removes what builds of the venv `name` left when they died (the lock is held, so none
/// is under way).
fn remove_stale_builds(name: &str) {
    let prefix = format!(".{name}.build-");
    let Ok(entries) = std::fs::read_dir(CACHE_DIR) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            println!(
                "[python] removing an unfinished build {}",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Makes a venv in the empty directory `at` (to become `dest`), installs [`REQUIREMENTS`]
/// and checks that the client imports.
fn build_venv(at: &Path, dest: &Path) -> anyhow::Result<()> {
    println!(
        "[python] creating {} ({}) with {}",
        dest.display(),
        REQUIREMENTS.trim().replace('\n', ", "),
        SYSTEM_PYTHON
    );
    run(
        Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(at),
        "python3 -m venv (Debian's python3-venv: make setup)",
    )?;
    let requirements = at.join("podvisor-requirements.txt");
    std::fs::write(&requirements, REQUIREMENTS)
        .with_context(|| format!("write {}", requirements.display()))?;
    println!("[python] pip install into {}", at.display());
    run(
        Command::new(at.join("bin/python3"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "-q",
                "-r",
            ])
            .arg(&requirements),
        "pip install (needs PyPI)",
    )?;
    let version = run_python(&at.join("bin/python3"), IMPORT_CHECK)?;
    ensure!(
        version.trim() == KUBERNETES_VERSION,
        "the venv has kubernetes {:?}, not {KUBERNETES_VERSION}",
        version.trim()
    );
    Ok(())
}

/// Runs `cmd` to completion; fails with its output if it fails.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Whether pip's package index answers a TCP connection (its `index-url`: `PIP_INDEX_URL`
/// or the pip configuration files, else pypi.org; through `https_proxy` if that is set).
pub fn pypi_reachable() -> bool {
    let url = std::env::var("https_proxy")
        .or_else(|_| std::env::var("HTTPS_PROXY"))
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(index_url);
    let Some((host, port)) = host_port(&url) else {
        return false;
    };
    let Ok(addrs) = (host.as_str(), port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok())
}

/// pip's index URL as pip would find it (environment, then the configuration files in
/// pip's order, the last one that sets it winning).
fn index_url() -> String {
    if let Ok(u) = std::env::var("PIP_INDEX_URL")
        && !u.is_empty()
    {
        return u;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let mut files = vec![
        PathBuf::from("/etc/xdg/pip/pip.conf"),
        PathBuf::from("/etc/pip.conf"),
        Path::new(&home).join(".pip/pip.conf"),
        Path::new(&home).join(".config/pip/pip.conf"),
    ];
    if let Some(f) = std::env::var_os("PIP_CONFIG_FILE") {
        files.push(PathBuf::from(f));
    }
    let mut url = "https://pypi.org/simple".to_string();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=')
                && matches!(k.trim(), "index-url" | "index_url")
            {
                url = v.trim().to_string();
            }
        }
    }
    url
}

/// Host and port of an `http(s)://[user@]host[:port]/...` URL.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = if scheme == "http" { 80 } else { 443 };
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .map_or(Some(default_port), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_follows_pins_and_python() {
        let a = cache_key("3.11.2 (main) [GCC 12.2.0]");
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, cache_key("3.11.2 (main) [GCC 12.2.0]"));
        assert_ne!(a, cache_key("3.12.0 (main) [GCC 13.1.0]"));
    }

    #[test]
    fn index_hosts() {
        assert_eq!(
            host_port("https://pypi.org/simple"),
            Some(("pypi.org".into(), 443))
        );
        assert_eq!(
            host_port("http://user:pw@mirror.local:3141/root/pypi/+simple/"),
            Some(("mirror.local".into(), 3141))
        );
        assert_eq!(host_port("http://[::1]/simple"), Some(("::1".into(), 80)));
        assert_eq!(host_port("pypi.org"), None);
    }

    /// Builds the venv (or uses the cached one) and imports the stream client with it.
    /// Skipped, with a notice, when there is no cached venv and PyPI cannot be reached.
    #[test]
    fn kubernetes_stream_client_imports() -> anyhow::Result<()> {
        if cached_kubernetes_python()?.is_none() && !pypi_reachable() {
            println!(
                "[python] SKIPPED: no cached venv at {} and PyPI is unreachable",
                venv_dir()?.display()
            );
            return Ok(());
        }
        let python = kubernetes_python()?;
        assert!(python.starts_with(venv_dir()?));
        let version = run_python(&python, IMPORT_CHECK)?;
        assert_eq!(version.trim(), KUBERNETES_VERSION);
        let ws = run_python(
            &python,
            "import websocket, sys; print(websocket.__version__); print(sys.prefix)",
        )?;
        let mut lines = ws.lines();
        assert_eq!(lines.next(), Some("1.9.2"));
        assert_eq!(
            lines.next().map(PathBuf::from),
            Some(venv_dir()?),
            "the renamed venv must be its own prefix"
        );
        Ok(())
    }
}
