//! Pod-wide setup: hostname, /etc/hosts, /etc/resolv.conf and sysctls, preceded by the RNG
//! seed and clock of VMs restored from a template ([`crate::identity`]). The files are written
//! to the sandbox directory and bind-mounted read-only into every container.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use podvisor_common::names;
use podvisor_proto::v1::HostEntry;

/// Where sysctls are written.
const PROC_SYS: &str = "/proc/sys";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid hostname {0:?}")]
    Hostname(String),
    #[error("invalid sysctl name {0:?}")]
    SysctlName(String),
    #[error("sysctl {0:?} does not exist in the pod's kernel")]
    UnknownSysctl(String),
    #[error("invalid /etc/hosts entry {0:?}")]
    HostEntry(String),
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("set hostname")]
    SetHostname(#[source] nix::Error),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

impl SandboxError {
    /// The request was wrong (as opposed to a failing write or system call).
    pub fn is_invalid_argument(&self) -> bool {
        match self {
            Self::Hostname(_)
            | Self::SysctlName(_)
            | Self::UnknownSysctl(_)
            | Self::HostEntry(_) => true,
            Self::Write { .. } | Self::SetHostname(_) => false,
            Self::Identity(e) => e.is_invalid_argument(),
        }
    }
}

/// Checks a hostname (RFC 1123 labels, at most 64 bytes as the kernel allows).
pub fn validate_hostname(h: &str) -> Result<(), SandboxError> {
    names::validate_hostname(h).map_err(|_| SandboxError::Hostname(h.to_owned()))
}

/// Maps a sysctl name ("net.ipv4.ip_forward" or "net/ipv4/ip_forward") to its path below
/// `/proc/sys`, refusing anything that could leave that directory.
pub fn sysctl_path(name: &str) -> Result<PathBuf, SandboxError> {
    let rel =
        names::sysctl_relative_path(name).map_err(|_| SandboxError::SysctlName(name.to_owned()))?;
    Ok(Path::new(PROC_SYS).join(rel))
}

/// Writes a sysctl that must exist: a name this kernel does not have is the request's
/// error (ENOENT without O_CREAT), not a failed write.
fn write_sysctl(path: &Path, name: &str, value: &str) -> Result<(), SandboxError> {
    let written = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()));
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(SandboxError::UnknownSysctl(name.to_owned()))
        }
        Err(source) => Err(SandboxError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Contents of the pod's /etc/hosts.
pub fn hosts_file(hostname: &str, entries: &[HostEntry]) -> Result<String, SandboxError> {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for e in entries {
        let valid_ip = e.ip.parse::<std::net::IpAddr>().is_ok();
        let valid_names = !e.hostnames.is_empty()
            && e.hostnames
                .iter()
                .all(|n| !n.is_empty() && !n.bytes().any(|b| b.is_ascii_whitespace() || b == b'#'));
        if !valid_ip || !valid_names {
            return Err(SandboxError::HostEntry(format!(
                "{} {}",
                e.ip,
                e.hostnames.join(" ")
            )));
        }
        let _ = writeln!(s, "{}\t{}", e.ip, e.hostnames.join(" "));
    }
    if !hostname.is_empty()
        && !entries
            .iter()
            .any(|e| e.hostnames.iter().any(|n| n == hostname))
    {
        let _ = writeln!(s, "127.0.1.1\t{hostname}");
    }
    Ok(s)
}

fn write(path: PathBuf, contents: &str) -> Result<(), SandboxError> {
    // Written in place (not renamed over) so running containers' bind mounts see updates.
    fs::write(&path, contents).map_err(|source| SandboxError::Write { path, source })
}

/// Files written for a sandbox; bind-mounted into containers.
#[derive(Debug, Clone)]
pub struct SandboxFiles {
    pub hostname: PathBuf,
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub shm: PathBuf,
}

impl SandboxFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            hostname: dir.join("hostname"),
            hosts: dir.join("hosts"),
            resolv_conf: dir.join("resolv.conf"),
            shm: dir.join("shm"),
        }
    }
}

