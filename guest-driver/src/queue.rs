//! The driver side of a split virtqueue.
//!
//! - Descriptors come from a free list kept in the driver's own memory (never re-read from the
//!   ring, which the device can write), so a device cannot corrupt the driver's bookkeeping.
//! - A chain is readable buffers, then writable ones; with RING_INDIRECT_DESC it takes one ring
//!   descriptor pointing at a per-slot indirect table.
//! - Kicks are decided once per batch ([`VirtQueue::add`] several times, then
//!   [`VirtQueue::notify`]), with RING_EVENT_IDX's wrap-safe rule from `protocol::ring`.
//! - A used element whose id or length makes no sense is an error ([`QueueError::BadUsed`]),
//!   never undefined behaviour.

use crate::hal::{Dma, DmaMemory, Hal, PhysAddr};
use crate::hypercall::{Doorbell, Shim};
use crate::protocol::ring::{self, RingLayout, UsedElemRepr, desc_flags, need_event};
use crate::transport::{QueueRegisters, RingPlacement, Transport, TransportError};
use core::sync::atomic::{Ordering, fence};

/// Most descriptors in one indirect table (one chain with RING_INDIRECT_DESC).
pub const MAX_INDIRECT: usize = 16;

/// Errors from a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The transport refused.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The queue does not exist, is smaller than the size asked for, or the size is not a
    /// power of two within the driver's capacity.
    #[error("queue {queue} holds at most {max} entries; the driver needs {wanted}")]
    TooSmall {
        /// Queue index.
        queue: u16,
        /// The device's maximum.
        max: u16,
        /// The driver's size.
        wanted: u16,
    },
    /// DMA memory ran out.
    #[error("out of DMA memory for queue {0}")]
    NoMemory(u16),
    /// Not enough free descriptors for the chain.
    #[error("{needed} descriptors needed, {free} free")]
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Free descriptors.
        free: usize,
    },
    /// An empty chain, one longer than the queue, or a zero-length or too-long buffer.
    #[error("a chain of {0} buffers cannot be sent")]
    BadChain(usize),
    /// A device-readable buffer after a device-writable one.
    #[error("device-readable buffers must come before device-writable ones")]
    BadOrder,
    /// The device returned a used element that names no chain in flight or reports more bytes
    /// than the chain could take.
    #[error("the device returned used id {id} with length {len}, which makes no sense")]
    BadUsed {
        /// The id returned.
        id: u32,
        /// The length returned.
        len: u32,
    },
}

/// One buffer of a chain, by physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Physical address.
    pub addr: PhysAddr,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (else reads it).
    pub device_writes: bool,
}

/// A chain the device has finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The token [`VirtQueue::add`] returned for it.
    pub token: u16,
    /// Bytes the device wrote into its writable buffers.
    pub len: u32,
}

/// Which queue to set up, how big, and whether RING_EVENT_IDX was negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// Queue index on the device.
    pub index: u16,
    /// Entries: a power of two, at most the queue's `SIZE`.
    pub size: u16,
    /// Whether RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

/// Counters for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains added.
    pub added: u64,
    /// Doorbells rung.
    pub kicks: u64,
}

/// DMA pages a queue's rings and indirect tables take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueMemory {
    /// Pages for the descriptor table and the two rings, one block.
    pub ring_pages: usize,
    /// Pages for the per-slot indirect tables (0 without RING_INDIRECT_DESC).
    pub indirect_pages: usize,
}

impl QueueMemory {
    /// What a queue of `size` entries needs on a transport with `placement`.
    pub fn for_queue(size: u16, placement: RingPlacement, indirect: bool) -> QueueMemory {
        let bytes = RingLayout::contiguous_size(size, used_align(placement)) as usize;
        let indirect_bytes = if indirect { usize::from(size) * MAX_INDIRECT * ring::DESCRIPTOR_SIZE } else { 0 };
        QueueMemory {
            ring_pages: Dma::<NoDma>::pages_for(bytes),
            indirect_pages: Dma::<NoDma>::pages_for(indirect_bytes),
        }
    }
}

fn used_align(placement: RingPlacement) -> u64 {
    match placement {
        RingPlacement::Separate => ring::USED_ALIGN,
        RingPlacement::Contiguous { used_align } => used_align,
    }
}

/// A `DmaMemory` with none to give, for page arithmetic only.
struct NoDma;

// SAFETY: it never hands out memory, so there is nothing to promise about it.
unsafe impl DmaMemory for NoDma {
    fn dma_alloc(_pages: usize) -> Option<(PhysAddr, core::ptr::NonNull<u8>)> {
        None
    }
    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: core::ptr::NonNull<u8>, _pages: usize) {}
}

