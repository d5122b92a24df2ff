//! Guest-side virtio drivers for small kernels, and the hypercall shim through which a guest
//! rings its devices' doorbells.
//!
//! The crate is `no_std` and needs no allocator (rings have a fixed size, a const parameter,
//! and live in DMA pages the kernel's [`hal::Hal`] hands out); the `alloc` feature adds
//! conveniences and `async` a `Future` per block request. Constants and wire formats come from
//! [`pvkit_protocol`], which is re-exported.
//!
//! A kernel provides a [`hal::Hal`], finds a device (a [`transport::mmio::MmioTransport`] or a
//! [`transport::pci::PciTransport`]), and hands the transport to a driver, saying how each
//! queue rings its doorbell ([`hypercall::Shim::choose`] picks pvkit's doorbell ports when the
//! host announced them on the command line, else the transport's notify register):
//!
//! ```no_run
//! use core::ptr::NonNull;
//! use pvkit_guest_driver::device::blk::{BlkError, VirtIOBlk};
//! use pvkit_guest_driver::hal::{DmaMemory, Hal, PhysAddr};
//! use pvkit_guest_driver::hypercall::Shim;
//! use pvkit_guest_driver::transport::mmio::MmioTransport;
//!
//! struct KernelHal;
//!
//! // SAFETY: this kernel identity-maps all memory, and `alloc_pages` returns zeroed,
//! // physically contiguous, page-aligned pages that nothing else uses.
//! unsafe impl DmaMemory for KernelHal {
//!     fn dma_alloc(pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
//!         let ptr = alloc_pages(pages)?;
//!         Some((ptr.as_ptr() as PhysAddr, ptr))
//!     }
//!     unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) {
//!         free_pages(vaddr, pages)
//!     }
//! }
//!
//! // SAFETY: the kernel identity-maps all memory, device registers included, so
//! // both are casts.
//! unsafe impl Hal for KernelHal {
//!     fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
//!         NonNull::new(paddr as *mut u8).expect("device memory is never at address 0")
//!     }
//!     fn virt_to_phys(vaddr: usize) -> PhysAddr {
//!         vaddr as PhysAddr
//!     }
//! }
//! # fn alloc_pages(_pages: usize) -> Option<NonNull<u8>> { None }
//! # fn free_pages(_ptr: NonNull<u8>, _pages: usize) {}
//!
//! fn first_disk(cmdline: &str) -> Result<(), BlkError> {
//!     let window = KernelHal::mmio_phys_to_virt(0xfeb0_0000, 0x200);
//!     // SAFETY: the window is the virtio-mmio device in slot 0, driven by nothing else.
//!     let transport = unsafe { MmioTransport::new(window) }?;
//!     let mut disk = VirtIOBlk::<KernelHal, _, 64>::new(transport, |queue, register| {
//!         Shim::choose(cmdline, Some(0), queue, register)
//!     })?;
//!     let mut sector = [0u8; 512];
//!     disk.read_blocks(0, &mut sector)?;
//!     disk.write_blocks(1, &sector)?;
//!     disk.flush()
//! }
//! ```

#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub use pvkit_protocol as protocol;

pub mod device;
pub mod hal;
pub mod hypercall;
pub mod queue;
pub mod transport;

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests;
