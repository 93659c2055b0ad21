//! Seccomp profiles in the JSON format kubelet passes for `Localhost` (the OCI runtime spec's
//! `linux.seccomp`, with Docker's `includes`/`excludes` and `names`), resolved to a [`Profile`].

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};
use serde::Deserialize;

use super::bpf::{Action, Profile, Rule};
use super::error::SeccompError;
use super::syscalls::X86_64;

/// The guest kernel's version, for `minKernel`.
pub const GUEST_KERNEL: (u32, u32) = (6, 1);

/// The profile file as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileFile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    syscalls: Vec<SyscallEntry>,
    #[serde(default)]
    listener_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyscallEntry {
    #[serde(default)]
    names: Vec<String>,
    /// Docker's older single-name form.
    #[serde(default)]
    name: String,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<ArgEntry>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArgEntry {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// Docker's conditions on an entry: capabilities, architectures, kernel version.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: String,
}

/// This machine's names for its architecture in profiles.
const ARCH_NAMES: &[&str] = &["amd64", "x86_64", "SCMP_ARCH_X86_64"];

fn action(name: &str, errno: Option<u32>, default_errno: u32) -> Result<Action, SeccompError> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => Action::Allow,
        "SCMP_ACT_ERRNO" => Action::Errno(errno.unwrap_or(default_errno)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
        "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
        "SCMP_ACT_TRAP" => Action::Trap,
        "SCMP_ACT_TRACE" => Action::Trace(errno.unwrap_or(default_errno)),
        "SCMP_ACT_LOG" => Action::Log,
        "SCMP_ACT_NOTIFY" => return Err(SeccompError::Notify),
        other => return Err(SeccompError::UnknownAction(other.to_string())),
    })
}

fn condition(arg: &ArgEntry) -> Result<SeccompCondition, SeccompError> {
    if arg.index > 5 {
        return Err(SeccompError::ArgIndex(arg.index));
    }
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        // (arg & value) == valueTwo
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => return Err(SeccompError::UnknownOperator(other.to_string())),
    };
    SeccompCondition::new(arg.index, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Rule)
}

fn kernel_at_least(min: &str) -> Result<bool, SeccompError> {
    if min.is_empty() {
        return Ok(true);
    }
    let mut parts = min.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor) <= GUEST_KERNEL),
        _ => Err(SeccompError::MinKernel(min.to_string())),
    }
}

impl Filter {
    /// Whether an entry with these `includes` applies.
    fn included(&self, caps: &[String]) -> Result<bool, SeccompError> {
        Ok(self.caps.iter().all(|c| caps.contains(c))
            && (self.arches.is_empty()
                || self.arches.iter().any(|a| ARCH_NAMES.contains(&a.as_str())))
            && kernel_at_least(&self.min_kernel)?)
    }

    /// Whether an entry with these `excludes` is left out.
    fn excluded(&self, caps: &[String]) -> bool {
        self.caps.iter().any(|c| caps.contains(c))
            || self.arches.iter().any(|a| ARCH_NAMES.contains(&a.as_str()))
    }
}

/// The number of a system call on x86_64.
pub fn syscall_number(name: &str) -> Option<u32> {
    X86_64
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| X86_64[i].1)
}

/// The highest number the table knows.
pub fn max_known() -> u32 {
    X86_64.iter().map(|(_, nr)| *nr).max().unwrap_or(0)
}

impl ProfileFile {
    /// Parses a profile.
    pub fn parse(text: &[u8]) -> Result<Self, SeccompError> {
        serde_json::from_slice(text).map_err(SeccompError::Json)
    }

