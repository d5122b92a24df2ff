//! Rate limits: token buckets in the manner of Firecracker's RateLimiter, one for operations
//! and one for bytes per class of work, each refilled continuously at its rate, holding at most
//! a tenth of a second of it (so a limit is met within a few percent over seconds) plus an
//! optional one-time burst. A request that finds too few tokens is not failed: it waits (a
//! block request in its ring, see the device) until the wait [`Limits::admit`] names has
//! passed. One request larger than the bucket passes when the bucket is full, leaving it in
//! debt, so nothing is ever refused for its size.
//!
//! Classes: block `all` (every request), `read` and `write` (as well, for those requests).
//! On the command line: `--limit CLASS:ops=RATE,bw=RATE[K|M|G],ops_burst=N,bw_burst=N`
//! (per second; either may be left out); through the API the same keys in JSON.

use crate::queue::services::Work;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How much of its rate a bucket holds (besides a one-time burst).
const BUCKET_SECONDS: f64 = 0.1;
/// The slowest rate accepted (one per thousand seconds) and the fastest.
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1e15;
/// The most queues with buckets of their own (more share the last ones).
const MAX_QUEUES: usize = 64;
/// The longest a request is told to wait at once (it is asked again then).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Why a limit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Not `CLASS:key=value,...`, or an unknown key.
    #[error("'{0}' is not CLASS:key=value,... with keys ops, bw, ops_burst, bw_burst")]
    Syntax(String),
    /// A class the device does not have.
    #[error("class '{class}' is not one of {known}")]
    Class {
        /// The class given.
        class: String,
        /// The device's classes.
        known: String,
    },
    /// A value that is not a positive number (with an optional K, M or G).
    #[error("{key}: '{value}' is not a positive number")]
    Value {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
    },
}

/// One class's limits; each `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<f64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<f64>,
    /// Operations allowed once beyond the rate.
    #[serde(default)]
    pub ops_burst: u64,
    /// Bytes allowed once beyond the rate.
    #[serde(default)]
    pub bw_burst: u64,
}

fn number(key: &'static str, value: &str) -> Result<f64, LimitError> {
    let (digits, scale) = match value.chars().last() {
        Some('K' | 'k') => (&value[..value.len() - 1], 1e3),
        Some('M' | 'm') => (&value[..value.len() - 1], 1e6),
        Some('G' | 'g') => (&value[..value.len() - 1], 1e9),
        _ => (value, 1.0),
    };
    match digits.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n * scale),
        _ => Err(LimitError::Value { key, value: value.to_string() }),
    }
}

impl LimitSpec {
    /// Parses `CLASS:key=value,...`.
    pub fn parse(text: &str) -> Result<(String, LimitSpec), LimitError> {
        let (class, pairs) = text.split_once(':').ok_or_else(|| LimitError::Syntax(text.to_string()))?;
        let mut spec = LimitSpec::default();
        for pair in pairs.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| LimitError::Syntax(pair.to_string()))?;
            match key {
                "ops" => spec.ops = Some(number("ops", value)?),
                "bw" => spec.bw = Some(number("bw", value)?),
                "ops_burst" => spec.ops_burst = number("ops_burst", value)? as u64,
                "bw_burst" => spec.bw_burst = number("bw_burst", value)? as u64,
                _ => return Err(LimitError::Syntax(pair.to_string())),
            }
        }
        Ok((class.to_string(), spec))
    }

    fn check(&self) -> Result<(), LimitError> {
        for (key, rate) in [("ops", self.ops), ("bw", self.bw)] {
            if let Some(rate) = rate
                && !(MIN_RATE..=MAX_RATE).contains(&rate)
            {
                return Err(LimitError::Value { key, value: rate.to_string() });
            }
        }
        for (key, burst) in [("ops_burst", self.ops_burst), ("bw_burst", self.bw_burst)] {
            if burst as f64 > MAX_RATE {
                return Err(LimitError::Value { key, value: burst.to_string() });
            }
        }
        Ok(())
    }
}

