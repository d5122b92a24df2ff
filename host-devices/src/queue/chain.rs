//! One walk of a descriptor chain: its device-readable bytes form one stream of segments, its
//! device-writable bytes another (virtio 1.2, 2.6.4: a device may not assume how the driver
//! split a request into descriptors). Every device walks chains through [`ChainBuffers`].
//!
//! virtio-queue's `Reader`/`Writer` copy through `std::io`; the block device needs the
//! segments themselves (io_uring and pread/pwrite go straight into guest memory), and the net
//! device needs a walk that allocates nothing per frame. So the walk keeps segments, and the
//! copies in and out are helpers over them. A byte cap bounds what one chain may make the
//! device hold: descriptors may all point at the same guest memory, so a chain's length is not
//! bounded by the guest's memory.

use super::services::QueueServices;
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// Why a chain cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No descriptor could be read (a bad head index, a loop, a bad indirect table).
    #[error("the descriptor chain is malformed")]
    Malformed,
    /// A device-writable buffer in a chain the device only reads (a transmit chain).
    #[error("a chain the device only reads holds a device-writable buffer")]
    WritableInReadOnlyChain,
    /// A descriptor whose buffer wraps around the address space.
    #[error("the buffer at {0:#x} wraps around the address space")]
    AddressWraps(u64),
    /// More bytes than the device accepts in one chain.
    #[error("the chain holds more than the {cap} bytes accepted in one chain")]
    TooLong {
        /// The cap.
        cap: u64,
    },
    /// A buffer outside guest memory.
    #[error("the buffer at {0:#x} is outside guest memory")]
    BadAddress(u64),
}

/// A contiguous piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// The segments of one chain; reusable (a worker keeps one and refills it per chain).
#[derive(Debug, Default, Clone)]
pub struct ChainBuffers {
    /// The head descriptor's index (what goes into the used ring).
    pub head: u16,
    /// Device-readable segments, in order.
    pub readable: Vec<Segment>,
    /// Device-writable segments, in order.
    pub writable: Vec<Segment>,
    /// Whether a readable descriptor came after a writable one (kept out of both streams).
    pub misordered: bool,
    readable_len: u64,
    writable_len: u64,
}

impl ChainBuffers {
    /// Walks `chain`, refusing more than `cap` bytes in all.
    pub fn collect<M>(chain: DescriptorChain<M>, cap: u64) -> Result<ChainBuffers, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut buffers = ChainBuffers::default();
        buffers.refill(chain, cap)?;
        Ok(buffers)
    }

    /// Walks `chain` into `self` (its vectors keep their capacity).
    pub fn refill<M>(&mut self, chain: DescriptorChain<M>, cap: u64) -> Result<(), ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.begin(chain.head_index());
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            self.add(desc.addr(), u64::from(desc.len()), desc.is_write_only(), cap)?;
        }
        if count == 0 {
            return Err(ChainError::Malformed);
        }
        Ok(())
    }

    /// Starts a walk of the chain at `head` (the vectors keep their capacity).
    pub fn begin(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.misordered = false;
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Adds the next descriptor of the walk: `len` bytes at `addr`, device-writable or not,
    /// refusing a buffer that wraps the address space and more than `cap` bytes in all.
    pub fn add(&mut self, addr: GuestAddress, len: u64, write_only: bool, cap: u64) -> Result<(), ChainError> {
        let seg = Segment { addr, len };
        if addr.checked_add(len).is_none() {
            return Err(ChainError::AddressWraps(addr.raw_value()));
        }
        if self.readable_len + self.writable_len + len > cap {
            return Err(ChainError::TooLong { cap });
        }
        if write_only {
            self.writable.push(seg);
            self.writable_len += len;
        } else if self.writable.is_empty() {
            self.readable.push(seg);
            self.readable_len += len;
        } else {
            self.misordered = true;
        }
        Ok(())
    }

    /// This chain, if it holds device-readable buffers only (what a transmit chain must).
    pub fn readable_only(self) -> Result<ChainBuffers, ChainError> {
        self.check_readable_only().map(|()| self)
    }

    /// Whether this chain holds device-readable buffers only.
    pub fn check_readable_only(&self) -> Result<(), ChainError> {
        if self.writable.is_empty() && !self.misordered { Ok(()) } else { Err(ChainError::WritableInReadOnlyChain) }
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Appends the readable bytes to `out` (whose growth the cap bounds).
    pub fn read_all<M: GuestMemoryBackend>(&self, mem: &M, out: &mut Vec<u8>) -> Result<(), ChainError> {
        self.read_after(mem, 0, out)
    }

    /// Appends the readable bytes after the first `skip` to `out`.
    pub fn read_after<M: GuestMemoryBackend>(&self, mem: &M, skip: u64, out: &mut Vec<u8>) -> Result<(), ChainError> {
        let mut skip = skip;
        for seg in &self.readable {
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let (addr, len) = (seg.addr.unchecked_add(skip), (seg.len - skip) as usize);
            skip = 0;
            let start = out.len();
            out.resize(start + len, 0);
            read_guest(mem, addr, &mut out[start..])?;
        }
        Ok(())
    }

    /// Writes `data` across the writable segments from their start, telling `services` of
    /// every byte written; returns how many bytes went in (a segment outside guest memory
    /// stops it).
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M, data: &[u8], services: &dyn QueueServices) -> usize {
        write_stream(mem, &self.writable, data, services)
    }
}

