//! Turning a descriptor chain into a checked block request.
//!
//! The device makes no assumption about how the driver split the request into descriptors
//! (virtio 1.2, 2.6.4): the readable bytes form one stream (header, then OUT data or discard
//! segments), the writable bytes another (IN data or the GET_ID answer, then the status byte).
//! Everything a guest controls is checked here, before any I/O.

pub use crate::queue::chain::Segment;
use crate::queue::chain::{ChainBuffers, ChainError, drop_front, pop_last_byte, read_stream, stream_len};
use crate::queue::split_ring::SplitRing;
use pvkit_protocol::blk::{self, RequestHeaderRepr, RequestType, SECTOR_SIZE, SEGMENT_SIZE, SegmentRepr};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Why a request was refused. Each kind is counted and logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain could not be walked (loop, bad index, bad indirect table).
    #[error("descriptor chain is malformed")]
    BadChain,
    /// A readable descriptor after a writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// No writable byte for the status.
    #[error("no writable byte for the status")]
    NoStatusByte,
    /// Fewer readable bytes than a request header.
    #[error("request header is {0} bytes, 16 needed")]
    HeaderTooShort(u64),
    /// Data of a length that is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// A sector range past the end of the disk, or overflowing.
    #[error("sectors {sector}+{sectors} lie outside a disk of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// Buffers of the wrong direction for the request type.
    #[error("{0} request has buffers of the wrong direction")]
    WrongDirection(&'static str),
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("{0} on a read-only disk")]
    ReadOnly(&'static str),
    /// A discard or write-zeroes segment that is malformed or has reserved flags.
    #[error("bad discard/write-zeroes segment: {0}")]
    BadSegment(blk::BlkError),
    /// More segments, or more sectors in one segment, than the device announced.
    #[error("{what} of {value} exceeds the announced limit {limit}")]
    OverLimit {
        /// Which limit.
        what: &'static str,
        /// The value asked for.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A request type the device does not support.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Guest memory that the buffers point at does not exist.
    #[error("buffer at {0:#x} is outside guest memory")]
    BadAddress(u64),
    /// A service (fault injection) failed the request on purpose.
    #[error("failed by an attached service")]
    FailedByService,
    /// A service (fault injection) refused the request as unsupported on purpose.
    #[error("refused as unsupported by an attached service")]
    UnsupportedByService,
}

impl RequestError {
    /// The status the driver sees.
    pub fn status(&self) -> blk::Status {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedByService => blk::Status::Unsupp,
            RequestError::BadSegment(blk::BlkError::ReservedSegmentFlags(_)) => blk::Status::Unsupp,
            _ => blk::Status::IoErr,
        }
    }

    /// A short stable name for statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::BadChain => "bad-chain",
            RequestError::ReadableAfterWritable => "direction-order",
            RequestError::NoStatusByte => "no-status",
            RequestError::HeaderTooShort(_) => "short-header",
            RequestError::UnalignedLength(_) => "unaligned",
            RequestError::OutOfRange { .. } => "out-of-range",
            RequestError::WrongDirection(_) => "wrong-direction",
            RequestError::ReadOnly(_) => "read-only",
            RequestError::BadSegment(_) => "bad-segment",
            RequestError::OverLimit { .. } => "over-limit",
            RequestError::Unsupported(_) => "unsupported",
            RequestError::BadAddress(_) => "bad-address",
            RequestError::FailedByService => "failed-by-service",
            RequestError::UnsupportedByService => "unsupported-by-service",
        }
    }
}

/// What a checked request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Read `data` (device-writable) from byte `offset`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Write `data` (device-readable) at byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Make earlier writes durable.
    Flush,
    /// Write the id string into `data`.
    GetId,
    /// Discard byte ranges.
    Discard(Vec<(u64, u64)>),
    /// Zero byte ranges; `bool` is UNMAP.
    WriteZeroes(Vec<(u64, u64, bool)>),
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request type from the header.
    pub request_type: RequestType,
    /// What to do.
    pub operation: Operation,
    /// The data buffers (device-writable for Read/GetId, device-readable for Write).
    pub data: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// The device's limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// Most segments in one discard or write-zeroes request.
    pub max_segments: u32,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
}

