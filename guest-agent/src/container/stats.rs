//! cgroup v2 statistics, and the usage of a container's writable layer.

use std::fs;
use std::path::Path;

use podvisor_proto::v1::{CgroupStats, FsUsage};

use super::cgroup::flat_keyed;
use super::exit::now_nanos;

fn read(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file)).unwrap_or_default()
}

fn single(dir: &Path, file: &str) -> u64 {
    read(dir, file).trim().parse().unwrap_or(0)
}

/// The VM's `/proc/meminfo`, read once per statistics call and given to [`read_stats`] for
/// each cgroup (empty if unreadable: no free swap).
pub fn meminfo() -> String {
    fs::read_to_string("/proc/meminfo").unwrap_or_default()
}

/// Reads cpu.stat, memory.current, memory.stat, memory.events, memory.swap.* and
/// pids.current of `dir`; `meminfo` is the VM's [`meminfo`].
pub fn read_stats(dir: &Path, meminfo: &str) -> CgroupStats {
    let (swap_usage_bytes, swap_available_bytes) = swap(dir, meminfo).unzip();
    let cpu = read(dir, "cpu.stat");
    let mem = read(dir, "memory.stat");
    let usage = single(dir, "memory.current");
    let inactive = flat_keyed(&mem, "inactive_file").unwrap_or(0);
    CgroupStats {
        cpu_usage_usec: flat_keyed(&cpu, "usage_usec").unwrap_or(0),
        cpu_user_usec: flat_keyed(&cpu, "user_usec").unwrap_or(0),
        cpu_system_usec: flat_keyed(&cpu, "system_usec").unwrap_or(0),
        memory_usage_bytes: usage,
        memory_working_set_bytes: usage.saturating_sub(inactive),
        memory_rss_bytes: flat_keyed(&mem, "anon").unwrap_or(0),
        oom_kills: flat_keyed(&read(dir, "memory.events"), "oom_kill").unwrap_or(0),
        pids_current: single(dir, "pids.current"),
        timestamp_unix_nanos: now_nanos(),
        swap_usage_bytes,
        swap_available_bytes,
    }
}

/// The cgroup's swap usage and what it could still swap: the VM's free swap within
/// `memory.swap.max`. None when the kernel keeps no swap accounting (no memory.swap.current).
fn swap(dir: &Path, meminfo: &str) -> Option<(u64, u64)> {
    let usage: u64 = fs::read_to_string(dir.join("memory.swap.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // "max" (or a missing file, as on the root cgroup) is no limit of the cgroup's own.
    let max = read(dir, "memory.swap.max")
        .trim()
        .parse()
        .unwrap_or(u64::MAX);
    let free = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("SwapFree:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_mul(1024);
    Some((usage, free.min(max.saturating_sub(usage))))
}

/// Bytes and inodes in use on the file system at `path` (a container's writable layer is a
/// tmpfs of its own, so this is what the container wrote). None when `path` cannot be read.
pub fn fs_usage(path: &Path) -> Option<FsUsage> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let used_blocks = st.blocks().saturating_sub(st.blocks_free());
    Some(FsUsage {
        used_bytes: used_blocks.saturating_mul(st.fragment_size()),
        inodes_used: st.files().saturating_sub(st.files_free()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cgroup_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let w = |f: &str, s: &str| fs::write(d.path().join(f), s).expect("write");
        w(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        w("memory.current", "10485760\n");
        w(
            "memory.stat",
            "anon 4096\nfile 8192\ninactive_file 1048576\n",
        );
        w("memory.events", "oom 2\noom_kill 1\n");
        w("pids.current", "3\n");
        w("memory.swap.current", "8192\n");
        w("memory.swap.max", "max\n");
        let meminfo = "SwapTotal:        2048 kB\nSwapFree:         1024 kB\n";
        let s = read_stats(d.path(), meminfo);
        assert_eq!(s.cpu_usage_usec, 1500);
        assert_eq!(s.cpu_system_usec, 500);
        assert_eq!(s.memory_usage_bytes, 10_485_760);
        assert_eq!(s.memory_working_set_bytes, 10_485_760 - 1_048_576);
        assert_eq!(s.memory_rss_bytes, 4096);
        assert_eq!(s.oom_kills, 1);
        assert_eq!(s.pids_current, 3);
        assert_eq!(s.swap_usage_bytes, Some(8192));
        assert_eq!(s.swap_available_bytes, Some(1_048_576));
        // A cgroup limit below the VM's free swap bounds what is available.
        w("memory.swap.max", "12288\n");
        let s = read_stats(d.path(), meminfo);
        assert_eq!(s.swap_available_bytes, Some(4096));
        // No swap accounting in the kernel: no figures, not zeros.
        fs::remove_file(d.path().join("memory.swap.current")).expect("rm");
        let s = read_stats(d.path(), meminfo);
        assert_eq!((s.swap_usage_bytes, s.swap_available_bytes), (None, None));
    }

    #[test]
    fn fs_usage_counts_what_was_written() {
        let d = tempfile::tempdir().expect("tempdir");
        let before = fs_usage(d.path()).expect("statvfs");
        assert!(fs_usage(&d.path().join("missing")).is_none());
        // Usage of a shared file system moves with others' writes; only check it is sane.
        assert!(
            before.used_bytes > 0 && before.inodes_used > 0,
            "{before:?}"
        );
    }
}
