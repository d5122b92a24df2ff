//! virtio-blk: read, write, flush, get-id, discard and write-zeroes; capacity, block size and
//! read-only from the configuration space; many requests in flight, each named by a token.
//!
//! [`VirtIOBlk::submit`] and [`VirtIOBlk::poll`] are the non-blocking base; the blocking
//! helpers ([`VirtIOBlk::read_blocks`] and the rest) wait on top of them.

use crate::hal::{Dma, Hal};
use crate::hypercall::Shim;
use crate::protocol::blk::{self, RequestHeaderRepr, RequestType, SegmentRepr, Status, feature as bf};
use crate::protocol::virtio::{DeviceId, Features, feature as vf};
use crate::queue::{Buffer, QueueError, VirtQueue};
use crate::transport::{self, NotifyTarget, Transport, TransportError};

/// Bytes of per-request DMA state: header (16), discard segment (16), status (1), padding.
const SLOT: usize = 64;
/// Most request queues the driver uses (when the device offers MQ).
pub const MAX_QUEUES: usize = 4;

/// Errors from the block driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlkError {
    /// The transport or a queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The device is not a block device.
    #[error("device type {0} is not a block device")]
    WrongDevice(u32),
    /// A buffer whose length is not a whole number of sectors (or is empty).
    #[error("a {0}-byte buffer is not a whole number of 512-byte sectors")]
    BadLength(usize),
    /// The request would go past the end of the disk.
    #[error("sectors {sector}+{count} are past the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors asked for.
        count: u64,
        /// Capacity.
        capacity: u64,
    },
    /// The device does not support the request (feature not offered, or UNSUPP status).
    #[error("the device does not support {0}")]
    Unsupported(&'static str),
    /// Writes to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The device reported an I/O error.
    #[error("the device reported an I/O error")]
    IoError,
    /// The device wrote a status byte that does not exist.
    #[error("the device returned status {0}")]
    BadStatus(u8),
    /// A token that names no request in flight.
    #[error("token {0} names no request in flight")]
    UnknownToken(u16),
}

impl From<TransportError> for BlkError {
    fn from(e: TransportError) -> BlkError {
        BlkError::Queue(QueueError::Transport(e))
    }
}

/// A request to submit.
#[derive(Debug)]
pub enum BlkRequest<'a> {
    /// Read sectors into the buffer.
    Read {
        /// First sector.
        sector: u64,
        /// Where the data goes (a whole number of sectors).
        buf: &'a mut [u8],
    },
    /// Write the buffer's sectors.
    Write {
        /// First sector.
        sector: u64,
        /// The data (a whole number of sectors).
        buf: &'a [u8],
    },
    /// Make written data durable.
    Flush,
    /// Read the device's id string (up to 20 bytes).
    GetId {
        /// Where the id goes (20 bytes).
        buf: &'a mut [u8; blk::ID_BYTES],
    },
    /// Discard sectors.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u32,
    },
    /// Zero sectors (unmapping them if the device may).
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u32,
    },
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The queue it ran on.
    pub queue: u16,
    /// The token [`VirtIOBlk::submit`] returned (unique per queue).
    pub token: u16,
    /// Its outcome.
    pub result: Result<(), BlkError>,
}

/// What the device reported about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkInfo {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Request queues the device offers.
    pub num_queues: u16,
    /// Request queues the driver set up (at most [`MAX_QUEUES`]).
    pub queues_used: u16,
    /// The negotiated features.
    pub features: Features,
}

/// A virtio-blk device with a request queue of `QUEUE` entries.
pub struct VirtIOBlk<H: Hal, T: Transport, const QUEUE: usize = 64> {
    transport: T,
    /// Completions taken while waiting for another token, by queue and token.
    finished: [[Option<Result<(), BlkError>>; QUEUE]; MAX_QUEUES],
    queues: [Option<VirtQueue<H, QUEUE>>; MAX_QUEUES],
    next_poll: usize,
    slots: Dma<H>,
    info: BlkInfo,
}

impl<H: Hal, T: Transport, const QUEUE: usize> VirtIOBlk<H, T, QUEUE> {
    /// The features the driver can use.
    pub const SUPPORTED: Features = Features::from_bits(&[
        vf::VERSION_1,
        vf::RING_EVENT_IDX,
        vf::RING_INDIRECT_DESC,
        bf::RO,
        bf::BLK_SIZE,
        bf::FLUSH,
        bf::MQ,
        bf::DISCARD,
        bf::WRITE_ZEROES,
    ]);

