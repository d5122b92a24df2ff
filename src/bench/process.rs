//! Backend processes under measurement: start, wait for the socket, CPU time and peak RSS
//! from /proc, stop.

use super::error::BenchError;
use pvkit_host_devices::process::ServingChild;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CPU time and memory of a process over an interval.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessUsage {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Wall time.
    pub wall: Duration,
    /// Peak resident set size (VmHWM), KiB.
    pub peak_rss_kib: u64,
    at: Option<Instant>,
}

impl ProcessUsage {
    /// CPU time per operation, in `unit`s of a second (1e6: µs), at `rate` operations per
    /// second over this usage's wall time; `None` when nothing was measured.
    pub fn cpu_per_op(&self, rate: f64, unit: f64) -> Option<f64> {
        let ops = rate * self.wall.as_secs_f64();
        (ops > 0.0 && ops.is_finite()).then(|| self.cpu.as_secs_f64() * unit / ops)
    }

    /// The usage between `earlier` and `self`.
    pub fn since(&self, earlier: &ProcessUsage) -> ProcessUsage {
        let wall = match (self.at, earlier.at) {
            (Some(a), Some(b)) => a.duration_since(b),
            _ => Duration::ZERO,
        };
        ProcessUsage { cpu: self.cpu.saturating_sub(earlier.cpu), wall, peak_rss_kib: self.peak_rss_kib, at: self.at }
    }
}

/// A backend process, killed on drop.
pub struct Spawned {
    child: ServingChild,
}

impl Spawned {
    /// Starts `cmd` and waits (up to 10 s) for `socket` to appear.
    /// Its standard error goes to `log`.
    pub fn start(name: &str, cmd: &mut Command, socket: &Path, log: &Path) -> Result<Spawned, BenchError> {
        let _ = std::fs::remove_file(socket);
        let log_file =
            std::fs::File::create(log).map_err(BenchError::io(format!("cannot create {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(log_file));
        let mut child = ServingChild::spawn(name, cmd)?;
        child.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(Spawned { child })
    }

    /// The process's CPU time and peak RSS now.
    pub fn usage(&self) -> Result<ProcessUsage, BenchError> {
        let pid =
            self.child.id().ok_or_else(|| BenchError::Measurement(format!("{} was stopped", self.child.name())))?;
        usage_of(pid, self.child.name())
    }
}

/// The CPU time (all threads) and peak RSS of process `pid` (`name` for messages) now.
pub fn usage_of(pid: u32, name: &str) -> Result<ProcessUsage, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(BenchError::io(format!("reading the statistics of {name} (pid {pid})")))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(ProcessUsage {
        cpu: Duration::from_secs_f64(ticks as f64 / hz as f64),
        wall: Duration::ZERO,
        peak_rss_kib,
        at: Some(Instant::now()),
    })
}

/// This process's usage now (the load generators and VMMs that run inside pvkit).
pub fn own_usage() -> Result<ProcessUsage, BenchError> {
    usage_of(std::process::id(), "pvkit")
}

impl Spawned {
    /// Asks the process to finish with SIGINT (DPDK releases its hugepages then), waiting up
    /// to `timeout` before killing it.
    pub fn interrupt(mut self, timeout: Duration) {
        self.child.signal_and_wait(libc::SIGINT, timeout);
    }

    /// Stops the process.
    pub fn stop(mut self) {
        self.child.kill_and_reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_op_divides_cpu_time_by_the_operations_in_the_window() {
        let usage =
            ProcessUsage { cpu: Duration::from_secs(1), wall: Duration::from_secs(2), peak_rss_kib: 1, at: None };
        assert_eq!(usage.cpu_per_op(1000.0, 1e6), Some(500.0), "1 s of CPU over 2,000 operations");
        assert_eq!(usage.cpu_per_op(0.0, 1e6), None);
        let unmeasured = ProcessUsage { wall: Duration::ZERO, ..usage };
        assert_eq!(unmeasured.cpu_per_op(1000.0, 1e6), None);
    }
}
