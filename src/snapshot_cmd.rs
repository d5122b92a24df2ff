//! `pvkit snapshot inspect DIR`: what a snapshot holds, without restoring it.

use std::path::PathBuf;
use std::process::ExitCode;

/// What to do with a snapshot.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotAction {
    /// Print where it was taken, guest memory's size and non-zero pages, each vCPU's
    /// registers, each device's transport state, ring indexes and the descriptor chains in
    /// flight.
    Inspect {
        /// The snapshot's directory (`pvkit ctl snapshot DIR`).
        dir: PathBuf,
    },
}

/// Runs `pvkit snapshot`.
pub fn snapshot(action: SnapshotAction) -> ExitCode {
    match action {
        SnapshotAction::Inspect { dir } => match pvkit_vmm_glue::snapshot::inspect::report(&dir) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pvkit snapshot inspect: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
    }
}