/// The request's framing: where its status byte is, once known. A chain that fails before the
/// status byte is found is dropped without a status.
pub struct Parsed {
    /// The status byte's address, when the chain has one.
    pub status: Option<GuestAddress>,
    /// The request, or why it was refused.
    pub result: Result<Request, RequestError>,
}

/// Most bytes one request's chain may describe (far above `seg_max` x `size_max`).
pub const MAX_CHAIN_BYTES: u64 = 1 << 32;

impl From<ChainError> for RequestError {
    fn from(error: ChainError) -> RequestError {
        match error {
            ChainError::Malformed => RequestError::BadChain,
            ChainError::WritableInReadOnlyChain => RequestError::WrongDirection("chain"),
            ChainError::AddressWraps(addr) | ChainError::BadAddress(addr) => RequestError::BadAddress(addr),
            ChainError::TooLong { cap } => RequestError::OverLimit { what: "chain bytes", value: cap + 1, limit: cap },
        }
    }
}

/// Walks `chain` (whose memory is `mem`) and checks the request it holds against `limits`.
pub fn parse<M, G>(chain: DescriptorChain<M>, mem: &G, limits: &Limits) -> Parsed
where
    M: Deref<Target = G>,
    G: GuestMemoryBackend,
{
    match ChainBuffers::collect(chain, MAX_CHAIN_BYTES) {
        Ok(buffers) => parse_buffers(buffers, mem, limits),
        Err(e) => Parsed { status: None, result: Err(e.into()) },
    }
}

/// Walks the chain at `head` of `ring` and checks the request it holds against `limits`
/// (`None`: the queue has no rings, and the chain cannot be walked).
pub fn parse_head(ring: Option<&SplitRing<'_>>, head: u16, limits: &Limits) -> Parsed {
    let Some(ring) = ring else {
        return Parsed { status: None, result: Err(ChainError::Malformed.into()) };
    };
    let mut buffers = ChainBuffers::default();
    match ring.walk(head, MAX_CHAIN_BYTES, &mut buffers) {
        Ok(()) => parse_buffers(buffers, ring.memory(), limits),
        Err(e) => Parsed { status: None, result: Err(e.into()) },
    }
}

/// Checks the request in an already walked chain; its segment lists become the request's
/// data in place (no copy, no allocation).
pub fn parse_buffers<G: GuestMemoryBackend>(buffers: ChainBuffers, mem: &G, limits: &Limits) -> Parsed {
    let misordered = buffers.misordered;
    let ChainBuffers { readable, mut writable, .. } = buffers;
    let Some(status_addr) = pop_last_byte(&mut writable) else {
        return Parsed { status: None, result: Err(RequestError::NoStatusByte) };
    };
    if !mem.check_range(status_addr, 1) {
        return Parsed { status: None, result: Err(RequestError::BadAddress(status_addr.raw_value())) };
    }
    let result = if misordered {
        Err(RequestError::ReadableAfterWritable)
    } else {
        check(mem, readable, writable, status_addr, limits)
    };
    Parsed { status: Some(status_addr), result }
}

fn check_range(offset_sector: u64, bytes: u64, capacity: u64) -> Result<(), RequestError> {
    let sectors = bytes / SECTOR_SIZE;
    match offset_sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector: offset_sector, sectors, capacity }),
    }
}

