//! Popping descriptor chains with the ring itself checked.
//!
//! virtio-queue's `pop_descriptor_chain` logs and returns nothing when the available index is
//! more than the ring size ahead of the device's, so a caller cannot tell a broken ring from an
//! empty one and a worker that re-enables notifications finds "more" forever. [`pop`] says
//! which it is; the worker loop ([`super::worker`]) marks such a queue broken.

use super::split_ring::{self, SplitRing};
use super::worker::PassError;
use std::num::Wrapping;
use std::ops::Deref;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// What makes a ring unserviceable until the frontend resets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The driver's available index is further ahead than the ring has entries.
    #[error("available index {avail} is {ahead} entries ahead of {next} on a ring of {size}")]
    AvailIndex {
        /// The driver's `avail.idx`.
        avail: u16,
        /// The device's next available index.
        next: u16,
        /// How far ahead (wrapping).
        ahead: u16,
        /// The ring size.
        size: u16,
    },
    /// The available ring cannot be read (its address is outside guest memory).
    #[error("the available ring at {0:#x} is outside guest memory")]
    Unreadable(u64),
    /// The driver made a head available that is not a descriptor of the ring.
    #[error("available head {head} is not a descriptor of a ring of {size}")]
    HeadOutOfRange {
        /// The head the driver wrote.
        head: u16,
        /// The ring size.
        size: u16,
    },
}

/// The next available chain of `queue`, `Ok(None)` when there is none (or the queue is not
/// set up), or why the ring is broken.
pub fn pop<M>(queue: &mut Queue, mem: M) -> Result<Option<DescriptorChain<M>>, RingError>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    match queue.iter(mem.clone()) {
        Ok(mut chains) => match chains.next() {
            // The chain cannot even be returned unused (its id is no descriptor of the ring).
            Some(chain) if chain.head_index() >= queue.size() => {
                Err(RingError::HeadOutOfRange { head: chain.head_index(), size: queue.size() })
            }
            next => Ok(next),
        },
        Err(virtio_queue::Error::QueueNotReady) => Ok(None),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let avail = queue.avail_idx(mem.deref(), std::sync::atomic::Ordering::Acquire).map(|a| a.0).unwrap_or(0);
            let next = queue.next_avail();
            let ahead = avail.wrapping_sub(next);
            Err(RingError::AvailIndex { avail, next, ahead, size: queue.size() })
        }
        Err(_) => Err(RingError::Unreadable(queue.avail_ring())),
    }
}

/// Pops a pass's chains from one queue and remembers a broken ring: [`Popper::next`] is
/// `None` at the end of the available chains and from a broken ring on, and
/// [`Popper::finish`] turns the pass's value into its result (the ring's error, for the
/// worker to mark, once everything taken so far was completed).
///
/// Hot paths take heads through a [`SplitRing`]: [`Popper::take_heads`] in bursts, or
/// [`Popper::next_head`] one at a time from what one read of the available index announced
/// ([`Popper::refresh`]).
#[derive(Debug)]
pub struct Popper {
    queue: usize,
    broken: Option<RingError>,
    /// Chains the last read of the available index announced and not taken yet.
    announced: u16,
    /// That available index.
    seen: Option<u16>,
}

impl Popper {
    /// For the device's queue `queue`.
    pub fn new(queue: usize) -> Popper {
        Popper { queue, broken: None, announced: 0, seen: None }
    }

    /// The next available chain of `vq`.
    pub fn next<M>(&mut self, vq: &mut Queue, mem: M) -> Option<DescriptorChain<M>>
    where
        M: Clone + Deref,
        M::Target: GuestMemory,
    {
        if self.broken.is_some() {
            return None;
        }
        pop(vq, mem).unwrap_or_else(|error| {
            self.broken = Some(error);
            None
        })
    }

    /// Takes up to `limit` heads of `vq` (in `mem`) into `into` in one burst: the available
    /// index is read once, and the heads up to it are taken without reading it again (a
    /// driver on another core writes that index for every chain it adds; reading it per chain
    /// moves its cache line back and forth each time). Returns how many were taken; chains the
    /// driver adds during the burst wait for the next one.
    pub fn take_heads(&mut self, vq: &mut Queue, mem: &GuestMemoryMmap, into: &mut Vec<u16>, limit: usize) -> usize {
        if self.broken.is_some() || limit == 0 {
            return 0;
        }
        let Some(ring) = SplitRing::new(vq, mem) else { return 0 };
        let before = into.len();
        if let Err(error) = split_ring::take_heads(vq, &ring, into, limit) {
            self.broken = Some(error);
        }
        into.len() - before
    }

    /// Reads the available index of `vq` (in `ring`) once: [`Popper::next_head`] takes the
    /// chains it announces.
    pub fn refresh(&mut self, vq: &Queue, ring: &SplitRing<'_>) {
        if self.broken.is_some() {
            return;
        }
        match ring.waiting(vq.next_avail()) {
            Ok(waiting) => {
                self.announced = waiting;
                self.seen = Some(vq.next_avail().wrapping_add(waiting));
            }
            Err(error) => self.broken = Some(error),
        }
    }

    /// The next head the last [`Popper::refresh`] announced, taken from `vq`.
    pub fn next_head(&mut self, vq: &mut Queue, ring: &SplitRing<'_>) -> Option<u16> {
        if self.broken.is_some() || self.announced == 0 {
            return None;
        }
        match ring.head(vq.next_avail()) {
            Ok(head) => {
                vq.set_next_avail(vq.next_avail().wrapping_add(1));
                self.announced -= 1;
                Some(head)
            }
            Err(error) => {
                self.broken = Some(error);
                None
            }
        }
    }

