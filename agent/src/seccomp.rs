//! The built-in supervisor's syscall filter: a seccomp allow-list close to systemd's
//! `@system-service` minus `@privileged` and `@resources` (what units get), plus the calls a
//! spec's `[sandbox] system_calls` names. A call outside it fails with ENOSYS, so that libc
//! falls back as on an older kernel (clone3 is outside: its flags cannot be read); a clone
//! making namespaces fails with EPERM, as under `RestrictNamespaces=`; a call made through
//! another ABI (x32, or 32-bit on a 64-bit kernel) kills the process.
//!
//! Built for x86_64, aarch64 and riscv64; elsewhere (32-bit ARM) and where the kernel takes no
//! filters (qemu-user), services run without one, which the agent says.

// The instructions and tables are unused where no filter is built (32-bit ARM).
#![cfg_attr(
    not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )),
    allow(dead_code, unused_macros)
)]

use muscle_protocol::SyscallName;

/// A compiled filter, ready to load between fork and exec.
#[derive(Debug, Clone)]
pub struct Filter(Vec<libc::sock_filter>);

/// Lists `(name, number)` for syscalls that exist on the target.
macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name as i64)),*]
    };
}

/// Allowed on every 64-bit target (the generic syscall table and x86_64 share these names).
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const ALLOWED: &[(&str, i64)] = calls![
    SYS_accept,
    SYS_accept4,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_chdir,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_dup,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_get_mempolicy,
    SYS_get_robust_list,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_io_destroy,
    SYS_io_getevents,
    SYS_io_setup,
    SYS_io_submit,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_io_uring_setup,
    SYS_ioctl,
    SYS_ioprio_get,
    SYS_kcmp,
    SYS_kill,
    SYS_lgetxattr,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_madvise,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_mincore,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_name_to_handle_at,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_openat2,
    SYS_personality,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_madvise,
    SYS_pselect6,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_robust_list,
    SYS_set_tid_address,
    SYS_setfsgid,
    SYS_setgid,
    SYS_setitimer,
    SYS_setpgid,
    SYS_setregid,
    SYS_setresgid,
    SYS_setsid,
    SYS_setsockopt,
    SYS_setxattr,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd4,
    SYS_socket,
    SYS_socketpair,
    SYS_splice,
    SYS_statfs,
    SYS_statx,
    SYS_symlinkat,
    SYS_sync,
    SYS_sync_file_range,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlinkat,
    SYS_utimensat,
    SYS_vmsplice,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// x86_64's older calls, which the generic table dropped.
#[cfg(target_arch = "x86_64")]
const ALLOWED_HERE: &[(&str, i64)] = calls![
    SYS_access,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_chmod,
    SYS_creat,
    SYS_dup2,
    SYS_epoll_create,
    SYS_epoll_wait,
    SYS_eventfd,
    SYS_fork,
    SYS_futimesat,
    SYS_getdents,
    SYS_getpgrp,
    SYS_inotify_init,
    SYS_link,
    SYS_lstat,
    SYS_mkdir,
    SYS_mknod,
    SYS_open,
    SYS_pause,
    SYS_pipe,
    SYS_poll,
    SYS_readlink,
    SYS_rename,
    SYS_renameat,
    SYS_rmdir,
    SYS_select,
    SYS_signalfd,
    SYS_stat,
    SYS_symlink,
    SYS_time,
    SYS_unlink,
    SYS_utime,
    SYS_utimes,
    SYS_vfork,
];

#[cfg(target_arch = "aarch64")]
const ALLOWED_HERE: &[(&str, i64)] = calls![SYS_renameat];

/// riscv_hwprobe (258) and riscv_flush_icache (259, what JIT compilers need), which libc does
/// not name.
#[cfg(target_arch = "riscv64")]
const ALLOWED_HERE: &[(&str, i64)] = &[("riscv_hwprobe", 258), ("riscv_flush_icache", 259)];

/// Denied unless a spec names them (or their systemd set): what `@privileged`, `@resources`,
/// `@mount`, `@debug` and `@keyring` hold that a service might need, and namespaces.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const GRANTABLE: &[(&str, &str, i64)] = &[
    ("@resources", "ioprio_set", libc::SYS_ioprio_set),
    ("@resources", "mbind", libc::SYS_mbind),
    ("@resources", "migrate_pages", libc::SYS_migrate_pages),
    ("@resources", "move_pages", libc::SYS_move_pages),
    (
        "@resources",
        "sched_setaffinity",
        libc::SYS_sched_setaffinity,
    ),
    ("@resources", "sched_setattr", libc::SYS_sched_setattr),
    ("@resources", "sched_setparam", libc::SYS_sched_setparam),
    (
        "@resources",
        "sched_setscheduler",
        libc::SYS_sched_setscheduler,
    ),
    ("@resources", "set_mempolicy", libc::SYS_set_mempolicy),
    ("@resources", "setpriority", libc::SYS_setpriority),
    ("@mount", "mount", libc::SYS_mount),
    ("@mount", "umount2", libc::SYS_umount2),
    ("@mount", "pivot_root", libc::SYS_pivot_root),
    ("@mount", "chroot", libc::SYS_chroot),
    ("", "unshare", libc::SYS_unshare),
    ("", "setns", libc::SYS_setns),
    ("@privileged", "chroot", libc::SYS_chroot),
    ("@privileged", "setdomainname", libc::SYS_setdomainname),
    ("@privileged", "sethostname", libc::SYS_sethostname),
    (
        "@privileged",
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
    ),
    ("@debug", "ptrace", libc::SYS_ptrace),
    ("@debug", "process_vm_readv", libc::SYS_process_vm_readv),
    ("@debug", "process_vm_writev", libc::SYS_process_vm_writev),
    ("@debug", "perf_event_open", libc::SYS_perf_event_open),
    ("@keyring", "add_key", libc::SYS_add_key),
    ("@keyring", "keyctl", libc::SYS_keyctl),
    ("@keyring", "request_key", libc::SYS_request_key),
    ("", "userfaultfd", libc::SYS_userfaultfd),
    ("", "bpf", libc::SYS_bpf),
    ("@privileged", "capset", libc::SYS_capset),
    ("@privileged", "setuid", libc::SYS_setuid),
    ("@privileged", "setreuid", libc::SYS_setreuid),
    ("@privileged", "setresuid", libc::SYS_setresuid),
    ("@privileged", "setfsuid", libc::SYS_setfsuid),
    ("@privileged", "setgroups", libc::SYS_setgroups),
    ("@privileged", "fchown", libc::SYS_fchown),
    ("@privileged", "fchownat", libc::SYS_fchownat),
    ("@chown", "fchown", libc::SYS_fchown),
    ("@chown", "fchownat", libc::SYS_fchownat),
    ("@resources", "setrlimit", libc::SYS_setrlimit),
    ("@debug", "pidfd_getfd", libc::SYS_pidfd_getfd),
];

