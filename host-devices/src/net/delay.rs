//! Frames that fault rules hold back, one line per direction of a queue pair, in the manner of
//! Linux's netem: `delay` keeps a frame until its time (with a range, each frame draws its own
//! delay, so frames whose delays cross leave in a new order, as netem's jitter does), and
//! `reorder` keeps a frame until the next frame in its direction has gone past it, or until
//! [`REORDER_WAIT`] at the latest when no other frame comes.
//!
//! A line holds at most [`DELAY_LINE_CAPACITY`] frames and [`DELAY_LINE_BYTES`] bytes; a
//! frame that finds it full is dropped by the device (counted). Nothing here allocates per frame beyond the line's own storage.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// The most frames one line holds.
pub const DELAY_LINE_CAPACITY: usize = 1024;
/// The most bytes of frames one line holds (a GSO frame may be 64 KiB).
pub const DELAY_LINE_BYTES: usize = 4 << 20;
/// How long a reordered frame waits for a frame to overtake it.
pub const REORDER_WAIT: Duration = Duration::from_millis(10);

/// A delayed frame: due at `due`; `order` keeps frames due at the same instant in arrival order.
struct Delayed<T> {
    due: Instant,
    order: u64,
    bytes: usize,
    item: T,
}

impl<T> PartialEq for Delayed<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}

impl<T> Eq for Delayed<T> {}

impl<T> PartialOrd for Delayed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Delayed<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

/// A frame waiting to be overtaken: it may go once `passed` has gone beyond `mark`.
struct Overtaken<T> {
    mark: u64,
    due: Instant,
    bytes: usize,
    item: T,
}

/// One direction's held frames.
pub struct DelayLine<T> {
    delayed: BinaryHeap<Reverse<Delayed<T>>>,
    overtaken: VecDeque<Overtaken<T>>,
    arrivals: u64,
    /// Frames that went past the line directly.
    passed: u64,
    /// Bytes held.
    bytes: usize,
}

impl<T> Default for DelayLine<T> {
    fn default() -> Self {
        DelayLine { delayed: BinaryHeap::new(), overtaken: VecDeque::new(), arrivals: 0, passed: 0, bytes: 0 }
    }
}

impl<T> DelayLine<T> {
    /// How many frames the line holds.
    pub fn len(&self) -> usize {
        self.delayed.len() + self.overtaken.len()
    }

    /// Whether the line holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a frame of `bytes` finds no room.
    fn full_for(&self, bytes: usize) -> bool {
        self.len() >= DELAY_LINE_CAPACITY || self.bytes.saturating_add(bytes) > DELAY_LINE_BYTES
    }

    /// Holds `item`, a frame of `bytes`, until `due`; gives it back when the line is full.
    pub fn hold_until(&mut self, item: T, bytes: usize, due: Instant) -> Result<(), T> {
        if self.full_for(bytes) {
            return Err(item);
        }
        self.arrivals += 1;
        self.bytes += bytes;
        self.delayed.push(Reverse(Delayed { due, order: self.arrivals, bytes, item }));
        Ok(())
    }

    /// Holds `item`, a frame of `bytes`, until the next frame goes past it
    /// ([`DelayLine::passed`]), or until [`REORDER_WAIT`] after `now`; gives it back when the
    /// line is full.
    pub fn hold_for_next(&mut self, item: T, bytes: usize, now: Instant) -> Result<(), T> {
        if self.full_for(bytes) {
            return Err(item);
        }
        self.bytes += bytes;
        self.overtaken.push_back(Overtaken { mark: self.passed, due: now + REORDER_WAIT, bytes, item });
        Ok(())
    }

    /// Holds `item` until `due`, or (`None`) until the next frame goes past it: what a fault
    /// rule's delay or reorder asks for.
    pub fn hold(&mut self, item: T, bytes: usize, due: Option<Instant>) -> Result<(), T> {
        match due {
            Some(due) => self.hold_until(item, bytes, due),
            None => self.hold_for_next(item, bytes, Instant::now()),
        }
    }

