//! The one used-publication and notification policy of every device.
//!
//! Used entries are written, then the used index is stored once per batch (release order),
//! never entry by entry: a frame spread over several receive buffers must become visible all
//! at once, or a driver that sees its first buffer (`num_buffers` = 3) before the other two
//! drops it, and one store per batch is cheaper. Whether the driver wants a notification for
//! the batch follows RING_EVENT_IDX's `used_event` with the wrap-safe rule when negotiated, and
//! the avail ring's NO_INTERRUPT flag otherwise (virtio-queue's `needs_notification` ignores
//! that flag). Every byte written is reported to the services (dirty-page logging).

use super::inflight::TrackedQueue;
use super::services::QueueServices;
use pvkit_protocol::ring::{AVAIL_F_NO_INTERRUPT, USED_ELEM_SIZE, need_event, used_event_offset};
use std::sync::atomic::{Ordering, fence};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Bytes before the used ring's first element (flags, idx).
const USED_RING_HEADER: u64 = 4;
/// Offset of the used index in the used ring.
const USED_IDX_OFFSET: u64 = 2;

/// Used entries waiting to be published together.
#[derive(Debug, Default)]
pub struct UsedBatch {
    entries: Vec<(u16, u32)>,
    /// The entries as the ring holds them, reused from batch to batch.
    bytes: Vec<u8>,
}

impl UsedBatch {
    /// Adds chain `head`, of which the device wrote `len` bytes.
    pub fn push(&mut self, head: u16, len: u32) {
        self.entries.push((head, len));
    }

    /// Takes the last entry back (its chain goes back to the available ring).
    pub fn pop_last(&mut self) -> Option<(u16, u32)> {
        self.entries.pop()
    }

    /// Number of entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Publishes the batch while the pass still holds `state`, `vring`'s lock (queue
    /// `queue`), then releases it and signals the driver if it asked: what every pass ends with. Under the lock, so
    /// that a frontend stopping the queue (GET_VRING_BASE, which takes it) waits until every
    /// chain the pass took has its used entry: the index it is told then matches the ring, and
    /// a migration's last dirty-log sync sees every write.
    pub fn publish_and_release<M: GuestMemory>(
        &mut self,
        mut state: std::sync::RwLockWriteGuard<'_, vhost_user_backend::VringState<super::Memory>>,
        vring: &VringRwLock,
        queue: usize,
        mem: &M,
        services: &dyn QueueServices,
    ) -> std::io::Result<()> {
        let notify = self.publish(state.get_queue_mut(), mem, services).map_err(std::io::Error::other)?;
        drop(state);
        if notify {
            vring.signal_used_queue()?;
            services.notified(queue);
        }
        Ok(())
    }

    /// Writes the entries into the used ring, then the used index once, and says whether the
    /// driver wants a notification for them. Entries whose head is not a descriptor of the
    /// ring are left out (a device bug: a guest offering such a head breaks its ring when it is
    /// popped, see [`super::ring::pop`]), so the driver never sees one.
    pub fn publish<M: GuestMemory>(
        &mut self,
        vq: &mut Queue,
        mem: &M,
        services: &dyn QueueServices,
    ) -> Result<bool, GuestMemoryError> {
        self.publish_tracked(vq, mem, services, None)
    }

