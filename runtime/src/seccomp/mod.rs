//! Seccomp for containers and their execs, as CRI asks for it: `RuntimeDefault`
//! ([`default`]), `Unconfined`, or a `Localhost` profile file ([`profile`]), compiled on the
//! host into one BPF program ([`bpf`]) that the guest agent installs just before the
//! container's (or exec's) execve.
//!
//! The guest is x86_64 (the VMM runs only there), so the profiles resolve against the x86_64
//! system call table ([`syscalls`]).

pub mod bpf;
pub mod default;
mod error;
pub mod profile;
mod syscalls;

pub use error::SeccompError;

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest `Localhost` profile file read.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The seccomp a container asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SeccompChoice {
    /// No filter.
    #[default]
    Unconfined,
    /// The runtime's default profile.
    RuntimeDefault,
    /// A profile file on the host (absolute path; kubelet's).
    Localhost(PathBuf),
}

/// Reads a `Localhost` profile: at most [`MAX_PROFILE_BYTES`].
fn read_profile(path: &Path) -> Result<Vec<u8>, SeccompError> {
    let read = |source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_PROFILE_BYTES {
        return Err(SeccompError::TooLong {
            path: path.to_path_buf(),
            max: MAX_PROFILE_BYTES,
        });
    }
    Ok(text)
}

/// The program for `choice` in a container whose bounding set is `caps` (`CAP_...` names), as
/// bytes for the agent; `None` for unconfined.
pub fn program(choice: &SeccompChoice, caps: &[String]) -> Result<Option<Vec<u8>>, SeccompError> {
    let profile = match choice {
        SeccompChoice::Unconfined => return Ok(None),
        SeccompChoice::RuntimeDefault => default::profile(caps)?,
        SeccompChoice::Localhost(path) => {
            let in_file = |e| SeccompError::InFile {
                path: path.clone(),
                source: Box::new(e),
            };
            let text = read_profile(path)?;
            profile::ProfileFile::parse(&text)
                .and_then(|f| f.resolve(caps))
                .map_err(in_file)?
        }
    };
    Ok(Some(bpf::to_bytes(&bpf::compile(&profile)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconfined_has_no_program_and_default_has_one() {
        assert_eq!(program(&SeccompChoice::Unconfined, &[]).expect("ok"), None);
        let p = program(&SeccompChoice::RuntimeDefault, &[])
            .expect("ok")
            .expect("program");
        assert_eq!(p.len() % 8, 0);
        assert!(p.len() / 8 <= bpf::MAX_INSTRUCTIONS);
    }

    #[test]
    fn localhost_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.json");
        let err = program(&SeccompChoice::Localhost(missing.clone()), &[]).expect_err("missing");
        assert!(podvisor_common::error_chain(&err).contains("missing.json"));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"defaultAction\": 3}").expect("write");
        let err = program(&SeccompChoice::Localhost(bad), &[]).expect_err("bad");
        let msg = podvisor_common::error_chain(&err);
        assert!(
            msg.contains("bad.json") && msg.contains("not a valid profile"),
            "{msg}"
        );
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_PROFILE_BYTES as usize + 1]).expect("write");
        let err = program(&SeccompChoice::Localhost(big), &[]).expect_err("big");
        assert!(matches!(err, SeccompError::TooLong { .. }), "{err:?}");
    }
}
