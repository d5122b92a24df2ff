//! pvkit's three backends for a tiny-guest VM (blk on a file, net loopback, console on a unix
//! or file port), `pvkit run` against them, and `pvkit ctl` on its API socket.

use crate::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long a backend may take to show its socket.
const WAIT: Duration = Duration::from_secs(10);

/// Where the console backend's port goes.
#[derive(Debug, Clone)]
pub enum ConsolePort {
    /// A unix socket a peer connects to (answering the guest's ping).
    Unix(PathBuf),
    /// A file the guest's output is appended to.
    File(PathBuf),
}

/// The three backends.
pub struct Backends {
    /// The backend processes (blk, net, console).
    pub processes: Vec<ChildGuard>,
    /// The blk backend's socket.
    pub blk: PathBuf,
    /// The net backend's socket.
    pub net: PathBuf,
    /// The console backend's socket.
    pub console: PathBuf,
    /// The console's port.
    pub console_port: ConsolePort,
    pvkit: PathBuf,
}

impl Backends {
    /// Starts them with `pvkit` in `dir`: blk on `dir/disk.img` (8 MiB, made if missing),
    /// net loopback, console on `port`.
    pub fn start(pvkit: &Path, dir: &Path, port: ConsolePort) -> Backends {
        let disk = dir.join("disk.img");
        if !disk.exists() {
            std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
        }
        let (blk, net, console) = (dir.join("blk.sock"), dir.join("net.sock"), dir.join("console.sock"));
        let port_arg = match &port {
            ConsolePort::Unix(path) => format!("unix:{}", path.display()),
            ConsolePort::File(path) => format!("file:{}", path.display()),
        };
        let mut processes = Vec::new();
        for (name, args, socket) in [
            ("vhost-user-blk", vec!["blk".to_string(), "--blk-file".into(), disk.display().to_string()], &blk),
            ("vhost-user-net", vec!["net".into(), "--loopback".into()], &net),
            ("vhost-user-console", vec!["console".into(), "--port".into(), port_arg], &console),
        ] {
            let mut cmd = Command::new(pvkit);
            cmd.arg("backend").args(&args).arg("--socket-path").arg(socket);
            let mut child = ChildGuard::spawn(name, &mut cmd).unwrap();
            child.wait_for_socket(socket, WAIT).unwrap();
            processes.push(child);
        }
        Backends { processes, blk, net, console, console_port: port, pvkit: pvkit.to_path_buf() }
    }

    /// `pvkit run` with the three devices attached, then `args`.
    pub fn run_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.pvkit);
        cmd.arg("run").args(args);
        cmd.arg("--blk").arg(&self.blk).arg("--net").arg(&self.net).arg("--console").arg(&self.console);
        cmd
    }

    /// Stops every backend (SIGTERM, then SIGKILL) and returns what they printed.
    pub fn stop(&mut self) -> String {
        self.processes.drain(..).map(|p| p.terminate(WAIT)).collect()
    }
}

/// `pvkit ctl --api-socket API ARGS...`.
pub fn ctl(pvkit: &Path, api: &Path, args: &[&str]) -> Output {
    Command::new(pvkit).arg("ctl").arg("--api-socket").arg(api).args(args).output().unwrap()
}

/// Waits up to `timeout` for `done`; panics with `what` when it never holds.
pub fn wait_for(what: &str, timeout: Duration, done: &dyn Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `timeout` for `child` to exit; returns how it ended.
pub fn wait_for_exit(child: &mut ChildGuard, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match child.check_running() {
            Ok(()) => assert!(Instant::now() < deadline, "the process did not end within {timeout:?}"),
            Err(ended) => return ended.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number of `PVKIT-SOAK n` progress lines in a serial log, and the last `n`.
pub fn soak_progress(log: &str) -> (usize, u64) {
    let numbers: Vec<u64> =
        log.lines().filter_map(|l| l.strip_prefix("PVKIT-SOAK ")).filter_map(|n| n.trim().parse().ok()).collect();
    (numbers.len(), numbers.last().copied().unwrap_or(0))
}
