//! What a benchmark run produces: raw samples (every round of every contender), the machine
//! and versions they were taken on, the readable table, and the JSON file (`--json`).

use super::error::BenchError;
use super::median;
use super::process::ProcessUsage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The distinct items of `items`, in the order they first appear.
pub fn first_seen<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The JSON format's version (`format` in the file).
pub const FORMAT: u32 = 1;

/// One process's share of a measurement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessStats {
    /// Its role: "backend", "generator", "vmm", ...
    pub role: String,
    /// CPU time (user + system, all threads) over the measurement.
    pub cpu_seconds: f64,
    /// The measurement's wall time.
    pub wall_seconds: f64,
    /// Peak resident memory (VmHWM) at the end, KiB.
    pub peak_rss_kib: u64,
}

impl ProcessStats {
    /// `usage` (an interval from [`ProcessUsage::since`]) under `role`.
    pub fn new(role: &str, usage: &ProcessUsage) -> ProcessStats {
        ProcessStats {
            role: role.to_string(),
            cpu_seconds: usage.cpu.as_secs_f64(),
            wall_seconds: usage.wall.as_secs_f64(),
            peak_rss_kib: usage.peak_rss_kib,
        }
    }

    /// CPU time over wall time (1.0 = one core).
    pub fn cpu_fraction(&self) -> f64 {
        if self.wall_seconds > 0.0 { self.cpu_seconds / self.wall_seconds } else { 0.0 }
    }
}

/// One measurement: one contender, one case, one round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// The scenario ("blk", "net", ...).
    pub scenario: String,
    /// What was measured, readable ("randread 4 KiB, QD 32, 1 queue").
    pub case: String,
    /// The case's plot: cases with the same group share one chart.
    pub group: String,
    /// The case's position on the chart's x axis (queue depth, frame size), when numeric.
    pub x: Option<f64>,
    /// The x axis's name ("queue depth").
    pub x_label: String,
    /// Who was measured.
    pub contender: String,
    /// The round (0-based).
    pub round: usize,
    /// The headline metric's name with its unit ("IOPS", "Mpps", "µs").
    pub metric: String,
    /// Whether more is better for the headline metric.
    pub higher_is_better: bool,
    /// The headline value.
    pub value: f64,
    /// Other readings ("lat_p50_us", "Gbit/s", "kicks_per_op"), by name.
    pub extra: BTreeMap<String, f64>,
    /// Each process's CPU time and memory.
    pub processes: Vec<ProcessStats>,
}

/// Whether a scenario ran, and why not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScenarioStatus {
    /// The scenario.
    pub name: String,
    /// Whether it ran.
    pub status: Outcome,
    /// Why it was skipped or failed, or what it measured.
    pub detail: String,
}

/// What became of a scenario (`"ran"`, `"skipped"` or `"failed"` in the JSON).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It ran and recorded its samples.
    Ran,
    /// The machine lacks what it needs.
    Skipped,
    /// It started and failed; the other scenarios still ran.
    Failed,
}

/// The machine a run was taken on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cores: usize,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// "pvm" (PVM-based KVM), "kvm", or "none" (no usable /dev/kvm).
    pub kvm: String,
}

impl Machine {
    /// This machine.
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let kvm = if !pvkit_vmm_glue::kvm_usable() {
            "none"
        } else if pvkit_vmm_glue::kvm_is_pvm() {
            "pvm"
        } else {
            "kvm"
        };
        Machine { cpu_model, cores, memory_mib, kernel, kvm: kvm.into() }
    }
}

/// A whole run: what `--json` writes and `compare` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// [`FORMAT`].
    pub format: u32,
    /// When the run started (UTC, RFC 3339).
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// pvkit's and the peers' versions.
    pub versions: BTreeMap<String, String>,
    /// The options of each scenario that ran.
    pub options: BTreeMap<String, String>,
    /// Each scenario's status.
    pub scenarios: Vec<ScenarioStatus>,
    /// What the table's header lines say, per scenario.
    pub notes: BTreeMap<String, Vec<String>>,
    /// Every raw sample.
    pub samples: Vec<Sample>,
}

/// A date as RFC 3339 UTC, from seconds since the epoch (proleptic Gregorian calendar).
pub fn rfc3339(epoch_seconds: u64) -> String {
    let days = (epoch_seconds / 86_400) as i64;
    let secs = epoch_seconds % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The first line of `program --version`, when it runs.
fn version_of(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string)
}

impl Report {
    /// An empty report for a run starting now.
    pub fn new() -> Report {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut versions = BTreeMap::new();
        versions.insert("pvkit".to_string(), env!("CARGO_PKG_VERSION").to_string());
        versions.insert("libblkio (crate blkio)".to_string(), "0.5".to_string());
        if super::find_program("qemu-storage-daemon").is_some()
            && let Some(v) = version_of("qemu-storage-daemon", &["--version"])
        {
            versions.insert("qemu-storage-daemon".to_string(), v);
        }
        // testpmd has no --version; DPDK's own version is what matters.
        if super::find_program("dpdk-testpmd").is_some()
            && let Some(v) = version_of("pkg-config", &["--modversion", "libdpdk"])
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
                .or_else(|| version_of("dpkg-query", &["-W", "-f=${Version}", "dpdk"]))
        {
            versions.insert("dpdk".to_string(), v);
        }
        if let Some(v) = version_of("rustc", &["--version"]) {
            versions.insert("rustc (at run time)".to_string(), v);
        }
        Report {
            format: FORMAT,
            date: rfc3339(now),
            machine: Machine::probe(),
            versions,
            options: BTreeMap::new(),
            scenarios: Vec::new(),
            notes: BTreeMap::new(),
            samples: Vec::new(),
        }
    }

