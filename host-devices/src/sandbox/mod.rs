//! The sandbox a backend enters once its sockets, files, tap and ports are open, before it
//! serves any frontend: a seccomp-bpf allow-list of system calls (built with `seccompiler`, as
//! Firecracker does; see [`syscalls`]) and, where the kernel has Landlock, a file-system rule
//! set that leaves only what the backend was given (see [`filesystem`]). Both set
//! `no_new_privs`. Every thread the backend starts afterwards inherits both.
//!
//! `--sandbox on` (the default) kills the process with SIGSYS on a system call outside the
//! list; `--sandbox log` lets it through and has the kernel log it (and enforces no Landlock
//! rules, which cannot log); `--sandbox off` installs nothing, for debugging.

pub mod filesystem;
pub mod syscalls;

use crate::BackendKind;
use std::path::{Path, PathBuf};

/// Errors from entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The seccomp filter could not be built from the allow-list.
    #[error("building the seccomp filter of {kind}: {source}")]
    Filter {
        /// The backend.
        kind: BackendKind,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("installing the seccomp filter of {kind}: {source}")]
    Install {
        /// The backend.
        kind: BackendKind,
        /// Why.
        source: seccompiler::Error,
    },
    /// A path the backend was given could not be opened for its Landlock rule.
    #[error("Landlock rule for {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        source: landlock::PathFdError,
    },
    /// The Landlock rule set could not be built or applied.
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
}

/// How strictly a backend is confined.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// seccomp allow-list (a call outside it kills the process) and Landlock.
    #[default]
    On,
    /// seccomp allow-list whose violations are only logged by the kernel; no Landlock.
    Log,
    /// No confinement.
    Off,
}

/// The sandbox option every backend takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SandboxArgs {
    /// Confinement once everything is open: on (seccomp allow-list and Landlock), log (only
    /// log calls outside the list) or off.
    #[arg(long, value_enum, value_name = "MODE", default_value = "on")]
    pub sandbox: SandboxMode,
}

/// What one backend may do once sandboxed.
#[derive(Debug, Clone)]
pub struct Sandbox {
    kind: BackendKind,
    mode: SandboxMode,
    files: Vec<(PathBuf, bool)>,
    removable_in: Vec<PathBuf>,
    /// System calls allowed beyond the backend's list (for a library it loads).
    extra_calls: &'static [(libc::c_long, &'static str)],
}

/// What entering the sandbox did, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// System calls on the allow-list (0 when seccomp is off).
    pub syscalls: usize,
    /// Whether violations kill (true) or are logged (false).
    pub kills: bool,
    /// How far Landlock is enforced.
    pub landlock: filesystem::Enforcement,
}

impl Sandbox {
    /// The sandbox of backend `kind` in `mode`, allowing no file yet.
    pub fn new(kind: BackendKind, mode: SandboxMode) -> Sandbox {
        Sandbox { kind, mode, files: Vec::new(), removable_in: Vec::new(), extra_calls: &[] }
    }

    /// Also allows `calls` (what a library the backend loaded needs, such as Ceph's).
    pub fn with_calls(mut self, calls: &'static [(libc::c_long, &'static str)]) -> Sandbox {
        self.extra_calls = calls;
        self
    }

    /// Allows reading `path` (and writing it unless `read_only`): an image, a port's file.
    pub fn file(mut self, path: &Path, read_only: bool) -> Sandbox {
        self.files.push((path.to_path_buf(), read_only));
        self
    }

    /// Allows removing the socket `path` (at exit), which needs its directory.
    pub fn removable(mut self, path: &Path) -> Sandbox {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        self.removable_in.push(dir.to_path_buf());
        self
    }

    /// Enters the sandbox: Landlock first (it needs to open the paths), then seccomp.
    pub fn enter(&self) -> Result<Option<Confinement>, SandboxError> {
        if self.mode == SandboxMode::Off {
            return Ok(None);
        }
        let landlock = if self.mode == SandboxMode::On {
            filesystem::restrict(&self.files, &self.removable_in)?
        } else {
            filesystem::Enforcement::Skipped
        };
        let kills = self.mode == SandboxMode::On;
        let syscalls = syscalls::install(self.kind, self.extra_calls, kills)?;
        Ok(Some(Confinement { syscalls, kills, landlock }))
    }

    /// [`Sandbox::enter`], logging what it did.
    pub fn enter_and_log(&self) -> Result<(), SandboxError> {
        match self.enter()? {
            None => log::warn!("{}: sandbox off (--sandbox off)", self.kind.program_name()),
            Some(c) => log::info!(
                "{}: sandboxed: {} system calls allowed ({}), Landlock {}",
                self.kind.program_name(),
                c.syscalls,
                if c.kills { "others kill the process" } else { "others are logged" },
                c.landlock
            ),
        }
        Ok(())
    }
}
