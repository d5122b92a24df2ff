//! In-flight tracking: the region kept while a ring runs, what a restarted backend resubmits
//! (chosen completion orders and crashes at chosen points), regions that cannot be believed,
//! and the block device serving resubmitted requests.

use super::ChainBuffers;
use super::inflight::{Inflight, InflightError, allocate};
use super::inflight_resume::{RegionError, RegionState};
use super::split_ring::SplitRing;
use super::{NoServices, UsedBatch, ring};
use crate::blk::device::{BlkDevice, BlkOptions};
use crate::blk::engine::{Engine, SyncEngine};
use crate::blk::stats::Stats;
use crate::queue::{Gates, Memory};
use pvkit_protocol::blk::{RequestHeaderRepr, RequestType};
use pvkit_protocol::inflight::{InflightRepr, desc_state, desc_state_offset, header, queue_region_size};
use pvkit_protocol::ring::desc_flags::{NEXT, WRITE};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const RING: u16 = 16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// An area for one queue of `queue_size` entries, as GET_INFLIGHT_FD makes it.
fn area(queue_size: u16) -> (std::fs::File, InflightRepr) {
    let (fd, repr) = allocate(&InflightRepr { num_queues: 1, queue_size, ..Default::default() }).unwrap();
    (std::fs::File::from(fd), repr)
}

fn dup(file: &std::fs::File) -> OwnedFd {
    file.as_fd().try_clone_to_owned().unwrap()
}

/// A backend's tracking over `file` (what SET_INFLIGHT_FD gives each backend), its ring
/// started.
fn backend(file: &std::fs::File, repr: InflightRepr) -> Inflight {
    let inflight = Inflight::new(1, Arc::new(AtomicU64::new(0)));
    inflight.set_area(dup(file), repr).unwrap();
    inflight.ring_started(0);
    inflight
}

/// `count` one-descriptor chains, heads 0.., each a 512-byte buffer at its own address.
fn post(mock: &MockSplitQueue<'_, GuestMemoryMmap>, count: u16) {
    let descs: Vec<RawDescriptor> = (0..count)
        .map(|i| RawDescriptor::from(SplitDescriptor::new(0x10_0000 + 0x1000 * u64::from(i), 512, WRITE, 0)))
        .collect();
    mock.add_desc_chains(&descs, 0).unwrap();
}

/// Pops everything available, tracked.
fn pop_all(inflight: &Inflight, vq: &mut Queue, mem: &GuestMemoryMmap) -> Vec<u16> {
    let tracked = inflight.queue(0).unwrap();
    // A first backend's first pass starts the fresh region.
    let _ = tracked.resume(vq, mem);
    let mut heads = Vec::new();
    while let Some(chain) = ring::pop(vq, mem).unwrap() {
        tracked.taken(chain.head_index());
        heads.push(chain.head_index());
    }
    heads
}

/// Publishes `heads` as one used batch, tracked.
fn complete(inflight: &Inflight, vq: &mut Queue, mem: &GuestMemoryMmap, heads: &[u16]) {
    let tracked = inflight.queue(0).unwrap();
    let mut used = UsedBatch::default();
    for head in heads {
        used.push(*head, 1);
    }
    used.publish_tracked(vq, mem, &NoServices, Some(&tracked)).unwrap();
}

/// The ring as a frontend restores it after a backend died: its base is the used index
/// (QEMU's `virtio_queue_restore_last_avail_idx`).
fn restored(mock: &MockSplitQueue<'_, GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Queue {
    let mut vq: Queue = mock.create_queue().unwrap();
    let used: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    vq.set_next_avail(used);
    vq.set_next_used(used);
    vq
}