/// x86_64's older calls of those sets.
#[cfg(target_arch = "x86_64")]
const GRANTABLE_HERE: &[(&str, &str, i64)] = &[
    ("@privileged", "chown", libc::SYS_chown),
    ("@privileged", "lchown", libc::SYS_lchown),
    ("@chown", "chown", libc::SYS_chown),
    ("@chown", "lchown", libc::SYS_lchown),
];

#[cfg(not(target_arch = "x86_64"))]
const GRANTABLE_HERE: &[(&str, &str, i64)] = &[];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 0xC000_00F3;

/// x86_64's x32 calls carry this bit.
const X32_BIT: u32 = 0x4000_0000;

/// Where `struct seccomp_data` holds the call's number, its ABI, and its first argument's low
/// word (every target here is little-endian).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARG0_OFFSET: u32 = 16;

/// CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
/// CLONE_NEWNET.
const CLONE_NEW_MASK: u32 = 0x7E02_0000;

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

impl Filter {
    /// The filter for a spec granting `extra` calls; `None` on a target without one. Names
    /// and sets this agent does not know are returned beside it, to be said.
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    pub fn build(extra: &[SyscallName]) -> (Option<Filter>, Vec<String>) {
        let base = ALLOWED.iter().chain(ALLOWED_HERE);
        let mut allowed: Vec<i64> = base.clone().map(|c| c.1).collect();
        // Every call by its name (without libc's SYS_), and the grantable ones by their set.
        let known: Vec<(&str, &str, i64)> = base
            .map(|(name, nr)| ("", name.trim_start_matches("SYS_"), *nr))
            .chain(GRANTABLE.iter().chain(GRANTABLE_HERE).copied())
            .collect();
        let mut unknown = Vec::new();
        for name in extra {
            let name = name.as_str();
            let granted: Vec<i64> = known
                .iter()
                .filter(|(set, call, _)| *set == name || *call == name)
                .map(|(_, _, nr)| *nr)
                .collect();
            if granted.is_empty() {
                unknown.push(name.to_owned());
            }
            allowed.extend(granted);
        }
        allowed.sort_unstable();
        allowed.dedup();
        // Granting unshare or setns grants namespaces: clone may then make them too.
        let namespaces = extra
            .iter()
            .any(|c| matches!(c.as_str(), "unshare" | "setns"));
        if !filters_work() {
            return (None, unknown);
        }
        (Some(Filter(program(&allowed, namespaces))), unknown)
    }

