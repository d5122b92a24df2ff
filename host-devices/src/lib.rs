//! pvkit's vhost-user device backends.
//!
//! Each backend runs as its own process, conventionally named `vhost-user-blk`,
//! `vhost-user-net` or `vhost-user-console`. The `pvkit` command is multi-call: started under
//! one of those names (by symlink or by re-executing itself with that `argv[0]`), it becomes
//! that backend. This crate holds the device logic; [`BackendKind`] names the backends and maps
//! program names to them.

#![warn(missing_docs)]

pub mod backend_channel;
pub mod blk;
pub mod console;
pub mod net;
pub mod process;
pub mod queue;
pub mod region_check;
pub mod relay;
pub mod sandbox;
pub mod server;
pub mod services;

use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, recovering the data from a thread that panicked while holding it: every
/// lock here guards data that stays consistent between statements, so a panic elsewhere must
/// not take the backend down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`lock`] for reading an `RwLock`.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`lock`] for writing an `RwLock`.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors from choosing or starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A backend name that does not exist.
    #[error("unknown backend '{0}' (expected one of: blk, net, console)")]
    UnknownBackend(String),
    /// The block backend failed.
    #[error(transparent)]
    Blk(#[from] blk::BlkError),
    /// The console backend failed.
    #[error(transparent)]
    Console(#[from] console::ConsoleBackendError),
    /// The net backend failed.
    #[error(transparent)]
    Net(#[from] net::NetBackendError),
}

/// The three device backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// virtio-blk over vhost-user.
    Blk,
    /// virtio-net over vhost-user.
    Net,
    /// virtio-console over vhost-user.
    Console,
}

impl BackendKind {
    /// Every backend.
    pub const ALL: [BackendKind; 3] = [BackendKind::Blk, BackendKind::Net, BackendKind::Console];

    /// The short name used by `pvkit backend NAME`.
    pub const fn short_name(self) -> &'static str {
        match self {
            BackendKind::Blk => "blk",
            BackendKind::Net => "net",
            BackendKind::Console => "console",
        }
    }

    /// The conventional program name, which is also the `argv[0]` a backend process carries.
    pub const fn program_name(self) -> &'static str {
        match self {
            BackendKind::Blk => "vhost-user-blk",
            BackendKind::Net => "vhost-user-net",
            BackendKind::Console => "vhost-user-console",
        }
    }

    /// Parses a short name (`blk`) or a program name (`vhost-user-blk`).
    pub fn from_name(name: &str) -> Result<BackendKind, BackendError> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.short_name() == name || k.program_name() == name)
            .ok_or_else(|| BackendError::UnknownBackend(name.to_string()))
    }

    /// The backend a process invoked as `argv0` should become, if its file name is a
    /// backend's program name (`/usr/bin/vhost-user-net` -> `Net`).
    pub fn from_argv0(argv0: &str) -> Option<BackendKind> {
        let file = Path::new(argv0).file_name()?.to_str()?;
        BackendKind::ALL.into_iter().find(|k| k.program_name() == file)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// Sets up logging to standard error (`RUST_LOG` chooses the level; `info` by default).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).try_init();
}

/// A command that starts backend `kind` by re-executing the multi-call binary `exe` with
/// `argv[0]` set to the backend's program name, so the process carries the conventional name
/// (`ps` shows `vhost-user-blk`) while one build provides every program.
pub fn backend_command(exe: &Path, kind: BackendKind) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg0(kind.program_name());
    cmd
}

/// Runs backend `kind` with its command-line arguments (without the program name) and
/// returns when it exits.
pub fn run_backend(kind: BackendKind, args: &[String]) -> Result<(), BackendError> {
    match kind {
        BackendKind::Blk => Ok(blk::main(args)?),
        BackendKind::Console => Ok(console::main(args)?),
        BackendKind::Net => Ok(net::main(args)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for kind in BackendKind::ALL {
            assert_eq!(BackendKind::from_name(kind.short_name()).unwrap(), kind);
            assert_eq!(BackendKind::from_name(kind.program_name()).unwrap(), kind);
            assert_eq!(BackendKind::from_argv0(&format!("/usr/local/bin/{}", kind.program_name())), Some(kind));
        }
        assert!(matches!(BackendKind::from_name("scsi"), Err(BackendError::UnknownBackend(n)) if n == "scsi"));
        assert_eq!(BackendKind::from_argv0("/usr/bin/pvkit"), None);
        assert_eq!(BackendKind::from_argv0(""), None);
    }
}
