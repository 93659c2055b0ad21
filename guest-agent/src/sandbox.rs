//! Pod-wide setup: hostname, /etc/hosts, /etc/resolv.conf and sysctls. The files are written
//! to the sandbox directory and bind-mounted read-only into every container.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use podvisor_proto::v1::HostEntry;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid hostname {0:?}")]
    Hostname(String),
    #[error("invalid sysctl name {0:?}")]
    SysctlName(String),
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
}

/// Checks a hostname (RFC 1123 labels, at most 64 bytes as the kernel allows).
pub fn validate_hostname(h: &str) -> Result<(), SandboxError> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Hostname(h.to_owned()))
    }
}

/// Maps a sysctl name ("net.ipv4.ip_forward" or "net/ipv4/ip_forward") to its path below
/// `/proc/sys`, refusing anything that could leave that directory.
pub fn sysctl_path(name: &str) -> Result<PathBuf, SandboxError> {
    let bad = || SandboxError::SysctlName(name.to_owned());
    let sep = if name.contains('/') { '/' } else { '.' };
    let mut p = PathBuf::from("/proc/sys");
    for part in name.split(sep) {
        if part.is_empty()
            || part == ".."
            || part == "."
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(bad());
        }
        p.push(part);
    }
    if p == Path::new("/proc/sys") {
        return Err(bad());
    }
    Ok(p)
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

/// Applies a SetupSandbox request. `set_kernel_state` is false in host tests (no sethostname,
/// no sysctls).
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
        .map(|(k, v)| Ok((sysctl_path(k)?, v)))
        .collect::<Result<Vec<_>, SandboxError>>()?;
    let hosts = hosts_file(&req.hostname, &req.hosts)?;
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
        for (path, value) in sysctls {
            write(path, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn hostnames_are_checked() {
        assert!(validate_hostname("my-pod.ns").is_ok());
        for bad in ["", "-a", "a-", "a..b", "a/b", &"x".repeat(65)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
