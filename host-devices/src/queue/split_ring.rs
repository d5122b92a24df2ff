//! A split ring read through host mappings translated once per pass.
//!
//! virtio-queue's iterators translate a guest address for every access: the available index,
//! every head, every descriptor. On a busy ring those translations (a region lookup each) and
//! the re-read available index were a third of a net worker's time. [`SplitRing`] translates
//! the descriptor table and the available ring once, when a pass starts, and reads heads and
//! descriptors straight from the mapping; a table that is not inside one region (or not in
//! guest memory at all) is read through guest addresses instead, so the reader is correct for
//! any layout and fast for the usual one.
//!
//! A chain is walked as virtio-queue walks it (virtio 1.2, 2.7.5.3): at most the ring's size
//! of descriptors, one level of indirect table whose length is a multiple of 16, the walk
//! ending at a descriptor it cannot read or an index outside its table, and no more than
//! 2^32 bytes in all. `tests` checks the two walks agree on random tables.

use super::chain::{ChainBuffers, ChainError};
use super::ring::RingError;
use std::sync::atomic::Ordering;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Bytes of one descriptor in a table.
const DESCRIPTOR_SIZE: usize = std::mem::size_of::<Descriptor>();
/// Offset of the available index in the available ring (after `flags`).
const AVAIL_IDX_OFFSET: usize = 2;
/// Offset of the first entry of the available ring.
const AVAIL_RING_OFFSET: usize = 4;

/// A table in guest memory: mapped once when it lies in one region, else read by address.
#[derive(Clone, Copy, Debug)]
enum Table<'m> {
    Mapped(VolatileSlice<'m, ()>),
    Guest(GuestAddress),
}

impl<'m> Table<'m> {
    fn new(mem: &'m GuestMemoryMmap, addr: GuestAddress, len: usize) -> Table<'m> {
        match mem.get_slice(addr, len) {
            Ok(slice) => Table::Mapped(slice),
            Err(_) => Table::Guest(addr),
        }
    }

    fn read<T: ByteValued>(self, mem: &GuestMemoryMmap, offset: usize) -> Option<T> {
        match self {
            Table::Mapped(slice) => slice.read_obj(offset).ok(),
            Table::Guest(base) => mem.read_obj(base.checked_add(offset as u64)?).ok(),
        }
    }

    fn load_u16(self, mem: &GuestMemoryMmap, offset: usize) -> Option<u16> {
        match self {
            Table::Mapped(slice) => slice.load::<u16>(offset, Ordering::Acquire).ok(),
            Table::Guest(base) => mem.load::<u16>(base.checked_add(offset as u64)?, Ordering::Acquire).ok(),
        }
        .map(u16::from_le)
    }
}

/// One queue's descriptor table and available ring, translated for a pass. Built after the
/// memory map was loaded, used within the pass that loaded it.
#[derive(Clone, Copy, Debug)]
pub struct SplitRing<'m> {
    mem: &'m GuestMemoryMmap,
    descriptors: Table<'m>,
    avail: Table<'m>,
    avail_at: u64,
    size: u16,
}

