//! `pvkit ctl --api-socket PATH pause|resume|info|shutdown`: the command-line client of
//! `pvkit run`'s API. Exit status 0 on success; otherwise the API's message and 1 (2 for bad
//! usage, 1 when the socket cannot be reached).

use pvkit_host_devices::services::client;
use std::path::PathBuf;
use std::process::ExitCode;

/// What to ask.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Park every vCPU.
    Pause,
    /// Let them run again.
    Resume,
    /// Print the VM's description (JSON).
    Info,
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
    #[arg(value_enum)]
    pub action: Action,
}

/// Runs `pvkit ctl`.
pub fn ctl(args: CtlArgs) -> ExitCode {
    let (method, path) = match args.action {
        Action::Pause => ("PUT", "/vm/pause"),
        Action::Resume => ("PUT", "/vm/resume"),
        Action::Info => ("GET", "/vm"),
        Action::Shutdown => ("PUT", "/vm/shutdown"),
    };
    match client::unix(&args.api_socket, method, path, "") {
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
