//! Guest-side virtio drivers for small kernels, and the hypercall shim through which a guest
//! rings its devices' doorbells.
//!
//! The crate is `no_std` and needs no allocator; the `alloc` feature adds conveniences.
//! Constants and wire formats come from [`pvkit_protocol`], which is re-exported.

#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
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
