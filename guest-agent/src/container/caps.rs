//! Capabilities, rlimits and no_new_privs. The parsing runs in the agent; the `apply_*`
//! functions run in the forked child before exec and therefore only make raw system calls
//! (no allocation, no locks).

use podvisor_common::last_errno as errno;
use podvisor_proto::caps::{DEFAULT as DEFAULT_CAPS, NAMES as CAP_NAMES};
use podvisor_proto::v1::{Capabilities, Rlimit};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapsError {
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    #[error("unknown rlimit {0:?}")]
    UnknownRlimit(String),
    #[error("rlimit {name}: soft limit {soft} above hard limit {hard}")]
    SoftAboveHard { name: String, soft: u64, hard: u64 },
}

/// Capability number of "CAP_SYS_ADMIN" / "sys_admin".
pub fn cap_number(name: &str) -> Result<u32, CapsError> {
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAP_NAMES
        .iter()
        .position(|n| *n == short)
        .map(|i| i as u32)
        .ok_or_else(|| CapsError::UnknownCapability(name.to_owned()))
}

fn mask<S: AsRef<str>>(names: &[S]) -> Result<u64, CapsError> {
    names
        .iter()
        .try_fold(0u64, |m, n| Ok(m | 1 << cap_number(n.as_ref())?))
}

/// The five capability sets as bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

impl CapSets {
    pub fn from_request(c: Option<&Capabilities>) -> Result<Self, CapsError> {
        match c {
            None => {
                let d = mask(DEFAULT_CAPS)?;
                Ok(Self {
                    bounding: d,
                    effective: d,
                    permitted: d,
                    inheritable: 0,
                    ambient: 0,
                })
            }
            Some(c) => Ok(Self {
                bounding: mask(&c.bounding)?,
                effective: mask(&c.effective)?,
                permitted: mask(&c.permitted)?,
                inheritable: mask(&c.inheritable)?,
                ambient: mask(&c.ambient)?,
            }),
        }
    }
}

/// A validated rlimit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RlimitSpec {
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

/// Resource number of "RLIMIT_NOFILE" / "nofile".
pub fn rlimit_resource(name: &str) -> Result<i32, CapsError> {
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("RLIMIT_").unwrap_or(&upper);
    let r = match short {
        "CPU" => libc::RLIMIT_CPU,
        "FSIZE" => libc::RLIMIT_FSIZE,
        "DATA" => libc::RLIMIT_DATA,
        "STACK" => libc::RLIMIT_STACK,
        "CORE" => libc::RLIMIT_CORE,
        "RSS" => libc::RLIMIT_RSS,
        "NPROC" => libc::RLIMIT_NPROC,
        "NOFILE" => libc::RLIMIT_NOFILE,
        "MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "AS" => libc::RLIMIT_AS,
        "LOCKS" => libc::RLIMIT_LOCKS,
        "SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "NICE" => libc::RLIMIT_NICE,
        "RTPRIO" => libc::RLIMIT_RTPRIO,
        "RTTIME" => libc::RLIMIT_RTTIME,
        _ => return Err(CapsError::UnknownRlimit(name.to_owned())),
    };
    Ok(r as i32)
}

pub fn parse_rlimits(r: &[Rlimit]) -> Result<Vec<RlimitSpec>, CapsError> {
    r.iter()
        .map(|l| {
            if l.soft > l.hard {
                return Err(CapsError::SoftAboveHard {
                    name: l.r#type.clone(),
                    soft: l.soft,
                    hard: l.hard,
                });
            }
            Ok(RlimitSpec {
                resource: rlimit_resource(&l.r#type)?,
                soft: l.soft,
                hard: l.hard,
            })
        })
        .collect()
}

/// Highest capability the running kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

// ---- child side: raw system calls only -------------------------------------------------------

/// Keeps the permitted set across the coming setresuid.
pub fn keep_caps(on: bool) -> Result<(), i32> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0, 0, 0) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Sets effective, permitted and inheritable, then raises the ambient capabilities.
pub fn apply_sets(c: &CapSets) -> Result<(), i32> {
    podvisor_common::caps::set(c.effective, c.permitted, c.inheritable)?;
    for cap in 0..64u64 {
        if c.ambient & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if r < 0 {
                return Err(errno());
            }
        }
    }
    Ok(())
}

pub fn apply_rlimits(limits: &[RlimitSpec]) -> Result<(), i32> {
    for l in limits {
        let new = libc::rlimit64 {
            rlim_cur: l.soft,
            rlim_max: l.hard,
        };
        // SAFETY: prlimit64 on the calling process with a valid rlimit struct and no old value.
        let r = unsafe {
            libc::prlimit64(
                0,
                l.resource as libc::__rlimit_resource_t,
                &new,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        assert_eq!(cap_number("CAP_CHOWN"), Ok(0));
        assert_eq!(cap_number("sys_admin"), Ok(21));
        assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Ok(40));
        assert!(cap_number("CAP_FLY").is_err());
        let sets = CapSets::from_request(Some(&Capabilities {
            bounding: vec!["CAP_KILL".into(), "CAP_NET_RAW".into()],
            effective: vec!["CAP_KILL".into()],
            ..Default::default()
        }))
        .expect("valid");
        assert_eq!(sets.bounding, 1 << 5 | 1 << 13);
        assert_eq!(sets.effective, 1 << 5);
        assert_eq!(sets.ambient, 0);
        let d = CapSets::from_request(None).expect("defaults");
        assert_eq!(d.bounding.count_ones() as usize, DEFAULT_CAPS.len());
        assert!(
            CapSets::from_request(Some(&Capabilities {
                ambient: vec!["CAP_NOPE".into()],
                ..Default::default()
            }))
            .is_err()
        );
    }

    #[test]
    fn rlimit_names() {
        let l = parse_rlimits(&[Rlimit {
            r#type: "RLIMIT_NOFILE".into(),
            soft: 1024,
            hard: 4096,
        }])
        .expect("valid");
        assert_eq!(l[0].resource, libc::RLIMIT_NOFILE as i32);
        assert!(
            parse_rlimits(&[Rlimit {
                r#type: "nofile".into(),
                soft: 10,
                hard: 1,
            }])
            .is_err()
        );
        assert!(rlimit_resource("RLIMIT_BOGUS").is_err());
        assert_eq!(rlimit_resource("core"), Ok(libc::RLIMIT_CORE as i32));
    }
}
