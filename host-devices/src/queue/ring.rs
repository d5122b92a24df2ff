//! Popping descriptor chains with the ring itself checked.
//!
//! virtio-queue's `pop_descriptor_chain` logs and returns nothing when the available index is
//! more than the ring size ahead of the device's, so a caller cannot tell a broken ring from an
//! empty one and a worker that re-enables notifications finds "more" forever. [`pop`] says
//! which it is; the worker loop ([`super::worker`]) marks such a queue broken.

use super::worker::PassError;
use std::num::Wrapping;
use std::ops::Deref;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

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
#[derive(Debug)]
pub struct Popper {
    queue: usize,
    broken: Option<RingError>,
}

impl Popper {
    /// For the device's queue `queue`.
    pub fn new(queue: usize) -> Popper {
        Popper { queue, broken: None }
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
}
