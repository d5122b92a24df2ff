//! The seccomp-bpf allow-lists: what a backend calls once everything is open, found by tracing
//! every end-to-end test of each backend (libblkio, QEMU's Linux guests, DPDK, the hostile
//! frontend, the VMM) with `strace -f`, and nothing more. Opening the image, the tap and the
//! ports, binding the listening socket and reading `/proc` all happen before the filter.
//!
//! Not on any list: `execve`/`execveat` (nothing to run), `fork` (a `clone` without
//! `CLONE_THREAD`), `ptrace`, `mount`, `kexec_*`, `bpf`, `perf_event_open`, `setuid` and the
//! rest. `clone3` answers ENOSYS, so the C library falls back to `clone`, whose flags the
//! filter can check (as Firecracker does).

use super::SandboxError;
use crate::BackendKind;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// What every backend calls while serving, with why.
const COMMON: &[(libc::c_long, &str)] = &[
    // Guest memory, ring and buffer I/O, sockets, eventfds, logging.
    (libc::SYS_read, "eventfds, sockets, ports"),
    (libc::SYS_write, "eventfds, sockets, ports, the log"),
    (libc::SYS_readv, "sockets and the tap"),
    (libc::SYS_writev, "sockets, the tap, the log"),
    (libc::SYS_close, "per-connection descriptors"),
    (libc::SYS_fcntl, "descriptor flags of received descriptors"),
    (libc::SYS_dup, "duplicating received descriptors"),
    (libc::SYS_dup3, "duplicating received descriptors"),
    (libc::SYS_lseek, "file positions"),
    (libc::SYS_newfstatat, "the relay's region check (fstat)"),
    (libc::SYS_fstat, "the relay's region check (fstat)"),
    (libc::SYS_statx, "file sizes"),
    (libc::SYS_openat, "nothing once Landlock applies; kept so a refused open fails with EACCES"),
    (libc::SYS_unlink, "removing the socket at exit"),
    (libc::SYS_unlinkat, "removing the socket at exit"),
    // Memory: mapping the frontend's memory table, thread stacks, the allocator.
    (libc::SYS_mmap, "guest memory regions, stacks, the allocator"),
    (libc::SYS_munmap, "guest memory regions, stacks, the allocator"),
    (libc::SYS_mprotect, "thread stack guard pages"),
    (libc::SYS_mremap, "the allocator"),
    (libc::SYS_madvise, "the allocator, thread exit"),
    (libc::SYS_brk, "the allocator"),
    // Threads: a worker per queue per connection, the relay, the listeners.
    (libc::SYS_futex, "locks, thread joins"),
    (libc::SYS_set_robust_list, "new threads"),
    (libc::SYS_rseq, "new threads"),
    (libc::SYS_sigaltstack, "new threads' signal stacks"),
    (libc::SYS_rt_sigprocmask, "new threads, the exit-signal mask"),
    (libc::SYS_rt_sigaction, "the C library"),
    (libc::SYS_rt_sigreturn, "signal return"),
    (libc::SYS_rt_sigtimedwait, "the thread that waits for SIGTERM/SIGINT"),
    (libc::SYS_sched_getaffinity, "the C library at thread start"),
    (libc::SYS_sched_yield, "spinning locks"),
    (libc::SYS_prctl, "thread names"),
    (libc::SYS_prlimit64, "thread stack sizes"),
    (libc::SYS_gettid, "the log, thread start"),
    (libc::SYS_getpid, "the relay's socket names"),
    (libc::SYS_tgkill, "abort on a fatal error"),
    (libc::SYS_getrandom, "hash maps"),
    (libc::SYS_exit, "thread exit"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_restart_syscall, "interrupted sleeps"),
    // Time.
    (libc::SYS_clock_nanosleep, "polling back-off, the statistics thread"),
    (libc::SYS_nanosleep, "polling back-off"),
    (libc::SYS_clock_gettime, "timestamps where the vDSO is not used"),
    (libc::SYS_timerfd_create, "the library's timers"),
    (libc::SYS_timerfd_settime, "the library's timers"),
    // Events.
    (libc::SYS_epoll_create1, "a worker's event loop per connection"),
    (libc::SYS_epoll_ctl, "watching kicks and descriptors"),
    (libc::SYS_epoll_wait, "waiting for kicks"),
    (libc::SYS_epoll_pwait, "waiting for kicks"),
    (libc::SYS_eventfd2, "exit events per connection"),
    (libc::SYS_poll, "waiting on sockets"),
    (libc::SYS_ppoll, "waiting on sockets"),
    // Sockets: each frontend is relayed through a private abstract socket.
    (libc::SYS_socket, "the relay's private socket"),
    (libc::SYS_bind, "the relay's private socket"),
    (libc::SYS_listen, "the relay's private socket"),
    (libc::SYS_accept4, "frontends, the relay, port clients"),
    (libc::SYS_connect, "the relay's private socket"),
    (libc::SYS_recvmsg, "vhost-user messages with descriptors"),
    (libc::SYS_sendmsg, "vhost-user replies"),
    (libc::SYS_recvfrom, "sockets"),
    (libc::SYS_sendto, "sockets"),
    (libc::SYS_shutdown, "ending a connection"),
    (libc::SYS_getsockopt, "socket errors"),
    (libc::SYS_setsockopt, "socket options"),
    (libc::SYS_getsockname, "socket addresses"),
    (libc::SYS_getpeername, "the control API's TCP clients (--metrics-addr)"),
    (libc::SYS_socketpair, "the backend request channel"),
    (libc::SYS_ioctl, "FIONBIO, terminal sizes, tap queues"),
];

