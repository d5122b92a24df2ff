//! `pvkit bench limits`: how closely pvkit's rate limits hold a load. libblkio drives
//! `vhost-user-blk` (null engine) at queue depth 32, 4 KiB random reads against operation limits
//! and 128 KiB sequential reads against bandwidth limits; each case reports the rate achieved
//! as a fraction of the limit. The scenario fails when a case's median is more than
//! `--tolerance` away from its limit.

use super::error::BenchError;
use super::loadgen::{self, Pattern};
use super::process::{Spawned, own_usage};
use super::recorder::Recorder;
use super::report::ProcessStats;
use pvkit_host_devices::{BackendKind, backend_command};
use std::path::PathBuf;
use std::time::Duration;

/// Options of the limits benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitsBenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rounds (the median is judged).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Queue depth.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Operation limits per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub ops: Vec<u64>,
    /// Bandwidth limits in MB/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    pub mbps: Vec<u64>,
    /// How far from its limit a case's median may land (0.05: within 5%).
    #[arg(long, default_value_t = 0.05)]
    pub tolerance: f64,
}

/// One case: the limit's command-line form, its value, the load's pattern, and its unit.
struct Case {
    name: String,
    limit: String,
    value: f64,
    pattern: Pattern,
    unit: &'static str,
}

fn cases(args: &LimitsBenchArgs) -> Vec<Case> {
    let ops = args.ops.iter().map(|&n| Case {
        name: format!("ops limit {n}/s"),
        limit: format!("all:ops={n}"),
        value: n as f64,
        pattern: Pattern::RandRead,
        unit: "IOPS",
    });
    let bw = args.mbps.iter().map(|&n| Case {
        name: format!("bandwidth limit {n} MB/s"),
        limit: format!("all:bw={n}M"),
        value: n as f64,
        pattern: Pattern::SeqRead,
        unit: "MB/s",
    });
    ops.chain(bw).collect()
}

/// Runs the benchmark into `rec`.
pub fn run(args: &LimitsBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if args.rounds == 0 || !positive(args.seconds) || args.qd == 0 || args.qd > 1024 || !positive(args.tolerance) {
        return Err(BenchError::Options("--rounds, --seconds, --tolerance and --qd (1-1024) must be positive".into()));
    }
    let cases = cases(args);
    rec.begin("limits", format!("{args:?}"), args.rounds * cases.len());
    rec.note(format!(
        "pvkit bench limits: libblkio at QD {}, vhost-user-blk null engine, {} round(s) of {} s per limit",
        args.qd, args.rounds, args.seconds
    ));
    let work = std::env::temp_dir().join(format!("pvkit-bench-limits-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(BenchError::io(format!("cannot create {}", work.display())))?;
    let result = measure(args, rec, &cases, &work);
    let _ = std::fs::remove_dir_all(&work);
    let off = result?;
    if off.is_empty() {
        rec.ran(format!("{} limit(s), every median within {:.0}%", cases.len(), args.tolerance * 100.0));
    } else {
        rec.failed(
            "limits",
            format!("medians further than {:.0}% from their limit: {}", args.tolerance * 100.0, off.join("; ")),
        );
    }
    Ok(())
}

/// Measures every case; returns the cases whose median ratio is off by more than the
/// tolerance.
fn measure(
    args: &LimitsBenchArgs,
    rec: &mut Recorder,
    cases: &[Case],
    work: &std::path::Path,
) -> Result<Vec<String>, BenchError> {
    let contender = "pvkit vhost-user-blk (null)";
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..args.rounds {
        for (case, ratios) in cases.iter().zip(&mut ratios) {
            rec.step(format!("round {} {}", round + 1, case.name));
            let socket = work.join("blk.sock");
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
            let mut cmd = backend_command(&exe, BackendKind::Blk);
            cmd.arg("--socket-path").arg(&socket).args(["--engine", "null", "--size", &(1u64 << 30).to_string()]);
            cmd.args(["--limit", &case.limit]);
            let child = Spawned::start(contender, &mut cmd, &socket, &work.join("backend.log"))?;
            let (before, own_before) = (child.usage()?, own_usage()?);
            let load = loadgen::run(&socket, case.pattern, args.qd, 1, Duration::from_secs_f64(args.seconds));
            let (usage, own) = (child.usage()?.since(&before), own_usage()?.since(&own_before));
            child.stop();
            let load = load?;
            let achieved = if case.unit == "IOPS" { load.iops } else { load.bytes_per_second / 1e6 };
            let ratio = achieved / case.value;
            ratios.push(ratio);
            let mut sample = rec.sample(&case.name, contender, round);
            sample.group = "achieved / limit".into();
            (sample.metric, sample.value) = ("achieved/limit".into(), ratio);
            sample.extra.insert(case.unit.into(), achieved);
            sample.extra.insert("limit".into(), case.value);
            sample.extra.insert("lat_p50_us".into(), load.p50.as_secs_f64() * 1e6);
            sample.processes = vec![ProcessStats::new("backend", &usage), ProcessStats::new("libblkio frontend", &own)];
            rec.push(sample);
        }
    }
    Ok(cases
        .iter()
        .zip(&mut ratios)
        .filter_map(|(case, ratios)| {
            let median = super::median(ratios);
            ((median - 1.0).abs() > args.tolerance).then(|| format!("{} at {:.3} of it", case.name, median))
        })
        .collect())
}