    /// A frame went out directly, past whatever waits to be overtaken.
    pub fn passed(&mut self) {
        if !self.overtaken.is_empty() {
            self.passed += 1;
        }
    }

    /// The next frame free to go at `now`: one that was overtaken first, then the earliest due.
    pub fn pop_ready(&mut self, now: Instant) -> Option<T> {
        let (bytes, item) = if self.overtaken.front().is_some_and(|f| f.mark < self.passed || f.due <= now) {
            self.overtaken.pop_front().map(|f| (f.bytes, f.item))?
        } else if self.delayed.peek().is_some_and(|Reverse(f)| f.due <= now) {
            self.delayed.pop().map(|Reverse(f)| (f.bytes, f.item))?
        } else {
            return None;
        };
        self.bytes -= bytes;
        Some(item)
    }

    /// When the next frame falls due (a reordered frame's latest time included).
    pub fn next_due(&self) -> Option<Instant> {
        let delayed = self.delayed.peek().map(|Reverse(f)| f.due);
        let overtaken = self.overtaken.front().map(|f| f.due);
        delayed.into_iter().chain(overtaken).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(line: &mut DelayLine<u32>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| line.pop_ready(now)).collect()
    }

    #[test]
    fn delayed_frames_leave_when_due_earliest_first_ties_in_arrival_order() {
        let start = Instant::now();
        let mut line = DelayLine::default();
        for (item, delay) in [(1, 30), (2, 10), (3, 10), (4, 20)] {
            line.hold_until(item, 60, start + ms(delay)).unwrap();
        }
        assert_eq!(line.next_due(), Some(start + ms(10)));
        assert_eq!(drain(&mut line, start + ms(5)), [] as [u32; 0], "nothing due yet");
        assert_eq!(drain(&mut line, start + ms(10)), [2, 3], "equal delays keep their order");
        assert_eq!(drain(&mut line, start + ms(40)), [4, 1], "crossed delays reorder, as netem's jitter");
        assert!(line.is_empty());
        assert_eq!(line.next_due(), None);
    }

    #[test]
    fn a_reordered_frame_goes_right_after_the_next_or_when_its_wait_is_over() {
        let start = Instant::now();
        let mut line = DelayLine::default();
        line.hold_for_next(1, 60, start).unwrap();
        assert_eq!(line.pop_ready(start), None, "waits to be overtaken");
        line.passed();
        assert_eq!(line.pop_ready(start), Some(1), "free once a frame went past");
        line.hold_for_next(2, 60, start).unwrap();
        assert_eq!(line.next_due(), Some(start + REORDER_WAIT));
        assert_eq!(line.pop_ready(start + REORDER_WAIT), Some(2), "nothing came: it goes after its wait");
        line.passed();
        line.hold_for_next(3, 60, start).unwrap();
        assert_eq!(line.pop_ready(start), None, "a frame that passed before it came does not count");
    }

    #[test]
    fn a_full_line_gives_the_frame_back() {
        let now = Instant::now();
        let mut line = DelayLine::default();
        for item in 0..DELAY_LINE_CAPACITY as u32 {
            line.hold_until(item, 60, now).unwrap();
        }
        assert_eq!(line.hold_until(7, 60, now), Err(7));
        assert_eq!(line.hold_for_next(8, 60, now), Err(8));
        assert_eq!(drain(&mut line, now).len(), DELAY_LINE_CAPACITY);
        let big = 64 << 10;
        for item in 0..(DELAY_LINE_BYTES / big) as u32 {
            line.hold_until(item, big, now).unwrap();
        }
        assert_eq!(line.hold_until(7, big, now), Err(7), "as many bytes as it holds");
        assert_eq!(line.hold_until(8, 60, now), Err(8));
        line.pop_ready(now);
        assert_eq!(line.hold_until(9, big, now), Ok(()), "room again once a frame left");
    }
}