fn used_heads(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<u16> {
    let idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    (0..idx)
        .map(|i| mem.read_obj::<u32>(mock.used_addr().unchecked_add(4 + 8 * u64::from(i % RING))).unwrap() as u16)
        .collect()
}

#[test]
fn an_area_is_a_sealed_zeroed_memfd_of_the_regions_size() {
    let (file, repr) = area(256);
    assert_eq!(repr.mmap_size, queue_region_size(256));
    assert_eq!(file.metadata().unwrap().len(), repr.mmap_size);
    assert!(file.set_len(repr.mmap_size * 2).is_err(), "sealed against growing");
    assert!(file.set_len(16).is_err(), "sealed against shrinking");
    let mut bytes = vec![1u8; repr.mmap_size as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    assert!(bytes.iter().all(|b| *b == 0));
    let refused = allocate(&InflightRepr { num_queues: 1, queue_size: 100, ..Default::default() });
    assert!(matches!(refused, Err(InflightError::Message(_))));
}

/// The engine completes heads 2 and 0 of four, then the backend dies: exactly heads 1 and 3
/// come back, in the order they were taken, and the ring goes on after them. Replaying from
/// the used index, as without tracking, would have run head 2 again and lost head 1.
#[test]
fn exactly_the_unfinished_requests_are_resubmitted_in_the_order_taken() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), RING);
    let (file, repr) = area(RING);
    let first = backend(&file, repr);
    let mut vq: Queue = mock.create_queue().unwrap();
    post(&mock, 4);
    assert_eq!(pop_all(&first, &mut vq, &mem), [0, 1, 2, 3]);
    complete(&first, &mut vq, &mem, &[2]);
    complete(&first, &mut vq, &mem, &[0]);
    drop(first); // killed: heads 1 and 3 never completed

    let replay: Vec<u16> =
        (2..4u64).map(|i| mem.read_obj(mock.avail_addr().unchecked_add(4 + 2 * i)).unwrap()).collect();
    assert_eq!(replay, [2, 3], "what a replay from the used index would have served");

    let second = backend(&file, repr);
    let mut vq = restored(&mock, &mem);
    let tracked = second.queue(0).unwrap();
    let heads = tracked.resume(&mut vq, &mem);
    assert_eq!(heads, [1, 3]);
    assert_eq!(vq.next_avail(), 4, "the ring goes on after everything taken");
    assert_eq!(second.resubmitted(), 2);
    let ring = SplitRing::new(&vq, &mem).unwrap();
    let addrs: Vec<(u16, u64)> = heads
        .iter()
        .map(|&head| {
            let mut buffers = ChainBuffers::default();
            ring.walk(head, 1 << 20, &mut buffers).unwrap();
            let first = buffers.readable.first().or(buffers.writable.first()).unwrap();
            (buffers.head, first.addr.raw_value())
        })
        .collect();
    assert_eq!(addrs, [(1, 0x10_1000), (3, 0x10_3000)], "the chains walk the guest's descriptors");
    assert!(tracked.resume(&mut vq, &mem).is_empty(), "only the first pass resumes");
    drop(tracked);

    // Resubmitted and new requests complete; after another kill nothing is left in flight.
    post(&mock, 1);
    let tracked = second.queue(0).unwrap();
    while let Some(chain) = ring::pop(&mut vq, &mem).unwrap() {
        tracked.taken(chain.head_index());
    }
    drop(tracked);
    complete(&second, &mut vq, &mem, &[3, 0, 1]);
    drop(second);
    let third = backend(&file, repr);
    let mut vq = restored(&mock, &mem);
    assert!(third.queue(0).unwrap().resume(&mut vq, &mem).is_empty());
    assert_eq!(vq.next_avail(), 5);
    assert_eq!(used_heads(&mem, &mock), [2, 0, 3, 0, 1]);
}

/// A crash after a batch's used index was stored but before its flags were cleared: the
/// batch list tells which heads were done.
#[test]
fn a_crash_between_publishing_and_clearing_is_repaired_from_the_batch_list() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), RING);
    let (file, repr) = area(RING);
    let first = backend(&file, repr);
    let mut vq: Queue = mock.create_queue().unwrap();
    post(&mock, 5);
    assert_eq!(pop_all(&first, &mut vq, &mem), [0, 1, 2, 3, 4]);
    complete(&first, &mut vq, &mem, &[1]);
    // The next batch (4, 0) is linked and its used entries and index are written...
    let tracked = first.queue(0).unwrap();
    tracked.publishing([4u16, 0].into_iter());
    for (slot, head) in [(1u64, 4u32), (2, 0)] {
        mem.write_obj(head, mock.used_addr().unchecked_add(4 + 8 * slot)).unwrap();
    }
    mem.write_obj(3u16, mock.used_addr().unchecked_add(2)).unwrap();
    drop(tracked);
    drop(first); // ...and the backend dies before it clears their flags.

    let second = backend(&file, repr);
    let mut vq = restored(&mock, &mem);
    let tracked = second.queue(0).unwrap();
    assert_eq!(
        tracked.examine(RING, 3),
        Ok(RegionState::InFlight { heads: vec![(2, 2), (3, 3)], repaired: 2 }),
        "heads 2 and 3, taken 2nd and 3rd"
    );
    assert_eq!(tracked.resume(&mut vq, &mem), [2, 3]);
    assert_eq!(vq.next_avail(), 5);
}

