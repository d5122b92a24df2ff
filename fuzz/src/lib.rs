//! What the device fuzz targets share: a small guest memory whose rings and buffers are laid
//! out from the fuzzer's bytes, and checks of what a device wrote back that do not trust the
//! device's own chain walk.
//!
//! Layout: queue `q`'s descriptor table at `0x1000 * (q + 1)`, its available ring 0x100 bytes
//! after it and its used ring 0x200 bytes after it; buffers from [`DATA_BASE`] to the end of
//! memory. A descriptor's address and length come from the input; unless their top bit is set,
//! they are folded into the buffer area (so most chains are usable and the device's logic is
//! reached), and with it they are kept as they are (outside memory, wrapping, huge).

/// The frontend of the whole-backend target.
pub mod frontend;

use pvkit_protocol::ring::{DESCRIPTOR_SIZE, USED_ELEM_SIZE, desc_flags};
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Entries per ring.
pub const RING: u16 = 16;
/// Guest memory size.
pub const MEM_SIZE: u64 = 0x4_0000;
/// Where buffers start.
pub const DATA_BASE: u64 = 0x1_0000;
/// The most queues a target sets up.
pub const MAX_QUEUES: usize = 8;

const AVAIL_OFFSET: u64 = 0x100;
const USED_OFFSET: u64 = 0x200;

/// The fuzzer's bytes, consumed from the front; reads past the end give zeros.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `bytes`.
    pub fn new(bytes: &'a [u8]) -> Input<'a> {
        Input { bytes }
    }

    /// The next `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        out
    }

    /// The next byte.
    pub fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Bytes left.
    pub fn rest_len(&self) -> usize {
        self.bytes.len()
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    /// Address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

impl RawDesc {
    fn from_input(input: &mut Input<'_>) -> RawDesc {
        let (addr, len, flags, next) = (input.u64(), input.u32(), input.u16(), input.u16());
        let addr = if addr >> 63 == 0 { DATA_BASE + addr % (MEM_SIZE - DATA_BASE) } else { addr };
        let len = if len >> 31 == 0 { len % 0x2000 } else { len };
        RawDesc { addr, len, flags, next: if next >> 15 == 0 { next % RING } else { next } }
    }

    fn bytes(&self) -> [u8; DESCRIPTOR_SIZE] {
        let mut out = [0u8; DESCRIPTOR_SIZE];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..14].copy_from_slice(&self.flags.to_le_bytes());
        out[14..].copy_from_slice(&self.next.to_le_bytes());
        out
    }
}

/// A used element the device published.
#[derive(Debug, Clone, Copy)]
pub struct UsedElem {
    /// Head index.
    pub id: u32,
    /// Bytes written.
    pub len: u32,
}

/// Guest memory with `queues` rings, each as the library's vring.
pub struct Guest {
    /// The memory.
    pub mem: GuestMemoryMmap,
    /// The same, as devices take it.
    pub atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    /// One vring per queue, set up, ready and enabled.
    pub vrings: Vec<VringRwLock>,
    avail: Vec<u16>,
}

fn ring_base(queue: usize) -> u64 {
    0x1000 * (queue as u64 + 1)
}

impl Guest {
    /// Fresh zeroed memory with `queues` (at most [`MAX_QUEUES`]) rings of [`RING`] entries.
    pub fn new(queues: usize, event_idx: bool) -> Guest {
        let queues = queues.min(MAX_QUEUES);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let vrings = (0..queues)
            .map(|q| {
                let vring = VringRwLock::new(atomic.clone(), RING).expect("vring");
                let base = ring_base(q);
                vring.set_queue_size(RING);
                vring.set_queue_info(base, base + AVAIL_OFFSET, base + USED_OFFSET).expect("ring addresses");
                vring.set_queue_event_idx(event_idx);
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                vring
            })
            .collect();
        Guest { mem, atomic, vrings, avail: vec![0; queues] }
    }

