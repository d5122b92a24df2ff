//! `pvkit bench all`: every scenario this machine can run, one after the other, into one
//! report; what the machine lacks is skipped with the reason, and a scenario that fails does
//! not stop the others.

use super::error::BenchError;
use super::recorder::Recorder;
use clap::{Args, FromArgMatches};

/// Options of `all`.
#[derive(clap::Args, Debug, Clone)]
pub struct AllArgs {
    /// Rounds for every scenario.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per measurement for every scenario that takes it (each scenario's own default
    /// otherwise).
    #[arg(long)]
    pub seconds: Option<f64>,
}

/// A scenario's options: its defaults, with `--rounds` and `--seconds` (when it takes it) from
/// `all`.
fn options<T: Args + FromArgMatches>(all: &AllArgs, takes_seconds: bool) -> Result<T, BenchError> {
    let mut argv = vec!["pvkit-bench".to_string(), "--rounds".into(), all.rounds.to_string()];
    if let (true, Some(seconds)) = (takes_seconds, all.seconds) {
        argv.extend(["--seconds".into(), seconds.to_string()]);
    }
    let command = T::augment_args(clap::Command::new("pvkit-bench"));
    let matches = command.try_get_matches_from(argv).map_err(|e| BenchError::Options(e.to_string()))?;
    T::from_arg_matches(&matches).map_err(|e| BenchError::Options(e.to_string()))
}

/// Runs every scenario into `rec`.
pub fn run(args: &AllArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    if args.rounds == 0 || args.seconds.is_some_and(|s| !s.is_finite() || s <= 0.0) {
        return Err(BenchError::Options("--rounds and --seconds must be positive".into()));
    }
    let kvm = pvkit_vmm_glue::kvm_usable();
    let outcome = super::blk::run(&options(args, true)?, rec);
    if let Err(e) = outcome {
        rec.failed("blk", e.to_string());
    }
    match super::net::unavailable() {
        Some(why) => rec.skipped("net", why),
        None => {
            if let Err(e) = super::net::run(&options(args, true)?, rec) {
                rec.failed("net", e.to_string());
            }
        }
    }
    if let Err(e) = super::console::run(&options(args, true)?, rec) {
        rec.failed("console", e.to_string());
    }
    if let Err(e) = super::guest::run(&options(args, true)?, rec) {
        rec.failed("guest", e.to_string());
    }
    if kvm {
        if let Err(e) = super::doorbell::run(&options(args, false)?, rec) {
            rec.failed("doorbell", e.to_string());
        }
        if let Err(e) = super::snapshot::run(&options(args, false)?, rec) {
            rec.failed("snapshot", e.to_string());
        }
    } else {
        rec.skipped("doorbell", "it runs the tiny guest on KVM, and /dev/kvm is not usable here");
        rec.skipped("snapshot", "it runs the tiny guest on KVM, and /dev/kvm is not usable here");
    }
    Ok(())
}
