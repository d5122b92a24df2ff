//! Child processes that serve on a socket (a backend, a peer, a load generator): started,
//! waited for until they listen, asked to stop with a signal, killed and reaped on drop. The
//! demo, the benchmarks and the tests all start their processes through [`ServingChild`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Errors from starting a serving process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {name}: {source}")]
    Start {
        /// The process's name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The process ended before it listened.
    #[error("{name} exited at start ({status})")]
    ExitedEarly {
        /// The process's name.
        name: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The socket did not appear in time.
    #[error("{name} did not listen on {} within {} s", path.display(), timeout.as_secs_f64())]
    NotListening {
        /// The process's name.
        name: String,
        /// The socket it should have created.
        path: PathBuf,
        /// How long it was given.
        timeout: Duration,
    },
}

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct ServingChild {
    name: String,
    child: Option<Child>,
}

impl ServingChild {
    /// Starts `cmd` (its standard streams as the caller set them), called `name` in messages.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Result<ServingChild, ProcessError> {
        let name = name.into();
        match cmd.spawn() {
            Ok(child) => Ok(ServingChild { name, child: Some(child) }),
            Err(source) => Err(ProcessError::Start { name, source }),
        }
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while the process is held.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process, for its pipes.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until `path` exists (a listening socket), failing if the process ends first or
    /// `timeout` passes.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<(), ProcessError> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if let Some(status) = self.exited() {
                return Err(ProcessError::ExitedEarly { name: self.name.clone(), status });
            }
            if Instant::now() > deadline {
                return Err(ProcessError::NotListening { name: self.name.clone(), path: path.into(), timeout });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Sends `signal` (SIGTERM, or SIGINT for DPDK, which then releases its hugepages) and
    /// waits up to `timeout` for the process to end; returns whether it did.
    pub fn signal_and_wait(&mut self, signal: libc::c_int, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else { return true };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        // SAFETY: kill only sends a signal, to the process this handle started and has not
        // reaped yet (so its id cannot belong to another process).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Kills and reaps the process, handing it back for what its pipes still hold.
    pub fn kill_and_reap(&mut self) -> Option<Child> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        let _ = child.wait();
        Some(child)
    }
}

impl Drop for ServingChild {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_exits_before_listening_is_an_error_and_a_sigterm_ends_one_that_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let mut early = ServingChild::spawn("false", &mut Command::new("false")).unwrap();
        assert!(matches!(early.wait_for_socket(&path, Duration::from_secs(5)), Err(ProcessError::ExitedEarly { .. })));
        let script = format!("touch {}; sleep 30", path.display());
        let mut serving = ServingChild::spawn("sh", Command::new("sh").args(["-c", &script])).unwrap();
        serving.wait_for_socket(&path, Duration::from_secs(5)).unwrap();
        assert!(serving.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)));
        let mut silent = ServingChild::spawn("sleep", Command::new("sleep").arg("30")).unwrap();
        assert!(matches!(
            silent.wait_for_socket(&dir.path().join("never"), Duration::from_millis(50)),
            Err(ProcessError::NotListening { .. })
        ));
    }
}