    /// Writes queue `queue`'s descriptor table and `count` new available entries from `input`.
    pub fn post(&mut self, queue: usize, count: u16, input: &mut Input<'_>) {
        let Some(avail) = self.avail.get_mut(queue) else { return };
        let base = ring_base(queue);
        for i in 0..u64::from(RING) {
            let desc = RawDesc::from_input(input);
            let _ = self.mem.write_slice(&desc.bytes(), GuestAddress(base + i * DESCRIPTOR_SIZE as u64));
        }
        for _ in 0..count {
            let head = input.u16();
            let head = if head >> 15 == 0 { head % RING } else { head };
            let slot = base + AVAIL_OFFSET + 4 + 2 * u64::from(*avail % RING);
            let _ = self.mem.write_obj(head, GuestAddress(slot));
            *avail = avail.wrapping_add(1);
        }
        let _ = self.mem.write_obj(*avail, GuestAddress(base + AVAIL_OFFSET + 2));
    }

    /// Sets queue `queue`'s available index to `idx` as it is (a guest jumping past the ring).
    pub fn set_avail_idx(&mut self, queue: usize, idx: u16) {
        if let Some(avail) = self.avail.get_mut(queue) {
            *avail = idx;
            let _ = self.mem.write_obj(idx, GuestAddress(ring_base(queue) + AVAIL_OFFSET + 2));
        }
    }

    /// Fills the buffer area from `bytes`.
    pub fn fill_data(&self, bytes: &[u8]) {
        let n = bytes.len().min((MEM_SIZE - DATA_BASE) as usize);
        let _ = self.mem.write_slice(&bytes[..n], GuestAddress(DATA_BASE));
    }

    /// The used index of queue `queue`.
    pub fn used_idx(&self, queue: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring_base(queue) + USED_OFFSET + 2)).unwrap_or(0)
    }

    /// The used elements `from..to` (ring indexes) of queue `queue`.
    pub fn used(&self, queue: usize, from: u16, to: u16) -> Vec<UsedElem> {
        let base = ring_base(queue) + USED_OFFSET + 4;
        let mut out = Vec::new();
        let mut i = from;
        while i != to && out.len() < 4 * usize::from(RING) {
            let at = base + USED_ELEM_SIZE as u64 * u64::from(i % RING);
            let id = self.mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
            let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
            out.push(UsedElem { id, len });
            i = i.wrapping_add(1);
        }
        out
    }

    fn desc(&self, table: u64, index: u64) -> Option<RawDesc> {
        let mut raw = [0u8; DESCRIPTOR_SIZE];
        self.mem.read_slice(&mut raw, GuestAddress(table.checked_add(index * DESCRIPTOR_SIZE as u64)?)).ok()?;
        let word = |r: std::ops::Range<usize>| raw[r].iter().rev().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        Some(RawDesc {
            addr: word(0..8),
            len: word(8..12) as u32,
            flags: word(12..14) as u16,
            next: word(14..16) as u16,
        })
    }

    /// The most bytes a device may write into the chain at `head` of queue `queue`: the sum of
    /// its writable descriptors (indirect tables included), walked here independently of the
    /// device, at most [`RING`] hops per table.
    pub fn writable_capacity(&self, queue: usize, head: u32) -> u64 {
        let table = ring_base(queue);
        let mut total = 0u64;
        let mut index = u64::from(head);
        for _ in 0..RING {
            if index >= u64::from(RING) {
                break;
            }
            let Some(desc) = self.desc(table, index) else { break };
            if desc.flags & desc_flags::INDIRECT != 0 {
                let entries = u64::from(desc.len) / DESCRIPTOR_SIZE as u64;
                for i in 0..entries.min(u64::from(pvkit_protocol::ring::MAX_QUEUE_SIZE)) {
                    match self.desc(desc.addr, i) {
                        Some(d) if d.flags & desc_flags::WRITE != 0 => total = total.saturating_add(d.len.into()),
                        Some(_) => {}
                        None => break,
                    }
                }
            } else if desc.flags & desc_flags::WRITE != 0 {
                total = total.saturating_add(desc.len.into());
            }
            if desc.flags & desc_flags::NEXT == 0 {
                break;
            }
            index = u64::from(desc.next);
        }
        total
    }

    /// What every head of queue `queue` offers ([`Guest::writable_capacity`]), taken before
    /// the device runs (it may write into buffers that alias indirect tables).
    pub fn capacities(&self, queue: usize) -> Vec<u64> {
        (0..u32::from(RING)).map(|head| self.writable_capacity(queue, head)).collect()
    }

    /// Checks what the device published on queue `queue` since used index `before`: no more
    /// entries than the guest made available, heads inside the ring, and used lengths within
    /// what each chain offered (`capacities`, from [`Guest::capacities`] before the device ran).
    pub fn check_used(&self, queue: usize, before: u16, offered: u16, capacities: &[u64]) {
        let after = self.used_idx(queue);
        let published = after.wrapping_sub(before);
        assert!(published <= offered, "queue {queue}: {published} used entries for {offered} available");
        for elem in self.used(queue, before, after) {
            assert!(elem.id < u32::from(RING), "queue {queue}: used id {} outside the ring", elem.id);
            let capacity = capacities.get(elem.id as usize).copied().unwrap_or(0);
            assert!(
                u64::from(elem.len) <= capacity,
                "queue {queue}: used length {} for head {}, which offers {capacity} writable bytes",
                elem.len,
                elem.id
            );
        }
    }
}

