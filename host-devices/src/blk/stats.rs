//! Request counters: by type, errors by kind, bytes. Errors are logged once per kind.

use super::request::RequestError;
use crate::lock;
use log::warn;
use pvkit_protocol::blk::RequestType;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every queue of a device (relaxed atomics: no lock on the I/O path
/// except when a request fails).
#[derive(Default)]
pub struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    other_ok: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Requests served again after a restart, from the in-flight region.
    resubmitted: std::sync::Arc<AtomicU64>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Stats {
    /// Counts a successful request moving `bytes`.
    pub fn record_ok(&self, kind: RequestType, bytes: u64) {
        let (counter, byte_counter) = match kind {
            RequestType::In => (&self.reads, Some(&self.bytes_read)),
            RequestType::Out => (&self.writes, Some(&self.bytes_written)),
            RequestType::Flush => (&self.flushes, None),
            _ => (&self.other_ok, None),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = byte_counter {
            c.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts a refused request, logging the first of each kind.
    pub fn record_error(&self, error: &RequestError) {
        self.count_error(error.kind(), &error.to_string());
    }

    /// Counts a request the disk failed.
    pub fn record_io_error(&self, kind: RequestType, error: &std::io::Error) {
        self.count_error("io-error", &format!("{} failed: {error}", kind.name()));
    }

    fn count_error(&self, kind: &'static str, message: &str) {
        let mut errors = lock(&self.errors);
        let count = errors.entry(kind).or_insert(0);
        if *count == 0 {
            warn!("request refused ({kind}): {message} (further errors of this kind are only counted)");
        }
        *count += 1;
    }

    /// The counter of resubmitted requests (kept by the in-flight tracking).
    pub fn resubmitted_counter(&self) -> std::sync::Arc<AtomicU64> {
        self.resubmitted.clone()
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: &str) -> u64 {
        lock(&self.errors).get(kind).copied().unwrap_or(0)
    }

    /// One summary line.
    pub fn summary(&self) -> String {
        let errors = lock(&self.errors);
        let errors = if errors.is_empty() {
            "none".to_string()
        } else {
            errors.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        };
        format!(
            "reads={} writes={} flushes={} other={} read_bytes={} written_bytes={} resubmitted={} errors={}",
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
            self.flushes.load(Ordering::Relaxed),
            self.other_ok.load(Ordering::Relaxed),
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed),
            self.resubmitted.load(Ordering::Relaxed),
            errors
        )
    }
}
