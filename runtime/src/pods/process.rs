//! A container's process as the guest agent runs it, composed from the image's defaults and
//! what the CRI request asks for, the way Docker and containerd compose them.

use std::collections::HashSet;

use podvisor_proto::v1 as agent;
use serde::{Deserialize, Serialize};

use crate::image::ImageConfig;

/// Capabilities a container gets unless its request adds or drops some (the set containerd
/// and the guest agent use).
pub use podvisor_proto::caps::DEFAULT as DEFAULT_CAPS;

/// Every capability the guest kernel (6.1) knows, `CAP_` included, for `ALL` in add/drop lists.
fn all_caps() -> impl Iterator<Item = String> {
    podvisor_proto::caps::NAMES
        .iter()
        .map(|n| format!("CAP_{n}"))
}

/// The user a container asks to run as (CRI security context); unset fields come from the
/// image's `User`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSpec {
    /// `run_as_user`.
    pub uid: Option<u32>,
    /// `run_as_group`.
    pub gid: Option<u32>,
    /// `run_as_username`.
    pub username: String,
    /// `supplemental_groups`.
    pub supplemental_groups: Vec<u32>,
}

/// What an exec in the container inherits from its init process: kept in the pod directory
/// so ExecSync works after a restart of podvisord too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// `KEY=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Numeric user (when `username` is empty).
    pub uid: u32,
    /// Primary group, if given.
    pub gid: Option<u32>,
    /// User name, resolved in the guest.
    pub username: String,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// The container's capability set (bounding, effective and permitted), when its
    /// request changed the defaults: an exec gets no more than its container.
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    /// The container's no_new_privs.
    #[serde(default)]
    pub no_new_privs: bool,
    /// The container's seccomp program, hex; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp_filter: Option<String>,
}

impl ExecDefaults {
    /// The agent's user message.
    pub fn user(&self) -> agent::User {
        agent::User {
            uid: self.uid,
            gid: self.gid,
            additional_gids: self.additional_gids.clone(),
            username: self.username.clone(),
        }
    }

    /// The seccomp program as the agent takes it (empty for none).
    pub fn seccomp_filter_bytes(&self) -> Result<Vec<u8>, ProcessError> {
        self.seccomp_filter
            .as_deref()
            .map_or(Ok(Vec::new()), hex::decode)
            .map_err(ProcessError::CorruptSeccomp)
    }

    /// An exec of `args` with these defaults (no terminal, no stdin): the container's user,
    /// environment, working directory, capabilities, no_new_privs and seccomp.
    pub fn process(&self, args: Vec<String>) -> Result<agent::Process, ProcessError> {
        Ok(agent::Process {
            args,
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: Some(self.user()),
            capabilities: self.capabilities.as_deref().map(capability_sets),
            no_new_privs: self.no_new_privs,
            seccomp_filter: self.seccomp_filter_bytes()?,
            ..Default::default()
        })
    }
}

/// Why a process cannot be composed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProcessError {
    /// Neither the request nor the image has a command.
    #[error("no command to run: the container config and image {0:?} have none")]
    NoCommand(String),
    /// A capability name that is not one.
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    /// An environment variable name that cannot be one.
    #[error("invalid environment variable name {0:?}")]
    BadEnvName(String),
    /// A recorded seccomp program that is not hex.
    #[error("the recorded seccomp program is corrupt")]
    CorruptSeccomp(#[source] hex::FromHexError),
}

/// The argument vector: a CRI `command` replaces the image's Entrypoint and drops its Cmd;
/// CRI `args` replace the Cmd.
pub fn compose_args(
    image_name: &str,
    image: &ImageConfig,
    command: &[String],
    args: &[String],
) -> Result<Vec<String>, ProcessError> {
    let mut argv: Vec<String> = if command.is_empty() {
        image.entrypoint.clone()
    } else {
        command.to_vec()
    };
    if !args.is_empty() {
        argv.extend_from_slice(args);
    } else if command.is_empty() {
        argv.extend_from_slice(&image.cmd);
    }
    if argv.is_empty() {
        return Err(ProcessError::NoCommand(image_name.to_string()));
    }
    Ok(argv)
}

/// The image's environment overlaid by the request's: a name the request sets replaces the
/// image's value in place, new names follow in request order.
pub fn compose_env(
    image_env: &[String],
    envs: &[(String, String)],
) -> Result<Vec<String>, ProcessError> {
    let mut env: Vec<String> = image_env.to_vec();
    for (k, v) in envs {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ProcessError::BadEnvName(k.clone()));
        }
        let entry = format!("{k}={v}");
        let prefix = format!("{k}=");
        match env.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(e) => *e = entry,
            None => env.push(entry),
        }
    }
    Ok(env)
}

