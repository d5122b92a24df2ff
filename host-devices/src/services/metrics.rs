//! Live metrics of a device, per queue: requests by operation and outcome, bytes, requests in
//! flight, a latency histogram (from the request being taken to its used entry), kicks
//! received, notifications sent and time spent polling. Each queue's counters are its own
//! (one cache line apart from the next queue's), written only by the worker that serves the
//! queue, so queues never contend; readers (the API) load them relaxed.

use serde_json::{Value, json};
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds (Prometheus `le`); a last,
/// unbounded bucket (`+Inf`) follows.
pub const LATENCY_BUCKETS: [f64; 20] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Operations one queue tells apart; more land in the last slot, named "other".
const MAX_OPS: usize = 8;

/// Counters of one operation on one queue.
#[derive(Default)]
struct OpCounters {
    name: OnceLock<&'static str>,
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

/// One queue's counters.
#[repr(align(128))]
#[derive(Default)]
pub struct QueueMetrics {
    ops: [OpCounters; MAX_OPS],
    admitted: AtomicU64,
    completed: AtomicU64,
    kicks: AtomicU64,
    notifications: AtomicU64,
    poll_ns: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
}

impl QueueMetrics {
    fn op(&self, name: &'static str) -> &OpCounters {
        for slot in &self.ops[..MAX_OPS - 1] {
            match slot.name.get() {
                Some(n) if *n == name => return slot,
                Some(_) => continue,
                None => {
                    if *slot.name.get_or_init(|| name) == name {
                        return slot;
                    }
                }
            }
        }
        let last = &self.ops[MAX_OPS - 1];
        let _ = last.name.set("other");
        last
    }

    /// `count` requests, frames or chunks were taken.
    pub fn admitted(&self, count: u64) {
        self.admitted.fetch_add(count, Relaxed);
    }

    /// Work of operation `op` moving `bytes` ended (`ok` or not) after `latency`.
    pub fn completed(&self, op: &'static str, bytes: u64, ok: bool, latency: Duration) {
        let counters = self.op(op);
        if ok {
            counters.ok.fetch_add(1, Relaxed);
            counters.bytes.fetch_add(bytes, Relaxed);
        } else {
            counters.failed.fetch_add(1, Relaxed);
        }
        self.completed.fetch_add(1, Relaxed);
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|le| seconds <= *le).unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Work of operation `op` moving `bytes` ended (`ok` or not) `count` times, all with
    /// the same latency: one update of each counter.
    fn completed_many(&self, op: &'static str, ok: (u64, u64, u64), latency: Duration, count: u64) {
        let counters = self.op(op);
        let (ok_count, failed, bytes) = ok;
        if ok_count > 0 {
            counters.ok.fetch_add(ok_count, Relaxed);
            counters.bytes.fetch_add(bytes, Relaxed);
        }
        if failed > 0 {
            counters.failed.fetch_add(failed, Relaxed);
        }
        self.completed.fetch_add(count, Relaxed);
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|le| seconds <= *le).unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(count, Relaxed);
        let total = latency.as_nanos().saturating_mul(u128::from(count));
        self.latency_sum_ns.fetch_add(u64::try_from(total).unwrap_or(u64::MAX), Relaxed);
    }

    /// The driver kicked the queue.
    pub fn kicked(&self) {
        self.kicks.fetch_add(1, Relaxed);
    }

    /// The device signalled the driver.
    pub fn notified(&self) {
        self.notifications.fetch_add(1, Relaxed);
    }

    /// The worker polled the queue for `time` without finding work.
    pub fn polled(&self, time: Duration) {
        self.poll_ns.fetch_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Work taken and not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.admitted.load(Relaxed).saturating_sub(self.completed.load(Relaxed))
    }

