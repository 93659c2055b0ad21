//! cgroup v2 statistics.

use std::fs;
use std::path::Path;

use podvisor_proto::v1::CgroupStats;

use super::cgroup::flat_keyed;
use super::exit::now_nanos;

fn read(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file)).unwrap_or_default()
}

fn single(dir: &Path, file: &str) -> u64 {
    read(dir, file).trim().parse().unwrap_or(0)
}

/// Reads cpu.stat, memory.current, memory.stat, memory.events and pids.current of `dir`.
pub fn read_stats(dir: &Path) -> CgroupStats {
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
    }
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
        let s = read_stats(d.path());
        assert_eq!(s.cpu_usage_usec, 1500);
        assert_eq!(s.cpu_system_usec, 500);
        assert_eq!(s.memory_usage_bytes, 10_485_760);
        assert_eq!(s.memory_working_set_bytes, 10_485_760 - 1_048_576);
        assert_eq!(s.memory_rss_bytes, 4096);
        assert_eq!(s.oom_kills, 1);
        assert_eq!(s.pids_current, 3);
    }
}