/// Removes the first `n` bytes of a stream in place (segments none of which wraps the
/// address space, as [`ChainBuffers`] guarantees); all of it when it is shorter.
pub fn drop_front(stream: &mut Vec<Segment>, n: u64) {
    let (mut left, mut whole) = (n, 0);
    for seg in stream.iter_mut() {
        if left == 0 {
            break;
        }
        if left >= seg.len {
            left -= seg.len;
            whole += 1;
        } else {
            seg.addr = seg.addr.unchecked_add(left);
            seg.len -= left;
            left = 0;
        }
    }
    stream.drain(..whole);
}

/// Removes the last byte of a stream in place and returns its address; `None` when the stream
/// holds no byte.
pub fn pop_last_byte(stream: &mut Vec<Segment>) -> Option<GuestAddress> {
    while let Some(last) = stream.last_mut() {
        if last.len == 0 {
            stream.pop();
            continue;
        }
        last.len -= 1;
        let addr = last.addr.unchecked_add(last.len);
        if last.len == 0 {
            stream.pop();
        }
        return Some(addr);
    }
    None
}

/// Total bytes of a stream.
pub fn stream_len(stream: &[Segment]) -> u64 {
    stream.iter().map(|s| s.len).sum()
}

/// Copies the guest bytes at `addr` into `buf`: through one translation when they lie in one
/// region (always, but for a buffer that straddles two), through vm-memory's walk over the
/// regions otherwise. vm-memory's `read_slice` walks an iterator of slices even for one
/// region, which cost a looped-back 64-byte frame about 240 instructions per copy.
pub fn read_guest<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, buf: &mut [u8]) -> Result<(), ChainError> {
    match mem.get_slice(addr, buf.len()) {
        Ok(slice) => {
            slice.copy_to(buf);
            Ok(())
        }
        Err(_) => mem.read_slice(buf, addr).map_err(|_| ChainError::BadAddress(addr.raw_value())),
    }
}

/// Copies `data` to the guest at `addr`, as [`read_guest`] reads.
pub fn write_guest<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, data: &[u8]) -> Result<(), ChainError> {
    match mem.get_slice(addr, data.len()) {
        Ok(slice) => {
            slice.copy_from(data);
            Ok(())
        }
        Err(_) => mem.write_slice(data, addr).map_err(|_| ChainError::BadAddress(addr.raw_value())),
    }
}