/// A region left with requests in flight, then `corrupt`ed: the frontend's area for a ring of
/// `RING` made for queues of `queue_size`.
fn corrupted(queue_size: u16, corrupt: impl Fn(&std::fs::File)) -> (Result<RegionState, RegionError>, u64, Vec<u16>) {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), RING);
    let (file, repr) = area(queue_size);
    let first = backend(&file, repr);
    let mut vq: Queue = mock.create_queue().unwrap();
    post(&mock, 3);
    pop_all(&first, &mut vq, &mem);
    complete(&first, &mut vq, &mem, &[1]);
    drop(first);
    corrupt(&file);
    let second = backend(&file, repr);
    let tracked = second.queue(0).unwrap();
    let examined = tracked.examine(RING, 1);
    let mut vq = restored(&mock, &mem);
    let resumed = tracked.resume(&mut vq, &mem);
    if queue_size >= RING {
        // Refused or not, the region is usable afterwards: started afresh or resumed.
        assert_eq!(tracked.examine(RING, 1).map(|_| ()), Ok(()));
    }
    (examined, second.refused(), resumed)
}

/// What a test does to an area's file.
type Corruption = Box<dyn Fn(&std::fs::File)>;

fn put_u16(file: &std::fs::File, at: u64, value: u16) {
    file.write_all_at(&value.to_le_bytes(), at).unwrap();
}

#[test]
fn regions_that_cannot_be_believed_are_refused_counted_and_started_afresh() {
    let flag = |head: u16| desc_state_offset(head) + desc_state::INFLIGHT;
    let counter = |head: u16| desc_state_offset(head) + desc_state::COUNTER;
    let cases: Vec<(&str, u16, Corruption, RegionError)> = vec![
        ("version", RING, Box::new(|f| put_u16(f, header::VERSION, 7)), RegionError::Version(7)),
        (
            "desc_num",
            RING,
            Box::new(|f| put_u16(f, header::DESC_NUM, 8)),
            RegionError::DescNum { found: 8, expected: RING },
        ),
        (
            "flag",
            RING,
            Box::new(move |f| f.write_all_at(&[2], flag(5)).unwrap()),
            RegionError::Flag { head: 5, value: 2 },
        ),
        (
            "beyond the ring",
            32,
            Box::new(move |f| f.write_all_at(&[1], flag(20)).unwrap()),
            RegionError::BeyondRing { head: 20, ring: RING },
        ),
        (
            "duplicate counter",
            RING,
            Box::new(move |f| f.write_all_at(&0u64.to_le_bytes(), counter(2)).unwrap()),
            RegionError::DuplicateCounter { first: 0, second: 2, counter: 0 },
        ),
        (
            "batch too long",
            RING,
            Box::new(|f| put_u16(f, header::USED_IDX, 60_000)),
            RegionError::BatchTooLong { used: 1, region: 60_000, batch: 5537, ring: RING },
        ),
        (
            "batch head",
            RING,
            Box::new(|f| {
                put_u16(f, header::USED_IDX, 0);
                put_u16(f, header::LAST_BATCH_HEAD, 40_000);
            }),
            RegionError::BatchHead { head: 40_000, ring: RING },
        ),
        (
            "batch list loop",
            RING,
            Box::new(move |f| {
                put_u16(f, header::USED_IDX, 0xffff);
                put_u16(f, header::LAST_BATCH_HEAD, 1);
                put_u16(f, desc_state_offset(1) + desc_state::NEXT, 1);
            }),
            RegionError::BatchRepeats(1),
        ),
        ("ring too large", 8, Box::new(|_| {}), RegionError::RingTooLarge { ring: RING, desc_num: 8 }),
    ];
    for (what, queue_size, corrupt, expected) in cases {
        let (examined, refused, resumed) = corrupted(queue_size, corrupt);
        assert_eq!(examined, Err(expected), "{what}");
        assert_eq!((refused, resumed), (1, vec![]), "{what}: refused once, nothing resubmitted");
    }
    // The same run without corruption resubmits heads 0 and 2.
    let (examined, refused, resumed) = corrupted(RING, |_| {});
    assert!(matches!(examined, Ok(RegionState::InFlight { .. })));
    assert_eq!((refused, resumed), (0, vec![0, 2]));
}

