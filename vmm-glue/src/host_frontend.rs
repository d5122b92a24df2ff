//! A vhost-user frontend for host-side tools that drive a backend without a guest (benchmarks,
//! end-to-end tests): the VMM's own handshake ([`BackendLink`]: protocol features, memfd guest
//! memory, rings) plus guest-driver's [`VirtQueue`] over rings carved out of that memory, with
//! kick and call eventfds. It plays the part of a VMM plus a guest driver, one request at a
//! time or many in flight.
//!
//! Each frontend has its own memory, so the rings are not allocated through a process-wide
//! `DmaMemory`: the frontend bump-allocates pages of its memory and hands them to the queue
//! ([`Dma::adopt`]), and a queue's size is chosen at run time ([`VirtQueue::with_memory`],
//! up to [`QUEUE_CAPACITY`]). Doorbells are the frontend's own: it asks the queue whether the
//! backend wants a kick ([`VirtQueue::kick_needed`]) and writes the kick eventfd.

use crate::backend_requests::BackendRequests;
use crate::frontend::BackendLink;
use crate::memory::GuestRam;
use crate::mmio::QueueConfig;
use pvkit_guest_driver::hal::{Dma, DmaMemory, PAGE_SIZE, PhysAddr};
use pvkit_guest_driver::hypercall::{Doorbell, Shim};
use pvkit_guest_driver::queue::{QueueError, QueueMemory, QueueSetup, VirtQueue};
use pvkit_guest_driver::transport::{NotifyTarget, QueueRegisters, RingPlacement, TransportError};
use pvkit_protocol::ring::RingLayout;
use pvkit_protocol::virtio::feature::RING_EVENT_IDX;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use pvkit_guest_driver::queue::Buffer;

/// The largest queue a host frontend drives (the bookkeeping of every queue is this big).
pub const QUEUE_CAPACITY: usize = 1024;

/// Errors from the host frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The handshake or a vhost-user request failed.
    #[error(transparent)]
    Link(#[from] crate::frontend::FrontendError),
    /// The shared memory could not be made.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// A kick or call eventfd could not be made, written or read.
    #[error("kick or call eventfd: {0}")]
    Eventfd(std::io::Error),
    /// The shared memory has no room left.
    #[error("out of shared memory: {wanted} bytes wanted, {left} left")]
    OutOfMemory {
        /// Bytes asked for (after alignment).
        wanted: u64,
        /// Bytes left.
        left: u64,
    },
    /// A queue size the frontend cannot drive.
    #[error("queue size {size} is not a power of two between 1 and {QUEUE_CAPACITY}")]
    QueueSize {
        /// The size asked for.
        size: u16,
    },
    /// No such queue.
    #[error("no queue {0}")]
    NoQueue(usize),
    /// The queue refused the chain, or the backend returned a used element that makes no sense.
    #[error("queue {queue}: {source}")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What the queue said.
        source: QueueError,
    },
    /// No used buffer arrived in time.
    #[error("queue {0}: no used buffer within {1:?}")]
    Timeout(usize, Duration),
    /// The backend offers no backend request channel.
    #[error("the backend offers no backend request channel (BACKEND_REQ)")]
    NoBackendRequests,
}

/// The frontend's DMA memory: pages of its shared memory, adopted by the queues
/// ([`Dma::adopt`]); nothing is allocated or freed through this type.
struct SharedPages;

// SAFETY: `dma_alloc` hands out nothing. `dma_dealloc` only sees pages given to `Dma::adopt`,
// which belong to the frontend's shared memory and stay mapped until the frontend (whose
// queues are dropped first, by field order) is gone; returning them is a no-op.
unsafe impl DmaMemory for SharedPages {
    fn dma_alloc(_pages: usize) -> Option<(PhysAddr, NonNull<u8>)> {
        None
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) {}
}

/// The queues' doorbell: silent, since the frontend writes its kick eventfds itself.
struct FrontendRings;

impl Doorbell for FrontendRings {
    fn ring(&self, _queue: u16) {}
}

static FRONTEND_RINGS: FrontendRings = FrontendRings;