    fn ops(&self) -> impl Iterator<Item = (&'static str, u64, u64, u64)> + '_ {
        self.ops
            .iter()
            .filter_map(|c| Some((*c.name.get()?, c.ok.load(Relaxed), c.failed.load(Relaxed), c.bytes.load(Relaxed))))
    }

    /// Cumulative bucket counts (as Prometheus wants them), the `+Inf` one last.
    fn cumulative_buckets(&self) -> Vec<u64> {
        let mut total = 0;
        self.latency_buckets
            .iter()
            .map(|b| {
                total += b.load(Relaxed);
                total
            })
            .collect()
    }

    /// The latency below which `fraction` of the completions fall, as a bucket's bound
    /// (`None` when nothing completed).
    pub fn latency_quantile(&self, fraction: f64) -> Option<f64> {
        let buckets = self.cumulative_buckets();
        let total = *buckets.last()?;
        if total == 0 {
            return None;
        }
        let wanted = (fraction * total as f64).ceil() as u64;
        let index = buckets.iter().position(|count| *count >= wanted.max(1))?;
        Some(LATENCY_BUCKETS.get(index).copied().unwrap_or(f64::INFINITY))
    }
}

/// A device's metrics.
pub struct Metrics {
    device: &'static str,
    queues: Vec<QueueMetrics>,
}

impl Metrics {
    /// Metrics of device `device` (its program name) with `queues` queues.
    pub fn new(device: &'static str, queues: usize) -> Metrics {
        Metrics { device, queues: (0..queues).map(|_| QueueMetrics::default()).collect() }
    }

    /// Queue `queue`'s counters (`None` for a queue the device does not have).
    pub fn queue(&self, queue: usize) -> Option<&QueueMetrics> {
        self.queues.get(queue)
    }

    /// A batch of completions, ended at `now`: consecutive ones of one queue, operation and
    /// start are counted together.
    pub fn completed_batch(&self, completions: &[crate::queue::services::Completion], now: std::time::Instant) {
        let mut rest = completions;
        while let Some(first) = rest.first() {
            let same = rest
                .iter()
                .take_while(|c| {
                    c.work.queue == first.work.queue && c.work.kind == first.work.kind && c.started == first.started
                })
                .count();
            let (run, after) = rest.split_at(same);
            rest = after;
            let Some(queue) = self.queue(first.work.queue) else { continue };
            let ok = run.iter().filter(|c| c.ok).count() as u64;
            let bytes = run.iter().filter(|c| c.ok).map(|c| c.work.bytes).sum();
            let latency = now.saturating_duration_since(first.started);
            queue.completed_many(first.work.kind, (ok, same as u64 - ok, bytes), latency, same as u64);
        }
    }

    /// The device's program name.
    pub fn device(&self) -> &'static str {
        self.device
    }

