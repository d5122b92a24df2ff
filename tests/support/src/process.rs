//! Child processes that are killed when the test drops them, and waiting for sockets.

use crate::{HarnessError, Result, tail};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped on drop. Its standard error goes to a pipe that
/// [`ChildGuard::stop`] and error messages read.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed, stdout discarded and stderr captured.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Result<ChildGuard> {
        let name = name.into();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(HarnessError::io(format!("starting {name}")))?;
        Ok(ChildGuard { name, child: Some(child) })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if the process has exited already.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = read_stderr(child);
            self.child = None;
            return Err(HarnessError::ExitedEarly { what: self.name.clone(), status, stderr: tail(&stderr, 20) });
        }
        Ok(())
    }

    /// Waits until `path` exists (a listening socket), failing if the process exits first.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            self.check_running()?;
            if Instant::now() > deadline {
                return Err(HarnessError::SocketNotReady(path.to_path_buf(), timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Reads the process's standard error up to the first line that contains `needle` and
    /// returns that line (what it read is no longer in [`ChildGuard::stop`]'s text); fails if
    /// the process closes standard error first.
    pub fn stderr_line_with(&mut self, needle: &str) -> Result<String> {
        let stderr = self.child.as_mut().and_then(|c| c.stderr.as_mut());
        let Some(stderr) = stderr else {
            return Err(HarnessError::Unexpected {
                what: self.name.clone(),
                detail: "standard error is not captured".into(),
            });
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
                        what: self.name.clone(),
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
        if let Some(child) = self.child.as_mut() {
            // SAFETY: kill only sends a signal to the process we started.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill_and_reap()
    }

    fn kill_and_reap(&mut self) -> String {
        let Some(mut child) = self.child.take() else { return String::new() };
        let _ = child.kill();
        let _ = child.wait();
        read_stderr(&mut child)
    }
}

fn read_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
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
