//! seccomp filters for the VMM's own threads: each vCPU thread and the event thread install
//! one on themselves when they start (not process-wide: the main thread still starts
//! backends and joins the others). The lists are what those threads were seen to call under
//! `strace -f` in every VM test (KVM runs, the software guest, backend restarts, config
//! changes), with room for the allocator and thread exit; a call outside them kills the
//! process, or with [`ThreadSandbox::Log`] is logged by the kernel.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// Errors from building or installing a thread's filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("building the {thread} thread's seccomp filter: {source}")]
    Build {
        /// Which thread.
        thread: &'static str,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// The kernel refused it.
    #[error("installing the {thread} thread's seccomp filter: {source}")]
    Install {
        /// Which thread.
        thread: &'static str,
        /// Why.
        source: seccompiler::Error,
    },
}

/// How the VMM's threads are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadSandbox {
    /// A call outside the list kills the process.
    #[default]
    On,
    /// Calls outside the list are logged by the kernel.
    Log,
    /// No filter.
    Off,
}

/// What a thread of the VMM does, for its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmThread {
    /// Runs a vCPU: KVM_RUN, device register accesses, vhost-user messages on activation.
    Vcpu,
    /// Watches backends: hang-ups, backend requests, reconnects.
    Events,
}

/// What both kinds of thread call.
const SHARED: &[libc::c_long] = &[
    libc::SYS_ioctl,           // KVM_RUN, KVM_IRQFD and KVM_IOEVENTFD on a reconnect, FIONBIO
    libc::SYS_read,            // eventfds, the backend request channel
    libc::SYS_write,           // COM1's output, eventfds, the log
    libc::SYS_writev,          // the log
    libc::SYS_recvmsg,         // vhost-user replies
    libc::SYS_sendmsg,         // vhost-user requests with descriptors
    libc::SYS_poll,            // waiting for a backend's reply or request
    libc::SYS_ppoll,           // waiting for a backend's reply or request
    libc::SYS_eventfd2,        // kick and call eventfds of a reconnected device
    libc::SYS_fcntl,           // descriptor flags
    libc::SYS_close,           // descriptors of a lost backend
    libc::SYS_futex,           // device locks
    libc::SYS_mmap,            // the allocator
    libc::SYS_munmap,          // the allocator, thread exit
    libc::SYS_mprotect,        // the allocator
    libc::SYS_madvise,         // the allocator, thread exit
    libc::SYS_mremap,          // the allocator
    libc::SYS_brk,             // the allocator
    libc::SYS_sched_yield,     // spinning locks
    libc::SYS_nanosleep,       // back-off
    libc::SYS_clock_nanosleep, // back-off
    libc::SYS_getrandom,       // hash maps
    libc::SYS_gettid,          // the log
    libc::SYS_getpid,          // the log
    libc::SYS_rt_sigreturn,    // the signal that kicks a vCPU out of KVM_RUN
    libc::SYS_rt_sigprocmask,  // thread exit
    libc::SYS_sigaltstack,     // thread exit
    libc::SYS_restart_syscall, // interrupted sleeps
    libc::SYS_tgkill,          // abort on a fatal error
    libc::SYS_exit,            // thread exit
    libc::SYS_exit_group,      // the watchdog ending the process
];

/// What only the event thread calls: its event loop, and connecting to a restarted backend.
const EVENTS: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_dup,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
];

/// The system calls `thread` may make.
pub fn allowed(thread: VmmThread) -> Vec<libc::c_long> {
    let extra: &[libc::c_long] = match thread {
        VmmThread::Vcpu => &[],
        VmmThread::Events => EVENTS,
    };
    SHARED.iter().chain(extra).copied().collect()
}

fn name(thread: VmmThread) -> &'static str {
    match thread {
        VmmThread::Vcpu => "vCPU",
        VmmThread::Events => "event",
    }
}

fn filter(thread: VmmThread, mode: ThreadSandbox) -> Result<BpfProgram, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        allowed(thread).into_iter().map(|call| (call, Vec::new())).collect();
    let mismatch = if mode == ThreadSandbox::Log { SeccompAction::Log } else { SeccompAction::KillProcess };
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
}

/// Installs `thread`'s filter on the calling thread (nothing with [`ThreadSandbox::Off`]).
pub fn confine_this_thread(thread: VmmThread, mode: ThreadSandbox) -> Result<(), SeccompError> {
    if mode == ThreadSandbox::Off {
        return Ok(());
    }
    let program = filter(thread, mode).map_err(|source| SeccompError::Build { thread: name(thread), source })?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { thread: name(thread), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_build_and_allow_no_exec_or_fork() {
        for thread in [VmmThread::Vcpu, VmmThread::Events] {
            let calls = allowed(thread);
            for forbidden in [libc::SYS_execve, libc::SYS_clone, libc::SYS_clone3, libc::SYS_fork, libc::SYS_openat] {
                assert!(!calls.contains(&forbidden), "{thread:?}: {forbidden}");
            }
            assert!(filter(thread, ThreadSandbox::On).is_ok());
        }
    }

    /// After confining itself a thread still does what it is allowed to (an eventfd round
    /// trip), and its status says it is filtered (read through a descriptor opened before).
    #[test]
    fn a_confined_thread_keeps_working_with_what_is_allowed() {
        use std::io::Read;
        let status = std::thread::spawn(|| {
            let mut status_file = std::fs::File::open("/proc/thread-self/status").unwrap();
            confine_this_thread(VmmThread::Events, ThreadSandbox::On).unwrap();
            let event = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            event.write(1).unwrap();
            assert_eq!(event.read().unwrap(), 1);
            // A plain read: `read_to_string` would ask for the size first (statx).
            let mut status = vec![0u8; 8192];
            let n = status_file.read(&mut status).unwrap();
            String::from_utf8_lossy(&status[..n]).into_owned()
        })
        .join()
        .unwrap();
        assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    }
}
