//! `RuntimeDefault`: containerd's default profile (moby's before it), for x86_64 — an allow list
//! with EPERM for the rest, more calls for containers holding the capabilities they need, no
//! namespaces for containers without CAP_SYS_ADMIN, and no AF_VSOCK or AF_ALG sockets.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};

use super::bpf::{Action, Profile, Rule};
use super::error::SeccompError;
use super::profile::{max_known, syscall_number};

/// Allowed for every container (x86_64 names only; the profile's 32-bit and newer-ABI names
/// have no number here).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lsm_get_self_attr",
    "lsm_list_modules",
    "lsm_set_self_attr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "map_shadow_stack",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
    "arch_prctl",
    "modify_ldt",
    // Kernel 4.8 and later check ptrace against the container's own PID namespace.
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
];

/// Allowed when the bounding set holds the capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_TIME", &["settimeofday", "clock_settime"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// `personality(2)` values allowed: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE (alone and with
/// UNAME26), and the query.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The namespace flags of `clone(2)` (CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER |
/// NEWPID | NEWNET).
const CLONE_NAMESPACES: u64 = 0x7e02_0000;

fn dword(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    // 32-bit: the kernel reads these arguments as `int`/`unsigned int`, so the high half of
    // the register must not decide (socket(0x1_0000_0028, ...) is an AF_VSOCK socket).
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Rule)
}

fn named(name: &str) -> u32 {
    syscall_number(name).unwrap_or_else(|| panic!("{name} is not in the x86_64 table"))
}

/// The default profile for a container whose bounding set is `caps` (`CAP_...` names).
pub fn profile(caps: &[String]) -> Result<Profile, SeccompError> {
    let mut syscalls: BTreeMap<u32, Vec<Rule>> = BTreeMap::new();
    let mut allow = |nr: u32, conditions: Vec<SeccompCondition>| {
        syscalls.entry(nr).or_default().push(Rule {
            conditions,
            action: Action::Allow,
        });
    };
    for name in ALLOWED {
        allow(named(name), Vec::new());
    }
    for (cap, names) in BY_CAPABILITY {
        if caps.iter().any(|c| c == cap) {
            for name in *names {
                allow(named(name), Vec::new());
            }
        }
    }
    for persona in PERSONALITIES {
        allow(
            named("personality"),
            vec![dword(0, SeccompCmpOp::Eq, *persona)?],
        );
    }
    // Every socket family but AF_ALG (38) and AF_VSOCK (40): a container never reaches the
    // guest agent's vsock port this way.
    let socket = named("socket");
    allow(socket, vec![dword(0, SeccompCmpOp::Lt, 38)?]);
    allow(socket, vec![dword(0, SeccompCmpOp::Eq, 39)?]);
    allow(socket, vec![dword(0, SeccompCmpOp::Gt, 40)?]);
    let admin = caps.iter().any(|c| c == "CAP_SYS_ADMIN");
    if !admin {
        allow(
            named("clone"),
            vec![dword(0, SeccompCmpOp::MaskedEq(CLONE_NAMESPACES), 0)?],
        );
        // ENOSYS, not EPERM: C libraries fall back to clone(2), whose flags are checked.
        syscalls.entry(named("clone3")).or_default().push(Rule {
            conditions: Vec::new(),
            action: Action::Errno(libc::ENOSYS as u32),
        });
    }
    Ok(Profile {
        default: Action::Errno(libc::EPERM as u32),
        syscalls,
        max_known: max_known(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::bpf::{compile, interpret::run};
    use super::*;

    const X86: u32 = 0xc000_003e;
    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0001;

    fn call(p: &[seccompiler::sock_filter], name: &str, args: [u64; 6]) -> u32 {
        run(p, X86, named(name), args)
    }

    #[test]
    fn every_name_is_an_x86_64_call() {
        for name in ALLOWED
            .iter()
            .chain(BY_CAPABILITY.iter().flat_map(|(_, n)| n.iter()))
        {
            assert!(syscall_number(name).is_some(), "{name}");
        }
    }

    #[test]
    fn default_profile_without_admin() {
        let caps = vec!["CAP_CHOWN".to_string(), "CAP_NET_RAW".to_string()];
        let p = compile(&profile(&caps).expect("profile")).expect("compile");
        assert_eq!(call(&p, "read", [0; 6]), ALLOW);
        assert_eq!(call(&p, "mkdir", [0; 6]), ALLOW);
        assert_eq!(call(&p, "unshare", [0x1000_0000, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(&p, "mount", [0; 6]), EPERM);
        assert_eq!(call(&p, "keyctl", [0; 6]), EPERM);
        assert_eq!(call(&p, "ptrace", [0; 6]), ALLOW);
        // AF_INET, AF_UNIX, AF_NETLINK yes; AF_ALG and AF_VSOCK no, whatever the high bits.
        for family in [1, 2, 16, 39, 44] {
            assert_eq!(
                call(&p, "socket", [family, 1, 0, 0, 0, 0]),
                ALLOW,
                "{family}"
            );
        }
        for family in [38, 40, 0xffff_ffff_0000_0028] {
            assert_eq!(
                call(&p, "socket", [family, 1, 0, 0, 0, 0]),
                EPERM,
                "{family:#x}"
            );
        }
        // clone: threads and forks yes, new namespaces no; clone3 falls back.
        assert_eq!(call(&p, "clone", [0x003d_0f00, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "clone", [0x1000_0011, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(call(&p, "clone3", [0; 6]), 0x0005_0000 | 38);
        assert_eq!(call(&p, "personality", [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "personality", [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn capabilities_widen_the_profile() {
        let caps = vec!["CAP_SYS_ADMIN".to_string(), "CAP_SYS_TIME".to_string()];
        let p = compile(&profile(&caps).expect("profile")).expect("compile");
        assert_eq!(call(&p, "unshare", [0x1000_0000, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "clone", [0x1000_0011, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&p, "clone3", [0; 6]), ALLOW);
        assert_eq!(call(&p, "settimeofday", [0; 6]), ALLOW);
        assert_eq!(call(&p, "reboot", [0; 6]), EPERM);
    }
}