/// What the block backend calls besides [`COMMON`].
const BLK: &[(libc::c_long, &str)] = &[
    (libc::SYS_pread64, "reads (sync engine, inline io_uring directions)"),
    (libc::SYS_pwrite64, "writes (sync engine, inline io_uring directions)"),
    (libc::SYS_preadv, "vectored reads"),
    (libc::SYS_pwritev, "vectored writes"),
    (libc::SYS_preadv2, "vectored reads"),
    (libc::SYS_pwritev2, "vectored writes"),
    (libc::SYS_fdatasync, "FLUSH, write-through"),
    (libc::SYS_fsync, "FLUSH on block devices"),
    (libc::SYS_fallocate, "DISCARD and WRITE_ZEROES"),
    (libc::SYS_io_uring_setup, "a new ring when one cannot be drained"),
    (libc::SYS_io_uring_enter, "submitting and reaping"),
    (libc::SYS_io_uring_register, "the io_uring engine"),
    (libc::SYS_memfd_create, "the in-flight area (GET_INFLIGHT_FD)"),
    (libc::SYS_ftruncate, "sizing the in-flight area"),
];

/// What Ceph's client libraries call besides [`COMMON`] and [`BLK`] once connected (`--rbd`):
/// found with `--sandbox log` under libblkio and Linux guests.
pub const CEPH_CLIENT: &[(libc::c_long, &str)] =
    &[(libc::SYS_uname, "librados' timer thread"), (libc::SYS_accept, "librados' admin socket")];

/// What the console backend calls besides [`COMMON`].
const CONSOLE: &[(libc::c_long, &str)] = &[];

/// What the net backend calls besides [`COMMON`].
const NET: &[(libc::c_long, &str)] = &[];

/// The allow-list of backend `kind`: each system call with why it is there.
pub fn allowed(kind: BackendKind) -> Vec<(libc::c_long, &'static str)> {
    let extra = match kind {
        BackendKind::Blk => BLK,
        BackendKind::Net => NET,
        BackendKind::Console => CONSOLE,
    };
    COMMON.iter().chain(extra).copied().collect()
}

/// `clone` only for threads.
fn threads_only() -> Result<SeccompRule, seccompiler::BackendError> {
    let flags = libc::CLONE_THREAD as u64;
    SeccompRule::new(vec![SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flags), flags)?])
}

/// The filter that answers `clone3` with ENOSYS, then the allow-list filter (a call outside it
/// kills the process, or is logged), in the order they are installed: the allow-list last, so
/// installing needs no `seccomp` call on it.
fn filters(
    kind: BackendKind,
    extra: &[(libc::c_long, &str)],
    kills: bool,
) -> Result<[BpfProgram; 2], seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).into_iter().chain(extra.iter().copied()).map(|(call, _)| (call, Vec::new())).collect();
    rules.insert(libc::SYS_clone, vec![threads_only()?]);
    rules.insert(libc::SYS_clone3, Vec::new());
    let mismatch = if kills { SeccompAction::KillProcess } else { SeccompAction::Log };
    let allow_list = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok([no_clone3.try_into()?, allow_list.try_into()?])
}

/// Installs the filters of backend `kind`, with the `extra` calls its libraries need, on every
/// thread of the process (and so on every thread started later); returns how many system calls
/// are allowed.
pub fn install(kind: BackendKind, extra: &[(libc::c_long, &str)], kills: bool) -> Result<usize, SandboxError> {
    let programs = filters(kind, extra, kills).map_err(|source| SandboxError::Filter { kind, source })?;
    for program in &programs {
        seccompiler::apply_filter_all_threads(program).map_err(|source| SandboxError::Install { kind, source })?;
    }
    Ok(allowed(kind).len() + extra.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_has_a_filter_without_exec_or_fork() {
        for kind in BackendKind::ALL {
            let calls: Vec<libc::c_long> = allowed(kind).into_iter().map(|(call, _)| call).collect();
            for forbidden in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork, libc::SYS_ptrace] {
                assert!(!calls.contains(&forbidden), "{kind}: system call {forbidden} allowed");
            }
            let mut unique = calls.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), calls.len(), "{kind}: a system call listed twice");
            assert!(filters(kind, &[], true).is_ok(), "{kind}: the filter builds");
        }
    }
}