    /// Every queue's counters as JSON (`GET /stats`).
    pub fn to_json(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                let ops: serde_json::Map<String, Value> = q
                    .ops()
                    .map(|(name, ok, failed, bytes)| {
                        (name.to_string(), json!({"ok": ok, "failed": failed, "bytes": bytes}))
                    })
                    .collect();
                let buckets: Vec<Value> = LATENCY_BUCKETS
                    .iter()
                    .map(|le| json!(le))
                    .chain(std::iter::once(json!("+Inf")))
                    .zip(q.cumulative_buckets())
                    .map(|(le, count)| json!([le, count]))
                    .collect();
                let us = |f: Option<f64>| f.filter(|v| v.is_finite()).map(|v| v * 1e6);
                json!({
                    "queue": index,
                    "ops": ops,
                    "in_flight": q.in_flight(),
                    "kicks": q.kicks.load(Relaxed),
                    "notifications": q.notifications.load(Relaxed),
                    "poll_seconds": q.poll_ns.load(Relaxed) as f64 / 1e9,
                    "latency": {
                        "count": q.completed.load(Relaxed),
                        "sum_seconds": q.latency_sum_ns.load(Relaxed) as f64 / 1e9,
                        "p50_us_at_most": us(q.latency_quantile(0.5)),
                        "p99_us_at_most": us(q.latency_quantile(0.99)),
                        "buckets": buckets,
                    },
                })
            })
            .collect();
        json!({ "device": self.device, "queues": queues })
    }

    /// Every queue's counters in Prometheus's text exposition format (`GET /metrics`).
    pub fn render_prometheus(&self, out: &mut String) {
        let device = self.device;
        let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn FnMut(&mut String)| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            samples(out);
        };
        family(
            "pvkit_requests_total",
            "counter",
            "Requests, frames or chunks completed, by queue, operation and outcome.",
            &mut |out| {
                for (index, q) in self.queues.iter().enumerate() {
                    for (op, ok, failed, _) in q.ops() {
                        let labels = format!("device=\"{device}\",queue=\"{index}\",op=\"{op}\"");
                        let _ = writeln!(out, "pvkit_requests_total{{{labels},outcome=\"ok\"}} {ok}");
                        let _ = writeln!(out, "pvkit_requests_total{{{labels},outcome=\"failed\"}} {failed}");
                    }
                }
            },
        );
        family(
            "pvkit_bytes_total",
            "counter",
            "Bytes moved by successful requests, by queue and operation.",
            &mut |out| {
                for (index, q) in self.queues.iter().enumerate() {
                    for (op, _, _, bytes) in q.ops() {
                        let _ = writeln!(
                            out,
                            "pvkit_bytes_total{{device=\"{device}\",queue=\"{index}\",op=\"{op}\"}} {bytes}"
                        );
                    }
                }
            },
        );
        let mut per_queue = |name: &str, kind: &str, help: &str, value: &dyn Fn(&QueueMetrics) -> String| {
            family(name, kind, help, &mut |out| {
                for (index, q) in self.queues.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{device=\"{device}\",queue=\"{index}\"}} {}", value(q));
                }
            });
        };
        per_queue("pvkit_in_flight", "gauge", "Requests taken from the ring and not yet completed.", &|q| {
            q.in_flight().to_string()
        });
        per_queue("pvkit_kicks_total", "counter", "Notifications received from the driver.", &|q| {
            q.kicks.load(Relaxed).to_string()
        });
        per_queue("pvkit_notifications_total", "counter", "Interrupts signalled to the driver.", &|q| {
            q.notifications.load(Relaxed).to_string()
        });
        per_queue("pvkit_poll_seconds_total", "counter", "Time spent polling the queue for work.", &|q| {
            format!("{}", q.poll_ns.load(Relaxed) as f64 / 1e9)
        });
        self.render_latency(out);
    }

    fn render_latency(&self, out: &mut String) {
        let name = "pvkit_latency_seconds";
        let _ =
            writeln!(out, "# HELP {name} Time from a request being taken to its used entry.\n# TYPE {name} histogram");
        for (index, q) in self.queues.iter().enumerate() {
            let labels = format!("device=\"{}\",queue=\"{index}\"", self.device);
            let buckets = q.cumulative_buckets();
            for (le, count) in
                LATENCY_BUCKETS.iter().map(|le| format!("{le}")).chain(["+Inf".to_string()]).zip(&buckets)
            {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
            }
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", q.latency_sum_ns.load(Relaxed) as f64 / 1e9);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", buckets.last().copied().unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histogram_and_quantiles_follow_the_completions() {
        let metrics = Metrics::new("vhost-user-blk", 2);
        let q = metrics.queue(1).unwrap();
        q.admitted(3);
        q.completed("read", 4096, true, Duration::from_micros(30));
        q.completed("read", 4096, true, Duration::from_micros(40));
        q.completed("write", 512, false, Duration::from_millis(3));
        q.kicked();
        q.notified();
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.latency_quantile(0.5), Some(0.000_05));
        assert_eq!(q.latency_quantile(1.0), Some(0.005));
        let stats = metrics.to_json();
        assert_eq!(stats["queues"][1]["ops"]["read"], json!({"ok": 2, "failed": 0, "bytes": 8192}));
        assert_eq!(stats["queues"][1]["ops"]["write"]["failed"], 1);
        assert_eq!(stats["queues"][0]["latency"]["count"], 0);
        let mut text = String::new();
        metrics.render_prometheus(&mut text);
        assert!(
            text.contains("pvkit_requests_total{device=\"vhost-user-blk\",queue=\"1\",op=\"read\",outcome=\"ok\"} 2")
        );
        assert!(text.contains("pvkit_latency_seconds_bucket{device=\"vhost-user-blk\",queue=\"1\",le=\"0.00005\"} 2"));
        assert!(text.contains("pvkit_latency_seconds_count{device=\"vhost-user-blk\",queue=\"1\"} 3"));
        assert!(text.contains("pvkit_kicks_total{device=\"vhost-user-blk\",queue=\"1\"} 1"));
    }

    #[test]
    fn operations_beyond_the_slots_are_counted_as_other() {
        let metrics = Metrics::new("x", 1);
        let q = metrics.queue(0).unwrap();
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        for name in names {
            q.completed(name, 1, true, Duration::ZERO);
        }
        let ops = metrics.to_json()["queues"][0]["ops"].clone();
        assert_eq!(ops.as_object().unwrap().len(), MAX_OPS);
        assert_eq!(ops["other"]["ok"], 2, "{ops}");
    }
}