/// What the queues' notify target points at; never written (their shim is [`FrontendRings`]).
static UNUSED_NOTIFY: AtomicU32 = AtomicU32::new(0);

/// Setting up a queue records its rings for [`BackendLink::activate`].
struct RingRecorder {
    size: u16,
    configs: Vec<QueueConfig>,
}

impl QueueRegisters for RingRecorder {
    fn max_queue_size(&mut self, _queue: u16) -> u16 {
        self.size
    }
    fn ring_placement(&self) -> RingPlacement {
        RingPlacement::Separate
    }
    fn queue_set(&mut self, queue: u16, layout: &RingLayout) -> Result<(), TransportError> {
        if usize::from(queue) != self.configs.len() {
            return Err(TransportError::NoSuchQueue(queue));
        }
        let (desc, avail, used) = (layout.desc, layout.avail, layout.used);
        self.configs.push(QueueConfig { max_size: self.size, size: layout.size, ready: true, desc, avail, used });
        Ok(())
    }
    fn notify_target(&mut self, _queue: u16) -> Result<NotifyTarget, TransportError> {
        Ok(NotifyTarget::Mmio32(NonNull::from(&UNUSED_NOTIFY).cast()))
    }
}

struct DriverQueue {
    ring: VirtQueue<SharedPages, QUEUE_CAPACITY>,
    kick: EventFd,
    call: EventFd,
}

/// A connected frontend with its rings set up and enabled.
pub struct HostFrontend {
    // Field order: the queues (which point into `ram`) go before the memory.
    queues: Vec<DriverQueue>,
    link: BackendLink,
    ram: GuestRam,
    next_free: u64,
    /// The virtio features negotiated.
    pub features: u64,
}