    /// Initialises the device; `shim` picks each queue's doorbell from the transport's notify
    /// register (see [`crate::hypercall::Shim::choose`]).
    pub fn new(transport: T, shim: impl Fn(u16, NotifyTarget) -> Shim) -> Result<Self, BlkError> {
        Self::with_features(transport, Self::SUPPORTED, shim)
    }

    /// Like [`VirtIOBlk::new`], accepting only the features in `allowed` (intersected with
    /// [`VirtIOBlk::SUPPORTED`]): to measure or test without RING_EVENT_IDX, say.
    pub fn with_features(
        mut transport: T,
        allowed: Features,
        shim: impl Fn(u16, NotifyTarget) -> Shim,
    ) -> Result<Self, BlkError> {
        if transport.device_id() != DeviceId::Block.raw() {
            return Err(BlkError::WrongDevice(transport.device_id()));
        }
        let features = transport::begin_init(&mut transport, Self::SUPPORTED.intersect(allowed))?;
        let mut config = [0u8; blk::CONFIG_SIZE];
        // Older devices expose a shorter configuration: read what is there.
        let readable = if features.has(bf::WRITE_ZEROES) || features.has(bf::DISCARD) { blk::CONFIG_SIZE } else { 36 };
        transport.read_config_consistent(0, &mut config[..readable])?;
        let parsed = blk::ConfigRepr::parse(&config).unwrap_or_default();
        let num_queues = if features.has(bf::MQ) { parsed.num_queues.max(1) } else { 1 };
        let queues_used = num_queues.min(MAX_QUEUES as u16);
        let info = BlkInfo {
            capacity: parsed.capacity,
            block_size: if features.has(bf::BLK_SIZE) && parsed.blk_size >= 512 { parsed.blk_size } else { 512 },
            read_only: features.has(bf::RO),
            num_queues,
            queues_used,
            features,
        };
        let mut queues: [Option<VirtQueue<H, QUEUE>>; MAX_QUEUES] = Default::default();
        for (index, slot) in queues.iter_mut().enumerate().take(usize::from(queues_used)) {
            let index = index as u16;
            *slot = Some(VirtQueue::new(
                &mut transport,
                index,
                features.has(vf::RING_INDIRECT_DESC),
                features.has(vf::RING_EVENT_IDX),
                |target| shim(index, target),
            )?);
        }
        let slots =
            Dma::new(Dma::<H>::pages_for(usize::from(queues_used) * QUEUE * SLOT)).ok_or(QueueError::NoMemory(0))?;
        transport::finish_init(&mut transport);
        Ok(VirtIOBlk { transport, finished: [[None; QUEUE]; MAX_QUEUES], queues, next_poll: 0, slots, info })
    }

    /// What the device reported.
    pub fn info(&self) -> BlkInfo {
        self.info
    }

    /// Request queue 0 (statistics, doorbell, interrupt suppression).
    pub fn queue(&mut self) -> &mut VirtQueue<H, QUEUE> {
        // Queue 0 always exists once `new` succeeded.
        self.queues[0].as_mut().expect("queue 0 is set up in new")
    }

    /// Request queue `index`, if the driver set it up.
    pub fn queue_at(&mut self, index: u16) -> Option<&mut VirtQueue<H, QUEUE>> {
        self.queues.get_mut(usize::from(index))?.as_mut()
    }

    /// Whether any queue has a finished request waiting.
    pub fn has_completions(&self) -> bool {
        self.queues.iter().flatten().any(VirtQueue::has_used)
    }

    /// The transport (interrupt acknowledgement).
    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    fn slot_offset(queue: u16, token: u16, offset: usize) -> usize {
        (usize::from(queue) * QUEUE + usize::from(token) % QUEUE) * SLOT + offset
    }

    fn slot_ptr(&self, queue: u16, token: u16, offset: usize) -> *mut u8 {
        self.slots.vaddr().as_ptr().wrapping_add(Self::slot_offset(queue, token, offset))
    }

    fn slot_phys(&self, queue: u16, token: u16, offset: usize) -> u64 {
        self.slots.paddr() + Self::slot_offset(queue, token, offset) as u64
    }

    fn check_range(&self, sector: u64, count: u64) -> Result<(), BlkError> {
        match sector.checked_add(count) {
            Some(end) if end <= self.info.capacity => Ok(()),
            _ => Err(BlkError::OutOfRange { sector, count, capacity: self.info.capacity }),
        }
    }

