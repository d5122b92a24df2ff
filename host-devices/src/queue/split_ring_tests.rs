//! The split-ring reader against virtio-queue's own walk, on random tables and on a table that
//! straddles two memory regions (bursts are tested through `ring::Popper`).

use super::*;
use crate::queue::{ChainBuffers, Segment};
use virtio_queue::QueueOwnedT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Address;

const NEXT: u16 = pvkit_protocol::ring::desc_flags::NEXT;
const WRITE: u16 = pvkit_protocol::ring::desc_flags::WRITE;
const INDIRECT: u16 = pvkit_protocol::ring::desc_flags::INDIRECT;
/// Where the random indirect tables go.
const INDIRECT_AREA: u64 = 0x4_0000;
const CAP: u64 = 1 << 20;

/// A small deterministic generator (xorshift), so a failure names its seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_descriptor(rng: &mut Random, size: u16) -> Descriptor {
    let flags = [0, NEXT, WRITE, NEXT | WRITE, NEXT, INDIRECT][rng.below(6) as usize];
    // Next indices mostly in the table, sometimes past it; lengths mostly small.
    let next = rng.below(u64::from(size) + 2) as u16;
    let len = match rng.below(8) {
        0 => u32::MAX - rng.below(16) as u32,
        1 => 16 * rng.below(6) as u32,
        _ => rng.below(4096) as u32,
    };
    let addr = if rng.below(16) == 0 { u64::MAX - rng.below(8) } else { 0x8_0000 + rng.below(0x1_0000) };
    Descriptor::new(addr, len, flags, next)
}

/// What one walk gave: the segments of each direction, or the error.
fn outcome(walked: Result<(), ChainError>, b: &ChainBuffers) -> Result<(Vec<Segment>, Vec<Segment>, bool), ChainError> {
    walked.map(|()| (b.readable.clone(), b.writable.clone(), b.misordered))
}

#[test]
fn walks_agree_with_virtio_queue_on_random_tables() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (mut walked, mut refused, mut through_indirect) = (0, 0, 0);
    for seed in 1..400u64 {
        let mut rng = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let size = [4u16, 8, 16][rng.below(3) as usize];
        let mock = MockSplitQueue::new(&mem, size);
        let descs: Vec<Descriptor> = (0..size).map(|_| random_descriptor(&mut rng, size)).collect();
        for (i, desc) in descs.iter().enumerate() {
            mem.write_obj(*desc, mock.desc_table_addr().unchecked_add(16 * i as u64)).unwrap();
        }
        // Indirect tables: every INDIRECT descriptor whose address is in the area finds one.
        for t in 0..4u64 {
            for i in 0..8u64 {
                let desc = random_descriptor(&mut rng, 8);
                mem.write_obj(desc, GuestAddress(INDIRECT_AREA + 0x1000 * t + 16 * i)).unwrap();
            }
        }
        for (i, desc) in descs.iter().enumerate() {
            let d = *desc;
            if d.refers_to_indirect_table() && rng.below(2) == 0 {
                let table = INDIRECT_AREA + 0x1000 * rng.below(4);
                let fixed = Descriptor::new(table, d.len() % 0x90, d.flags(), d.next());
                mem.write_obj(fixed, mock.desc_table_addr().unchecked_add(16 * i as u64)).unwrap();
            }
        }
        let mut queue: Queue = mock.create_queue().unwrap();
        let ring = SplitRing::new(&queue, &mem).unwrap();
        for head in 0..size {
            // Theirs: the head made available and popped.
            let slot = queue.next_avail();
            mem.write_obj(head, mock.avail_addr().unchecked_add(4 + 2 * u64::from(slot % size))).unwrap();
            mem.write_obj(slot.wrapping_add(1), mock.avail_addr().unchecked_add(2)).unwrap();
            let chain = queue.iter(&mem).unwrap().next().unwrap();
            let mut theirs = ChainBuffers::default();
            let theirs_result = theirs.refill(chain, CAP);
            let mut ours = ChainBuffers::default();
            let ours_result = ring.walk(head, CAP, &mut ours);
            let first: Descriptor = mem.read_obj(mock.desc_table_addr().unchecked_add(16 * u64::from(head))).unwrap();
            match &ours_result {
                Ok(()) if first.refers_to_indirect_table() => through_indirect += 1,
                Ok(()) => walked += 1,
                Err(_) => refused += 1,
            }
            assert_eq!(
                outcome(ours_result, &ours),
                outcome(theirs_result, &theirs),
                "seed {seed}, ring of {size}, head {head}"
            );
        }
    }
    // The tables exercise every kind of walk.
    assert!(walked > 100 && refused > 100 && through_indirect > 20, "{walked} {refused} {through_indirect}");
}

#[test]
fn a_table_across_two_regions_is_read_by_address() {
    // Two adjacent regions; the descriptor table starts 32 bytes before the boundary.
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000), (GuestAddress(0x1_0000), 0x1_0000)]).unwrap();
    let table = GuestAddress(0x1_0000 - 32);
    let chain = [
        Descriptor::new(0x2000, 100, NEXT, 1),
        Descriptor::new(0x3000, 200, NEXT, 2),
        Descriptor::new(0x1_4000, 300, WRITE, 0),
    ];
    for (i, desc) in chain.iter().enumerate() {
        mem.write_obj(*desc, table.unchecked_add(16 * i as u64)).unwrap();
    }
    let mut queue = Queue::new(4).unwrap();
    queue.set_size(4);
    queue.set_desc_table_address(Some(table.0 as u32), Some(0));
    queue.set_avail_ring_address(Some(0x6000), Some(0));
    queue.set_used_ring_address(Some(0x7000), Some(0));
    queue.set_ready(true);
    let ring = SplitRing::new(&queue, &mem).unwrap();
    assert!(matches!(ring.descriptors, Table::Guest(_)), "the table is not in one region");
    let mut buffers = ChainBuffers::default();
    ring.walk(0, CAP, &mut buffers).unwrap();
    assert_eq!((buffers.readable_len(), buffers.writable_len()), (300, 300));
    assert_eq!(buffers.writable[0].addr, GuestAddress(0x1_4000));
}

fn ring_with_chains(mem: &GuestMemoryMmap, size: u16, count: u16) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
    let mock = MockSplitQueue::new(mem, size);
    let descs: Vec<RawDescriptor> =
        (0..count).map(|i| RawDescriptor::from(Descriptor::new(0x8000 + u64::from(i) * 64, 16, 0, 0))).collect();
    if count > 0 {
        mock.add_desc_chains(&descs, 0).unwrap();
    }
    let queue = mock.create_queue().unwrap();
    (mock, queue)
}

#[test]
fn a_queue_not_ready_has_no_ring() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (_mock, mut queue) = ring_with_chains(&mem, 16, 1);
    queue.set_ready(false);
    assert!(SplitRing::new(&queue, &mem).is_none());
}
