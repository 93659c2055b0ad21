//! Names a pod's request carries into the guest: its hostname and its sysctl names. The
//! same rules are checked by podvisord before any work starts (a bad request is refused
//! as InvalidArgument naming its field) and by the agent, which trusts nothing it is sent.

use std::path::{Component, Path, PathBuf};

/// The longest hostname the kernel takes (`__NEW_UTS_LEN`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not RFC 1123 labels of letters, digits and '-', or longer than the kernel allows.
    #[error(
        "invalid hostname {0:?}: needs 1 to {MAX_HOSTNAME_LEN} bytes of dot-separated labels of \
         letters, digits and '-' (RFC 1123)"
    )]
    Hostname(String),
    /// Not a sysctl name (dotted or slashed), or one that would leave `/proc/sys`.
    #[error("invalid sysctl name {0:?}")]
    Sysctl(String),
}

/// Checks a hostname: RFC 1123 labels (letters, digits, '-' not at either end), at most
/// [`MAX_HOSTNAME_LEN`] bytes.
pub fn validate_hostname(h: &str) -> Result<(), NameError> {
    let ok = !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(NameError::Hostname(h.to_owned()))
    }
}

/// The path below `/proc/sys` of a sysctl name ("net.ipv4.ip_forward" or
/// "net/ipv4/ip_forward"; with slashes, a part may hold dots, as in an interface name), or
/// an error for anything that is not one or could leave that directory.
pub fn sysctl_relative_path(name: &str) -> Result<PathBuf, NameError> {
    let bad = || NameError::Sysctl(name.to_owned());
    let sep = if name.contains('/') { '/' } else { '.' };
    let mut p = PathBuf::new();
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
    let stays_below = p.components().all(|c| matches!(c, Component::Normal(_)));
    if p == Path::new("") || !stays_below {
        return Err(bad());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_follow_rfc_1123_and_the_kernel_limit() {
        for good in [
            "web",
            "web-0",
            "a.b.c",
            "x1",
            "a".repeat(MAX_HOSTNAME_LEN).as_str(),
        ] {
            assert_eq!(validate_hostname(good), Ok(()), "{good:?}");
        }
        let long = "a".repeat(MAX_HOSTNAME_LEN + 1);
        // The pod name crictl's validation suite uses: 68 bytes.
        let suite = "create-PodSandbox-for-container-01234567-89ab-cdef-0123-456789abcdef";
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a_b",
            "a b",
            "a\nb",
            long.as_str(),
            suite,
        ] {
            assert!(validate_hostname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sysctl_names_stay_below_proc_sys() {
        assert_eq!(
            sysctl_relative_path("net.ipv4.ip_forward"),
            Ok(PathBuf::from("net/ipv4/ip_forward"))
        );
        assert_eq!(
            sysctl_relative_path("net/ipv4/conf/eth0.100/forwarding"),
            Ok(PathBuf::from("net/ipv4/conf/eth0.100/forwarding"))
        );
        for bad in [
            "",
            ".",
            "..",
            "net..x",
            "net/../../etc",
            "/net/ipv4",
            "net.ipv4.",
            "net ipv4",
            "kernel/./x",
            "a\0b",
        ] {
            assert!(sysctl_relative_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
