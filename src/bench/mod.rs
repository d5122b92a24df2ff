//! `pvkit bench`: paravirtual I/O benchmarks that compare contenders side by side in one run,
//! with raw samples in JSON (`--json`), plots (`--svg`) and a regression check (`compare`).

pub mod all;
pub mod blk;
pub mod compare;
pub mod console;
pub mod doorbell;
pub mod error;
pub mod guest;
pub mod limits;
mod loadgen;
pub mod net;
pub mod plot;
mod process;
pub mod recorder;
pub mod report;
pub mod snapshot;

pub use error::BenchError;
use std::path::PathBuf;

/// Where results go besides the table on standard output.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Write every raw sample, the machine, versions and options to FILE as JSON.
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write plots (SVG) into DIR, created if missing.
    #[arg(long, global = true, value_name = "DIR")]
    pub svg: Option<PathBuf>,
}

/// Benchmark scenarios.
#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// Block I/O through libblkio: pvkit vhost-user-blk (each engine) vs qemu-storage-daemon and
    /// --peer backends; 4 KiB random and 128 KiB sequential, queue-depth and queue-count sweeps.
    Blk(blk::BlkBenchArgs),
    /// How closely vhost-user-blk's rate limits hold a libblkio load at QD 32: operation and
    /// bandwidth limits, each case's rate achieved as a fraction of its limit.
    Limits(limits::LimitsBenchArgs),
    /// Frames per second into vhost-user-net --sink vs DPDK's net_vhost, DPDK testpmd generating.
    Net(net::NetBenchArgs),
    /// The whole stack: the tiny guest on KVM (port doorbells, MMIO notify) and the software
    /// guest driving pvkit's three backends.
    Guest(guest::GuestBenchArgs),
    /// Inside the tiny guest on KVM: a kick per doorbell mechanism, a request round trip, and
    /// requests per queue depth, with event-idx on and off.
    Doorbell(doorbell::DoorbellBenchArgs),
    /// Guest-to-host and host-to-guest throughput through one vhost-user-console port.
    Console(console::ConsoleBenchArgs),
    /// Snapshot time and size, restore time and the downtime of moving a VM (stop-and-copy and
    /// pre-copy), per guest memory size, on KVM.
    Snapshot(snapshot::SnapshotBenchArgs),
    /// Every scenario this machine can run (what it cannot is skipped, saying why).
    All(all::AllArgs),
    /// Per-metric change between two --json reports, with a noise-aware verdict; exits 1 when
    /// something got worse beyond the noise (2 on errors, as every bench command).
    Compare(compare::CompareArgs),
}

/// The median of `values` (sorted in place; the upper middle for an even count, 0 when empty).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The full path of `program` on `PATH`, if it is there.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Runs a scenario; returns whether everything passed (compare: no regression).
pub fn run(scenario: &Scenario, output: &OutputArgs) -> Result<bool, BenchError> {
    if let Scenario::Compare(args) = scenario {
        return compare::run(args);
    }
    // Refuse unwritable output places before spending minutes measuring.
    if let Some(dir) = &output.svg {
        std::fs::create_dir_all(dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))?;
    }
    if let Some(file) = &output.json
        && let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(BenchError::Options(format!(
            "cannot write {}: {} is not a directory",
            file.display(),
            parent.display()
        )));
    }
    let mut rec = recorder::Recorder::new();
    let outcome = match scenario {
        Scenario::Blk(args) => blk::run(args, &mut rec),
        Scenario::Limits(args) => limits::run(args, &mut rec),
        Scenario::Console(args) => console::run(args, &mut rec),
        Scenario::Snapshot(args) => snapshot::run(args, &mut rec),
        Scenario::Net(args) => net::run(args, &mut rec),
        Scenario::Guest(args) => guest::run(args, &mut rec),
        Scenario::Doorbell(args) => doorbell::run(args, &mut rec),
        Scenario::All(args) => all::run(args, &mut rec),
        Scenario::Compare(_) => Ok(()),
    };
    let report = rec.finish();
    // Whatever was measured is written, even when a scenario failed part way.
    if let Some(file) = &output.json {
        report.save(file)?;
        eprintln!("pvkit bench: wrote {} samples to {}", report.samples.len(), file.display());
    }
    if let Some(dir) = &output.svg {
        let written = plot::write_all(&report, dir)?;
        eprintln!("pvkit bench: wrote {} plot(s) to {}", written.len(), dir.display());
    }
    outcome?;
    let failed: Vec<_> = report.scenarios.iter().filter(|s| s.status == report::Outcome::Failed).collect();
    // Repeated last, so the reason is at the end of the output, where a reader looks first.
    for scenario in &failed {
        eprintln!("pvkit bench: scenario {} failed: {}", scenario.name, scenario.detail);
    }
    Ok(failed.is_empty())
}