    /// [`UsedBatch::publish`], keeping the queue's in-flight region (`tracked`): the batch is
    /// linked into its list before the used index is stored, and its heads are marked done
    /// after (the specification's order, so that a crash anywhere in between is repaired).
    pub fn publish_tracked<M: GuestMemory>(
        &mut self,
        vq: &mut Queue,
        mem: &M,
        services: &dyn QueueServices,
        tracked: Option<&TrackedQueue<'_>>,
    ) -> Result<bool, GuestMemoryError> {
        if self.entries.is_empty() {
            return Ok(false);
        }
        let size = vq.size().max(1);
        self.entries.retain(|(head, _)| {
            let valid = *head < size;
            if !valid {
                log::error!("a used entry for descriptor {head} on a ring of {size} was left out");
            }
            valid
        });
        // Taken out, so that a batch failing half-way is not published again.
        let mut entries = std::mem::take(&mut self.entries);
        let used_ring = vq.used_ring();
        let old = vq.next_used();
        if entries.is_empty() {
            return Ok(false);
        }
        // The entries are written in runs up to the ring's end (usually one or two), one copy
        // each, rather than one per entry.
        self.bytes.clear();
        for (head, len) in &entries {
            self.bytes.extend_from_slice(&u32::from(*head).to_le_bytes());
            self.bytes.extend_from_slice(&len.to_le_bytes());
        }
        let mut next = old;
        let mut rest = &self.bytes[..];
        while !rest.is_empty() {
            let slot = usize::from(next % size);
            let run = (usize::from(size) - slot).min(rest.len() / USED_ELEM_SIZE);
            let (now, later) = rest.split_at(run * USED_ELEM_SIZE);
            let at = GuestAddress(used_ring + USED_RING_HEADER + (USED_ELEM_SIZE * slot) as u64);
            mem.write_slice(now, at)?;
            services.guest_written(at, now.len() as u64);
            next = next.wrapping_add(run as u16);
            rest = later;
        }
        if let Some(tracked) = tracked {
            tracked.publishing(entries.iter().map(|(head, _)| *head));
        }
        let idx_at = GuestAddress(used_ring + USED_IDX_OFFSET);
        mem.store(next.to_le(), idx_at, Ordering::Release)?;
        services.guest_written(idx_at, 2);
        vq.set_next_used(next);
        if let Some(tracked) = tracked {
            tracked.published(entries.iter().map(|(head, _)| *head), next);
        }
        entries.clear();
        self.entries = entries;
        // The index must be visible before the driver's wish is read (pairs with the
        // driver's barrier between writing used_event and reading the used index).
        fence(Ordering::SeqCst);
        let avail_ring = vq.avail_ring();
        if vq.event_idx_enabled() {
            let used_event: u16 =
                u16::from_le(mem.load(GuestAddress(avail_ring + used_event_offset(vq.size())), Ordering::Acquire)?);
            Ok(need_event(used_event, next, old))
        } else {
            let flags: u16 = u16::from_le(mem.load(GuestAddress(avail_ring), Ordering::Acquire)?);
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::NoServices;
    use crate::queue::services::RecordingServices;
    use vm_memory::{Address, GuestMemoryMmap};

    /// Ring addresses of a 16-entry queue laid out apart (virtio-queue's mock lays the used
    /// ring over the avail ring's `used_event`).
    struct Layout {
        avail: GuestAddress,
        used: GuestAddress,
    }

    impl Layout {
        fn avail_addr(&self) -> GuestAddress {
            self.avail
        }
        fn used_addr(&self) -> GuestAddress {
            self.used
        }
    }

    fn setup(_mem: &GuestMemoryMmap) -> (Layout, Queue) {
        let layout = Layout { avail: GuestAddress(0x2000), used: GuestAddress(0x3000) };
        let mut queue = Queue::new(16).unwrap();
        queue.set_size(16);
        queue.set_desc_table_address(Some(0x1000), Some(0));
        queue.set_avail_ring_address(Some(0x2000), Some(0));
        queue.set_used_ring_address(Some(0x3000), Some(0));
        queue.set_ready(true);
        (layout, queue)
    }

    #[test]
    fn a_batch_across_the_rings_end_wraps_its_entries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mock, mut vq) = setup(&mem);
        vq.set_next_used(14);
        let services = RecordingServices::default();
        let mut batch = UsedBatch::default();
        for head in 0..4u16 {
            batch.push(head, u32::from(head) * 10);
        }
        batch.publish(&mut vq, &mem, &services).unwrap();
        let idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(idx, 18);
        for (slot, head) in [(14u64, 0u32), (15, 1), (0, 2), (1, 3)] {
            let id: u32 = mem.read_obj(mock.used_addr().unchecked_add(4 + 8 * slot)).unwrap();
            let len: u32 = mem.read_obj(mock.used_addr().unchecked_add(8 + 8 * slot)).unwrap();
            assert_eq!((id, len), (head, head * 10), "slot {slot}");
        }
        assert!(services.covers(mock.used_addr().0 + 4 + 8 * 14, 16), "the run before the end logged");
        assert!(services.covers(mock.used_addr().0 + 4, 16), "the run after the wrap logged");
        assert_eq!(vq.next_used(), 18);
    }

    #[test]
    fn a_batch_is_published_with_one_index_and_reported_written() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mock, mut vq) = setup(&mem);
        let services = RecordingServices::default();
        let mut batch = UsedBatch::default();
        batch.push(3, 100);
        batch.push(5, 7);
        assert!(batch.publish(&mut vq, &mem, &services).unwrap(), "no NO_INTERRUPT: notify");
        let idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(idx, 2);
        let id: u32 = mem.read_obj(mock.used_addr().unchecked_add(4 + 8)).unwrap();
        let len: u32 = mem.read_obj(mock.used_addr().unchecked_add(8 + 8)).unwrap();
        assert_eq!((id, len), (5, 7));
        assert!(services.covers(mock.used_addr().0 + 2, 2 + 16), "index and both entries logged");
    }

    #[test]
    fn no_interrupt_is_honoured_without_event_idx() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mock, mut vq) = setup(&mem);
        mem.write_obj(AVAIL_F_NO_INTERRUPT, mock.avail_addr()).unwrap();
        let mut batch = UsedBatch::default();
        batch.push(0, 1);
        assert!(!batch.publish(&mut vq, &mem, &NoServices).unwrap(), "the driver asked for no interrupt");
        mem.write_obj(0u16, mock.avail_addr()).unwrap();
        batch.push(1, 1);
        assert!(batch.publish(&mut vq, &mem, &NoServices).unwrap());
    }

    #[test]
    fn event_idx_notifies_only_when_used_event_is_crossed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mock, mut vq) = setup(&mem);
        vq.set_event_idx(true);
        let used_event_at = mock.avail_addr().unchecked_add(used_event_offset(16));
        mem.write_obj(5u16, used_event_at).unwrap();
        let mut batch = UsedBatch::default();
        for head in 0..3 {
            batch.push(head, 0);
        }
        assert!(!batch.publish(&mut vq, &mem, &NoServices).unwrap(), "used 0..3 does not reach used_event 5");
        for head in 3..6 {
            batch.push(head, 0);
        }
        assert!(batch.publish(&mut vq, &mem, &NoServices).unwrap(), "used 3..6 crosses used_event 5");
        batch.push(20, 0);
        assert!(!batch.publish(&mut vq, &mem, &NoServices).unwrap(), "a bad head is left out");
        let idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(idx, 6);
    }
}
