//! What a VMM's host cgroup and network namespace count: the pod's CPU and memory as the
//! host sees them (every guest cycle and page is the VMM's), and its TAP's traffic.

use std::io;
use std::path::Path;

use super::cgroup::{CgroupPath, hierarchies};
use super::error::{VmmError, file_err};

/// A VMM cgroup's CPU and memory, read from the first hierarchy that has each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Memory charged, bytes.
    pub memory_bytes: Option<u64>,
    /// Memory charged less inactive file pages (kubelet's working set), bytes.
    pub working_set_bytes: Option<u64>,
    /// Anonymous memory, bytes.
    pub rss_bytes: Option<u64>,
    /// Processes in it.
    pub pids: Option<u64>,
}

/// A network interface's counters as the pod sees them (its TAP's turned around: what the
/// TAP receives the pod sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetUsage {
    /// Bytes the pod received.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Bytes the pod sent.
    pub tx_bytes: u64,
    /// Send errors.
    pub tx_errors: u64,
}

/// The usage of cgroup `path`; a figure no hierarchy has stays `None`.
pub fn cgroup_usage(path: &CgroupPath) -> Result<CgroupUsage, VmmError> {
    let mut u = CgroupUsage::default();
    for h in hierarchies()? {
        let dir = h.join(path.relative());
        // cgroup v1 controllers.
        if u.cpu_ns.is_none() {
            u.cpu_ns = read_number(&dir.join("cpuacct.usage"))?;
        }
        if u.memory_bytes.is_none()
            && let Some(usage) = read_number(&dir.join("memory.usage_in_bytes"))?
        {
            let stat = read_keyed(&dir.join("memory.stat"))?;
            let inactive = key(&stat, "total_inactive_file").unwrap_or(0);
            u.memory_bytes = Some(usage);
            u.working_set_bytes = Some(usage.saturating_sub(inactive));
            u.rss_bytes = key(&stat, "total_rss");
        }
        // cgroup v2.
        if u.memory_bytes.is_none()
            && let Some(usage) = read_number(&dir.join("memory.current"))?
        {
            let stat = read_keyed(&dir.join("memory.stat"))?;
            let inactive = key(&stat, "inactive_file").unwrap_or(0);
            u.memory_bytes = Some(usage);
            u.working_set_bytes = Some(usage.saturating_sub(inactive));
            u.rss_bytes = key(&stat, "anon");
        }
        if u.pids.is_none() {
            u.pids = read_number(&dir.join("pids.current"))?;
        }
    }
    // The unified hierarchy counts CPU time even without the cpu controller.
    if u.cpu_ns.is_none() {
        for h in hierarchies()? {
            let stat = read_keyed(&h.join(path.relative()).join("cpu.stat"))?;
            if let Some(usec) = key(&stat, "usage_usec") {
                u.cpu_ns = Some(usec.saturating_mul(1000));
                break;
            }
        }
    }
    Ok(u)
}

/// Interface `ifname`'s counters in the network namespace of process `pid`
/// (`/proc/<pid>/net/dev`), turned around to the pod's side; `None` when it has none.
pub fn tap_usage(pid: u32, ifname: &str) -> Result<Option<NetUsage>, VmmError> {
    let path = format!("/proc/{pid}/net/dev");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err("read", Path::new(&path))(e)),
    };
    Ok(parse_net_dev(&text, ifname))
}

/// `<name>: rx_bytes rx_packets rx_errs ... (8 receive fields) tx_bytes tx_packets tx_errs`.
fn parse_net_dev(text: &str, ifname: &str) -> Option<NetUsage> {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(ifname)?.strip_prefix(':'))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    if f.len() < 11 {
        return None;
    }
    // The TAP receives what the guest sends.
    Some(NetUsage {
        rx_bytes: f[8],
        rx_errors: f[10],
        tx_bytes: f[0],
        tx_errors: f[2],
    })
}

fn read_number(path: &Path) -> Result<Option<u64>, VmmError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err("read", path)(e)),
    }
}

fn read_keyed(path: &Path) -> Result<String, VmmError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(file_err("read", path)(e)),
    }
}

fn key(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_is_turned_to_the_pods_side() {
        let text = "Inter-|   Receive                            |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
            tap0_pv:  1500      10    1    0    0     0          0         0    98000      70    2    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(text, "tap0_pv"),
            Some(NetUsage {
                rx_bytes: 98000,
                rx_errors: 2,
                tx_bytes: 1500,
                tx_errors: 1
            })
        );
        assert_eq!(parse_net_dev(text, "tap0"), None, "a prefix is not a name");
        assert_eq!(parse_net_dev(text, "eth0"), None);
    }

    #[test]
    fn this_process_cgroup_counts() {
        // podvisord's own cgroup is the root or a service's; a VMM's leaf reads the same way.
        let path = CgroupPath::podvisor(&format!("unit-usage-{}", std::process::id())).unwrap();
        let cg = super::super::cgroup::PodCgroup::create(&path).unwrap();
        drop(cg);
        let u = cgroup_usage(&path).unwrap();
        assert!(u.memory_bytes.is_some(), "{u:?}");
        assert!(u.cpu_ns.is_some(), "{u:?}");
        super::super::cgroup::remove_cgroup(&path).unwrap();
    }
}
