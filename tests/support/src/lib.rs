//! Test support for pvkit's end-to-end tests.
//!
//! - [`linux_guest`]: boot a real Linux guest (Debian's cloud kernel, busybox, fio, iperf3)
//!   under `qemu-system-x86_64 -accel tcg` against vhost-user backends, run a shell script in
//!   it and get back its serial log and result, in about twenty lines of test code;
//! - [`initramfs`]: gzip'd newc cpio archives, built with the `cpio` and `flate2` crates;
//! - [`peers`]: independent backends nobody here wrote (`qemu-storage-daemon`);
//! - [`process`]: child processes that die with the test, and waiting for sockets;
//! - [`facility`]: deciding whether a test whose facility is missing skips or fails.

pub mod blkio_client;
pub mod ceph;
pub mod facility;
/// The control API's HTTP client (from `pvkit-host-devices`).
pub use pvkit_host_devices::services::client as http;
pub mod initramfs;
pub mod linux_guest;
pub mod migration;
pub mod peers;
pub mod process;
pub mod terminal;
pub mod tiny_guest;
pub mod tiny_vm;
/// The vhost-user frontend with its own driver, from `pvkit-vmm-glue`, under the name the
/// tests use.
pub mod vhost_frontend {
    pub use pvkit_vmm_glue::host_frontend::{Buffer, FrontendError, HostFrontend as TestFrontend};
}

use std::path::PathBuf;
use std::time::Duration;

/// Errors from the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A program the harness needs is not installed.
    #[error("{program} is not installed ({hint})")]
    MissingProgram {
        /// The program.
        program: String,
        /// How to get it.
        hint: &'static str,
    },
    /// A command ran but failed.
    #[error("{what} failed ({status}): {stderr}")]
    CommandFailed {
        /// What was being done.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its standard error.
        stderr: String,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with which path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Output the harness could not make sense of.
    #[error("unexpected output from {what}: {detail}")]
    Unexpected {
        /// Where it came from.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// A guest that did not finish in time.
    #[error("the guest did not finish within {0:?}; serial log tail:\n{1}")]
    Timeout(Duration, String),
    /// A socket that never appeared.
    #[error("socket {0} did not appear within {1:?}")]
    SocketNotReady(PathBuf, Duration),
    /// A child process that exited while it was expected to keep running.
    #[error("{what} exited early ({status}): {stderr}")]
    ExitedEarly {
        /// Which process.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its standard error.
        stderr: String,
    },
}

impl HarnessError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let context = context.into();
        move |source| HarnessError::Io { context, source }
    }
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, HarnessError>;

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
