//! What the crate needs from the kernel it runs in: memory a device can reach by DMA, and the
//! translation between the kernel's virtual addresses and the physical addresses a device sees.

use core::ptr::NonNull;

/// A physical (device-visible) address.
pub type PhysAddr = u64;

/// Size of the pages [`DmaMemory::dma_alloc`] counts in.
pub const PAGE_SIZE: usize = 4096;

/// Memory a device can reach by DMA: all a queue needs from its kernel.
///
/// # Safety
///
/// Implementors promise that [`DmaMemory::dma_alloc`] returns `pages` pages of zeroed memory,
/// physically contiguous, aligned to [`PAGE_SIZE`], that the device can read and write at the
/// returned physical address and the driver at the returned virtual pointer, and that nothing
/// else uses until [`DmaMemory::dma_dealloc`] gives it back.
pub unsafe trait DmaMemory {
    /// Allocates `pages` zeroed, physically contiguous pages for rings and request headers;
    /// `None` when out of memory.
    fn dma_alloc(pages: usize) -> Option<(PhysAddr, NonNull<u8>)>;

    /// Gives back memory from [`DmaMemory::dma_alloc`] (or given to [`Dma::adopt`]).
    ///
    /// # Safety
    ///
    /// `paddr`, `vaddr` and `pages` are exactly what one `dma_alloc` call returned and took
    /// (or one `Dma::adopt` call was given), and neither the driver nor the device uses the
    /// memory any more.
    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize);
}

/// The kernel services the drivers use: DMA memory, device registers and address translation.
///
/// # Safety
///
/// Implementors promise, besides [`DmaMemory`]'s contract:
/// - [`Hal::mmio_phys_to_virt`] returns a pointer through which `size` bytes of device registers
///   at `paddr` can be accessed with volatile reads and writes (mapped uncached where the
///   architecture needs it);
/// - [`Hal::virt_to_phys`] returns the physical address of the byte at `vaddr`, for buffers the
///   drivers hand to a device; the drivers only pass buffers that the caller promised (in the
///   `unsafe` functions that take them) to be physically contiguous.
///
/// An identity-mapped kernel implements all of this with casts; a paged kernel with its page
/// tables and a DMA allocator.
pub unsafe trait Hal: DmaMemory {
    /// A pointer to `size` bytes of device registers at physical address `paddr`.
    fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8>;

    /// The physical address of the byte at virtual address `vaddr`.
    fn virt_to_phys(vaddr: usize) -> PhysAddr;
}

/// Memory from [`DmaMemory::dma_alloc`], given back when dropped.
pub struct Dma<H: DmaMemory> {
    paddr: PhysAddr,
    vaddr: NonNull<u8>,
    pages: usize,
    _hal: core::marker::PhantomData<H>,
}

impl<H: DmaMemory> Dma<H> {
    /// Allocates `pages` pages; `None` when out of memory (or for zero pages).
    pub fn new(pages: usize) -> Option<Dma<H>> {
        if pages == 0 {
            return None;
        }
        let (paddr, vaddr) = H::dma_alloc(pages)?;
        Some(Dma { paddr, vaddr, pages, _hal: core::marker::PhantomData })
    }

    /// Takes `pages` pages the caller allocated itself (a host tool carving rings out of memory
    /// it shares with a device); `None` for zero pages. They go back through
    /// [`DmaMemory::dma_dealloc`] when dropped.
    ///
    /// # Safety
    ///
    /// The memory meets [`DmaMemory::dma_alloc`]'s promises (zeroed, page-aligned, reachable by
    /// the device at `paddr` and by the driver at `vaddr`, used by nothing else) until
    /// `H::dma_dealloc` is called with these three values.
    pub unsafe fn adopt(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> Option<Dma<H>> {
        if pages == 0 {
            return None;
        }
        Some(Dma { paddr, vaddr, pages, _hal: core::marker::PhantomData })
    }

    /// Pages needed for `bytes` bytes.
    pub const fn pages_for(bytes: usize) -> usize {
        bytes.div_ceil(PAGE_SIZE)
    }

    /// The device-visible address.
    pub fn paddr(&self) -> PhysAddr {
        self.paddr
    }

    /// The driver's pointer.
    pub fn vaddr(&self) -> NonNull<u8> {
        self.vaddr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Always false: a `Dma` holds at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memory as bytes, for the driver's own use (split it to lend parts to requests).
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: `DmaMemory::dma_alloc` (an unsafe trait's contract) or the caller of
        // `adopt` (an unsafe fn's contract) gave `pages` pages at `vaddr`,
        // valid for reads and writes and used by nothing else until `dma_dealloc` in drop; the
        // `&mut self` borrow keeps this the only slice of them while it lives.
        unsafe { core::slice::from_raw_parts_mut(self.vaddr.as_ptr(), self.len()) }
    }
}

impl<H: DmaMemory> Drop for Dma<H> {
    fn drop(&mut self) {
        // SAFETY: the three values came from one dma_alloc (or adopt) call, and this owner is the only
        // user; whoever gave the memory to a device (a queue) has stopped it before dropping.
        unsafe { H::dma_dealloc(self.paddr, self.vaddr, self.pages) };
    }
}

// SAFETY: `Dma` owns its memory exclusively (no aliasing handle exists), so moving it to
// another thread moves that ownership.
unsafe impl<H: DmaMemory> Send for Dma<H> {}
