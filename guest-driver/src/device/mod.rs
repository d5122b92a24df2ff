//! Device drivers: block, net and console, each over any [`crate::transport::Transport`].

pub mod blk;
pub mod console;
pub mod net;

use crate::transport::Transport;

/// Resets a device (its queues stop) — called before a driver's queues free their memory.
pub(crate) fn reset<T: Transport + ?Sized>(transport: &mut T) {
    transport.set_status(0);
}
