//! `pvkit stat`: live rates of running backends from their control API, one line per backend
//! per interval, in the manner of `iostat`: requests, MB/s, failures, latency bounds, requests
//! in flight, injected faults and waits for the rate limits; `--json` for scripts.

use pvkit_host_devices::services::client::{self, ClientError};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `pvkit stat` options.
#[derive(clap::Args, Debug)]
pub struct StatArgs {
    /// The backends' API sockets (their --api-socket).
    #[arg(required = true, value_name = "API-SOCKET")]
    pub sockets: Vec<PathBuf>,
    /// Seconds between lines (fractions allowed).
    #[arg(long, short, default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Stop after this many intervals (default: until interrupted).
    #[arg(long, short)]
    pub count: Option<u64>,
    /// One JSON object per backend per interval instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.05..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("'{text}' is not a number of seconds between 0.05 and 3600")),
    }
}

/// Errors of `pvkit stat`.
#[derive(Debug, thiserror::Error)]
enum StatError {
    /// The API did not answer.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// It answered something else than its statistics.
    #[error("{socket}: GET /stats answered {status}: {body}")]
    Answer {
        /// The socket.
        socket: String,
        /// The status.
        status: u16,
        /// The body.
        body: String,
    },
}

/// Totals of one backend at one moment, over all its queues.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    device: String,
    requests: u64,
    failed: u64,
    bytes: u64,
    in_flight: u64,
    injected: u64,
    throttled: u64,
    /// Cumulative latency histogram: (upper bound in seconds, count); the last bound is +Inf.
    buckets: Vec<(f64, u64)>,
}

fn fetch(socket: &Path) -> Result<Totals, StatError> {
    let reply = client::unix(socket, "GET", "/stats", "")?;
    if reply.status != 200 {
        let socket = socket.display().to_string();
        return Err(StatError::Answer { socket, status: reply.status, body: reply.body });
    }
    Ok(totals(&reply.json()))
}

/// Sums a `GET /stats` answer over the queues.
fn totals(stats: &Value) -> Totals {
    let mut t = Totals { device: stats["device"].as_str().unwrap_or("?").to_string(), ..Totals::default() };
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    for queue in stats["queues"].as_array().into_iter().flatten() {
        for op in queue["ops"].as_object().into_iter().flat_map(|o| o.values()) {
            t.requests += number(&op["ok"]) + number(&op["failed"]);
            t.failed += number(&op["failed"]);
            t.bytes += number(&op["bytes"]);
        }
        t.in_flight += number(&queue["in_flight"]);
        let buckets = queue["latency"]["buckets"].as_array().into_iter().flatten();
        for (i, bucket) in buckets.enumerate() {
            let bound = bucket[0].as_f64().unwrap_or(f64::INFINITY);
            if t.buckets.len() <= i {
                t.buckets.push((bound, 0));
            }
            t.buckets[i].1 += number(&bucket[1]);
        }
    }
    t.injected = stats["faults"].as_array().into_iter().flatten().map(|r| number(&r["injected"])).sum();
    t.throttled = number(&stats["limits"]["throttled"]);
    t
}

/// The bucket bound under which `fraction` of the completions between `before` and `now` fell.
fn quantile(before: &Totals, now: &Totals, fraction: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = now
        .buckets
        .iter()
        .enumerate()
        .map(|(i, (bound, count))| (*bound, count.saturating_sub(before.buckets.get(i).map_or(0, |b| b.1))))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let wanted = ((fraction * total as f64).ceil() as u64).max(1);
    counts.iter().find(|(_, count)| *count >= wanted).map(|(bound, _)| *bound)
}

fn rate(before: u64, now: u64, seconds: f64) -> f64 {
    now.saturating_sub(before) as f64 / seconds
}

fn line(socket: &Path, before: &Totals, now: &Totals, seconds: f64) -> Value {
    let us = |q: Option<f64>| q.filter(|v| v.is_finite()).map(|v| (v * 1e6).round());
    json!({
        "socket": socket.display().to_string(),
        "device": now.device,
        "requests_per_s": rate(before.requests, now.requests, seconds),
        "failed_per_s": rate(before.failed, now.failed, seconds),
        "mb_per_s": rate(before.bytes, now.bytes, seconds) / 1e6,
        "p50_us_at_most": us(quantile(before, now, 0.5)),
        "p99_us_at_most": us(quantile(before, now, 0.99)),
        "in_flight": now.in_flight,
        "injected_per_s": rate(before.injected, now.injected, seconds),
        "throttled_per_s": rate(before.throttled, now.throttled, seconds),
    })
}