fn check<M: GuestMemoryBackend>(
    mem: &M,
    mut readable_data: Vec<Segment>,
    writable_data: Vec<Segment>,
    status: GuestAddress,
    limits: &Limits,
) -> Result<Request, RequestError> {
    let readable_len = stream_len(&readable_data);
    if readable_len < blk::REQUEST_HEADER_SIZE as u64 {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let mut header_bytes = [0u8; blk::REQUEST_HEADER_SIZE];
    read_stream(mem, &readable_data, &mut header_bytes).map_err(RequestError::from)?;
    drop_front(&mut readable_data, header_bytes.len() as u64);
    let header =
        RequestHeaderRepr::parse_bytes(&header_bytes).map_err(|_| RequestError::HeaderTooShort(readable_len))?;
    let in_len = stream_len(&writable_data);
    let out_len = stream_len(&readable_data);
    for seg in readable_data.iter().chain(writable_data.iter()) {
        if !mem.check_range(seg.addr, seg.len as usize) {
            return Err(RequestError::BadAddress(seg.addr.raw_value()));
        }
    }
    let name = header.request_type.name();
    let capacity = limits.capacity_sectors;
    let sector_offset =
        |sector: u64| sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::OutOfRange { sector, sectors: 0, capacity });
    let (operation, data) = match header.request_type {
        RequestType::In => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection(name));
            }
            if !in_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(in_len));
            }
            check_range(header.sector, in_len, capacity)?;
            (Operation::Read { offset: sector_offset(header.sector)? }, writable_data)
        }
        RequestType::Out => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection(name));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly(name));
            }
            if !out_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(out_len));
            }
            check_range(header.sector, out_len, capacity)?;
            (Operation::Write { offset: sector_offset(header.sector)? }, readable_data)
        }
        RequestType::Flush => (Operation::Flush, Vec::new()),
        RequestType::GetId => {
            if out_len != 0 || in_len == 0 {
                return Err(RequestError::WrongDirection(name));
            }
            (Operation::GetId, writable_data)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection(name));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly(name));
            }
            let is_discard = header.request_type == RequestType::Discard;
            let segments = parse_segments(mem, &readable_data, out_len, limits, is_discard)?;
            let operation = if is_discard {
                Operation::Discard(segments.iter().map(|s| (s.0, s.1)).collect())
            } else {
                Operation::WriteZeroes(segments)
            };
            (operation, Vec::new())
        }
        other => return Err(RequestError::Unsupported(other.raw())),
    };
    Ok(Request { request_type: header.request_type, operation, data, status })
}

fn parse_segments<M: GuestMemoryBackend>(
    mem: &M,
    stream: &[Segment],
    len: u64,
    limits: &Limits,
    is_discard: bool,
) -> Result<Vec<(u64, u64, bool)>, RequestError> {
    if len == 0 || !len.is_multiple_of(SEGMENT_SIZE as u64) {
        return Err(RequestError::BadSegment(blk::BlkError::Truncated(pvkit_protocol::TruncatedError {
            what: "virtio-blk discard segment",
            needed: SEGMENT_SIZE,
            actual: (len % SEGMENT_SIZE as u64) as usize,
        })));
    }
    let count = len / SEGMENT_SIZE as u64;
    if count > u64::from(limits.max_segments) {
        return Err(RequestError::OverLimit { what: "segment count", value: count, limit: limits.max_segments.into() });
    }
    let max_sectors = if is_discard { limits.max_discard_sectors } else { limits.max_write_zeroes_sectors };
    let mut out = Vec::with_capacity(count as usize);
    let mut rest = stream.to_vec();
    for _ in 0..count {
        let mut raw = [0u8; SEGMENT_SIZE];
        read_stream(mem, &rest, &mut raw).map_err(RequestError::from)?;
        drop_front(&mut rest, SEGMENT_SIZE as u64);
        let seg = SegmentRepr::parse(&raw).map_err(RequestError::BadSegment)?;
        if is_discard && seg.unmap {
            // The UNMAP flag is reserved for discard (virtio 1.2, 5.2.6.2).
            return Err(RequestError::BadSegment(blk::BlkError::ReservedSegmentFlags(blk::SEGMENT_F_UNMAP)));
        }
        if seg.num_sectors > max_sectors {
            return Err(RequestError::OverLimit {
                what: "segment sectors",
                value: seg.num_sectors.into(),
                limit: max_sectors.into(),
            });
        }
        check_range(seg.sector, u64::from(seg.num_sectors) * SECTOR_SIZE, limits.capacity_sectors)?;
        out.push((seg.sector * SECTOR_SIZE, u64::from(seg.num_sectors) * SECTOR_SIZE, seg.unmap));
    }
    Ok(out)
}

/// Writes the status byte.
pub fn write_status<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, status: blk::Status) -> bool {
    mem.write_obj(status as u8, addr).is_ok()
}