impl HostFrontend {
    /// Connects to `socket`, negotiates `wanted` features (intersected with the backend's),
    /// shares `mem_size` bytes of memory and sets up `num_queues` rings of `queue_size`.
    pub fn connect(
        socket: &Path,
        mem_size: u64,
        num_queues: usize,
        queue_size: u16,
        wanted: u64,
    ) -> Result<HostFrontend, FrontendError> {
        if !queue_size.is_power_of_two() || usize::from(queue_size) > QUEUE_CAPACITY {
            return Err(FrontendError::QueueSize { size: queue_size });
        }
        let ram = GuestRam::shared(mem_size)?;
        let link = BackendLink::connect(socket, &ram, num_queues)?;
        let features = link.features_for(wanted);
        let mut this = HostFrontend { queues: Vec::new(), link, ram, next_free: 0, features };
        let event_idx = features & (1 << RING_EVENT_IDX) != 0;
        let mut recorder = RingRecorder { size: queue_size, configs: Vec::new() };
        let memory = QueueMemory::for_queue(queue_size, RingPlacement::Separate, false);
        let mut rings = Vec::new();
        for index in 0..num_queues {
            let pages = this.adopt_pages(memory.ring_pages)?;
            let queue = index as u16;
            let setup = QueueSetup { index: queue, size: queue_size, event_idx };
            let shim = |_| Shim::Custom(&FRONTEND_RINGS);
            let ring = VirtQueue::with_memory(&mut recorder, setup, pages, None, shim)
                .map_err(|source| FrontendError::Queue { queue: index, source })?;
            rings.push(ring);
        }
        let new_eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::Eventfd);
        let kicks = (0..num_queues).map(|_| new_eventfd()).collect::<Result<Vec<_>, _>>()?;
        let calls = (0..num_queues).map(|_| new_eventfd()).collect::<Result<Vec<_>, _>>()?;
        this.features =
            this.link.activate(wanted, &recorder.configs, &vec![0; num_queues], &kicks, &calls, &this.ram)?;
        for ((ring, kick), call) in rings.into_iter().zip(kicks).zip(calls) {
            this.queues.push(DriverQueue { ring, kick, call });
        }
        Ok(this)
    }

    /// The shared memory, for writing requests and reading results.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Reserves `len` bytes of guest memory aligned to `align`; returns the guest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, FrontendError> {
        let size = self.ram.size();
        let start = self.next_free.div_ceil(align.max(1)) * align.max(1);
        match start.checked_add(len) {
            Some(end) if end <= size => {
                self.next_free = end;
                Ok(start)
            }
            _ => Err(FrontendError::OutOfMemory { wanted: len, left: size.saturating_sub(self.next_free) }),
        }
    }

    /// Reserves `pages` fresh (zeroed, never handed out before) pages for a queue's rings.
    fn adopt_pages(&mut self, pages: usize) -> Result<Dma<SharedPages>, FrontendError> {
        let bytes = (pages * PAGE_SIZE) as u64;
        let gpa = self.alloc(bytes, PAGE_SIZE as u64)?;
        let host = self.ram.host_address(gpa, bytes).and_then(|a| NonNull::new(a as *mut u8));
        let left = self.ram.size().saturating_sub(gpa);
        let host = host.ok_or(FrontendError::OutOfMemory { wanted: bytes, left })?;
        // SAFETY: the pages lie inside the frontend's shared memory (`host_address` checked the
        // range), page-aligned, zeroed (fresh memfd pages, handed out once by the bump
        // allocator), reachable by the backend at `gpa` (it maps the same memfd) and by this
        // process at `host`; they stay mapped until the frontend, which drops its queues
        // first, is gone, and `SharedPages::dma_dealloc` does nothing with them.
        unsafe { Dma::adopt(gpa, host, pages) }.ok_or(FrontendError::OutOfMemory { wanted: bytes, left })
    }

    /// Reads `size` bytes of the device's configuration space at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        Ok(self.link.read_config(offset, size)?)
    }

    /// The backend request channel (opened with SET_BACKEND_REQ_FD at connection, for a
    /// backend that offered BACKEND_REQ); the caller reads it (configuration changes) with
    /// [`BackendRequests::wait_config_change`].
    pub fn open_backend_requests(&mut self) -> Result<BackendRequests, FrontendError> {
        self.link.take_backend_requests().ok_or(FrontendError::NoBackendRequests)
    }

    /// Writes `data` into the device's configuration space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        Ok(self.link.write_config(offset, data)?)
    }

    /// Posts a chain of `buffers` on queue `q` and kicks if the backend wants it (with
    /// RING_EVENT_IDX, only when it asked for this entry, as a driver following the
    /// specification does: a backend that forgets to re-arm is then noticed as a request that
    /// never completes); returns the chain's head index.
    ///
    /// The buffers are guest addresses in this frontend's memory (from [`HostFrontend::alloc`]);
    /// the backend, not this process, reads and writes them.
    pub fn submit(&mut self, q: usize, buffers: &[Buffer]) -> Result<u16, FrontendError> {
        let queue = self.queues.get_mut(q).ok_or(FrontendError::NoQueue(q))?;
        // SAFETY: the buffers are guest addresses the backend reaches in the shared memory;
        // this process keeps no Rust reference into them (it reads results through
        // `GuestMemoryMmap`'s volatile accessors), so the device writing them while the chain
        // is in flight breaks nothing here.
        let head = unsafe { queue.ring.add(buffers) }.map_err(|source| FrontendError::Queue { queue: q, source })?;
        if queue.ring.kick_needed() {
            queue.kick.write(1).map_err(FrontendError::Eventfd)?;
        }
        Ok(head)
    }

    /// Waits for the next used element on queue `q`; returns (head id, length written) and
    /// frees the chain's descriptors.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<(u16, u32), FrontendError> {
        let deadline = Instant::now() + timeout;
        let queue = self.queues.get_mut(q).ok_or(FrontendError::NoQueue(q))?;
        loop {
            if let Some(used) = queue.ring.pop_used().map_err(|source| FrontendError::Queue { queue: q, source })? {
                return Ok((used.token, used.len));
            }
            if Instant::now() > deadline {
                return Err(FrontendError::Timeout(q, timeout));
            }
            // Wait for the call eventfd (or look again shortly).
            let mut pfd = libc::pollfd { fd: queue.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            let _ = queue.call.read();
        }
    }
}