    /// Gives the last `count` heads taken (one at a time or in a burst) back to `vq`.
    pub fn put_back(&mut self, vq: &mut Queue, count: u16) {
        vq.set_next_avail(vq.next_avail().wrapping_sub(count));
        self.announced += count;
    }

    /// The available index the last [`Popper::refresh`] read.
    pub fn seen(&self) -> Option<u16> {
        self.seen
    }

    /// `value`, or the broken ring this pass found.
    pub fn finish<T>(self, value: T) -> Result<T, PassError> {
        match self.broken {
            Some(error) => Err(PassError::Ring { queue: self.queue, error }),
            None => Ok(value),
        }
    }
}

/// Whether the driver has made chains available that `queue` has not taken yet (a broken or
/// unreadable ring counts as none: it is not served).
pub fn has_available<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(avail) => {
            let ahead = (avail - Wrapping(queue.next_avail())).0;
            ahead != 0 && ahead <= queue.size()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn an_index_too_far_ahead_is_a_broken_ring_not_an_empty_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        assert_eq!(pop(&mut queue, &mem).unwrap().map(|c| c.head_index()), None, "empty");
        mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x8000, 16, 0, 0))], 0).unwrap();
        assert!(has_available(&queue, &mem));
        assert_eq!(pop(&mut queue, &mem).unwrap().map(|c| c.head_index()), Some(0));
        assert!(!has_available(&queue, &mem));
        mem.write_obj(1000u16, mock.avail_addr().unchecked_add(2)).unwrap();
        assert_eq!(
            pop(&mut queue, &mem).map(|c| c.map(|c| c.head_index())),
            Err(RingError::AvailIndex { avail: 1000, next: 1, ahead: 999, size: 16 })
        );
        assert!(!has_available(&queue, &mem), "a broken ring offers nothing");
    }

    #[test]
    fn a_head_outside_the_ring_is_a_broken_ring() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x8000, 16, 0, 0))], 0).unwrap();
        mem.write_obj(5000u16, mock.avail_addr().unchecked_add(4)).unwrap();
        assert_eq!(
            pop(&mut queue, &mem).map(|c| c.map(|c| c.head_index())),
            Err(RingError::HeadOutOfRange { head: 5000, size: 16 })
        );
    }

    fn chains_of(mock: &MockSplitQueue<'_, GuestMemoryMmap>, count: u16) {
        let descs: Vec<RawDescriptor> = (0..count)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(0x8000 + u64::from(i) * 64, 16, 0, 0)))
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
    }

    #[test]
    fn a_burst_takes_what_was_available_at_its_start_up_to_its_limit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut popper = Popper::new(0);
        let mut taken = Vec::new();
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 8), 0, "an empty ring");
        chains_of(&mock, 5);
        // A partial burst: the limit stops it, the rest waits for the next one.
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 3), 3);
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 8), 2);
        assert_eq!(taken, [0, 1, 2, 3, 4]);
        assert_eq!(queue.next_avail(), 5);
        assert!(popper.finish(()).is_ok());
    }

    #[test]
    fn a_burst_straddles_the_end_of_the_ring() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 4);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut popper = Popper::new(0);
        // The driver's index and the device's both near the wrap of the ring (and of u16).
        mem.write_obj(u16::MAX - 1, mock.avail_addr().unchecked_add(2)).unwrap();
        queue.set_next_avail(u16::MAX - 1);
        let mut taken = Vec::new();
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 8), 0);
        // Four more chains: ring slots 2, 3, 0, 1 (avail index 65534 .. 1).
        for (slot, head) in [(2u64, 3u16), (3, 0), (0, 1), (1, 2)] {
            mem.write_obj(head, mock.avail_addr().unchecked_add(4 + 2 * slot)).unwrap();
        }
        mem.write_obj(2u16, mock.avail_addr().unchecked_add(2)).unwrap();
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 8), 4);
        assert_eq!(taken, [3, 0, 1, 2]);
        assert_eq!(queue.next_avail(), 2);
    }

    #[test]
    fn a_broken_ring_ends_the_burst_and_is_reported() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        chains_of(&mock, 2);
        mem.write_obj(5000u16, mock.avail_addr().unchecked_add(6)).unwrap();
        let mut popper = Popper::new(3);
        let mut taken = Vec::new();
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 8), 1, "the good chain before the bad head");
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 8), 0, "nothing after a broken ring");
        assert!(matches!(
            popper.finish(()),
            Err(PassError::Ring { queue: 3, error: RingError::HeadOutOfRange { head: 5000, size: 16 } })
        ));
        let mut too_far = Popper::new(0);
        let mut fresh: Queue = mock.create_queue().unwrap();
        mem.write_obj(1000u16, mock.avail_addr().unchecked_add(2)).unwrap();
        assert_eq!(too_far.take_heads(&mut fresh, &mem, &mut taken, 8), 0);
        assert!(matches!(too_far.finish(()), Err(PassError::Ring { error: RingError::AvailIndex { .. }, .. })));
    }

    #[test]
    fn with_event_idx_a_partial_burst_leaves_the_rest_announced_as_work() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        chains_of(&mock, 6);
        let (mut popper, mut taken) = (Popper::new(0), Vec::new());
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 4), 4);
        // Re-arming after the burst: avail_event is set to the next index, and the two chains
        // left are reported, so the worker takes another pass instead of sleeping on them.
        assert!(queue.enable_notification(&mem).unwrap(), "chains left behind must count as work");
        let avail_event: u16 = mem.read_obj(mock.used_addr().unchecked_add(4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 4);
        assert_eq!(popper.take_heads(&mut queue, &mem, &mut taken, 4), 2);
        assert!(!queue.enable_notification(&mem).unwrap(), "all taken");
    }
}