impl<'m> SplitRing<'m> {
    /// The rings of `queue` in `mem`; `None` when the queue is not ready (or has no entries).
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Option<SplitRing<'m>> {
        let size = queue.size();
        if !queue.ready() || size == 0 {
            return None;
        }
        let entries = usize::from(size);
        Some(SplitRing {
            mem,
            descriptors: Table::new(mem, GuestAddress(queue.desc_table()), entries * DESCRIPTOR_SIZE),
            avail: Table::new(mem, GuestAddress(queue.avail_ring()), AVAIL_RING_OFFSET + 2 * entries),
            avail_at: queue.avail_ring(),
            size,
        })
    }

    /// The memory the rings (and buffers) are in.
    pub fn memory(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    /// The driver's available index (an acquire load: heads and descriptors it published
    /// before are visible after it).
    pub fn avail_idx(&self) -> Result<u16, RingError> {
        self.avail.load_u16(self.mem, AVAIL_IDX_OFFSET).ok_or(RingError::Unreadable(self.avail_at))
    }

    /// How many chains wait after the device's `next` available index, checked against the
    /// ring's size.
    pub fn waiting(&self, next: u16) -> Result<u16, RingError> {
        let avail = self.avail_idx()?;
        let ahead = avail.wrapping_sub(next);
        if ahead > self.size {
            return Err(RingError::AvailIndex { avail, next, ahead, size: self.size });
        }
        Ok(ahead)
    }

    /// The head in the available ring's entry for index `at` (read after [`Self::waiting`]
    /// saw it published), checked to be a descriptor of the ring.
    pub fn head(&self, at: u16) -> Result<u16, RingError> {
        let offset = AVAIL_RING_OFFSET + 2 * usize::from(at % self.size);
        let head = self.avail.load_u16(self.mem, offset).ok_or(RingError::Unreadable(self.avail_at))?;
        if head >= self.size {
            return Err(RingError::HeadOutOfRange { head, size: self.size });
        }
        Ok(head)
    }

    /// Walks the chain at `head` into `buffers`, refusing more than `cap` bytes in all.
    pub fn walk(&self, head: u16, cap: u64, buffers: &mut ChainBuffers) -> Result<(), ChainError> {
        buffers.begin(head);
        let mut walk = Walk { table: self.descriptors, table_size: self.size, next: head, ttl: self.size };
        let (mut indirect, mut total, mut count) = (false, 0u32, 0usize);
        while walk.ttl > 0 && walk.next < walk.table_size {
            let offset = usize::from(walk.next) * DESCRIPTOR_SIZE;
            let Some(desc) = walk.table.read::<Descriptor>(self.mem, offset) else { break };
            if desc.refers_to_indirect_table() {
                match self.indirect_table(&desc, indirect) {
                    Some(table) => (walk, indirect) = (table, true),
                    None => break,
                }
                continue;
            }
            // A chain longer than 2^32 bytes ends there (virtio 1.2, 2.7.5.2).
            let Some(sum) = total.checked_add(desc.len()) else { break };
            total = sum;
            if desc.has_next() {
                walk.next = desc.next();
                walk.ttl -= 1;
            } else {
                walk.ttl = 0;
            }
            buffers.add(desc.addr(), u64::from(desc.len()), desc.is_write_only(), cap)?;
            count += 1;
        }
        if count == 0 {
            return Err(ChainError::Malformed);
        }
        Ok(())
    }

    /// Where the walk goes on after an indirect descriptor, or `None` where it ends: an
    /// indirect table inside one, or a length that is no whole number of descriptors.
    fn indirect_table(&self, desc: &Descriptor, inside_one: bool) -> Option<Walk<'m>> {
        let len = desc.len() as usize;
        if inside_one || !len.is_multiple_of(DESCRIPTOR_SIZE) {
            return None;
        }
        let entries = u16::try_from(len / DESCRIPTOR_SIZE).ok()?;
        let table = Table::new(self.mem, desc.addr(), len);
        Some(Walk { table, table_size: entries, next: 0, ttl: entries })
    }
}

/// Where a chain walk is: its table, the table's size, the next index, descriptors left.
struct Walk<'m> {
    table: Table<'m>,
    table_size: u16,
    next: u16,
    ttl: u16,
}

/// Takes up to `limit` heads from `queue` in one burst: the available index is read once, the
/// heads up to it are appended to `into` and the device's next index moves past them. A broken
/// ring takes what came before the first bad entry and returns the error with them.
pub fn take_heads(
    queue: &mut Queue,
    ring: &SplitRing<'_>,
    into: &mut Vec<u16>,
    limit: usize,
) -> Result<usize, RingError> {
    let next = queue.next_avail();
    let waiting = usize::from(ring.waiting(next)?).min(limit);
    let before = into.len();
    let mut result = Ok(());
    for i in 0..waiting {
        match ring.head(next.wrapping_add(i as u16)) {
            Ok(head) => into.push(head),
            Err(error) => {
                result = Err(error);
                break;
            }
        }
    }
    let taken = into.len() - before;
    queue.set_next_avail(next.wrapping_add(taken as u16));
    result.map(|()| taken)
}

#[cfg(test)]
#[path = "split_ring_tests.rs"]
mod tests;