/// A split virtqueue of up to `SIZE` entries (a power of two: the driver's capacity, which
/// sizes its bookkeeping), with rings in DMA memory from `H`. [`VirtQueue::new`] uses all of
/// it; [`VirtQueue::with_memory`] a smaller power of two chosen at run time.
pub struct VirtQueue<H: DmaMemory, const SIZE: usize> {
    rings: Dma<H>,
    indirect: Option<Dma<H>>,
    layout: RingLayout,
    index: u16,
    doorbell: Shim,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    next: [u16; SIZE],
    chain_len: [u16; SIZE],
    writable: [u32; SIZE],
    in_flight: [bool; SIZE],
    avail_idx: u16,
    kicked_at: u16,
    last_used: u16,
    suppress_interrupts: bool,
    stats: QueueStats,
}

// SAFETY: the queue owns its DMA memory and refers to device registers only through its
// doorbell; nothing in it is tied to the creating thread.
unsafe impl<H: DmaMemory, const SIZE: usize> Send for VirtQueue<H, SIZE> {}

impl<H: DmaMemory, const SIZE: usize> VirtQueue<H, SIZE> {
    const SIZE_OK: () = assert!(SIZE.is_power_of_two() && SIZE <= ring::MAX_QUEUE_SIZE as usize);

    /// Sets up queue `index` of `transport` with `SIZE` entries: allocates its rings, gives
    /// them to the device and resolves its doorbell once (`choose` picks the mechanism from the
    /// transport's notify register). `indirect` and `event_idx` say whether those features
    /// were negotiated.
    pub fn new<T: Transport + ?Sized>(
        transport: &mut T,
        index: u16,
        indirect: bool,
        event_idx: bool,
        choose: impl FnOnce(crate::transport::NotifyTarget) -> Shim,
    ) -> Result<Self, QueueError> {
        let () = Self::SIZE_OK;
        let size = SIZE as u16;
        let memory = QueueMemory::for_queue(size, Transport::ring_placement(transport), indirect);
        let rings = Dma::<H>::new(memory.ring_pages).ok_or(QueueError::NoMemory(index))?;
        let indirect = match indirect {
            true => Some(Dma::<H>::new(memory.indirect_pages).ok_or(QueueError::NoMemory(index))?),
            false => None,
        };
        let setup = QueueSetup { index, size, event_idx };
        Self::with_memory(transport, setup, rings, indirect, choose)
    }

