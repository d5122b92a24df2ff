//! Used entries held back until a time of their own: a request that is served but whose
//! completion a service delays (fault injection's `delay`) is published only once its time has
//! come, by the first pass after it (the device arms a timer for it). It stays marked in flight
//! until then, so a backend that dies meanwhile has it resubmitted. When the frontend stops the
//! ring (GET_VRING_BASE) every held entry is published at once: the index the frontend is told
//! then counts no request that was taken and not completed.

use super::Memory;
use super::inflight::Inflight;
use super::services::{Completion, QueueServices};
use super::used::UsedBatch;
use crate::lock;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::GuestAddressSpace;

/// One held entry.
#[derive(Debug, Clone, Copy)]
struct Held {
    due: Instant,
    head: u16,
    len: u32,
    /// Reported to the services when the entry is published.
    completion: Option<Completion>,
}

/// The held entries of every queue of a connection, and each queue's ring (for the stop).
pub struct HeldUsed {
    queues: Vec<Mutex<Vec<Held>>>,
    /// How many entries each queue holds: a pass looks here, without a lock.
    counts: Vec<AtomicUsize>,
    vrings: Vec<Mutex<Option<VringRwLock>>>,
}

impl HeldUsed {
    /// Nothing held, for `queues` queues.
    pub fn new(queues: usize) -> HeldUsed {
        HeldUsed {
            queues: (0..queues).map(|_| Mutex::new(Vec::new())).collect(),
            counts: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
            vrings: (0..queues).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Holds the used entry of chain `head` (`len` bytes written) on queue `queue` until
    /// `due`, and its `completion` for the services; `vring` is the queue's ring, for
    /// publishing it when the frontend stops the ring.
    pub fn hold(
        &self,
        queue: usize,
        vring: &VringRwLock,
        due: Instant,
        (head, len): (u16, u32),
        completion: Option<Completion>,
    ) {
        if let (Some(held), Some(slot)) = (self.queues.get(queue), self.vrings.get(queue)) {
            let mut held = lock(held);
            held.push(Held { due, head, len, completion });
            self.counts[queue].store(held.len(), Ordering::Relaxed);
            drop(held);
            lock(slot).get_or_insert_with(|| vring.clone());
        }
    }

    /// Moves queue `queue`'s entries due now into `used`, in the order they were held,
    /// and reports their completions to `services`.
    pub fn take_due(&self, queue: usize, used: &mut UsedBatch, services: &dyn QueueServices) {
        if !self.holds(queue) {
            return;
        }
        // The clock only when something is held (most passes hold nothing).
        let now = Instant::now();
        let Some(held) = self.queues.get(queue) else { return };
        let mut held = lock(held);
        held.retain(|entry| {
            let due = entry.due <= now;
            if due {
                used.push(entry.head, entry.len);
                if let Some(completion) = &entry.completion {
                    services.completed(completion);
                }
            }
            !due
        });
        self.counts[queue].store(held.len(), Ordering::Relaxed);
    }

    /// Whether queue `queue` holds any entry.
    fn holds(&self, queue: usize) -> bool {
        self.counts.get(queue).is_some_and(|count| count.load(Ordering::Relaxed) > 0)
    }

    /// When queue `queue`'s next held entry is due.
    pub fn next_due(&self, queue: usize) -> Option<Instant> {
        if !self.holds(queue) {
            return None;
        }
        lock(self.queues.get(queue)?).iter().map(|entry| entry.due).min()
    }

    /// The frontend stops queue `queue`: every entry still held is published now.
    pub fn release_all(&self, queue: usize, memory: Option<Memory>, services: &dyn QueueServices, inflight: &Inflight) {
        let (Some(held), Some(slot)) = (self.queues.get(queue), self.vrings.get(queue)) else { return };
        let entries = {
            let mut held = lock(held);
            self.counts[queue].store(0, Ordering::Relaxed);
            std::mem::take(&mut *held)
        };
        let (Some(vring), Some(memory)) = (lock(slot).clone(), memory) else { return };
        if entries.is_empty() {
            return;
        }
        let mut used = UsedBatch::default();
        for entry in entries {
            used.push(entry.head, entry.len);
            if let Some(completion) = &entry.completion {
                services.completed(completion);
            }
        }
        let mem = memory.memory();
        let tracked = inflight.queue(queue);
        let mut state = vring.get_mut();
        let notify = used.publish_tracked(state.get_queue_mut(), &*mem, services, tracked.as_ref());
        drop(state);
        if matches!(notify, Ok(true)) {
            let _ = vring.signal_used_queue();
        }
    }
}
