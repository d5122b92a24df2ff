//! In-flight I/O tracking for split rings, as the vhost-user specification's "Inflight I/O
//! tracking" section has it (protocol feature INFLIGHT_SHMFD, messages GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD).
//!
//! The backend keeps, in memory shared with the frontend, which descriptor heads it took from
//! the available ring and has not yet returned in the used ring. The frontend keeps that memory
//! across a backend crash and hands it to the restarted backend, which resubmits exactly those
//! requests, in the order it took them.
//!
//! The shared area holds one region per queue, each [`queue_region_size`] bytes:
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | `features` (u64) | 0 |
//! | 8 | `version` (u16) | [`REGION_VERSION`]; 0 is a region never used |
//! | 10 | `desc_num` (u16) | entries in `desc` (the queue size) |
//! | 12 | `last_batch_head` (u16) | first head of the last used batch |
//! | 14 | `used_idx` (u16) | the used index once the last batch is marked done |
//! | 16 | `desc[desc_num]` | one [`DESC_STATE_SIZE`]-byte state per descriptor |
//!
//! and each descriptor state: `inflight` (u8, 0 or 1) at 0, padding, `next` (u16, the batch
//! list) at 6, `counter` (u64, the order heads were taken in) at 8.

use crate::bytes::{TruncatedError, check_len, get_u16, get_u64, set_u16, set_u64};
use crate::ring::MAX_QUEUE_SIZE;

/// Bytes of the GET_INFLIGHT_FD / SET_INFLIGHT_FD payload (`VhostUserInflight`, padded).
pub const MESSAGE_SIZE: usize = 24;
/// The region version this layout describes.
pub const REGION_VERSION: u16 = 1;
/// Bytes before a queue region's descriptor states.
pub const QUEUE_HEADER_SIZE: u64 = 16;
/// Bytes of one descriptor state.
pub const DESC_STATE_SIZE: u64 = 16;
/// Alignment of each queue region in the shared area.
pub const QUEUE_REGION_ALIGN: u64 = 64;
/// The most queues one area describes (more than any device has).
pub const MAX_QUEUES: u16 = 1024;

/// Offsets in a queue region's header.
pub mod header {
    /// `features` (u64).
    pub const FEATURES: u64 = 0;
    /// `version` (u16).
    pub const VERSION: u64 = 8;
    /// `desc_num` (u16).
    pub const DESC_NUM: u64 = 10;
    /// `last_batch_head` (u16).
    pub const LAST_BATCH_HEAD: u64 = 12;
    /// `used_idx` (u16).
    pub const USED_IDX: u64 = 14;
}

/// Offsets in a descriptor state.
pub mod desc_state {
    /// `inflight` (u8): 1 while the head is taken and not yet used.
    pub const INFLIGHT: u64 = 0;
    /// `next` (u16): the next head of the last used batch.
    pub const NEXT: u64 = 6;
    /// `counter` (u64): when the head was taken, by the queue's counter.
    pub const COUNTER: u64 = 8;
}

/// The bytes one queue's region takes for a queue of `queue_size` entries (a multiple of
/// [`QUEUE_REGION_ALIGN`]).
pub const fn queue_region_size(queue_size: u16) -> u64 {
    let raw = QUEUE_HEADER_SIZE + DESC_STATE_SIZE * queue_size as u64;
    raw.div_ceil(QUEUE_REGION_ALIGN) * QUEUE_REGION_ALIGN
}

/// Where the state of descriptor `head` starts within its queue's region.
pub const fn desc_state_offset(head: u16) -> u64 {
    QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head as u64
}

/// Errors from this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    /// The payload is shorter than the message.
    #[error(transparent)]
    Truncated(#[from] TruncatedError),
    /// A queue count of zero or beyond [`MAX_QUEUES`].
    #[error("an in-flight area for {0} queues (1 to {MAX_QUEUES} allowed)")]
    QueueCount(u16),
    /// A queue size that is zero, not a power of two, or too large.
    #[error("an in-flight area for queues of {0} entries (a power of two up to {MAX_QUEUE_SIZE})")]
    QueueSize(u16),
    /// The area announced cannot hold the regions of its queues.
    #[error("an in-flight area of {size} bytes cannot hold {queues} queue regions of {each} bytes")]
    TooSmall {
        /// Bytes announced.
        size: u64,
        /// Queues it should describe.
        queues: u16,
        /// Bytes each queue's region takes.
        each: u64,
    },
}