/// The user: the request's fields first, the image's `User` (`uid[:gid]` or
/// `name[:group]`) for what it leaves out. A group given by name in the image cannot be
/// passed to the agent (it takes a numeric gid) and is left to the user's passwd entry.
pub fn compose_user(image_user: &str, spec: &UserSpec) -> ExecDefaults {
    let mut out = ExecDefaults {
        additional_gids: spec.supplemental_groups.clone(),
        ..Default::default()
    };
    let (img_name, img_group) = match image_user.split_once(':') {
        Some((u, g)) => (u, g),
        None => (image_user, ""),
    };
    if let Some(uid) = spec.uid {
        out.uid = uid;
    } else if !spec.username.is_empty() {
        out.username = spec.username.clone();
    } else if let Ok(uid) = img_name.parse::<u32>() {
        out.uid = uid;
    } else {
        out.username = img_name.to_string();
    }
    out.gid = spec.gid.or_else(|| {
        // The image's group only goes with the image's user.
        (spec.uid.is_none() && spec.username.is_empty())
            .then(|| img_group.parse::<u32>().ok())
            .flatten()
    });
    out
}

fn normalise_cap(name: &str) -> Result<String, ProcessError> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    if all_caps().any(|c| c == full) {
        Ok(full)
    } else {
        Err(ProcessError::UnknownCapability(name.to_string()))
    }
}

/// Every capability, sorted: a privileged container's set.
pub fn all_capabilities() -> Vec<String> {
    let mut caps: Vec<String> = all_caps().collect();
    caps.sort();
    caps
}

/// The agent's capability sets for a process holding `caps`: bounding, effective and
/// permitted; nothing inheritable or ambient.
pub fn capability_sets(caps: &[String]) -> agent::Capabilities {
    agent::Capabilities {
        bounding: caps.to_vec(),
        effective: caps.to_vec(),
        permitted: caps.to_vec(),
        inheritable: Vec::new(),
        ambient: Vec::new(),
    }
}

/// The capability set for `add` and `drop` (CRI names, with or without `CAP_`, `ALL`
/// allowed), sorted; `None` when both are empty (the agent's defaults apply).
pub fn compose_capabilities(
    add: &[String],
    drop: &[String],
) -> Result<Option<Vec<String>>, ProcessError> {
    if add.is_empty() && drop.is_empty() {
        return Ok(None);
    }
    let is_all = |s: &String| s.trim().eq_ignore_ascii_case("ALL");
    let mut set: HashSet<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    if add.iter().any(is_all) {
        set.extend(all_caps());
    }
    for a in add.iter().filter(|a| !is_all(a)) {
        set.insert(normalise_cap(a)?);
    }
    if drop.iter().any(is_all) {
        set.clear();
        // `drop: [ALL], add: [X]` keeps X, as in Kubernetes.
        for a in add.iter().filter(|a| !is_all(a)) {
            set.insert(normalise_cap(a)?);
        }
    }
    for d in drop.iter().filter(|d| !is_all(d)) {
        set.remove(&normalise_cap(d)?);
    }
    let mut caps: Vec<String> = set.into_iter().collect();
    caps.sort();
    Ok(Some(caps))
}