    /// Reads a report written by `--json`.
    pub fn load(path: &Path) -> Result<Report, BenchError> {
        let text = std::fs::read_to_string(path).map_err(BenchError::io(format!("cannot read {}", path.display())))?;
        let report: Report =
            serde_json::from_str(&text).map_err(|source| BenchError::NotAReport { path: path.into(), source })?;
        if report.format != FORMAT {
            return Err(BenchError::ReportFormat { path: path.into(), found: report.format, expected: FORMAT });
        }
        Ok(report)
    }

    /// Writes the report as JSON.
    pub fn save(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).map_err(BenchError::Encode)?;
        std::fs::write(path, text + "\n").map_err(BenchError::io(format!("cannot write {}", path.display())))
    }

    /// The cases of `scenario`, in the order they were first measured.
    pub fn cases(&self, scenario: &str) -> Vec<String> {
        first_seen(self.samples.iter().filter(|s| s.scenario == scenario).map(|s| s.case.clone()))
    }

    /// The contenders of `scenario`, in the order they were first measured.
    pub fn contenders(&self, scenario: &str) -> Vec<String> {
        first_seen(self.samples.iter().filter(|s| s.scenario == scenario).map(|s| s.contender.clone()))
    }

    /// The samples of one contender in one case.
    pub fn group(&self, scenario: &str, case: &str, contender: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.scenario == scenario && s.case == case && s.contender == contender).collect()
    }
}

impl Default for Report {
    fn default() -> Report {
        Report::new()
    }
}

/// Median, min and max of some samples' headline values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().collect();
        let median = median(&mut v);
        Spread { median, min: v.first().copied().unwrap_or(0.0), max: v.last().copied().unwrap_or(0.0) }
    }

    /// (max - min) / median: how noisy the samples were.
    pub fn relative_range(&self) -> f64 {
        if self.median.abs() > 0.0 { (self.max - self.min) / self.median.abs() } else { 0.0 }
    }
}

fn format_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1e5 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The readable table of one scenario.
pub fn table(report: &Report, scenario: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for note in report.notes.get(scenario).into_iter().flatten() {
        let _ = writeln!(out, "{note}");
    }
    let contenders = report.contenders(scenario);
    let width = contenders.iter().map(String::len).max().unwrap_or(10).max(10);
    for case in report.cases(scenario) {
        let Some(first) = report.samples.iter().find(|s| s.scenario == scenario && s.case == case) else { continue };
        let in_case = report.samples.iter().filter(|s| s.scenario == scenario && s.case == case);
        let extras: Vec<String> = first_seen(in_case.flat_map(|s| s.extra.keys().cloned()));
        let _ = writeln!(
            out,
            "\n{case}: {}{}",
            first.metric,
            if first.higher_is_better { "" } else { " (lower is better)" }
        );
        let _ = write!(out, "  {:<width$} {:>12} {:>25} {:>7}", "contender", "median", "(min - max)", "ratio");
        for k in &extras {
            let _ = write!(out, " {:>12}", k);
        }
        let _ = writeln!(out, "  processes (CPU, peak RSS)");
        let mut base = None;
        for contender in &contenders {
            let group = report.group(scenario, &case, contender);
            if group.is_empty() {
                continue;
            }
            let spread = Spread::of(group.iter().map(|s| s.value));
            let base = *base.get_or_insert(spread.median);
            let ratio = if base != 0.0 { spread.median / base } else { 0.0 };
            let range = format!("{} - {}", format_value(spread.min), format_value(spread.max));
            let _ = write!(out, "  {contender:<width$} {:>12} {range:>25} {ratio:>7.3}", format_value(spread.median));
            for k in &extras {
                let values: Vec<f64> = group.iter().filter_map(|s| s.extra.get(k).copied()).collect();
                let cell = if values.is_empty() { "-".to_string() } else { format_value(Spread::of(values).median) };
                let _ = write!(out, " {cell:>12}");
            }
            let roles = first_seen(group.iter().flat_map(|s| s.processes.iter().map(|p| p.role.as_str())));
            let procs: Vec<String> = roles
                .iter()
                .map(|role| {
                    let of_role: Vec<&ProcessStats> =
                        group.iter().flat_map(|s| s.processes.iter()).filter(|p| p.role == *role).collect();
                    let cpu = Spread::of(of_role.iter().map(|p| p.cpu_fraction() * 100.0)).median;
                    let rss = of_role.iter().map(|p| p.peak_rss_kib).max().unwrap_or(0);
                    format!("{role} {cpu:.0}% {} MiB", rss.div_ceil(1024))
                })
                .collect();
            let _ = writeln!(out, "  {}", procs.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_480_000), "2026-11-24T00:26:40Z");
    }

    #[test]
    fn spread_and_table() {
        let s = Spread::of([3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let mut report = Report::new();
        for (contender, value) in [("a", 100.0), ("b", 150.0)] {
            report.samples.push(Sample {
                scenario: "blk".into(),
                case: "randread QD 1".into(),
                group: "randread".into(),
                x: Some(1.0),
                x_label: "queue depth".into(),
                contender: contender.into(),
                round: 0,
                metric: "IOPS".into(),
                higher_is_better: true,
                value,
                extra: BTreeMap::from([("lat_p50_us".to_string(), 10.0)]),
                processes: vec![ProcessStats {
                    role: "backend".into(),
                    cpu_seconds: 0.5,
                    wall_seconds: 1.0,
                    peak_rss_kib: 2048,
                }],
            });
        }
        let text = table(&report, "blk");
        assert!(text.contains("1.500"), "{text}");
        assert!(text.contains("backend 50% 2 MiB"), "{text}");
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }
}