    /// Submits a request without waiting; returns its token. Call
    /// [`VirtQueue::notify`](crate::queue::VirtQueue::notify) through [`VirtIOBlk::kick`] after
    /// a batch.
    ///
    /// # Safety
    ///
    /// The request's buffer must stay valid and untouched until [`VirtIOBlk::poll`] returns
    /// the token, and be physically contiguous (see [`Hal::virt_to_phys`]).
    pub unsafe fn submit(&mut self, request: BlkRequest<'_>) -> Result<u16, BlkError> {
        // SAFETY: passed on from the caller.
        unsafe { self.submit_on(0, request) }
    }

    /// Submits a request on request queue `queue` (see [`BlkInfo::queues_used`]); tokens
    /// are per queue.
    ///
    /// # Safety
    ///
    /// As for [`VirtIOBlk::submit`].
    pub unsafe fn submit_on(&mut self, queue: u16, request: BlkRequest<'_>) -> Result<u16, BlkError> {
        if queue >= self.info.queues_used {
            return Err(BlkError::Queue(QueueError::Transport(TransportError::NoSuchQueue(queue))));
        }
        let (kind, sector, data): (RequestType, u64, Option<Buffer>) = match &request {
            BlkRequest::Read { sector, buf } => {
                self.check_io(*sector, buf.len(), false)?;
                (
                    RequestType::In,
                    *sector,
                    Some(Buffer {
                        addr: H::virt_to_phys(buf.as_ptr() as usize),
                        len: buf.len() as u32,
                        device_writes: true,
                    }),
                )
            }
            BlkRequest::Write { sector, buf } => {
                self.check_io(*sector, buf.len(), true)?;
                (
                    RequestType::Out,
                    *sector,
                    Some(Buffer {
                        addr: H::virt_to_phys(buf.as_ptr() as usize),
                        len: buf.len() as u32,
                        device_writes: false,
                    }),
                )
            }
            BlkRequest::Flush => {
                if !self.info.features.has(bf::FLUSH) {
                    return Err(BlkError::Unsupported("flush"));
                }
                (RequestType::Flush, 0, None)
            }
            BlkRequest::GetId { buf } => (
                RequestType::GetId,
                0,
                Some(Buffer {
                    addr: H::virt_to_phys(buf.as_ptr() as usize),
                    len: blk::ID_BYTES as u32,
                    device_writes: true,
                }),
            ),
            BlkRequest::Discard { sector, count } | BlkRequest::WriteZeroes { sector, count } => {
                let discard = matches!(request, BlkRequest::Discard { .. });
                let feature = if discard { bf::DISCARD } else { bf::WRITE_ZEROES };
                if !self.info.features.has(feature) {
                    return Err(BlkError::Unsupported(if discard { "discard" } else { "write-zeroes" }));
                }
                if self.info.read_only {
                    return Err(BlkError::ReadOnly);
                }
                self.check_range(*sector, u64::from(*count))?;
                let kind = if discard { RequestType::Discard } else { RequestType::WriteZeroes };
                (kind, 0, None)
            }
        };
        // The token is the chain's head, known only after adding; use the queue's next free
        // head, which `add` will take.
        let buffers_len = 2
            + usize::from(data.is_some())
            + usize::from(matches!(request, BlkRequest::Discard { .. } | BlkRequest::WriteZeroes { .. }));
        let (free, slot) = match self.queue_at(queue) {
            Some(q) => (q.free(), q.peek_free_head()),
            None => return Err(BlkError::Queue(QueueError::Transport(TransportError::NoSuchQueue(queue)))),
        };
        if free < buffers_len.min(2) {
            return Err(BlkError::Queue(QueueError::Full { needed: buffers_len, free }));
        }
        let mut header = [0u8; blk::REQUEST_HEADER_SIZE];
        let _ = RequestHeaderRepr { request_type: kind, ioprio: 0, sector }.emit(&mut header);
        self.write_slot(queue, slot, 0, &header);
        self.write_slot(queue, slot, 32, &[0xff]);
        let mut buffers = [Buffer { addr: 0, len: 0, device_writes: false }; 4];
        let mut n = 0;
        buffers[n] =
            Buffer { addr: self.slot_phys(queue, slot, 0), len: blk::REQUEST_HEADER_SIZE as u32, device_writes: false };
        n += 1;
        if let BlkRequest::Discard { sector, count } | BlkRequest::WriteZeroes { sector, count } = request {
            let mut segment = [0u8; blk::SEGMENT_SIZE];
            let unmap = matches!(request, BlkRequest::WriteZeroes { .. });
            let _ = SegmentRepr { sector, num_sectors: count, unmap }.emit(&mut segment);
            self.write_slot(queue, slot, 16, &segment);
            buffers[n] =
                Buffer { addr: self.slot_phys(queue, slot, 16), len: blk::SEGMENT_SIZE as u32, device_writes: false };
            n += 1;
        }
        if let Some(data) = data {
            buffers[n] = data;
            n += 1;
        }
        buffers[n] = Buffer { addr: self.slot_phys(queue, slot, 32), len: 1, device_writes: true };
        n += 1;
        let q =
            self.queue_at(queue).ok_or(BlkError::Queue(QueueError::Transport(TransportError::NoSuchQueue(queue))))?;
        // SAFETY: the header, segment and status live in this driver's DMA slots, reserved for
        // the chain until it is popped; the data buffer is the caller's promise.
        let token = unsafe { q.add(&buffers[..n]) }?;
        debug_assert_eq!(token, slot);
        Ok(token)
    }

