//! Where the services that sit between guest and backend attach, once for every device.
//!
//! A device calls the hooks of its [`super::DeviceCore`]'s services at three points:
//! - [`QueueServices::admit`] before a request or frame is served (rate limits, fault
//!   injection decide here);
//! - [`QueueServices::completed`] after it completed (per-queue counters and latency);
//! - [`QueueServices::guest_written`] for every write into guest memory, used-ring updates
//!   included (dirty-page logging for live migration).
//!
//! Each later service is one implementation of this trait; no device changes for it. Today
//! every backend runs with [`NoServices`].

use std::time::Instant;
use vm_memory::GuestAddress;

/// What a device is about to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// The device's queue index.
    pub queue: usize,
    /// The device's name of the operation (`read`, `write`, `tx`, `rx`, ...).
    pub kind: &'static str,
    /// Bytes it moves.
    pub bytes: u64,
    /// Block: the first sector it touches.
    pub sector: Option<u64>,
}

impl Work {
    /// `bytes` of operation `kind` on queue `queue`.
    pub fn new(queue: usize, kind: &'static str, bytes: u64) -> Work {
        Work { queue, kind, bytes, sector: None }
    }

    /// The same work, starting at sector `sector`.
    pub fn at_sector(self, sector: u64) -> Work {
        Work { sector: Some(sector), ..self }
    }
}

/// A service's answer to [`QueueServices::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it now.
    Serve,
    /// Fail it: a block request completes with an I/O error, a frame is dropped (counted).
    Fail,
    /// Refuse it: a block request completes with UNSUPP; anything else is dropped as by `Fail`.
    Unsupported,
    /// A block write: serve only its first this many bytes (whole sectors), then fail it
    /// with IOERR; anything else as by `Fail`.
    Torn(u64),
    /// Serve it, but let it take effect this long from now: a block request completes then, a
    /// frame leaves then, console output reaches its port then.
    Delay(std::time::Duration),
    /// A frame: pass it on with one byte after its Ethernet header inverted, the one this
    /// number picks (others: serve).
    Corrupt(u64),
    /// A frame: pass it on twice (others: serve).
    Duplicate,
    /// A frame: pass it on after the next frame in its direction (others: serve).
    Reorder,
}

/// A completed request or frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// What was served.
    pub work: Work,
    /// When the device took it from the ring.
    pub started: Instant,
    /// Whether it succeeded.
    pub ok: bool,
}

/// The hooks; every method has a default that does nothing.
///
/// The contract every device keeps: each [`Work`] given to `admit` is reported to `completed`
/// exactly once, with `ok: false` when a service failed it or the device could not serve it.
pub trait QueueServices: Send + Sync {
    /// Before `work` is served.
    fn admit(&self, _work: &Work) -> Verdict {
        Verdict::Serve
    }

    /// `count` requests, frames or chunks were taken from queue `queue` (before their
    /// `admit`; once per batch where a device takes them in batches).
    fn taken(&self, _queue: usize, _count: usize) {}

    /// Whether [`QueueServices::throttle`] may hold anything back (lets a device skip asking).
    fn throttles(&self) -> bool {
        false
    }

    /// Before `works` (taken together at `now`) are admitted, by a device that can make work
    /// wait (block: in its ring): the first that must wait for the rate limits and for how
    /// long, `None` when all may go (their tokens are taken).
    fn throttle(&self, _works: &[Work], _now: Instant) -> Option<(usize, std::time::Duration)> {
        None
    }

    /// After a request or frame completed.
    fn completed(&self, _completion: &Completion) {}

    /// After a batch of requests completed together (one hook call for the batch, so that
    /// counting costs little per request).
    fn completed_batch(&self, completions: &[Completion]) {
        for completion in completions {
            self.completed(completion);
        }
    }

    /// The device wrote `len` bytes of guest memory at `addr`.
    fn guest_written(&self, _addr: GuestAddress, _len: u64) {}

    /// The driver kicked queue `queue`.
    fn kicked(&self, _queue: usize) {}

    /// The device signalled the driver for queue `queue`.
    fn notified(&self, _queue: usize) {}

    /// The worker serving queue `queue` (and maybe others) polled for `time` and found nothing.
    fn polled(&self, _queue: usize, _time: std::time::Duration) {}

    /// Whether any hook does something (lets a hot path skip building [`Work`]).
    fn is_active(&self) -> bool {
        true
    }
}

/// One request or frame between its admission and its completion (see [`admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    work: Work,
    started: Instant,
    served: bool,
    verdict: Verdict,
}

/// Asks the services whether `work` may be served. `None` when no service is active (serve it,
/// report nothing); otherwise the admission, to be passed to [`complete`] exactly once.
pub fn admit(services: &dyn QueueServices, work: Work) -> Option<Admission> {
    if !services.is_active() {
        return None;
    }
    services.taken(work.queue, 1);
    // Delays, corruption and duplicates are for the device to enact on work it serves.
    let verdict = services.admit(&work);
    let served = matches!(
        verdict,
        Verdict::Serve | Verdict::Delay(_) | Verdict::Corrupt(_) | Verdict::Duplicate | Verdict::Reorder
    );
    Some(Admission { work, started: Instant::now(), served, verdict })
}

/// What the services said of admitted work (`Serve` when none is active).
pub fn verdict_of(admission: &Option<Admission>) -> Verdict {
    admission.as_ref().map_or(Verdict::Serve, |a| a.verdict)
}

/// Whether an admission from [`admit`] lets the work be served.
pub fn is_served(admission: &Option<Admission>) -> bool {
    admission.is_none_or(|a| a.served)
}

/// Reports the end of admitted work: `ok` when it was served successfully (never for work a
/// service failed).
pub fn complete(services: &dyn QueueServices, admission: Option<Admission>, ok: bool) {
    if let Some(Admission { work, started, served, .. }) = admission {
        services.completed(&Completion { work, started, ok: ok && served });
    }
}

/// No service attached.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoServices;

impl QueueServices for NoServices {
    fn is_active(&self) -> bool {
        false
    }
}

/// Records every hook call, for tests of the devices' hook points.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct RecordingServices {
    /// What was admitted.
    pub admitted: std::sync::Mutex<Vec<Work>>,
    /// What completed.
    pub completed: std::sync::Mutex<Vec<Completion>>,
    /// Every guest write.
    pub written: std::sync::Mutex<Vec<(u64, u64)>>,
    /// The verdict to give.
    pub fail_all: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl QueueServices for RecordingServices {
    fn admit(&self, work: &Work) -> Verdict {
        crate::lock(&self.admitted).push(*work);
        if self.fail_all.load(std::sync::atomic::Ordering::Relaxed) { Verdict::Fail } else { Verdict::Serve }
    }

    fn completed(&self, completion: &Completion) {
        crate::lock(&self.completed).push(*completion);
    }

    fn guest_written(&self, addr: GuestAddress, len: u64) {
        crate::lock(&self.written).push((addr.0, len));
    }
}

#[cfg(test)]
impl RecordingServices {
    /// Whether every byte of `[addr, addr + len)` was reported written.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        let written = crate::lock(&self.written);
        (addr..addr + len).all(|byte| written.iter().any(|&(a, l)| byte >= a && byte < a + l))
    }
}
