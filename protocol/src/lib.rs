//! The one place where both sides of pvkit's paravirtual interface are defined.
//!
//! Guest drivers (`pvkit-guest-driver`), device backends (`pvkit-host-devices`) and the VMM
//! (`pvkit-vmm-glue`) all take their constants, layouts and wire formats from here, so they
//! cannot disagree.
//!
//! Every wire format comes in two halves, in the style of smoltcp:
//! - a checked *view* over bytes (`RequestHeader<T: AsRef<[u8]>>`, ...), built only through
//!   `new_checked`, whose accessors therefore never panic;
//! - a plain *representation* (`RequestHeaderRepr`, ...) with `parse` (view to value, rejecting
//!   reserved or out-of-range fields with a typed error) and `emit` (value to bytes).
//!
//! The crate is `no_std`, allocates nothing and contains no `unsafe` code.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

mod bytes;

pub mod abi;
pub mod blk;
pub mod console;
pub mod inflight;
pub mod mmio;
pub mod nbd;
pub mod net;
pub mod ring;
pub mod virtio;

pub use bytes::TruncatedError;