    fn check_io(&self, sector: u64, len: usize, write: bool) -> Result<(), BlkError> {
        if len == 0 || !len.is_multiple_of(blk::SECTOR_SIZE as usize) || len > u32::MAX as usize {
            return Err(BlkError::BadLength(len));
        }
        if write && self.info.read_only {
            return Err(BlkError::ReadOnly);
        }
        self.check_range(sector, (len / blk::SECTOR_SIZE as usize) as u64)
    }

    fn write_slot(&self, queue: u16, token: u16, offset: usize, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            // SAFETY: slot offsets + lengths stay below SLOT, inside the DMA allocation.
            unsafe { self.slot_ptr(queue, token, offset + i).write_volatile(*byte) };
        }
    }

    /// Rings the doorbell if the device wants it for the requests submitted since the last
    /// call (one decision per batch).
    pub fn kick(&mut self) -> bool {
        let mut rang = false;
        for q in self.queues.iter_mut().flatten() {
            rang |= q.notify();
        }
        rang
    }

    /// Takes one finished request from any queue, if there is one (queues taken in turn).
    pub fn poll(&mut self) -> Result<Option<BlkCompletion>, BlkError> {
        let count = usize::from(self.info.queues_used);
        for step in 0..count {
            let queue = ((self.next_poll + step) % count) as u16;
            if let Some(done) = self.poll_queue(queue)? {
                self.next_poll = (usize::from(queue) + 1) % count;
                return Ok(Some(done));
            }
        }
        Ok(None)
    }

    /// Takes one finished request from queue `queue`, if there is one.
    pub fn poll_queue(&mut self, queue: u16) -> Result<Option<BlkCompletion>, BlkError> {
        let Some(q) = self.queue_at(queue) else { return Ok(None) };
        let Some(used) = q.pop_used()? else { return Ok(None) };
        // SAFETY: the status byte is in this request's DMA slot.
        let status = unsafe { self.slot_ptr(queue, used.token, 32).read_volatile() };
        let result = match Status::try_from(status) {
            Ok(Status::Ok) => Ok(()),
            Ok(Status::IoErr) => Err(BlkError::IoError),
            Ok(Status::Unsupp) => Err(BlkError::Unsupported("this request")),
            Err(_) => Err(BlkError::BadStatus(status)),
        };
        Ok(Some(BlkCompletion { queue, token: used.token, result }))
    }

    /// The outcome of request `token` on `queue` once it has finished; other requests that
    /// finish meanwhile are kept for their own callers.
    pub fn poll_token(&mut self, queue: u16, token: u16) -> Result<Option<Result<(), BlkError>>, BlkError> {
        let (q, t) = (usize::from(queue), usize::from(token));
        if q >= MAX_QUEUES || t >= QUEUE {
            return Err(BlkError::UnknownToken(token));
        }
        if let Some(result) = self.finished[q][t].take() {
            return Ok(Some(result));
        }
        while let Some(done) = self.poll_queue(queue)? {
            if done.token == token {
                return Ok(Some(done.result));
            }
            self.finished[q][usize::from(done.token) % QUEUE] = Some(done.result);
        }
        Ok(None)
    }

    /// Submits a request and returns a future that resolves when it completes. The future
    /// polls the queue each time it is polled and asks to be polled again while the request
    /// is in flight, so it works on any executor (interrupt-driven ones can wake it sooner).
    ///
    /// # Safety
    ///
    /// As for [`VirtIOBlk::submit`]; in particular the future must be polled to completion
    /// (not leaked or dropped early) before the request's buffer is reused or freed.
    #[cfg(feature = "async")]
    pub unsafe fn submit_future<'a>(
        &'a mut self,
        queue: u16,
        request: BlkRequest<'a>,
    ) -> Result<BlkFuture<'a, H, T, QUEUE>, BlkError> {
        // SAFETY: passed on from the caller.
        let token = unsafe { self.submit_on(queue, request) }?;
        self.kick();
        Ok(BlkFuture { blk: self, queue, token })
    }

    /// Submits one request and polls until it completes.
    ///
    /// # Safety
    ///
    /// As for [`VirtIOBlk::submit`]; the buffer is free again when this returns.
    unsafe fn run(&mut self, request: BlkRequest<'_>) -> Result<(), BlkError> {
        // SAFETY: passed on from the caller; this function waits for the completion.
        let token = unsafe { self.submit(request) }?;
        self.kick();
        loop {
            if let Some(result) = self.poll_token(0, token)? {
                return result;
            }
            core::hint::spin_loop();
        }
    }

    /// Reads sectors into `buf` (a whole number of sectors), waiting for them.
    pub fn read_blocks(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        // SAFETY: `buf` is borrowed for the whole call, which waits for the completion; the
        // caller's Hal promises its translation (buffers must be physically contiguous).
        unsafe { self.run(BlkRequest::Read { sector, buf }) }
    }

    /// Writes `buf`'s sectors, waiting for them.
    pub fn write_blocks(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        // SAFETY: as in `read_blocks`.
        unsafe { self.run(BlkRequest::Write { sector, buf }) }
    }

    /// Flushes, waiting.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        // SAFETY: no caller buffer.
        unsafe { self.run(BlkRequest::Flush) }
    }

    /// The device id string (trailing zeros trimmed by the caller).
    pub fn get_id(&mut self) -> Result<[u8; blk::ID_BYTES], BlkError> {
        let mut id = [0u8; blk::ID_BYTES];
        // SAFETY: as in `read_blocks`.
        unsafe { self.run(BlkRequest::GetId { buf: &mut id }) }?;
        Ok(id)
    }

    /// Reads `count` sectors into a new vector (feature `alloc`; the `Hal` must translate heap
    /// memory of that length contiguously, as identity-mapped kernels do).
    #[cfg(feature = "alloc")]
    pub fn read_vec(&mut self, sector: u64, count: u32) -> Result<alloc::vec::Vec<u8>, BlkError> {
        let mut data = alloc::vec![0u8; count as usize * blk::SECTOR_SIZE as usize];
        self.read_blocks(sector, &mut data)?;
        Ok(data)
    }

    /// Discards sectors, waiting.
    pub fn discard(&mut self, sector: u64, count: u32) -> Result<(), BlkError> {
        // SAFETY: no caller buffer.
        unsafe { self.run(BlkRequest::Discard { sector, count }) }
    }

    /// Zeroes sectors, waiting.
    pub fn write_zeroes(&mut self, sector: u64, count: u32) -> Result<(), BlkError> {
        // SAFETY: no caller buffer.
        unsafe { self.run(BlkRequest::WriteZeroes { sector, count }) }
    }
}

impl<H: Hal, T: Transport, const QUEUE: usize> Drop for VirtIOBlk<H, T, QUEUE> {
    fn drop(&mut self) {
        // The device must stop using the rings and slots before their memory goes back.
        super::reset(&mut self.transport);
    }
}

/// A request in flight, as a future (feature `async`).
#[cfg(feature = "async")]
pub struct BlkFuture<'a, H: Hal, T: Transport, const QUEUE: usize> {
    blk: &'a mut VirtIOBlk<H, T, QUEUE>,
    queue: u16,
    token: u16,
}

#[cfg(feature = "async")]
impl<H: Hal, T: Transport, const QUEUE: usize> core::future::Future for BlkFuture<'_, H, T, QUEUE> {
    type Output = Result<(), BlkError>;

    fn poll(self: core::pin::Pin<&mut Self>, cx: &mut core::task::Context<'_>) -> core::task::Poll<Self::Output> {
        let this = self.get_mut();
        match this.blk.poll_token(this.queue, this.token) {
            Ok(Some(result)) => core::task::Poll::Ready(result),
            Ok(None) => {
                cx.waker().wake_by_ref();
                core::task::Poll::Pending
            }
            Err(e) => core::task::Poll::Ready(Err(e)),
        }
    }
}