    /// Sets up a queue as [`VirtQueue::new`] does, with `setup.size` entries (a power of two,
    /// at most `SIZE`) in memory the caller provides: `rings` of at least
    /// [`QueueMemory::for_queue`]'s `ring_pages`, and `indirect` tables (RING_INDIRECT_DESC) of
    /// at least its `indirect_pages`.
    pub fn with_memory<T: QueueRegisters + ?Sized>(
        transport: &mut T,
        setup: QueueSetup,
        rings: Dma<H>,
        indirect: Option<Dma<H>>,
        choose: impl FnOnce(crate::transport::NotifyTarget) -> Shim,
    ) -> Result<Self, QueueError> {
        let () = Self::SIZE_OK;
        let QueueSetup { index, size, event_idx } = setup;
        let max = transport.max_queue_size(index);
        if max < size || !size.is_power_of_two() || usize::from(size) > SIZE {
            return Err(QueueError::TooSmall { queue: index, max: max.min(SIZE as u16), wanted: size });
        }
        let placement = transport.ring_placement();
        let memory = QueueMemory::for_queue(size, placement, indirect.is_some());
        let short = |dma: &Dma<H>, pages: usize| dma.len() < pages * crate::hal::PAGE_SIZE;
        if short(&rings, memory.ring_pages) || indirect.as_ref().is_some_and(|t| short(t, memory.indirect_pages)) {
            return Err(QueueError::NoMemory(index));
        }
        let layout = RingLayout::contiguous(rings.paddr(), size, used_align(placement))
            .map_err(|_| QueueError::Transport(TransportError::BadLayout(index)))?;
        let target = transport.notify_target(index)?;
        transport.queue_set(index, &layout)?;
        let mut next = [0u16; SIZE];
        for (i, n) in next.iter_mut().enumerate().take(usize::from(size)) {
            *n = (i as u16).wrapping_add(1);
        }
        Ok(VirtQueue {
            rings,
            indirect,
            layout,
            index,
            doorbell: choose(target),
            event_idx,
            free_head: 0,
            num_free: size,
            next,
            chain_len: [0; SIZE],
            writable: [0; SIZE],
            in_flight: [false; SIZE],
            avail_idx: 0,
            kicked_at: 0,
            last_used: 0,
            suppress_interrupts: false,
            stats: QueueStats::default(),
        })
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// The queue's index on its device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The doorbell mechanism in use.
    pub fn doorbell(&self) -> Shim {
        self.doorbell
    }

    /// The token the next [`VirtQueue::add`] will return (the head of the free list).
    pub fn peek_free_head(&self) -> u16 {
        self.free_head
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.num_free.into()
    }

    /// Chains the device holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|f| **f).count()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Where the rings are (physical addresses).
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// A pointer `offset` bytes into the ring memory (offsets computed from the layout, inside
    /// the allocation).
    fn ring_ptr(&self, phys: u64) -> *mut u8 {
        let offset = (phys - self.rings.paddr()) as usize;
        debug_assert!(offset < self.rings.len());
        self.rings.vaddr().as_ptr().wrapping_add(offset)
    }

    fn write_descriptor(table: *mut u8, slot: usize, repr: &ring::DescriptorRepr) {
        let mut raw = [0u8; ring::DESCRIPTOR_SIZE];
        // The buffer is exactly one descriptor long.
        if let Ok(mut desc) = ring::Descriptor::new_checked(&mut raw[..]) {
            repr.emit(&mut desc);
        }
        let at = table.wrapping_add(slot * ring::DESCRIPTOR_SIZE);
        for (i, byte) in raw.iter().enumerate() {
            // SAFETY: `table` points at a descriptor table with room for `slot` (callers pass
            // slots below its length), in DMA memory the queue owns.
            unsafe { at.add(i).write_volatile(*byte) };
        }
    }

    fn write_u16(&self, phys: u64, value: u16) {
        // SAFETY: `phys` lies inside the rings (computed from the layout) and is 2-aligned.
        unsafe { self.ring_ptr(phys).cast::<u16>().write_volatile(value.to_le()) }
    }

    fn read_u16(&self, phys: u64) -> u16 {
        // SAFETY: as in `write_u16`.
        u16::from_le(unsafe { self.ring_ptr(phys).cast::<u16>().read_volatile() })
    }

    fn read_u32(&self, phys: u64) -> u32 {
        // SAFETY: as in `write_u16`, 4-aligned.
        u32::from_le(unsafe { self.ring_ptr(phys).cast::<u32>().read_volatile() })
    }

    /// Adds a chain (readable buffers first, then writable ones) to the available ring without
    /// ringing the doorbell; returns its token. Call [`VirtQueue::notify`] after a batch.
    ///
    /// # Safety
    ///
    /// The buffers must stay valid, and the driver must not touch the writable ones, until the
    /// chain comes back from [`VirtQueue::pop_used`].
    pub unsafe fn add(&mut self, buffers: &[Buffer]) -> Result<u16, QueueError> {
        let count = buffers.len();
        let fits = count <= usize::from(self.size()) || (self.indirect.is_some() && count <= MAX_INDIRECT);
        if count == 0 || !fits || buffers.iter().any(|b| b.len == 0) {
            return Err(QueueError::BadChain(count));
        }
        if buffers.windows(2).any(|w| w[0].device_writes && !w[1].device_writes) {
            return Err(QueueError::BadOrder);
        }
        let use_indirect = self.indirect.is_some() && count > 1 && count <= MAX_INDIRECT;
        let needed = if use_indirect { 1 } else { count };
        if needed > usize::from(self.num_free) {
            return Err(QueueError::Full { needed, free: self.num_free.into() });
        }
        let head = self.free_head;
        let table = self.ring_ptr(self.layout.desc);
        if let (true, Some(indirect)) = (use_indirect, &self.indirect) {
            let tables =
                indirect.vaddr().as_ptr().wrapping_add(usize::from(head) * MAX_INDIRECT * ring::DESCRIPTOR_SIZE);
            for (i, buf) in buffers.iter().enumerate() {
                let last = i + 1 == count;
                let repr = ring::DescriptorRepr {
                    addr: buf.addr,
                    len: buf.len,
                    flags: if buf.device_writes { desc_flags::WRITE } else { 0 }
                        | if last { 0 } else { desc_flags::NEXT },
                    next: if last { 0 } else { (i + 1) as u16 },
                };
                Self::write_descriptor(tables, i, &repr);
            }
            let table_phys = indirect.paddr() + (usize::from(head) * MAX_INDIRECT * ring::DESCRIPTOR_SIZE) as u64;
            let repr = ring::DescriptorRepr {
                addr: table_phys,
                len: (count * ring::DESCRIPTOR_SIZE) as u32,
                flags: desc_flags::INDIRECT,
                next: 0,
            };
            Self::write_descriptor(table, usize::from(head), &repr);
            self.free_head = self.next[usize::from(head)];
        } else {
            let mut slot = head;
            for (i, buf) in buffers.iter().enumerate() {
                let last = i + 1 == count;
                let next = self.next[usize::from(slot)];
                let repr = ring::DescriptorRepr {
                    addr: buf.addr,
                    len: buf.len,
                    flags: if buf.device_writes { desc_flags::WRITE } else { 0 }
                        | if last { 0 } else { desc_flags::NEXT },
                    next: if last { 0 } else { next },
                };
                Self::write_descriptor(table, usize::from(slot), &repr);
                if last {
                    self.free_head = next;
                } else {
                    slot = next;
                }
            }
        }
        self.num_free -= needed as u16;
        let h = usize::from(head);
        self.chain_len[h] = needed as u16;
        self.writable[h] = buffers.iter().filter(|b| b.device_writes).map(|b| b.len).fold(0u32, u32::saturating_add);
        self.in_flight[h] = true;
        let slot = u64::from(self.avail_idx % self.size());
        self.write_u16(self.layout.avail + 4 + 2 * slot, head);
        // The descriptors and the ring entry must be visible before the index moves.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.layout.avail + 2, self.avail_idx);
        self.stats.added += 1;
        Ok(head)
    }

    /// Whether the device wants a kick for the chains added since the last decision (read
    /// once per batch: RING_EVENT_IDX's `avail_event`, or the NO_NOTIFY flag).
    pub fn kick_needed(&mut self) -> bool {
        let (old, new) = (self.kicked_at, self.avail_idx);
        if old == new {
            return false;
        }
        self.kicked_at = new;
        // The new index must be visible before the device's wish is read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event = self.read_u16(self.layout.used + ring::avail_event_offset(self.size()));
            need_event(avail_event, new, old)
        } else {
            self.read_u16(self.layout.used) & ring::USED_F_NO_NOTIFY == 0
        }
    }