fn print_table_line(value: &Value) {
    let latency = |key: &str| value[key].as_f64().map_or("-".to_string(), |v| format!("<={v}"));
    println!(
        "{:<19} {:>10.0} {:>9.2} {:>8.0} {:>10} {:>10} {:>8} {:>9.0} {:>11.0}  {}",
        value["device"].as_str().unwrap_or("?"),
        value["requests_per_s"].as_f64().unwrap_or(0.0),
        value["mb_per_s"].as_f64().unwrap_or(0.0),
        value["failed_per_s"].as_f64().unwrap_or(0.0),
        latency("p50_us_at_most"),
        latency("p99_us_at_most"),
        value["in_flight"],
        value["injected_per_s"].as_f64().unwrap_or(0.0),
        value["throttled_per_s"].as_f64().unwrap_or(0.0),
        value["socket"].as_str().unwrap_or("")
    );
}

/// Runs `pvkit stat`.
pub fn stat(args: StatArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pvkit stat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &StatArgs) -> Result<(), StatError> {
    let mut previous: Vec<Totals> = args.sockets.iter().map(|s| fetch(s)).collect::<Result<_, _>>()?;
    let mut taken = Instant::now();
    let interval = Duration::from_secs_f64(args.interval);
    let mut lines = 0u64;
    while args.count.is_none_or(|count| lines < count) {
        std::thread::sleep(interval);
        let now: Vec<Totals> = args.sockets.iter().map(|s| fetch(s)).collect::<Result<_, _>>()?;
        let seconds = taken.elapsed().as_secs_f64().max(1e-3);
        taken = Instant::now();
        if !args.json && lines.is_multiple_of(20) {
            println!(
                "{:<19} {:>10} {:>9} {:>8} {:>10} {:>10} {:>8} {:>9} {:>11}  socket",
                "device", "req/s", "MB/s", "fail/s", "p50(us)", "p99(us)", "inflight", "faults/s", "throttled/s"
            );
        }
        for ((socket, before), after) in args.sockets.iter().zip(&previous).zip(&now) {
            let value = line(socket, before, after, seconds);
            if args.json { println!("{value}") } else { print_table_line(&value) }
        }
        previous = now;
        lines += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(ok: u64, failed: u64, bytes: u64, fast: u64, slow: u64) -> Value {
        json!({
            "device": "vhost-user-blk",
            "queues": [{
                "ops": {"read": {"ok": ok, "failed": failed, "bytes": bytes}},
                "in_flight": 2,
                "latency": {"buckets": [[0.00005, fast], [0.001, fast + slow], ["+Inf", fast + slow]]}
            }],
            "faults": [{"injected": failed}],
            "limits": {"throttled": ok / 100}
        })
    }

    #[test]
    fn rates_and_quantiles_come_from_the_difference_between_two_answers() {
        let before = totals(&stats(100, 0, 409_600, 100, 0));
        let after = totals(&stats(1100, 10, 4_505_600, 1000, 110));
        let value = line(&PathBuf::from("api.sock"), &before, &after, 2.0);
        assert_eq!(value["requests_per_s"], 505.0);
        assert_eq!(value["failed_per_s"], 5.0);
        assert_eq!(value["mb_per_s"], 2.048);
        assert_eq!(value["p50_us_at_most"], 50.0, "900 of 1010 new ones under 50 us");
        assert_eq!(value["p99_us_at_most"], 1000.0);
        assert_eq!(value["in_flight"], 2);
        assert_eq!(value["injected_per_s"], 5.0);
        assert_eq!(value["throttled_per_s"], 5.0, "10 more waits in 2 s");
        let idle = line(&PathBuf::from("api.sock"), &after, &after, 1.0);
        assert_eq!((idle["requests_per_s"].as_f64(), idle["p50_us_at_most"].is_null()), (Some(0.0), true));
    }
}
