//! Collects a run's samples into a [`Report`] while showing progress on standard error: a
//! progress bar on a terminal (indicatif), one line per step otherwise (logs, CI).

use super::report::{Outcome, Report, Sample, ScenarioStatus};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;

/// The run in progress.
pub struct Recorder {
    /// What was measured so far.
    pub report: Report,
    progress: ProgressBar,
    scenario: String,
    steps_started: u64,
    step_open: bool,
}

impl Recorder {
    /// A recorder for a run starting now.
    pub fn new() -> Recorder {
        let progress = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        progress.set_style(style);
        Recorder { report: Report::new(), progress, scenario: String::new(), steps_started: 0, step_open: false }
    }

    /// Starts a scenario of `steps` steps (calls of [`Recorder::step`]), run with `options`.
    pub fn begin(&mut self, scenario: &str, options: String, steps: usize) {
        self.scenario = scenario.to_string();
        self.report.options.insert(scenario.to_string(), options);
        self.progress.inc_length(steps as u64);
    }

    /// A line for the top of the scenario's table (what was measured, how).
    pub fn note(&mut self, line: impl Into<String>) {
        self.report.notes.entry(self.scenario.clone()).or_default().push(line.into());
    }

    /// Says what the next measurement is.
    pub fn step(&mut self, what: impl Into<String>) {
        let what = format!("{}: {}", self.scenario, what.into());
        self.steps_started += 1;
        self.step_open = true;
        if self.progress.is_hidden() {
            eprintln!("[{}/{}] {what}", self.steps_started, self.progress.length().unwrap_or(0));
        } else {
            self.progress.set_message(what);
        }
    }

    /// Records a measurement (its step is done).
    pub fn push(&mut self, sample: Sample) {
        if std::mem::take(&mut self.step_open) {
            self.progress.inc(1);
        }
        self.report.samples.push(sample);
    }

    /// A sample of the current scenario with the fields every sample shares filled in.
    pub fn sample(&self, case: impl Into<String>, contender: impl Into<String>, round: usize) -> Sample {
        let case = case.into();
        Sample {
            scenario: self.scenario.clone(),
            group: case.clone(),
            case,
            x: None,
            x_label: String::new(),
            contender: contender.into(),
            round,
            metric: String::new(),
            higher_is_better: true,
            value: 0.0,
            extra: BTreeMap::new(),
            processes: Vec::new(),
        }
    }

    /// The current scenario ran; prints its table.
    pub fn ran(&mut self, detail: impl Into<String>) {
        self.report.scenarios.push(ScenarioStatus {
            name: self.scenario.clone(),
            status: Outcome::Ran,
            detail: detail.into(),
        });
        let table = super::report::table(&self.report, &self.scenario);
        self.progress.suspend(|| println!("{table}"));
    }

    /// A scenario that could not run here, and why.
    pub fn skipped(&mut self, scenario: &str, why: impl Into<String>) {
        let why = why.into();
        self.progress.suspend(|| eprintln!("pvkit bench: skipping {scenario}: {why}"));
        self.report.scenarios.push(ScenarioStatus { name: scenario.into(), status: Outcome::Skipped, detail: why });
    }

    /// A scenario that failed (in `all`, the others still run).
    pub fn failed(&mut self, scenario: &str, why: impl Into<String>) {
        let why = why.into();
        self.progress.suspend(|| eprintln!("pvkit bench: {scenario} failed: {why}"));
        self.report.scenarios.push(ScenarioStatus { name: scenario.into(), status: Outcome::Failed, detail: why });
    }

    /// Ends the progress display and hands over the report.
    pub fn finish(self) -> Report {
        self.progress.finish_and_clear();
        self.report
    }
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}