    /// Rings the doorbell if the device wants it for the chains added since the last call.
    /// Returns whether it rang.
    pub fn notify(&mut self) -> bool {
        if self.kick_needed() {
            self.doorbell.ring(self.index);
            self.stats.kicks += 1;
            return true;
        }
        false
    }

    /// Whether the device has returned a chain not yet popped.
    pub fn has_used(&self) -> bool {
        self.read_u16(self.layout.used + 2) != self.last_used
    }

    /// Takes the next chain the device returned, if any, checking it makes sense.
    pub fn pop_used(&mut self) -> Result<Option<Used>, QueueError> {
        if !self.has_used() {
            return Ok(None);
        }
        // Read the element only after seeing the index that published it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size());
        let at = self.layout.used + 4 + ring::USED_ELEM_SIZE as u64 * slot;
        let elem = UsedElemRepr { id: self.read_u32(at), len: self.read_u32(at + 4) };
        self.last_used = self.last_used.wrapping_add(1);
        self.update_used_event();
        let id = elem.id as usize;
        let bad = QueueError::BadUsed { id: elem.id, len: elem.len };
        if elem.check(self.size(), u32::MAX).is_err() || !self.in_flight[id] {
            return Err(bad);
        }
        let writable = self.writable[id];
        // A chain with nothing to write: some devices report the bytes they read (against the
        // specification); harmless, so reported as 0 rather than refused.
        let len = if writable == 0 { 0 } else { elem.len };
        if len > writable {
            self.recycle(id as u16);
            return Err(bad);
        }
        self.recycle(id as u16);
        Ok(Some(Used { token: id as u16, len }))
    }

    /// Returns a chain's descriptors to the free list (walking the driver's own links).
    fn recycle(&mut self, head: u16) {
        let h = usize::from(head);
        let count = self.chain_len[h];
        let mut last = head;
        for _ in 1..count {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += count;
        self.in_flight[h] = false;
        self.chain_len[h] = 0;
        self.writable[h] = 0;
    }

    /// Stops (or resumes) asking the device for interrupts, for a driver that polls.
    pub fn suppress_interrupts(&mut self, suppress: bool) {
        self.suppress_interrupts = suppress;
        if self.event_idx {
            self.update_used_event();
        } else {
            self.write_u16(self.layout.avail, if suppress { ring::AVAIL_F_NO_INTERRUPT } else { 0 });
        }
    }

    fn update_used_event(&mut self) {
        if self.event_idx {
            // Suppressed: keep the wish half a ring-index space ahead, so the device skips
            // the signal; else ask for the very next completion.
            let event = if self.suppress_interrupts { self.last_used.wrapping_add(0x8000) } else { self.last_used };
            self.write_u16(self.layout.avail + ring::used_event_offset(self.size()), event);
        }
    }
}

/// The physical address of a buffer in the driver's memory.
pub fn buffer_of<H: Hal>(data: &[u8], device_writes: bool) -> Buffer {
    Buffer { addr: H::virt_to_phys(data.as_ptr() as usize), len: data.len() as u32, device_writes }
}
