//! Descriptor chains for heads a restarted backend resubmits.
//!
//! virtio-queue makes a `DescriptorChain` only from an available-ring entry (its constructor
//! is the crate's own), and the entries of in-flight heads may have been overwritten by the
//! driver since. So the heads are written into a small private available ring of their own,
//! mapped just past the end of guest memory in a copy of the memory map (the guest's regions
//! are shared, not copied), and popped from a queue that points at it and at the guest's
//! descriptor table. The chains walk the guest's descriptors as any popped chain does; the
//! private page is never guest memory (a device reads and writes buffers through the
//! guest's own map, where it does not exist).

use std::sync::Arc;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

/// Bytes of the private ring's page(s) alignment.
const PAGE: u64 = 4096;

/// Errors from building the private ring.
#[derive(Debug, thiserror::Error)]
pub enum ResubmitError {
    /// The private page could not be mapped or added to the map.
    #[error("cannot map a page for {heads} resubmitted head(s): {why}")]
    Map {
        /// Heads to resubmit.
        heads: usize,
        /// What failed.
        why: String,
    },
}

/// The heads a ring resubmits, ready to be popped as chains.
pub struct Resubmission {
    memory: GuestMemoryMmap,
    /// Descriptor table, private avail ring, private used ring.
    rings: [u64; 3],
    size: u16,
    max_size: u16,
}

impl Resubmission {
    /// Chains for `heads` of the ring `vq` in `guest` memory.
    pub fn new(guest: &GuestMemoryMmap, vq: &Queue, heads: &[u16]) -> Result<Resubmission, ResubmitError> {
        let failed = |why: String| ResubmitError::Map { heads: heads.len(), why };
        let base =
            guest.last_addr().0.checked_add(PAGE).map(|a| a & !(PAGE - 1)).ok_or_else(|| failed("no room".into()))?;
        // A whole avail ring (flags, idx, entries, used_event) and a used ring of the ring's
        // size: the queue checks both fit before it pops.
        let entries = u64::from(vq.size());
        let used_at = (6 + 2 * entries).next_multiple_of(8);
        let size = (used_at + 6 + 8 * entries).next_multiple_of(PAGE);
        let mapping = MmapRegion::new(size as usize).map_err(|e| failed(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(base)).ok_or_else(|| failed("bad region".into()))?;
        let memory = guest.insert_region(Arc::new(region)).map_err(|e| failed(e.to_string()))?;
        let ring = GuestAddress(base);
        let count = u16::try_from(heads.len()).map_err(|_| failed(format!("{} heads", heads.len())))?;
        memory.write_obj(count.to_le(), ring.unchecked_add(2)).map_err(|e| failed(e.to_string()))?;
        for (slot, head) in heads.iter().enumerate() {
            memory
                .write_obj(head.to_le(), ring.unchecked_add(4 + 2 * slot as u64))
                .map_err(|e| failed(e.to_string()))?;
        }
        let rings = [vq.desc_table(), base, base + used_at];
        Ok(Resubmission { memory, rings, size: vq.size(), max_size: vq.max_size() })
    }

    /// The chains, in the order of the heads given.
    pub fn chains(&self) -> Vec<DescriptorChain<&GuestMemoryMmap>> {
        let popped = Queue::new(self.max_size).map_err(|e| e.to_string()).and_then(|mut queue| {
            let halves = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
            let [desc, avail, used] = self.rings.map(halves);
            queue.set_size(self.size);
            queue.set_desc_table_address(desc.0, desc.1);
            queue.set_avail_ring_address(avail.0, avail.1);
            queue.set_used_ring_address(used.0, used.1);
            queue.set_ready(true);
            let chains = queue.iter(&self.memory).map_err(|e| e.to_string())?;
            Ok(chains.collect::<Vec<_>>())
        });
        popped.unwrap_or_else(|e| {
            log::error!("the resubmitted heads cannot be popped: {e}");
            Vec::new()
        })
    }
}
