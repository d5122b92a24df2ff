//! A timer per queue, for work that waits: requests over the rate limits (block requests and
//! transmitted frames go back to their ring, received frames wait in the backend) and
//! completions a service holds back. A queue waiting for its limits takes no kicks; its timer
//! wakes its worker when the tokens are back. Nothing is failed and order is kept.

use crate::lock;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// A timer whose read never blocks: re-arming it clears an expiration that epoll may already
/// have reported, and the worker must not then wait for the next one.
fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor `timer` owns; only its O_NONBLOCK flag changes.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok { Ok(timer) } else { Err(io::Error::last_os_error()) }
}

/// One timer per queue, and until when each queue waits for its limits.
pub struct Throttles {
    timers: Vec<Mutex<TimerFd>>,
    until: Vec<Mutex<Option<Instant>>>,
    /// When each queue's timer fires next.
    armed: Vec<Mutex<Option<Instant>>>,
    /// Whether each queue's `until` is set: the hot paths look here, without a lock.
    waiting: Vec<AtomicBool>,
    /// The event id of queue 0's timer (queue `q`'s is this plus `q`).
    first_event: u64,
}

impl Throttles {
    /// Timers for `queues` queues, whose events are `first_event` onwards.
    pub fn new(queues: usize, first_event: u64) -> io::Result<Throttles> {
        let timers = (0..queues).map(|_| nonblocking_timer().map(Mutex::new)).collect::<io::Result<Vec<_>>>()?;
        let none = || (0..queues).map(|_| Mutex::new(None)).collect();
        let waiting = (0..queues).map(|_| AtomicBool::new(false)).collect();
        Ok(Throttles { timers, until: none(), armed: none(), waiting, first_event })
    }

    /// The timer of queue `queue`, with its event id, for the queue's worker to watch.
    pub fn timer(&self, queue: usize) -> Option<(i32, u64)> {
        let timer = self.timers.get(queue)?;
        Some((lock(timer).as_raw_fd(), self.first_event + queue as u64))
    }

    /// The queue whose timer event `event` is.
    pub fn queue_of(&self, event: u64) -> Option<usize> {
        let queue = usize::try_from(event.checked_sub(self.first_event)?).ok()?;
        (queue < self.timers.len()).then_some(queue)
    }

    /// Whether queue `queue` waits for its limits now.
    pub fn is_waiting(&self, queue: usize) -> bool {
        self.until(queue).is_some_and(|t| t > Instant::now())
    }

    /// Queue `queue` waits `wait` from now: its timer is set to wake its worker then.
    pub fn wait(&self, queue: usize, wait: Duration) -> io::Result<()> {
        let Some(until) = self.until.get(queue) else { return Ok(()) };
        let at = Instant::now() + wait;
        *lock(until) = Some(at);
        if let Some(flag) = self.waiting.get(queue) {
            flag.store(true, Ordering::Relaxed);
        }
        self.wake_at(queue, at)
    }

    /// Queue `queue`'s worker wakes at `at`, or earlier if its timer is set for earlier.
    pub fn wake_at(&self, queue: usize, at: Instant) -> io::Result<()> {
        let (Some(armed), Some(timer)) = (self.armed.get(queue), self.timers.get(queue)) else { return Ok(()) };
        let mut armed = lock(armed);
        let now = Instant::now();
        if armed.is_some_and(|t| t > now && t <= at) {
            return Ok(());
        }
        *armed = Some(at);
        // A zero timer would be disarmed: at least a microsecond.
        let wait = at.saturating_duration_since(now).max(Duration::from_micros(1));
        lock(timer).reset(wait, None).map_err(io::Error::from)
    }

    /// Until when queue `queue` waits for its limits.
    pub fn until(&self, queue: usize) -> Option<Instant> {
        if !self.waiting.get(queue)?.load(Ordering::Relaxed) {
            return None;
        }
        self.until.get(queue).and_then(|until| *lock(until))
    }

    /// Queue `queue`'s timer fired: its expiration is consumed (the event is level-triggered),
    /// and a wait for the limits that has passed is over.
    pub fn fired(&self, queue: usize) {
        let (Some(until), Some(timer), Some(armed)) =
            (self.until.get(queue), self.timers.get(queue), self.armed.get(queue))
        else {
            return;
        };
        let _ = lock(timer).wait();
        *lock(armed) = None;
        let mut until = lock(until);
        if until.is_some_and(|t| t <= Instant::now()) {
            *until = None;
            if let Some(flag) = self.waiting.get(queue) {
                flag.store(false, Ordering::Relaxed);
            }
        }
    }
}
