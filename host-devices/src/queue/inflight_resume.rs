//! Resuming a ring from its in-flight region after a backend restart: the specification's
//! steps, with every field of the region checked before it is believed.

use super::inflight::TrackedQueue;
use log::{info, warn};
use pvkit_protocol::inflight::{REGION_VERSION, desc_state, desc_state_offset, header};
use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Offset of the used index in the used ring.
const USED_IDX_OFFSET: u64 = 2;

/// Why a queue's region cannot be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// A version this backend does not know.
    #[error("region version {0} (only {REGION_VERSION} is known)")]
    Version(u16),
    /// `desc_num` differs from the queue size the area was made for.
    #[error("desc_num {found} where the area was made for {expected}")]
    DescNum {
        /// What the region says.
        found: u16,
        /// The area's queue size.
        expected: u16,
    },
    /// The ring has more entries than the region has states.
    #[error("a ring of {ring} entries is larger than the region's {desc_num} descriptor states")]
    RingTooLarge {
        /// The ring size.
        ring: u16,
        /// The region's states.
        desc_num: u16,
    },
    /// The used index is further from the region's `used_idx` than a batch can be.
    #[error("the used index {used} is {batch} ahead of the region's {region}, more than a ring of {ring}")]
    BatchTooLong {
        /// The ring's used index.
        used: u16,
        /// The region's `used_idx`.
        region: u16,
        /// The difference.
        batch: u16,
        /// The ring size.
        ring: u16,
    },
    /// The batch list leads to a head that is no descriptor of the ring.
    #[error("the last batch's list reaches head {head}, outside a ring of {ring}")]
    BatchHead {
        /// The head.
        head: u16,
        /// The ring size.
        ring: u16,
    },
    /// The batch list names a head twice (a loop).
    #[error("the last batch's list names head {0} twice")]
    BatchRepeats(u16),
    /// An `inflight` flag that is neither 0 nor 1.
    #[error("descriptor {head} has in-flight flag {value}")]
    Flag {
        /// The head.
        head: u16,
        /// The flag's value.
        value: u8,
    },
    /// A head outside the ring is marked in flight.
    #[error("descriptor {head} is marked in flight but a ring of {ring} has no such head")]
    BeyondRing {
        /// The head.
        head: u16,
        /// The ring size.
        ring: u16,
    },
    /// Two heads were taken at the same count.
    #[error("descriptors {first} and {second} both have counter {counter}")]
    DuplicateCounter {
        /// One head.
        first: u16,
        /// The other.
        second: u16,
        /// Their counter.
        counter: u64,
    },
}

/// What a region says about a ring that restarts.
#[derive(Debug, PartialEq, Eq)]
pub enum RegionState {
    /// Never used (version 0): start it.
    Fresh,
    /// The heads still in flight, in the order they were taken, and how many of the last
    /// batch's flags were cleared because their used entries had been published.
    InFlight {
        /// `(counter, head)`, by counter.
        heads: Vec<(u64, u16)>,
        /// Entries of the last batch repaired.
        repaired: u16,
    },
}

