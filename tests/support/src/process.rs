//! Child processes that are killed when the test drops them, and waiting for sockets.

use crate::{HarnessError, Result, tail};
use pvkit_host_devices::process::{ProcessError, ServingChild};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed (SIGKILL) and reaped on drop. Its standard error goes to a pipe that
/// [`ChildGuard::stop`] and error messages read.
pub struct ChildGuard {
    inner: ServingChild,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed, stdout discarded and stderr captured.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Result<ChildGuard> {
        let name = name.into();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let inner = ServingChild::spawn(name.clone(), cmd).map_err(|e| match e {
            ProcessError::Start { source, .. } => HarnessError::io(format!("starting {name}"))(source),
            other => HarnessError::Unexpected { what: name.clone(), detail: other.to_string() },
        })?;
        Ok(ChildGuard { inner })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.inner.id()
    }

    /// Fails if the process has exited already.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(status) = self.inner.exited() else { return Ok(()) };
        let stderr = self.inner.kill_and_reap().map(|mut child| read_stderr(&mut child)).unwrap_or_default();
        Err(HarnessError::ExitedEarly { what: self.inner.name().to_string(), status, stderr: tail(&stderr, 20) })
    }

    /// Waits until `path` exists (a listening socket), failing if the process exits first.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        match self.inner.wait_for_socket(path, timeout) {
            Ok(()) => Ok(()),
            Err(ProcessError::NotListening { .. }) => Err(HarnessError::SocketNotReady(path.to_path_buf(), timeout)),
            Err(_) => self.check_running(),
        }
    }

    /// Reads the process's standard error up to the first line that contains `needle` and
    /// returns that line (what it read is no longer in [`ChildGuard::stop`]'s text); fails if
    /// the process closes standard error first.
    pub fn stderr_line_with(&mut self, needle: &str) -> Result<String> {
        let name = self.inner.name().to_string();
        let stderr = self.inner.child_mut().and_then(|c| c.stderr.as_mut());
        let Some(stderr) = stderr else {
            return Err(HarnessError::Unexpected { what: name, detail: "standard error is not captured".into() });
        };
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match stderr.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    if text.contains(needle) {
                        return Ok(text);
                    }
                    line.clear();
                }
                Ok(1) => line.push(byte[0]),
                _ => {
                    return Err(HarnessError::Unexpected {
                        what: name,
                        detail: format!("standard error ended without a line containing {needle:?}"),
                    });
                }
            }
        }
    }

    /// Kills the process and returns what it wrote to standard error.
    pub fn stop(mut self) -> String {
        self.kill_and_reap()
    }

    /// Sends SIGTERM, waits up to `timeout` for the process to exit (killing it after that),
    /// and returns what it wrote to standard error.
    pub fn terminate(mut self, timeout: Duration) -> String {
        self.inner.signal_and_wait(libc::SIGTERM, timeout);
        self.kill_and_reap()
    }

    fn kill_and_reap(&mut self) -> String {
        self.inner.kill_and_reap().map(|mut child| read_stderr(&mut child)).unwrap_or_default()
    }
}

fn read_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// Runs `cmd` to completion, returning its standard output, or an error with its stderr.
pub fn run_checked(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(HarnessError::io(format!("running {what}")))?;
    if !out.status.success() {
        return Err(HarnessError::CommandFailed {
            what: what.to_string(),
            status: out.status,
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 20),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