/// Applies a SetupSandbox request once all of it is valid. The RNG seed and the clock come
/// first, so that everything after (file times, the hostname, whatever the containers do) sees
/// this VM's own clock and randomness. `set_kernel_state` is false in host tests (no RNG seed,
/// clock step, sethostname or sysctls).
pub fn setup(
    files: &SandboxFiles,
    req: &podvisor_proto::v1::SetupSandboxRequest,
    set_kernel_state: bool,
) -> Result<(), SandboxError> {
    if !req.hostname.is_empty() {
        validate_hostname(&req.hostname)?;
    }
    let sysctls = req
        .sysctls
        .iter()
        .map(|(k, v)| Ok((sysctl_path(k)?, k, v)))
        .collect::<Result<Vec<_>, SandboxError>>()?;
    let hosts = hosts_file(&req.hostname, &req.hosts)?;
    crate::identity::validate(&req.random_seed, req.time_unix_nanos)?;
    // A sysctl this kernel lacks is refused before anything changes.
    if set_kernel_state
        && let Some((_, name, _)) = sysctls.iter().find(|(path, _, _)| !path.exists())
    {
        return Err(SandboxError::UnknownSysctl((*name).clone()));
    }
    if set_kernel_state {
        if !req.random_seed.is_empty() {
            crate::identity::mix_random_seed(&req.random_seed)?;
        }
        if req.time_unix_nanos != 0 {
            crate::identity::step_clock(req.time_unix_nanos)?;
        }
    }
    write(files.hostname.clone(), &format!("{}\n", req.hostname))?;
    write(files.hosts.clone(), &hosts)?;
    write(files.resolv_conf.clone(), &req.resolv_conf)?;
    if let Err(source) = fs::create_dir_all(&files.shm) {
        return Err(SandboxError::Write {
            path: files.shm.clone(),
            source,
        });
    }
    if set_kernel_state {
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(SandboxError::SetHostname)?;
        }
        for (path, name, value) in sysctls {
            write_sysctl(&path, name, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::v1::SetupSandboxRequest;

    #[test]
    fn sysctl_names_stay_in_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").expect("valid"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").expect("valid"),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "",
            "..",
            "net/../../etc/passwd",
            "a..b",
            "net.ipv4 x",
            "/abs",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hosts_file_lists_entries_and_hostname() {
        let s = hosts_file(
            "web-0",
            &[HostEntry {
                ip: "10.0.0.5".into(),
                hostnames: vec!["db".into(), "db.local".into()],
            }],
        )
        .expect("valid");
        assert!(s.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(s.contains("10.0.0.5\tdb db.local\n"));
        assert!(s.contains("127.0.1.1\tweb-0\n"));
        assert!(
            hosts_file(
                "",
                &[HostEntry {
                    ip: "nope".into(),
                    hostnames: vec!["x".into()]
                }]
            )
            .is_err()
        );
    }

    fn request() -> SetupSandboxRequest {
        SetupSandboxRequest {
            sandbox_id: "pod-1".into(),
            hostname: "web-0".into(),
            resolv_conf: "nameserver 10.96.0.10\n".into(),
            hosts: Vec::new(),
            sysctls: Default::default(),
            random_seed: vec![0x5a; 64],
            // Now, so that even a setup that wrongly touched the host's clock would not move it.
            time_unix_nanos: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                .try_into()
                .unwrap(),
        }
    }

    #[test]
    fn bad_identity_fields_are_invalid_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = SandboxFiles::new(dir.path());
        let mut long_seed = request();
        long_seed.random_seed = vec![1; crate::identity::MAX_RANDOM_SEED_LEN + 1];
        let mut negative_time = request();
        negative_time.time_unix_nanos = -1_000;
        for (what, req) in [("4097 bytes", long_seed), ("-1000 ns", negative_time)] {
            // set_kernel_state is true: validation must fail before the host's RNG or clock
            // is touched.
            let e = setup(&files, &req, true).unwrap_err();
            assert!(e.is_invalid_argument(), "{what}: {e:?}");
            assert!(e.to_string().contains(what), "{what}: {e}");
            assert!(!files.hostname.exists() && !files.hosts.exists(), "{what}");
        }
    }

    #[test]
    fn valid_identity_fields_pass_and_files_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let files = SandboxFiles::new(dir.path());
        setup(&files, &request(), false).unwrap();
        assert_eq!(fs::read_to_string(&files.hostname).unwrap(), "web-0\n");
        assert_eq!(
            fs::read_to_string(&files.resolv_conf).unwrap(),
            "nameserver 10.96.0.10\n"
        );
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(validate_hostname("my-pod.ns").is_ok());
        for bad in ["", "-a", "a-", "a..b", "a/b", &"x".repeat(65)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