    #[cfg(not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )))]
    pub fn build(_extra: &[SyscallName]) -> (Option<Filter>, Vec<String>) {
        (None, vec![])
    }

    /// Loads the filter into the calling process (between fork and exec: no allocation).
    pub fn load(&self) -> std::io::Result<()> {
        let prog = libc::sock_fprog {
            len: self.0.len() as u16,
            filter: self.0.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points at instructions that live as long as `self`; the kernel copies
        // them.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        match rc {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

/// The program: the architecture checked, namespaces refused to clone (unless granted), then
/// each allowed call; anything else fails with ENOSYS.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
fn program(allowed: &[i64], namespaces: bool) -> Vec<libc::sock_filter> {
    let mut prog = vec![
        op(LD_W_ABS, 0, 0, ARCH_OFFSET),
        op(JEQ_K, 1, 0, AUDIT_ARCH),
        op(RET_K, 0, 0, RET_KILL_PROCESS),
        op(LD_W_ABS, 0, 0, NR_OFFSET),
        // syscall(-1) is no other ABI: the ENOSYS it always got.
        op(JEQ_K, 0, 1, u32::MAX),
        op(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
    ];
    if cfg!(target_arch = "x86_64") {
        prog.push(op(JGE_K, 0, 1, X32_BIT));
        prog.push(op(RET_K, 0, 0, RET_KILL_PROCESS));
    }
    // clone with a CLONE_NEW* flag makes namespaces (RestrictNamespaces= in units); clone3's
    // flags cannot be read, so it is left out and libc falls back to clone.
    prog.extend([
        op(JEQ_K, 0, 4, libc::SYS_clone as u32),
        op(LD_W_ABS, 0, 0, ARG0_OFFSET),
        op(JSET_K, 0, 1, if namespaces { 0 } else { CLONE_NEW_MASK }),
        op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, RET_ALLOW),
    ]);
    for nr in allowed {
        prog.push(op(JEQ_K, 0, 1, *nr as u32));
        prog.push(op(RET_K, 0, 0, RET_ALLOW));
    }
    prog.push(op(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32));
    prog
}

/// Whether this kernel takes seccomp filters: asked once with no program, which a kernel that
/// does refuses with EFAULT, and one without (or qemu-user, which emulates no filters) with
/// EINVAL. Without, services run unfiltered and the agent says so once; with, a filter that
/// fails to load fails the start.
pub fn filters_work() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        // SAFETY: a null program is never read: the kernel answers EFAULT or EINVAL.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                std::ptr::null::<libc::sock_fprog>(),
            )
        };
        let works = rc == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT);
        if !works {
            say!("services run without a syscall filter: this kernel (or emulator) takes no seccomp filters");
        }
        works
    })
}