/// A signal number from an image's `StopSignal` (`SIGQUIT`, `QUIT`, `3`); SIGTERM when
/// unset or unknown.
pub fn stop_signal(name: &str) -> u32 {
    const TERM: u32 = libc::SIGTERM as u32;
    let name = name.trim();
    if name.is_empty() {
        return TERM;
    }
    if let Ok(n) = name.parse::<u32>() {
        return n;
    }
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match short {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        "PWR" => libc::SIGPWR,
        "STOP" => libc::SIGSTOP,
        _ => {
            tracing::warn!("unknown stop signal {name:?}: using SIGTERM");
            libc::SIGTERM
        }
    };
    n as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: s(entrypoint),
            cmd: s(cmd),
            ..Default::default()
        }
    }

    #[test]
    fn args_follow_docker_rules() {
        let img = image(&["/entry", "-x"], &["default"]);
        assert_eq!(
            compose_args("i", &img, &[], &[]).unwrap(),
            ["/entry", "-x", "default"]
        );
        assert_eq!(
            compose_args("i", &img, &[], &s(&["a"])).unwrap(),
            ["/entry", "-x", "a"]
        );
        assert_eq!(
            compose_args("i", &img, &s(&["sh"]), &[]).unwrap(),
            ["sh"],
            "a command drops the image's cmd"
        );
        assert_eq!(
            compose_args("i", &img, &s(&["sh"]), &s(&["-c", "true"])).unwrap(),
            ["sh", "-c", "true"]
        );
        assert_eq!(
            compose_args("i", &image(&[], &["sh"]), &[], &[]).unwrap(),
            ["sh"]
        );
        assert_eq!(
            compose_args("busybox", &image(&[], &[]), &[], &[]).unwrap_err(),
            ProcessError::NoCommand("busybox".into())
        );
    }

    #[test]
    fn env_overlays_in_place() {
        let env = compose_env(
            &s(&["PATH=/bin", "A=1"]),
            &[("A".into(), "2".into()), ("B".into(), "x=y".into())],
        )
        .unwrap();
        assert_eq!(env, ["PATH=/bin", "A=2", "B=x=y"]);
        assert!(compose_env(&[], &[("A=B".into(), "1".into())]).is_err());
        assert!(compose_env(&[], &[(String::new(), "1".into())]).is_err());
    }

    #[test]
    fn user_from_request_then_image() {
        let u = compose_user("1000:50", &UserSpec::default());
        assert_eq!((u.uid, u.gid, u.username.as_str()), (1000, Some(50), ""));
        let u = compose_user("app:staff", &UserSpec::default());
        assert_eq!((u.uid, u.gid, u.username.as_str()), (0, None, "app"));
        let u = compose_user(
            "app",
            &UserSpec {
                uid: Some(7),
                supplemental_groups: vec![3],
                ..Default::default()
            },
        );
        assert_eq!((u.uid, u.gid, u.username.as_str()), (7, None, ""));
        assert_eq!(u.additional_gids, [3]);
        let u = compose_user(
            "1:1",
            &UserSpec {
                username: "nobody".into(),
                gid: Some(9),
                ..Default::default()
            },
        );
        assert_eq!((u.uid, u.gid, u.username.as_str()), (0, Some(9), "nobody"));
        let u = compose_user("", &UserSpec::default());
        assert_eq!((u.uid, u.gid, u.username.as_str()), (0, None, ""));
    }

    #[test]
    fn capabilities_add_and_drop() {
        assert_eq!(compose_capabilities(&[], &[]).unwrap(), None);
        let set = compose_capabilities(&s(&["sys_admin"]), &s(&["CAP_KILL", "net_raw"]))
            .unwrap()
            .unwrap();
        let c = capability_sets(&set);
        assert!(c.bounding.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(!c.bounding.contains(&"CAP_KILL".to_string()));
        assert!(!c.bounding.contains(&"CAP_NET_RAW".to_string()));
        assert!(c.effective.contains(&"CAP_CHOWN".to_string()));
        assert!(c.ambient.is_empty());

        let set = compose_capabilities(&s(&["NET_BIND_SERVICE"]), &s(&["ALL"]))
            .unwrap()
            .unwrap();
        assert_eq!(capability_sets(&set).permitted, ["CAP_NET_BIND_SERVICE"]);
        let set = compose_capabilities(&s(&["ALL"]), &[]).unwrap().unwrap();
        assert_eq!(capability_sets(&set).bounding.len(), all_caps().count());
        // Dropping everything is an empty set, not the defaults.
        assert_eq!(
            compose_capabilities(&[], &s(&["ALL"])).unwrap(),
            Some(vec![])
        );

        // An exec gets its container's set and no_new_privs.
        let defaults = ExecDefaults {
            capabilities: Some(vec![]),
            no_new_privs: true,
            ..Default::default()
        };
        let p = defaults.process(s(&["true"])).expect("process");
        assert_eq!(p.capabilities, Some(capability_sets(&[])));
        assert!(p.no_new_privs);
        assert_eq!(
            ExecDefaults::default()
                .process(vec![])
                .expect("process")
                .capabilities,
            None
        );
        // Records written before these fields read as the defaults.
        let old: ExecDefaults = serde_json::from_str(
            r#"{"env":[],"cwd":"/","uid":0,"gid":null,"username":"","additional_gids":[]}"#,
        )
        .unwrap();
        assert_eq!((old.capabilities, old.no_new_privs), (None, false));
        assert_eq!(
            compose_capabilities(&s(&["CAP_NOPE"]), &[]).unwrap_err(),
            ProcessError::UnknownCapability("CAP_NOPE".into())
        );
    }

    #[test]
    fn stop_signals() {
        assert_eq!(stop_signal(""), 15);
        assert_eq!(stop_signal("SIGQUIT"), 3);
        assert_eq!(stop_signal("int"), 2);
        assert_eq!(stop_signal("9"), 9);
        assert_eq!(stop_signal("SIGNOPE"), 15);
    }
}