/// Fills `buf` from the start of a stream.
pub fn read_stream<M: GuestMemoryBackend>(mem: &M, stream: &[Segment], buf: &mut [u8]) -> Result<(), ChainError> {
    let mut done = 0usize;
    for seg in stream {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(seg.len as usize);
        read_guest(mem, seg.addr, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Writes `data` across `stream` from its start, telling `services` of each write; returns
/// the bytes written.
pub fn write_stream<M: GuestMemoryBackend>(
    mem: &M,
    stream: &[Segment],
    data: &[u8],
    services: &dyn QueueServices,
) -> usize {
    let mut done = 0usize;
    for seg in stream {
        if done == data.len() {
            break;
        }
        let n = (seg.len as usize).min(data.len() - done);
        if write_guest(mem, seg.addr, &data[done..done + n]).is_err() {
            break;
        }
        services.guest_written(seg.addr, n as u64);
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::NoServices;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = pvkit_protocol::ring::desc_flags::NEXT;
    const WRITE: u16 = pvkit_protocol::ring::desc_flags::WRITE;

    fn chain_of<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, (i + 1) as u16))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        let queue = mock.create_queue().unwrap();
        (mock, queue)
    }

    #[test]
    fn streams_are_trimmed_in_place_at_any_split() {
        let seg = |addr, len| Segment { addr: GuestAddress(addr), len };
        let stream = vec![seg(0x1000, 10), seg(0x2000, 0), seg(0x3000, 6)];
        let mut s = stream.clone();
        drop_front(&mut s, 4);
        assert_eq!(s, [seg(0x1004, 6), seg(0x2000, 0), seg(0x3000, 6)]);
        drop_front(&mut s, 6);
        assert_eq!(s, [seg(0x2000, 0), seg(0x3000, 6)], "a whole segment goes, not a zero-length one after it");
        drop_front(&mut s, 100);
        assert!(s.is_empty(), "more than the stream: all of it");
        let mut s = stream.clone();
        assert_eq!(pop_last_byte(&mut s), Some(GuestAddress(0x3005)));
        assert_eq!(s, [seg(0x1000, 10), seg(0x2000, 0), seg(0x3000, 5)]);
        let mut s = vec![seg(0x1000, 1), seg(0x2000, 0)];
        assert_eq!(pop_last_byte(&mut s), Some(GuestAddress(0x1000)), "trailing empty segments are skipped");
        assert!(s.is_empty());
        assert_eq!(pop_last_byte(&mut s), None);
        assert_eq!(stream_len(&stream), 16);
    }

    #[test]
    fn streams_split_by_direction_and_copies_round_trip() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0x9000)).unwrap();
        let (_mock, mut queue) =
            chain_of(&mem, &[(0x8000, 6, 0), (0x9000, 5, 0), (0xa000, 4, WRITE), (0xb000, 4, WRITE)]);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let buffers = ChainBuffers::collect(chain, 1 << 20).unwrap();
        assert_eq!((buffers.readable_len(), buffers.writable_len()), (11, 8));
        let mut out = Vec::new();
        buffers.read_all(&mem, &mut out).unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(buffers.write(&mem, b"abcdefghij", &NoServices), 8, "only what fits");
        let mut back = [0u8; 4];
        mem.read_slice(&mut back, GuestAddress(0xb000)).unwrap();
        assert_eq!(&back, b"efgh");
    }

    #[test]
    fn copies_cross_a_boundary_between_regions_and_refuse_addresses_outside() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        let straddling = [Segment { addr: GuestAddress(0xffa), len: 12 }];
        assert_eq!(write_stream(&mem, &straddling, b"hello, world", &NoServices), 12);
        let mut back = [0u8; 12];
        read_stream(&mem, &straddling, &mut back).unwrap();
        assert_eq!(&back, b"hello, world", "through both regions");
        let mut one = [0u8; 6];
        read_guest(&mem, GuestAddress(0x1000), &mut one).unwrap();
        assert_eq!(&one, b" world", "the second region holds the rest");
        assert_eq!(read_guest(&mem, GuestAddress(0x1ffe), &mut one), Err(ChainError::BadAddress(0x1ffe)));
        assert_eq!(write_guest(&mem, GuestAddress(0x3000), b"x"), Err(ChainError::BadAddress(0x3000)));
    }

    #[test]
    fn the_cap_counts_descriptors_that_alias_the_same_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let same = vec![(0x8000, 0x8000, 0); 8];
        let (_mock, mut queue) = chain_of(&mem, &same);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(ChainBuffers::collect(chain, 0x10000).unwrap_err(), ChainError::TooLong { cap: 0x10000 });
    }

    #[test]
    fn readable_after_writable_is_flagged_and_wrapping_buffers_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (_mock, mut queue) = chain_of(&mem, &[(0x8000, 4, WRITE), (0x9000, 4, 0)]);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert!(ChainBuffers::collect(chain, 1 << 20).unwrap().misordered);
        let (_mock, mut queue) = chain_of(&mem, &[(u64::MAX - 2, 16, 0)]);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(ChainBuffers::collect(chain, 1 << 20).unwrap_err(), ChainError::AddressWraps(u64::MAX - 2));
    }
}