/// A token bucket refilled continuously at `rate` per second up to `size`, with a one-time
/// `burst` on top.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    size: f64,
    /// Tokens now (negative: in debt after a request larger than the bucket).
    tokens: f64,
    burst: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: u64) -> Bucket {
        let size = (rate * BUCKET_SECONDS).max(1.0);
        Bucket { rate, size, tokens: size, burst: burst as f64, updated: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.size);
        self.updated = now;
    }

    /// Whether `cost` tokens may be taken now (after [`Bucket::refill`]). More than the bucket
    /// holds passes once it is full, going into debt.
    fn ready(&self, cost: f64) -> bool {
        self.tokens + self.burst >= cost.min(self.size)
    }

    /// How long until `cost` tokens may be taken (after [`Bucket::refill`]).
    fn wait_for(&self, cost: f64) -> Duration {
        let missing = cost.min(self.size) - (self.tokens + self.burst);
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(missing / self.rate).map_or(MAX_WAIT, |wait| wait.min(MAX_WAIT))
        }
    }

    fn take(&mut self, cost: f64) {
        let from_burst = cost.min(self.burst);
        self.burst -= from_burst;
        self.tokens -= cost - from_burst;
    }
}

/// One class's buckets.
#[derive(Debug)]
struct Limiter {
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Limiter {
    fn new(spec: LimitSpec) -> Limiter {
        Limiter {
            ops: spec.ops.map(|rate| Bucket::new(rate, spec.ops_burst)),
            bytes: spec.bw.map(|rate| Bucket::new(rate, spec.bw_burst)),
        }
    }

    fn refill(&mut self, now: Instant) {
        for bucket in [self.ops.as_mut(), self.bytes.as_mut()].into_iter().flatten() {
            bucket.refill(now);
        }
    }

    fn ready(&self, bytes: u64) -> bool {
        self.ops.as_ref().is_none_or(|b| b.ready(1.0)) && self.bytes.as_ref().is_none_or(|b| b.ready(bytes as f64))
    }

    fn wait_for(&self, bytes: u64) -> Duration {
        let ops = self.ops.as_ref().map_or(Duration::ZERO, |b| b.wait_for(1.0));
        let bw = self.bytes.as_ref().map_or(Duration::ZERO, |b| b.wait_for(bytes as f64));
        ops.max(bw)
    }

    fn take(&mut self, bytes: u64) {
        if let Some(bucket) = self.ops.as_mut() {
            bucket.take(1.0);
        }
        if let Some(bucket) = self.bytes.as_mut() {
            bucket.take(bytes as f64);
        }
    }
}

/// One class's limits and its buckets: one for the device, or one per queue.
struct Class {
    spec: LimitSpec,
    buckets: Vec<Limiter>,
}

impl Class {
    /// The buckets of `key` (0, or a queue), made full the first time they are needed.
    fn buckets(&mut self, key: usize) -> &mut Limiter {
        while self.buckets.len() <= key {
            self.buckets.push(Limiter::new(self.spec));
        }
        &mut self.buckets[key]
    }
}

/// A device's limits.
pub struct Limits {
    classes: &'static [&'static str],
    /// Whether each queue has buckets of its own (a console's ports), or the device one set.
    per_queue: bool,
    limiters: Mutex<BTreeMap<String, Class>>,
    any: AtomicBool,
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Limits {
    /// No limits, for a device whose classes are `classes` (none: it takes no limits), with
    /// buckets for each queue (`per_queue`) or for the whole device.
    pub fn new(classes: &'static [&'static str], per_queue: bool) -> Limits {
        Limits {
            classes,
            per_queue,
            limiters: Mutex::new(BTreeMap::new()),
            any: AtomicBool::new(false),
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        }
    }

