//! The queue-worker core every backend stands on.
//!
//! A device keeps only its own logic (a block request to the engine, a frame to the network
//! side, console bytes to a port); everything about serving virtqueues is here, once:
//!
//! - [`quiesce`]: one stop protocol. A worker enters a pass through its gate; a disconnect
//!   stops the connection's workers and waits until none is inside a pass, an exit closes the
//!   gates for good.
//! - [`worker`]: one worker loop. Notifications off, passes until idle (with `--poll-us`,
//!   polling that long after the last work), notifications on, and again if the driver added
//!   buffers meanwhile. The memory map is handed to each pass as the atomic holder, so a pass
//!   loads a map *after* it popped a chain (DESIGN.md, rule 1).
//! - [`ring`]: popping chains with the ring checked. An available index more than the ring
//!   size ahead marks the queue broken: logged once, counted, not served again until the
//!   frontend stops it (GET_VRING_BASE); the other queues and the next connection go on.
//! - [`split_ring`]: the rings read through mappings translated once per pass: heads taken in
//!   bursts with one read of the available index, chains walked without a lookup per
//!   descriptor.
//! - [`chain`]: one walk of a descriptor chain into readable and writable segments, with a byte
//!   cap, and copies in and out of them.
//! - [`used`]: one used-publication and notification policy: entries written, the used index
//!   stored once per batch, RING_EVENT_IDX's `used_event` or the NO_INTERRUPT flag honoured.
//! - [`services`]: the hooks where later services attach once for every device: before a
//!   request or frame is served, after it completes, and on every write into guest memory.
//! - [`dirty_log`]: dirty-page logging for live migration, the first service: it listens on
//!   `guest_written` in front of whatever services are attached.
//! - [`inflight`]: in-flight I/O tracking (INFLIGHT_SHMFD): heads taken and not yet used are
//!   kept in an area the frontend holds across backend restarts, and a restarted ring
//!   resubmits them (walked from their heads by [`split_ring`]) before anything new.
//! - [`device_core`]: what every `VhostUserBackend` implementation shares (the memory slot,
//!   the exit events, the stop flag, broken queues) behind one [`DeviceCore`].

pub mod chain;
pub mod device_core;
pub mod dirty_log;
pub mod held;
pub mod inflight;
mod inflight_resume;
#[cfg(test)]
mod inflight_tests;
pub mod quiesce;
pub mod ring;
pub mod services;
#[cfg(test)]
mod services_tests;
pub mod split_ring;
#[cfg(test)]
mod tests;
pub mod throttle;
pub mod used;
pub mod worker;

pub use chain::{ChainBuffers, ChainError, Segment};
pub use device_core::DeviceCore;
pub use quiesce::Gates;
pub use ring::RingError;
pub use services::{NoServices, QueueServices, Verdict};
pub use used::UsedBatch;
pub use worker::{PassError, QueueService, Rearm, WorkerQueue};

/// The guest memory every backend maps (dirty pages are logged through the services' hooks,
/// not a bitmap in the memory, see [`dirty_log`]).
pub type Memory = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>;
