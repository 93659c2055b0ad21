//! Linux network interface names, as the kernel's `dev_valid_name` accepts them.

/// A name the kernel would refuse (or that would break a path or `ip` command line).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid interface name {0:?}: 1 to 15 bytes, no '/', ':', NUL or white space")]
pub struct IfnameError(pub String);

/// Checks `name` against the kernel's rules: 1 to `IFNAMSIZ - 1` bytes, not `.` or `..`,
/// and no `/`, `:`, NUL or white space.
pub fn validate_ifname(name: &str) -> Result<(), IfnameError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(IfnameError(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_rules() {
        for good in ["eth0", "tap-0123456789a", "pvtap.1"] {
            assert_eq!(validate_ifname(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\0b",
            "0123456789abcdef",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
