//! `pvkit bench compare OLD.json NEW.json`: every metric both reports measured, its change,
//! and a verdict that allows for noise: a change counts only when it is larger than the
//! threshold and than the spread (max - min over median) either run saw for that metric.

use super::error::BenchError;
use super::report::{Report, Sample, Spread, first_seen};
use std::path::PathBuf;

/// Options of `compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// The earlier report (`--json` of an earlier run).
    pub old: PathBuf,
    /// The later report.
    pub new: PathBuf,
    /// Changes smaller than this many percent are noise, whatever the spread.
    #[arg(long, default_value_t = 5.0)]
    pub threshold: f64,
}

/// How one metric moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the noise.
    Same,
    /// Better beyond the noise.
    Better,
    /// Worse beyond the noise.
    Worse,
}

/// One metric of one contender in one case, in both reports.
#[derive(Debug, Clone)]
pub struct Change {
    /// "scenario: case", contender and metric.
    pub key: (String, String, String),
    /// Old and new medians.
    pub old: f64,
    /// The new median.
    pub new: f64,
    /// Relative change (new - old) / old.
    pub change: f64,
    /// The noise allowance used.
    pub noise: f64,
    /// The verdict.
    pub verdict: Verdict,
}

/// Whether more is better for an extra reading named `name` (a headline metric carries its
/// own direction): latencies, kicks per operation, the backend's CPU time per operation and
/// times in milliseconds are better lower.
fn extra_higher_is_better(name: &str) -> bool {
    !(name.starts_with("lat_") || name == "kicks_per_op" || name.starts_with("backend_cpu_") || name.ends_with("_ms"))
}

/// The metrics of a group of samples: headline first, then the extras.
fn metrics(group: &[&Sample]) -> Vec<(String, bool, Vec<f64>)> {
    let Some(first) = group.first() else { return Vec::new() };
    let mut out = vec![(first.metric.clone(), first.higher_is_better, group.iter().map(|s| s.value).collect())];
    for key in first.extra.keys() {
        let values: Vec<f64> = group.iter().filter_map(|s| s.extra.get(key).copied()).collect();
        out.push((key.clone(), extra_higher_is_better(key), values));
    }
    out
}

/// Every change between `old` and `new`, with `threshold` as a fraction.
pub fn changes(old: &Report, new: &Report, threshold: f64) -> Vec<Change> {
    let mut out = Vec::new();
    let keys = first_seen(new.samples.iter().map(|s| (s.scenario.clone(), s.case.clone(), s.contender.clone())));
    for (scenario, case, contender) in keys {
        let (old_group, new_group) = (old.group(&scenario, &case, &contender), new.group(&scenario, &case, &contender));
        let old_metrics = metrics(&old_group);
        for (metric, higher, new_values) in metrics(&new_group) {
            let Some((_, _, old_values)) = old_metrics.iter().find(|(m, _, _)| *m == metric) else { continue };
            let (o, n) = (Spread::of(old_values.iter().copied()), Spread::of(new_values));
            if o.median == 0.0 {
                continue;
            }
            let change = (n.median - o.median) / o.median;
            let noise = threshold.max(o.relative_range()).max(n.relative_range());
            let verdict = if change.abs() <= noise {
                Verdict::Same
            } else if (change > 0.0) == higher {
                Verdict::Better
            } else {
                Verdict::Worse
            };
            out.push(Change {
                key: (format!("{scenario}: {case}"), contender.clone(), metric),
                old: o.median,
                new: n.median,
                change,
                noise,
                verdict,
            });
        }
    }
    out
}

/// Runs the comparison; Ok(false) when something got worse.
pub fn run(args: &CompareArgs) -> Result<bool, BenchError> {
    if !args.threshold.is_finite() || args.threshold < 0.0 {
        return Err(BenchError::Options("--threshold must be a percentage of zero or more".into()));
    }
    let (old, new) = (Report::load(&args.old)?, Report::load(&args.new)?);
    if old.machine != new.machine {
        println!(
            "note: the reports come from different machines ({} / {} cores vs {} / {} cores); changes may be the machine's",
            old.machine.cpu_model, old.machine.cores, new.machine.cpu_model, new.machine.cores
        );
    }
    let list = changes(&old, &new, args.threshold / 100.0);
    if list.is_empty() {
        return Err(BenchError::Measurement("the two reports have no metric in common".into()));
    }
    println!("pvkit bench compare: {} ({}) -> {} ({})", args.old.display(), old.date, args.new.display(), new.date);
    let mut last_case = String::new();
    for c in &list {
        if c.key.0 != last_case {
            println!("\n{}", c.key.0);
            last_case.clone_from(&c.key.0);
        }
        let verdict = match c.verdict {
            Verdict::Same => "same (within noise)",
            Verdict::Better => "better",
            Verdict::Worse => "WORSE",
        };
        println!(
            "  {:<44} {:<14} {:>12.3} -> {:>12.3} {:>+8.1}%  (noise {:>4.1}%)  {verdict}",
            c.key.1,
            c.key.2,
            c.old,
            c.new,
            c.change * 100.0,
            c.noise * 100.0
        );
    }
    let worse = list.iter().filter(|c| c.verdict == Verdict::Worse).count();
    let better = list.iter().filter(|c| c.verdict == Verdict::Better).count();
    println!(
        "\n{} metric(s): {better} better, {worse} worse, {} within noise",
        list.len(),
        list.len() - better - worse
    );
    Ok(worse == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Report;
    use std::collections::BTreeMap;

    fn report(values: &[f64], latency: f64) -> Report {
        let mut r = Report::new();
        for (round, v) in values.iter().enumerate() {
            r.samples.push(Sample {
                scenario: "blk".into(),
                case: "randread".into(),
                group: "randread".into(),
                x: None,
                x_label: String::new(),
                contender: "pvkit".into(),
                round,
                metric: "IOPS".into(),
                higher_is_better: true,
                value: *v,
                extra: BTreeMap::from([("lat_p50_us".to_string(), latency)]),
                processes: Vec::new(),
            });
        }
        r
    }

    #[test]
    fn verdicts_allow_for_noise_and_direction() {
        let old = report(&[100.0, 101.0, 99.0], 10.0);
        // IOPS down 20% with little spread: worse. Latency down 20%: better.
        let c = changes(&old, &report(&[80.0, 81.0, 79.0], 8.0), 0.05);
        assert_eq!(c[0].verdict, Verdict::Worse, "{c:?}");
        assert_eq!(c[1].verdict, Verdict::Better, "{c:?}");
        // The same drop in a run whose own spread is wider is noise.
        let c = changes(&old, &report(&[80.0, 120.0, 60.0], 10.0), 0.05);
        assert_eq!(c[0].verdict, Verdict::Same, "{c:?}");
        // Under the threshold: noise.
        let c = changes(&old, &report(&[97.0, 97.0, 97.0], 10.0), 0.05);
        assert_eq!(c[0].verdict, Verdict::Same, "{c:?}");
    }

    #[test]
    fn cpu_per_operation_and_times_are_better_lower() {
        for name in ["backend_cpu_us_per_req", "backend_cpu_ns_per_frame", "backend_cpu_us_per_MB", "save_ms"] {
            assert!(!extra_higher_is_better(name), "{name}");
        }
        assert!(extra_higher_is_better("MB/s"));
    }
}