#[test]
fn areas_their_file_cannot_hold_or_that_describe_nonsense_are_refused() {
    let (file, repr) = area(RING);
    let inflight = Inflight::new(1, Arc::new(AtomicU64::new(0)));
    let larger = InflightRepr { mmap_size: repr.mmap_size * 4, num_queues: 4, ..repr };
    assert!(matches!(inflight.set_area(dup(&file), larger), Err(InflightError::FileTooShort { .. })));
    let offset = InflightRepr { mmap_offset: 64, ..repr };
    assert!(matches!(inflight.set_area(dup(&file), offset), Err(InflightError::FileTooShort { .. })));
    let wrapping = InflightRepr { mmap_offset: u64::MAX, ..repr };
    assert!(matches!(inflight.set_area(dup(&file), wrapping), Err(InflightError::Message(_))));
    for bad in [InflightRepr { num_queues: 0, ..repr }, InflightRepr { queue_size: 3, ..repr }] {
        assert!(matches!(inflight.set_area(dup(&file), bad), Err(InflightError::Message(_))));
    }
    let small = InflightRepr { mmap_size: repr.mmap_size - 1, ..repr };
    assert!(matches!(inflight.set_area(dup(&file), small), Err(InflightError::Message(_))));
    assert_eq!(inflight.refused(), 6);
    assert!(!inflight.is_tracking());
    inflight.set_area(dup(&file), repr).unwrap();
    assert!(inflight.is_tracking());
    assert!(inflight.queue(1).is_none(), "no region for a second queue");
}

/// Two writes taken by a backend that died; the block device that follows writes them to the
/// disk, returns exactly those two heads and counts them.
#[test]
fn the_block_device_serves_resubmitted_requests_first() {
    let mem = memory();
    let atomic: Memory = GuestMemoryAtomic::new(mem.clone());
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), RING);
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let (file, repr) = area(RING);
    // Two writes of a sector each, patterns 0xa0 and 0xa1, heads 0 and 3.
    for (i, sector) in [0u64, 1].into_iter().enumerate() {
        let base = 0x20_0000 + 0x1_0000 * i as u64;
        let mut header = [0u8; 16];
        RequestHeaderRepr { request_type: RequestType::Out, ioprio: 0, sector }.emit(&mut header).unwrap();
        mem.write_slice(&header, GuestAddress(base)).unwrap();
        mem.write_slice(&[0xa0 + i as u8; 512], GuestAddress(base + 0x1000)).unwrap();
        let first = 3 * i as u16;
        let chain = [
            RawDescriptor::from(SplitDescriptor::new(base, 16, NEXT, first + 1)),
            RawDescriptor::from(SplitDescriptor::new(base + 0x1000, 512, NEXT, first + 2)),
            RawDescriptor::from(SplitDescriptor::new(base + 0x2000, 1, WRITE, 0)),
        ];
        mock.add_desc_chains(&chain, first).unwrap();
    }
    let dead = backend(&file, repr);
    let mut vq: Queue = mock.create_queue().unwrap();
    assert_eq!(pop_all(&dead, &mut vq, &mem), [0, 3]);
    drop(dead);

    let stats = Arc::new(Stats::default());
    let options = BlkOptions {
        num_queues: 1,
        queue_size: 256,
        serial: "inflight".into(),
        logical_block_size: 512,
        read_only: false,
        poll_us: 0,
    };
    let engine = Engine::Sync(SyncEngine::open(disk.path().to_str().unwrap(), false, false).unwrap());
    let device = BlkDevice::new(Arc::new(engine), options, stats.clone(), Arc::new(Gates::new(1))).unwrap();
    device.core().inflight().set_area(dup(&file), repr).unwrap();
    device.update_memory(atomic.clone()).unwrap();
    let vring = VringRwLock::new(atomic, RING).unwrap();
    vring.set_queue_size(RING);
    vring.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0).unwrap();
    vring.set_queue_next_avail(0); // the used index, as the frontend restores it
    device.core().inflight().ring_started(0);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    device.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();

    assert_eq!(used_heads(&mem, &mock), [0, 3]);
    for (i, sector) in [0u64, 1].into_iter().enumerate() {
        let mut got = [0u8; 512];
        disk.as_file().read_exact_at(&mut got, sector * 512).unwrap();
        assert_eq!(got, [0xa0 + i as u8; 512], "sector {sector}");
        let status: u8 = mem.read_obj(GuestAddress(0x20_2000 + 0x1_0000 * i as u64)).unwrap();
        assert_eq!(status, 0);
    }
    assert!(stats.summary().contains("writes=2 ") && stats.summary().contains("resubmitted=2"), "{}", stats.summary());
    assert_eq!(vring.get_ref().get_queue().next_avail(), 2);
    let flags: Vec<u8> = (0..RING)
        .map(|h| {
            let mut b = [0u8];
            file.read_exact_at(&mut b, desc_state_offset(h) + desc_state::INFLIGHT).unwrap();
            b[0]
        })
        .collect();
    assert!(flags.iter().all(|f| *f == 0), "nothing left in flight: {flags:?}");
}
