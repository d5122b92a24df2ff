//! Block requests over the rate limits wait in their ring. A pass that finds a request the
//! limits hold back puts it, and every request after it, back in the available ring (`next_avail`
//! moves back; a head marked in flight is unmarked), and the queue sleeps without taking kicks
//! until a timer of its own fires when the tokens are back. Nothing is failed, nothing is held
//! in the backend (a frontend stopping the ring finds no request taken and not completed), and
//! order is kept.

use crate::lock;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// One timer per request queue, and until when each queue waits.
pub struct Throttles {
    timers: Vec<Mutex<TimerFd>>,
    until: Vec<Mutex<Option<Instant>>>,
    /// The event id of queue 0's timer (queue `q`'s is this plus `q`).
    first_event: u64,
}

impl Throttles {
    /// Timers for `queues` queues, whose events are `first_event` onwards.
    pub fn new(queues: usize, first_event: u64) -> io::Result<Throttles> {
        let timers = (0..queues)
            .map(|_| TimerFd::new().map(Mutex::new).map_err(io::Error::from))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Throttles { timers, until: (0..queues).map(|_| Mutex::new(None)).collect(), first_event })
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
        self.until.get(queue).is_some_and(|until| lock(until).is_some_and(|t| t > Instant::now()))
    }

    /// Queue `queue` waits `wait` from now: its timer is set to wake its worker then.
    pub fn wait(&self, queue: usize, wait: Duration) -> io::Result<()> {
        let (Some(until), Some(timer)) = (self.until.get(queue), self.timers.get(queue)) else { return Ok(()) };
        // A zero timer would be disarmed: wait at least a microsecond.
        let wait = wait.max(Duration::from_micros(1));
        *lock(until) = Some(Instant::now() + wait);
        lock(timer).reset(wait, None).map_err(io::Error::from)
    }

    /// Queue `queue`'s timer fired: its expiration is consumed (the event is level-triggered)
    /// and the queue waits no longer.
    pub fn fired(&self, queue: usize) {
        if let (Some(until), Some(timer)) = (self.until.get(queue), self.timers.get(queue)) {
            let _ = lock(timer).wait();
            *lock(until) = None;
        }
    }
}