    /// Replaces every limit with `specs` (class to limits), after checking them all; the
    /// buckets start full.
    pub fn set(&self, specs: BTreeMap<String, LimitSpec>) -> Result<(), LimitError> {
        for (class, spec) in &specs {
            if !self.classes.contains(&class.as_str()) {
                let known = if self.classes.is_empty() {
                    "(none: this device takes no limits yet)".into()
                } else {
                    self.classes.join(", ")
                };
                return Err(LimitError::Class { class: class.clone(), known });
            }
            spec.check()?;
        }
        let mut limiters = crate::lock(&self.limiters);
        *limiters =
            specs.into_iter().map(|(class, spec)| (class, Class { spec, buckets: vec![Limiter::new(spec)] })).collect();
        self.any.store(!limiters.is_empty(), Relaxed);
        Ok(())
    }

    /// The limits in force (`GET /limits`), with what they held back.
    pub fn to_json(&self) -> serde_json::Value {
        let classes: serde_json::Map<String, serde_json::Value> = crate::lock(&self.limiters)
            .iter()
            .map(|(name, class)| (name.clone(), serde_json::to_value(class.spec).unwrap_or_default()))
            .collect();
        serde_json::json!({
            "limits": classes,
            "throttled": self.throttled.load(Relaxed),
            "throttled_seconds": self.throttled_ns.load(Relaxed) as f64 / 1e9,
        })
    }

    /// Whether `work` may go now; otherwise how long it must wait.
    pub fn admit(&self, work: &Work) -> Option<Duration> {
        self.admit_batch(std::slice::from_ref(work), Instant::now()).map(|(_, wait)| wait)
    }

    /// The first of `works`, taken together at `now`, that must wait, and how long; the
    /// tokens of those before it are taken. Tokens are taken from every class that applies to
    /// a work only when all of them allow it.
    pub fn admit_batch(&self, works: &[Work], now: Instant) -> Option<(usize, Duration)> {
        if !self.any.load(Relaxed) {
            return None;
        }
        let mut limiters = crate::lock(&self.limiters);
        // One refill for the batch: every work of it was taken at `now`.
        limiters.values_mut().flat_map(|class| class.buckets.iter_mut()).for_each(|limiter| limiter.refill(now));
        for (index, work) in works.iter().enumerate() {
            let key = if self.per_queue { work.queue.min(MAX_QUEUES) } else { 0 };
            let applies = |name: &String| name == "all" || name == work.kind;
            let mut wait = Duration::ZERO;
            for (_, class) in limiters.iter_mut().filter(|(name, _)| applies(name)) {
                let limiter = class.buckets(key);
                if !limiter.ready(work.bytes) {
                    wait = wait.max(limiter.wait_for(work.bytes).max(Duration::from_micros(1)));
                }
            }
            if wait > Duration::ZERO {
                return Some((index, wait));
            }
            for (_, class) in limiters.iter_mut().filter(|(name, _)| applies(name)) {
                class.buckets(key).take(work.bytes);
            }
        }
        None
    }

    /// Whether any limit is set.
    pub fn is_active(&self) -> bool {
        self.any.load(Relaxed)
    }

