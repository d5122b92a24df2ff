//! The `pvkit` command line.

use clap::{Parser, Subcommand};
use pvkit_host_devices::BackendKind;
use std::process::ExitCode;

/// The tiny guest kernel, built for x86_64-unknown-none by build.rs.
pub static TINY_GUEST_ELF: &[u8] = include_bytes!(env!("PVKIT_TINY_GUEST_ELF"));

#[derive(Parser, Debug)]
#[command(
    name = "pvkit",
    version,
    about = "Paravirtualization toolkit: vhost-user backends, guest drivers, a KVM VMM and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the three backends, boot the tiny guest against them, self-test, benchmark, summarise.
    Demo,
    /// Boot a guest on KVM with vhost-user backends attached over virtio-mmio.
    Run(crate::run::RunArgs),
    /// Run a benchmark (contenders interleaved, medians and ratios).
    Bench {
        #[command(flatten)]
        output: crate::bench::OutputArgs,
        #[command(subcommand)]
        scenario: crate::bench::Scenario,
    },
    /// Live rates of running backends from their control API (--api-socket), like iostat.
    Stat(crate::stat::StatArgs),
    /// Control a running `pvkit run --api-socket`: pause, resume, info, snapshot, migrate, shutdown.
    Ctl(crate::ctl::CtlArgs),
    /// Examine a snapshot taken with `pvkit ctl snapshot`.
    Snapshot {
        #[command(subcommand)]
        action: crate::snapshot_cmd::SnapshotAction,
    },
    /// Run one device backend (the same as invoking pvkit as vhost-user-blk, -net or -console).
    Backend {
        /// blk, net or console.
        kind: String,
        /// Arguments for the backend.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn main(args: Vec<String>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Demo => crate::demo::demo(),
        Command::Run(args) => crate::run::run(args),
        Command::Stat(args) => crate::stat::stat(args),
        Command::Ctl(args) => crate::ctl::ctl(args),
        Command::Snapshot { action } => crate::snapshot_cmd::snapshot(action),
        Command::Bench { output, scenario } => match crate::bench::run(&scenario, &output) {
            Ok(true) => ExitCode::SUCCESS,
            // A scenario of `all` failed, or `compare` found something worse.
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("pvkit bench: {err}");
                ExitCode::from(2)
            }
        },
        Command::Backend { kind, args } => {
            match BackendKind::from_name(&kind).and_then(|k| pvkit_host_devices::run_backend(k, &args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("pvkit backend: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
