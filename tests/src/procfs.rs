//! Resident memory of a VMM process, with and without guest RAM; the process tree.
//!
//! How: `/proc/<pid>/smaps` lists every mapping with its `Rss:`. The total
//! is the sum over all mappings. Guest RAM is the anonymous mapping (no
//! path) whose size is the guest memory size: exactly `mem-mib` MiB for
//! podvisor-vmm; for QEMU, the largest anonymous mapping between that size
//! and that size plus 4 MiB (QEMU over-allocates for alignment and guard
//! pages). "VMM RSS" = total Rss - Rss of that mapping.

use std::path::Path;

use anyhow::Context;

/// Resident memory of one process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// All mappings.
    pub total_kib: u64,
    /// The guest RAM mapping, if one was recognized.
    pub guest_kib: Option<u64>,
}

impl Rss {
    /// Total minus guest RAM (the VMM's own memory), if guest RAM was found.
    pub fn vmm_kib(&self) -> Option<u64> {
        self.guest_kib.map(|g| self.total_kib.saturating_sub(g))
    }
}

/// How to recognize guest RAM among the mappings.
#[derive(Debug, Clone, Copy)]
pub enum GuestRam {
    /// An anonymous mapping of exactly this many bytes.
    Exact(u64),
    /// The largest anonymous mapping of at least this many bytes and at most 4 MiB more.
    AtLeast(u64),
}

/// `Anonymous:` of `/proc/<pid>/smaps_rollup` in KiB: memory only this process holds (for a
/// VMM restored from a snapshot, the guest pages it wrote plus its own heap).
pub fn anonymous_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no Anonymous: line in {path}"))
}

/// Reads `/proc/<pid>/smaps`.
pub fn rss(pid: u32, guest: GuestRam) -> anyhow::Result<Rss> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    Ok(parse_smaps(&text, guest))
}

struct Mapping {
    size: u64,
    anonymous: bool,
    rss_kib: u64,
}

/// Parses smaps text (see [`rss`]).
pub fn parse_smaps(text: &str, guest: GuestRam) -> Rss {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            // address perms offset dev inode [path]
            let path = words.nth(4);
            maps.push(Mapping {
                size: hi.saturating_sub(lo),
                anonymous: path.is_none(),
                rss_kib: 0,
            });
        } else if first == "Rss:"
            && let Some(m) = maps.last_mut()
        {
            m.rss_kib = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let total_kib = maps.iter().map(|m| m.rss_kib).sum();
    let guest_kib = match guest {
        GuestRam::Exact(bytes) => maps.iter().find(|m| m.anonymous && m.size == bytes),
        GuestRam::AtLeast(bytes) => maps
            .iter()
            .filter(|m| m.anonymous && m.size >= bytes && m.size <= bytes + (4 << 20))
            .max_by_key(|m| m.size),
    }
    .map(|m| m.rss_kib);
    Rss {
        total_kib,
        guest_kib,
    }
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Every process id in `/proc`.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A process's command line, its arguments joined by spaces (empty if it is gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A process's parent, from `/proc/<pid>/stat`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `roots` and every process below them.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let all: Vec<(u32, Option<u32>)> = pids().into_iter().map(|p| (p, parent(p))).collect();
    let mut out = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            all.iter()
                .filter(|(_, pp)| *pp == Some(p))
                .map(|(c, _)| *c)
                .filter(|c| !out.contains(c))
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/vmm
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               20000 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0 
Rss:                 100 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
";

    #[test]
    fn guest_mapping_is_excluded() {
        let r = parse_smaps(SMAPS, GuestRam::Exact(128 << 20));
        assert_eq!(r.total_kib, 20912);
        assert_eq!(r.guest_kib, Some(20000));
        assert_eq!(r.vmm_kib(), Some(912));
        assert_eq!(
            parse_smaps(SMAPS, GuestRam::Exact(64 << 20)).guest_kib,
            None
        );
        assert_eq!(
            parse_smaps(SMAPS, GuestRam::AtLeast(126 << 20)).guest_kib,
            Some(20000)
        );
    }
}