    /// A queue waited `time` for its limits.
    pub fn note_throttled(&self, time: Duration) {
        self.throttled.fetch_add(1, Relaxed);
        self.throttled_ns.fetch_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Times work waited, and the total time (seconds).
    pub fn throttled(&self) -> (u64, f64) {
        (self.throttled.load(Relaxed), self.throttled_ns.load(Relaxed) as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLK: &[&str] = &["all", "read", "write"];

    fn limits(specs: &[&str]) -> Limits {
        let limits = Limits::new(BLK, false);
        limits.set(specs.iter().map(|s| LimitSpec::parse(s).unwrap()).collect()).unwrap();
        limits
    }

    /// Admits `work` as fast as the limits allow for `seconds`; returns how many went.
    fn admitted_in(limits: &Limits, work: Work, seconds: f64) -> u64 {
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        let mut count = 0;
        while Instant::now() < end {
            match limits.admit(&work) {
                None => count += 1,
                Some(wait) => std::thread::sleep(wait.min(end.saturating_duration_since(Instant::now()))),
            }
        }
        count
    }

    #[test]
    fn the_command_line_form_parses_and_is_checked() {
        assert_eq!(
            LimitSpec::parse("read:ops=5k,bw=50M,ops_burst=100").unwrap(),
            ("read".into(), LimitSpec { ops: Some(5000.0), bw: Some(50e6), ops_burst: 100, bw_burst: 0 })
        );
        assert!(matches!(LimitSpec::parse("ops=5"), Err(LimitError::Syntax(_))));
        assert!(matches!(LimitSpec::parse("all:speed=5"), Err(LimitError::Syntax(_))));
        assert!(matches!(LimitSpec::parse("all:ops=-5"), Err(LimitError::Value { key: "ops", .. })));
        assert!(matches!(LimitSpec::parse("all:bw=fast"), Err(LimitError::Value { key: "bw", .. })));
        let blk = Limits::new(BLK, false);
        for spec in ["all:ops=0.0000001", "all:bw=1e300", "all:ops=5,ops_burst=1e18"] {
            let parsed = LimitSpec::parse(spec).map(|p| [p].into_iter().collect());
            assert!(parsed.is_err() || blk.set(parsed.unwrap()).is_err(), "{spec}");
        }
        let net = Limits::new(&[], false);
        let refused = net.set([LimitSpec::parse("all:ops=5").unwrap()].into_iter().collect());
        assert!(matches!(refused, Err(LimitError::Class { .. })));
    }

    #[test]
    fn operations_and_bytes_are_held_to_their_rates() {
        let ops = admitted_in(&limits(&["all:ops=2000"]), Work::new(0, "read", 4096), 0.5);
        assert!((900..=1300).contains(&ops), "{ops} operations in 0.5 s at 2000/s");
        let bytes = admitted_in(&limits(&["write:bw=4M"]), Work::new(0, "write", 65536), 0.5) * 65536;
        assert!((1_800_000..=2_600_000).contains(&bytes), "{bytes} bytes in 0.5 s at 4 MB/s");
        let other = admitted_in(&limits(&["write:bw=4M"]), Work::new(0, "read", 65536), 0.1);
        assert!(other > 1000, "reads are not limited by a write limit: {other}");
    }

    #[test]
    fn per_queue_buckets_keep_one_queue_from_holding_another_back() {
        let limits = Limits::new(&["tx"], true);
        limits.set([LimitSpec::parse("tx:ops=10").unwrap()].into_iter().collect()).unwrap();
        let on = |queue: usize| Work::new(queue, "tx", 1);
        assert_eq!(limits.admit(&on(1)), None, "port 0's bucket holds one");
        assert!(limits.admit(&on(1)).is_some(), "then port 0 waits");
        assert_eq!(limits.admit(&on(5)), None, "port 1 has a bucket of its own");
        let shared = Limits::new(&["tx"], false);
        shared.set([LimitSpec::parse("tx:ops=10").unwrap()].into_iter().collect()).unwrap();
        assert_eq!(shared.admit(&on(1)), None);
        assert!(shared.admit(&on(5)).is_some(), "one bucket for the device");
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_once_it_is_full_and_a_burst_is_used_once() {
        let limits = limits(&["all:bw=1M"]);
        let big = Work::new(0, "read", 1 << 20);
        assert_eq!(limits.admit(&big), None, "a full bucket lets a larger request through");
        let wait = limits.admit(&big).expect("then it is in debt");
        assert!(wait > Duration::from_millis(500), "{wait:?}: about a second of debt to repay");
        let burst = self::limits(&["all:ops=10,ops_burst=50"]);
        let quick = (0..100).filter(|_| burst.admit(&Work::new(0, "read", 0)).is_none()).count();
        assert_eq!(quick, 51, "one bucket's worth (1) plus the burst (50) at once");
    }
}
