//! Plots of a report (`--svg DIR`), made with `plotters`' SVG backend: for every scenario and
//! group of cases, the headline metric per contender (median, with min-max whiskers) along the
//! group's axis (queue depth, frame size, operation); and, where latencies were recorded, their
//! 50th and 99th percentiles.

use super::error::BenchError;
use super::report::{Report, Sample, Spread, first_seen};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// A file-name-safe form of `text`.
fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Line colours that stay apart on white (the usual categorical ten, yellow left out).
const PALETTE: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
];

/// One line of a chart: a name and (x index, median, min, max) points.
struct Series {
    name: String,
    points: Vec<(f64, f64, f64, f64)>,
    thin: bool,
}

/// The groups of a scenario, in order of appearance.
fn groups(report: &Report, scenario: &str) -> Vec<String> {
    first_seen(report.samples.iter().filter(|s| s.scenario == scenario).map(|s| s.group.clone()))
}

/// The cases of a group, in order, with their axis labels.
fn axis(samples: &[&Sample]) -> Vec<(String, String)> {
    let mut cases: Vec<(String, String, Option<f64>)> = Vec::new();
    for s in samples {
        if !cases.iter().any(|(c, _, _)| *c == s.case) {
            let label = match s.x {
                Some(x) => format!("{x}"),
                None => s.case.strip_prefix(&format!("{}: ", s.group)).unwrap_or(&s.case).to_string(),
            };
            cases.push((s.case.clone(), label, s.x));
        }
    }
    cases.sort_by(|a, b| match (a.2, b.2) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => std::cmp::Ordering::Equal,
    });
    cases.into_iter().map(|(case, label, _)| (case, label)).collect()
}

fn series_of(samples: &[&Sample], cases: &[(String, String)], value: impl Fn(&Sample) -> Option<f64>) -> Vec<Series> {
    let contenders = first_seen(samples.iter().map(|s| s.contender.clone()));
    contenders
        .into_iter()
        .map(|contender| {
            let points = cases
                .iter()
                .enumerate()
                .filter_map(|(i, (case, _))| {
                    let values: Vec<f64> = samples
                        .iter()
                        .filter(|s| s.contender == contender && s.case == *case)
                        .filter_map(|s| value(s))
                        .collect();
                    (!values.is_empty()).then(|| {
                        let spread = Spread::of(values);
                        (i as f64, spread.median, spread.min, spread.max)
                    })
                })
                .collect();
            Series { name: contender, points, thin: false }
        })
        .collect()
}

fn draw(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    labels: &[String],
    series: &[Series],
) -> Result<(), BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Plot { path: path.into(), detail: e.to_string() };
    let top = series.iter().flat_map(|s| s.points.iter().map(|p| p.3)).fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let last = labels.len().saturating_sub(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5..last + 0.5, 0.0..top)
        .map_err(|e| fail(&e))?;
    let label_of = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(labels.len().max(1) * 2 + 1)
        .x_label_formatter(&label_of)
        .disable_x_mesh()
        .draw()
        .map_err(|e| fail(&e))?;
    // Paired series (a thin one after each) share a colour.
    let per_colour = if series.iter().any(|s| s.thin) { 2 } else { 1 };
    for (i, s) in series.iter().enumerate() {
        let index = i / per_colour;
        let (r, g, b) = PALETTE[index % PALETTE.len()];
        let color = RGBColor(r, g, b).to_rgba();
        let width = if s.thin { 1 } else { 2 };
        let line: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.1)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(width)))
            .map_err(|e| fail(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width)));
        chart
            .draw_series(line.iter().map(|p| Circle::new(*p, if s.thin { 3 } else { 4 }, color.filled())))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(s.points.iter().map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color)))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Writes every plot of `report` into `dir`; returns the files written.
pub fn write_all(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))?;
    let mut written = Vec::new();
    let scenarios = first_seen(report.samples.iter().map(|s| s.scenario.as_str()));
    for scenario in scenarios {
        for group in groups(report, scenario) {
            let samples: Vec<&Sample> =
                report.samples.iter().filter(|s| s.scenario == scenario && s.group == group).collect();
            let Some(first) = samples.first() else { continue };
            let cases = axis(&samples);
            let labels: Vec<String> = cases.iter().map(|(_, l)| l.clone()).collect();
            let direction = if first.higher_is_better { "higher is better" } else { "lower is better" };
            let y_desc = format!("{} ({direction})", first.metric);
            let title = format!("pvkit bench {scenario}: {group}");
            let path = dir.join(format!("{}-{}.svg", slug(scenario), slug(&group)));
            draw(&path, &title, &first.x_label, &y_desc, &labels, &series_of(&samples, &cases, |s| Some(s.value)))?;
            written.push(path);
            if samples.iter().any(|s| s.extra.contains_key("lat_p50_us")) {
                // Each contender's p50 then its p99 (thin), so the two share a colour.
                let p50 = series_of(&samples, &cases, |s| s.extra.get("lat_p50_us").copied());
                let p99 = series_of(&samples, &cases, |s| s.extra.get("lat_p99_us").copied());
                let paired: Vec<Series> = p50
                    .into_iter()
                    .zip(p99)
                    .flat_map(|(mut p50, mut p99)| {
                        p50.name = format!("{} p50", p50.name);
                        (p99.name, p99.thin) = (format!("{} p99", p99.name), true);
                        [p50, p99]
                    })
                    .collect();
                let path = dir.join(format!("{}-{}-latency.svg", slug(scenario), slug(&group)));
                let title = format!("pvkit bench {scenario}: {group}, latency percentiles");
                draw(&path, &title, &first.x_label, "latency, µs (lower is better)", &labels, &paired)?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("randread 4 KiB, 1 queue(s)"), "randread-4-kib-1-queue-s");
        assert_eq!(slug("one kick"), "one-kick");
    }
}