/// A service that checks the hooks a device calls: every admitted request completes, and
/// every guest write lies inside guest memory. It fails the requests `fail_mask` picks (bit
/// `n % 64` for the n-th request), so the error path is fuzzed too.
pub struct CheckingServices {
    admitted: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
    fail_mask: u64,
}

impl CheckingServices {
    /// A service failing the requests `fail_mask` picks.
    pub fn new(fail_mask: u64) -> CheckingServices {
        use std::sync::atomic::AtomicU64;
        CheckingServices { admitted: AtomicU64::new(0), completed: AtomicU64::new(0), fail_mask }
    }

    /// Asserts that every admitted request completed.
    pub fn check_balanced(&self) {
        self.check_outstanding_at_most(0);
    }

    /// Asserts that no request completed more than once and at most `held` are still waiting.
    pub fn check_outstanding_at_most(&self, held: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let (admitted, completed) = (self.admitted.load(SeqCst), self.completed.load(SeqCst));
        assert!(
            completed <= admitted && admitted - completed <= held,
            "{admitted} admitted, {completed} completed ({held} may wait)"
        );
    }
}

impl pvkit_host_devices::queue::services::QueueServices for CheckingServices {
    fn admit(&self, _work: &pvkit_host_devices::queue::services::Work) -> pvkit_host_devices::queue::services::Verdict {
        use pvkit_host_devices::queue::services::Verdict;
        let n = self.admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fail_mask >> (n % 64) & 1 != 0 { Verdict::Fail } else { Verdict::Serve }
    }

    fn completed(&self, _completion: &pvkit_host_devices::queue::services::Completion) {
        self.completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn guest_written(&self, addr: GuestAddress, len: u64) {
        let end = addr.0.checked_add(len);
        assert!(end.is_some_and(|end| end <= MEM_SIZE), "a guest write at {:#x}+{len} outside guest memory", addr.0);
    }

    fn is_active(&self) -> bool {
        true
    }
}

/// Posts rings on every queue from `input` (a count byte each: 0xff jumps the available index
/// past the ring instead), fills the buffer area with the rest, and returns what each queue
/// offered and each head's writable capacity, taken before any device runs.
pub fn post_all(guest: &mut Guest, queues: usize, input: &mut Input<'_>) -> (Vec<u16>, Vec<Vec<u64>>) {
    let mut offered = vec![0u16; queues];
    for (q, offered) in offered.iter_mut().enumerate() {
        let count = input.byte();
        if count == 0xff {
            let idx = input.u16();
            guest.set_avail_idx(q, idx);
            *offered = idx;
        } else {
            *offered = u16::from(count) % (RING + 1);
            guest.post(q, *offered, input);
        }
    }
    guest.fill_data(input.rest());
    let capacities = (0..queues).map(|q| guest.capacities(q)).collect();
    (offered, capacities)
}
