//! The guest's `Hal`: identity-mapped memory (physical = virtual), DMA pages from a bump
//! allocator over a static pool (never freed: the guest runs one self-test and exits).

use crate::boot;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use pvkit_guest_driver::hal::{DmaMemory, Hal, PAGE_SIZE, PhysAddr};

const POOL_PAGES: usize = 1024;

#[repr(C, align(4096))]
struct Pool([u8; POOL_PAGES * PAGE_SIZE]);

static mut POOL: Pool = Pool([0; POOL_PAGES * PAGE_SIZE]);
static NEXT_PAGE: AtomicUsize = AtomicUsize::new(0);

pub struct GuestHal;

// SAFETY: pool pages are handed out once each (an atomic bump pointer), page-aligned, zeroed
// (the pool is in .bss and never reused), and identity-mapped, so the physical address equals
// the pointer; device registers below 4 GiB are identity-mapped too, and higher ones are
// mapped on demand before their pointer is returned.
unsafe impl DmaMemory for GuestHal {
    fn dma_alloc(pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
        let first = NEXT_PAGE.fetch_add(pages, Ordering::SeqCst);
        if first + pages > POOL_PAGES {
            return None;
        }
        let base = (&raw mut POOL).cast::<u8>().wrapping_add(first * PAGE_SIZE);
        NonNull::new(base).map(|p| (p.as_ptr() as PhysAddr, p))
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) {}
}

// SAFETY: identity-mapped (physical = virtual); device registers below 4 GiB are
// mapped at boot and higher ones by `map_gib_region` before their pointer is returned.
unsafe impl Hal for GuestHal {
    fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        if !boot::map_gib_region(paddr) {
            crate::println!("tiny-guest: cannot map device memory at {paddr:#x}");
        }
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    fn virt_to_phys(vaddr: usize) -> PhysAddr {
        vaddr as PhysAddr
    }
}

/// Pages used so far.
pub fn pages_used() -> usize {
    NEXT_PAGE.load(Ordering::SeqCst).min(POOL_PAGES)
}