    /// The profile for a container whose bounding set is `caps` (`CAP_...` names). Names this
    /// architecture does not have are skipped, as runc skips them.
    pub fn resolve(&self, caps: &[String]) -> Result<Profile, SeccompError> {
        if !self.listener_path.is_empty() {
            return Err(SeccompError::Notify);
        }
        let default_errno = self.default_errno_ret.unwrap_or(libc::EPERM as u32);
        let default = action(&self.default_action, self.default_errno_ret, default_errno)?;
        let mut syscalls: BTreeMap<u32, Vec<Rule>> = BTreeMap::new();
        for entry in &self.syscalls {
            if !entry.includes.included(caps)? || entry.excludes.excluded(caps) {
                continue;
            }
            let act = action(&entry.action, entry.errno_ret, default_errno)?;
            // As runc: the conditions all hold, unless one argument has several: then each
            // condition is an alternative of its own.
            let conditions = entry
                .args
                .iter()
                .map(condition)
                .collect::<Result<Vec<_>, _>>()?;
            let mut indexes: Vec<u8> = entry.args.iter().map(|a| a.index).collect();
            indexes.sort_unstable();
            let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
            let rules: Vec<Vec<SeccompCondition>> = if repeated {
                conditions.into_iter().map(|c| vec![c]).collect()
            } else {
                vec![conditions]
            };
            let names = entry
                .names
                .iter()
                .chain(Some(&entry.name).filter(|n| !n.is_empty()));
            for name in names {
                let Some(nr) = syscall_number(name) else {
                    tracing::debug!(syscall = %name, "seccomp profile: not a system call on x86_64, skipped");
                    continue;
                };
                syscalls
                    .entry(nr)
                    .or_default()
                    .extend(rules.iter().map(|c| Rule {
                        conditions: c.clone(),
                        action: act,
                    }));
            }
        }
        Ok(Profile {
            default,
            syscalls,
            max_known: max_known(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::bpf::{compile, interpret::run};
    use super::*;

    const X86: u32 = 0xc000_003e;

    #[test]
    fn table_is_sorted_and_knows_common_calls() {
        assert!(X86_64.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("chmod"), Some(90));
        assert_eq!(syscall_number("mkdirat"), Some(258));
        assert_eq!(syscall_number("clone3"), Some(435));
        assert_eq!(syscall_number("mmap2"), None);
    }

    #[test]
    fn deny_list_profile() {
        let text = br#"{
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["chmod", "fchmodat", "not_a_call"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"name": "kill", "action": "SCMP_ACT_KILL_PROCESS",
                 "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]}
            ]
        }"#;
        let profile = ProfileFile::parse(text)
            .expect("parse")
            .resolve(&[])
            .expect("resolve");
        let p = compile(&profile).expect("compile");
        assert_eq!(run(&p, X86, 90, [0; 6]), 0x0005_0001);
        assert_eq!(run(&p, X86, 83, [0; 6]), 0x0005_000d);
        assert_eq!(run(&p, X86, 62, [1, 9, 0, 0, 0, 0]), 0x8000_0000);
        assert_eq!(run(&p, X86, 62, [1, 15, 0, 0, 0, 0]), 0x7fff_0000);
        assert_eq!(run(&p, X86, 0, [0; 6]), 0x7fff_0000);
    }

    #[test]
    fn conditions_on_one_argument_are_alternatives() {
        let text = br#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [
                {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}]}"#;
        let profile = ProfileFile::parse(text)
            .expect("parse")
            .resolve(&[])
            .expect("resolve");
        let p = compile(&profile).expect("compile");
        for (persona, want) in [(0, 0x7fff_0000), (8, 0x7fff_0000), (4, 0x0005_0001)] {
            assert_eq!(
                run(&p, X86, 135, [persona, 0, 0, 0, 0, 0]),
                want,
                "{persona}"
            );
        }
    }

    #[test]
    fn includes_and_excludes() {
        let text = br#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_PTRACE"]}},
            {"names": ["iopl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
            {"names": ["uname"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "7.0"}},
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}}]}"#;
        let file = ProfileFile::parse(text).expect("parse");
        let plain = file.resolve(&[]).expect("resolve");
        assert!(!plain.syscalls.contains_key(&101));
        assert!(!plain.syscalls.contains_key(&172));
        assert!(!plain.syscalls.contains_key(&63));
        assert!(plain.syscalls.contains_key(&39));
        let caps = ["CAP_SYS_PTRACE".to_string(), "CAP_SYS_ADMIN".to_string()];
        let admin = file.resolve(&caps).expect("resolve");
        assert!(admin.syscalls.contains_key(&101));
        assert!(!admin.syscalls.contains_key(&39));
    }

    #[test]
    fn refused_profiles() {
        let cases: [(&[u8], &str); 5] = [
            (br#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#, "notif"),
            (br#"{"defaultAction": "SCMP_ACT_NOPE"}"#, "SCMP_ACT_NOPE"),
            (
                br#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}"#,
                "argument 6",
            ),
            (
                br#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_ABOUT"}]}]}"#,
                "SCMP_CMP_ABOUT",
            ),
            (br#"{"syscalls": []}"#, "defaultAction"),
        ];
        for (text, want) in cases {
            let err = ProfileFile::parse(text)
                .and_then(|f| f.resolve(&[]))
                .expect_err("refused");
            let msg = podvisor_common::error_chain(&err);
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }
}