/// The GET_INFLIGHT_FD / SET_INFLIGHT_FD payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InflightRepr {
    /// Bytes of the shared area.
    pub mmap_size: u64,
    /// Where the area starts in its file.
    pub mmap_offset: u64,
    /// Queues it describes.
    pub num_queues: u16,
    /// Entries of each queue's descriptor state array.
    pub queue_size: u16,
}

impl InflightRepr {
    /// The payload's fields, unchecked beyond their presence (GET_INFLIGHT_FD's request
    /// carries only the counts; see [`InflightRepr::check_counts`] and
    /// [`InflightRepr::check_area`]).
    pub fn parse(payload: &[u8]) -> Result<InflightRepr, InflightError> {
        // The C struct is 20 bytes of fields padded to 24; the padding need not be sent.
        check_len("VhostUserInflight", payload, 20)?;
        Ok(InflightRepr {
            mmap_size: get_u64(payload, 0),
            mmap_offset: get_u64(payload, 8),
            num_queues: get_u16(payload, 16),
            queue_size: get_u16(payload, 18),
        })
    }

    /// The payload's bytes.
    pub fn emit(&self) -> [u8; MESSAGE_SIZE] {
        let mut out = [0u8; MESSAGE_SIZE];
        set_u64(&mut out, 0, self.mmap_size);
        set_u64(&mut out, 8, self.mmap_offset);
        set_u16(&mut out, 16, self.num_queues);
        set_u16(&mut out, 18, self.queue_size);
        out
    }

    /// Checks the queue count and size a frontend asks an area for.
    pub fn check_counts(&self) -> Result<(), InflightError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(InflightError::QueueCount(self.num_queues));
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(InflightError::QueueSize(self.queue_size));
        }
        Ok(())
    }

    /// The bytes the regions of all queues take.
    pub const fn regions_size(&self) -> u64 {
        queue_region_size(self.queue_size) * self.num_queues as u64
    }

    /// Checks that the announced area holds the regions of its queues (its file's size is
    /// the backend's to check).
    pub fn check_area(&self) -> Result<(), InflightError> {
        self.check_counts()?;
        let each = queue_region_size(self.queue_size);
        if self.mmap_size < self.regions_size() {
            return Err(InflightError::TooSmall { size: self.mmap_size, queues: self.num_queues, each });
        }
        Ok(())
    }

    /// Where queue `queue`'s region starts in the area.
    pub const fn queue_offset(&self, queue: u16) -> u64 {
        queue_region_size(self.queue_size) * queue as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_and_hold_header_and_states() {
        assert_eq!(queue_region_size(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_size(1), 64);
        for size in [1u16, 2, 64, 256, 1024, 32768] {
            let bytes = queue_region_size(size);
            assert_eq!(bytes % QUEUE_REGION_ALIGN, 0);
            assert!(bytes >= desc_state_offset(size), "{size}");
        }
    }

    #[test]
    fn the_message_round_trips_and_bad_areas_are_refused() {
        let repr =
            InflightRepr { mmap_size: 4 * queue_region_size(256), mmap_offset: 0, num_queues: 4, queue_size: 256 };
        assert_eq!(InflightRepr::parse(&repr.emit()), Ok(repr));
        assert_eq!(repr.check_area(), Ok(()));
        assert!(matches!(InflightRepr::parse(&[0; 19]), Err(InflightError::Truncated(_))));
        let small = InflightRepr { mmap_size: repr.mmap_size - 1, ..repr };
        assert!(matches!(small.check_area(), Err(InflightError::TooSmall { .. })));
        assert_eq!(InflightRepr { num_queues: 0, ..repr }.check_area(), Err(InflightError::QueueCount(0)));
        assert_eq!(InflightRepr { num_queues: 5000, ..repr }.check_counts(), Err(InflightError::QueueCount(5000)));
        assert_eq!(InflightRepr { queue_size: 100, ..repr }.check_counts(), Err(InflightError::QueueSize(100)));
        assert_eq!(InflightRepr { queue_size: 0, ..repr }.check_counts(), Err(InflightError::QueueSize(0)));
        assert_eq!(repr.queue_offset(3), 3 * queue_region_size(256));
    }
}
