//! `pvkit ctl --api-socket PATH pause|resume|info|snapshot DIR|migrate SOCKET [--live]|shutdown`: the command-line client of
//! `pvkit run`'s API. Exit status 0 on success; otherwise the API's message and 1 (2 for bad
//! usage, 1 when the socket cannot be reached).

use pvkit_host_devices::services::client;
use std::path::PathBuf;
use std::process::ExitCode;

/// What to ask.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Park every vCPU and stop the devices' rings.
    Pause,
    /// Start the rings again and let the vCPUs run.
    Resume,
    /// Print the VM's description (JSON).
    Info,
    /// Pause the VM (if it runs) and save it into DIR (created if needed); it stays paused:
    /// resume it or shut it down, and start it again with `pvkit run --restore DIR`.
    Snapshot {
        /// The snapshot's directory.
        dir: PathBuf,
    },
    /// Move the VM to the `pvkit run --incoming SOCKET` waiting on SOCKET; this run ends once
    /// the VM runs there. Prints the downtime.
    Migrate {
        /// The destination's socket.
        socket: PathBuf,
        /// Pre-copy: send memory while the VM runs, in rounds following KVM's and the
        /// backends' dirty-page logs, then stop it briefly (default: stop-and-copy).
        #[arg(long)]
        live: bool,
        /// With --live: keep the live phase going for at least this many milliseconds (rounds
        /// go on past the point where few pages are left; for tests and measurements).
        #[arg(long, value_name = "MS", requires = "live")]
        live_ms: Option<u64>,
    },
    /// End the run.
    Shutdown,
}

/// Options of `pvkit ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The API socket of a `pvkit run --api-socket`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// `path` made absolute (the VM's API resolves paths in its own working directory), as text;
/// `None`, after saying so, when it cannot be.
fn absolute(path: &std::path::Path) -> Option<String> {
    match std::path::absolute(path) {
        Ok(path) => Some(path.display().to_string()),
        Err(e) => {
            eprintln!("pvkit ctl: cannot make {} an absolute path: {e}", path.display());
            None
        }
    }
}

/// Runs `pvkit ctl`.
pub fn ctl(args: CtlArgs) -> ExitCode {
    let mut body = String::new();
    let (method, path) = match &args.action {
        Action::Pause => ("PUT", "/vm/pause"),
        Action::Resume => ("PUT", "/vm/resume"),
        Action::Info => ("GET", "/vm"),
        Action::Shutdown => ("PUT", "/vm/shutdown"),
        Action::Snapshot { dir } => {
            let Some(dir) = absolute(dir) else { return ExitCode::from(2) };
            body = serde_json::json!({ "dir": dir }).to_string();
            ("PUT", "/vm/snapshot")
        }
        Action::Migrate { socket, live, live_ms } => {
            let Some(socket) = absolute(socket) else { return ExitCode::from(2) };
            body = serde_json::json!({ "socket": socket, "live": live, "live_ms": live_ms }).to_string();
            ("PUT", "/vm/migrate")
        }
    };
    match client::unix(&args.api_socket, method, path, &body) {
        Ok(response) if (200..300).contains(&response.status) => {
            println!("{}", response.body);
            ExitCode::SUCCESS
        }
        Ok(response) => {
            let json = response.json();
            let message = json["error"].as_str().map_or(response.body.clone(), str::to_string);
            eprintln!("pvkit ctl: {} {path}: {message} (HTTP {})", method, response.status);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pvkit ctl: {e}");
            ExitCode::FAILURE
        }
    }
}