impl TrackedQueue<'_> {
    /// The first pass on a ring that started: when the region says requests were in flight,
    /// points `vq` past them (`next_avail` = used index + their number, as each taken head
    /// gets exactly one used entry) and returns their heads, to be served again before
    /// anything new, in the order they were first taken. Later passes return nothing.
    pub fn resume<M: GuestMemory>(&self, vq: &mut Queue, mem: &M) -> Vec<u16> {
        if !vq.ready() || !self.take_pending() {
            return Vec::new();
        }
        let used_at = GuestAddress(vq.used_ring().wrapping_add(USED_IDX_OFFSET));
        let used = match mem.load::<u16>(used_at, Ordering::Acquire) {
            Ok(raw) => u16::from_le(raw),
            Err(e) => {
                warn!("queue {}: cannot read the used index to resume from the in-flight region: {e}", self.queue);
                return Vec::new();
            }
        };
        match self.examine(vq.size(), used) {
            Ok(RegionState::Fresh) => {
                self.initialize(used);
                Vec::new()
            }
            Ok(RegionState::InFlight { heads, repaired }) => {
                let next = heads.last().map_or(0, |(counter, _)| counter.saturating_add(1));
                self.counter().store(next, Ordering::Relaxed);
                let count = heads.len() as u16;
                vq.set_next_avail(used.wrapping_add(count));
                vq.set_next_used(used);
                if count > 0 || repaired > 0 {
                    info!(
                        "queue {}: resuming at used index {used}: {count} request(s) in flight resubmitted, {repaired} \
                         entr(ies) of the last batch found done",
                        self.queue
                    );
                }
                self.note_resubmitted(heads.len());
                heads.into_iter().map(|(_, head)| head).collect()
            }
            Err(error) => {
                warn!(
                    "queue {}: the in-flight region is refused ({error}); started afresh, the ring resumes at the \
                     index the frontend gave",
                    self.queue
                );
                self.note_refused();
                self.initialize(used);
                Vec::new()
            }
        }
    }

    /// Checks the region against a ring of `ring` entries whose used index is `used`, repairs
    /// its last batch, and lists the heads in flight.
    pub fn examine(&self, ring: u16, used: u16) -> Result<RegionState, RegionError> {
        let version = self.read_u16(header::VERSION);
        if version == 0 {
            return Ok(RegionState::Fresh);
        }
        if version != REGION_VERSION {
            return Err(RegionError::Version(version));
        }
        let desc_num = self.read_u16(header::DESC_NUM);
        if desc_num != self.desc_num() {
            return Err(RegionError::DescNum { found: desc_num, expected: self.desc_num() });
        }
        if ring > desc_num {
            return Err(RegionError::RingTooLarge { ring, desc_num });
        }
        let repaired = self.repair_last_batch(ring, used)?;
        let mut heads = Vec::new();
        for head in 0..desc_num {
            match self.read_u8(desc_state_offset(head) + desc_state::INFLIGHT) {
                0 => {}
                1 if head < ring => heads.push((self.read_u64(desc_state_offset(head) + desc_state::COUNTER), head)),
                1 => return Err(RegionError::BeyondRing { head, ring }),
                value => return Err(RegionError::Flag { head, value }),
            }
        }
        heads.sort_unstable();
        if let Some(pair) = heads.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(RegionError::DuplicateCounter { first: pair[0].1, second: pair[1].1, counter: pair[0].0 });
        }
        Ok(RegionState::InFlight { heads, repaired })
    }

    /// When the used index moved past the region's `used_idx`, the last batch was published
    /// but its flags not all cleared: clear them along the batch list and take the used
    /// index. The whole list is walked and checked before anything is written.
    fn repair_last_batch(&self, ring: u16, used: u16) -> Result<u16, RegionError> {
        let region = self.read_u16(header::USED_IDX);
        let batch = used.wrapping_sub(region);
        if batch == 0 {
            return Ok(0);
        }
        if batch > ring {
            return Err(RegionError::BatchTooLong { used, region, batch, ring });
        }
        let mut listed = Vec::with_capacity(usize::from(batch));
        let mut seen = vec![false; usize::from(ring)];
        let mut head = self.read_u16(header::LAST_BATCH_HEAD);
        for _ in 0..batch {
            if head >= ring {
                return Err(RegionError::BatchHead { head, ring });
            }
            if std::mem::replace(&mut seen[usize::from(head)], true) {
                return Err(RegionError::BatchRepeats(head));
            }
            listed.push(head);
            head = self.read_u16(desc_state_offset(head) + desc_state::NEXT);
        }
        for head in listed {
            self.write_u8(desc_state_offset(head) + desc_state::INFLIGHT, 0);
        }
        self.write_u16(header::USED_IDX, used);
        Ok(batch)
    }
}
