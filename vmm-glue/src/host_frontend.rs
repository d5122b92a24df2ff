//! A vhost-user frontend with a small split-ring driver, for host-side tools that drive a
//! backend without a guest (benchmarks, end-to-end tests): the VMM's own handshake
//! ([`BackendLink`]: protocol features, memfd guest memory, rings) plus real vrings, kick and
//! call eventfds. It plays the part of a VMM plus a guest driver, one request at a time or many
//! in flight.
//!
//! The ring driver is its own rather than guest-driver's `VirtQueue`: that one allocates
//! through a `Hal` of static functions (one DMA arena per process), while a test process runs
//! many frontends at once, each over its own memory.

use crate::backend_requests::BackendRequests;
use crate::frontend::BackendLink;
use crate::memory::GuestRam;
use crate::mmio::QueueConfig;
use pvkit_protocol::ring::{self, RingLayout, desc_flags};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Errors from the test frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The handshake or a vhost-user request failed.
    #[error(transparent)]
    Link(#[from] crate::frontend::FrontendError),
    /// The shared memory could not be made.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Setting up memory or eventfds failed.
    #[error("{0}")]
    Setup(String),
    /// No used buffer arrived in time.
    #[error("queue {0}: no used buffer within {1:?}")]
    Timeout(usize, Duration),
    /// The queue has no free descriptors, or the request is empty.
    #[error("queue {0}: {1}")]
    Queue(usize, String),
}

/// One buffer of a request: guest address, length, and whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True when the device writes it.
    pub device_writes: bool,
}

struct DriverQueue {
    layout: RingLayout,
    next_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    kick: EventFd,
    call: EventFd,
}

/// A connected frontend with its rings set up and enabled.
pub struct HostFrontend {
    link: BackendLink,
    ram: GuestRam,
    queues: Vec<DriverQueue>,
    next_free: u64,
    mem_size: u64,
    /// The virtio features negotiated.
    pub features: u64,
}

use pvkit_protocol::virtio::feature::RING_EVENT_IDX;

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
        let ram = GuestRam::shared(mem_size)?;
        let link = BackendLink::connect(socket, &ram, num_queues)?;
        let mut this = HostFrontend { link, ram, queues: Vec::new(), next_free: 0, mem_size, features: 0 };
        let (mut configs, mut kicks, mut calls, mut layouts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..num_queues {
            let base = this.alloc(RingLayout::contiguous_size(queue_size, 4096), 4096)?;
            let layout = RingLayout::contiguous(base, queue_size, 4096)
                .map_err(|e| FrontendError::Setup(format!("ring layout: {e}")))?;
            let new_eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| FrontendError::Setup(e.to_string()));
            kicks.push(new_eventfd()?);
            calls.push(new_eventfd()?);
            let (desc, avail, used) = (layout.desc, layout.avail, layout.used);
            configs.push(QueueConfig { max_size: queue_size, size: queue_size, ready: true, desc, avail, used });
            layouts.push(layout);
        }
        this.features = this.link.activate(wanted, &configs, &vec![0; num_queues], &kicks, &calls, &this.ram)?;
        for ((layout, kick), call) in layouts.into_iter().zip(kicks).zip(calls) {
            let free = (0..queue_size).rev().collect();
            this.queues.push(DriverQueue { layout, next_avail: 0, last_used: 0, free, kick, call });
        }
        Ok(this)
    }

    /// The shared memory, for writing requests and reading results.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Reserves `len` bytes of guest memory aligned to `align`; returns the guest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, FrontendError> {
        let start = self.next_free.div_ceil(align) * align;
        if start + len > self.mem_size {
            return Err(FrontendError::Setup(format!("out of guest memory for {len} bytes")));
        }
        self.next_free = start + len;
        Ok(start)
    }

    /// Reads `size` bytes of the device's configuration space at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        Ok(self.link.read_config(offset, size)?)
    }

    /// The backend request channel (opened with SET_BACKEND_REQ_FD at connection, for a
    /// backend that offered BACKEND_REQ); the caller reads it (configuration changes) with
    /// [`BackendRequests::wait_config_change`].
    pub fn open_backend_requests(&mut self) -> Result<BackendRequests, FrontendError> {
        self.link
            .take_backend_requests()
            .ok_or_else(|| FrontendError::Setup("the backend offers no backend request channel (BACKEND_REQ)".into()))
    }

    /// Writes `data` into the device's configuration space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        Ok(self.link.write_config(offset, data)?)
    }

    /// Posts a chain of `buffers` on queue `q` and kicks; returns the head index.
    pub fn submit(&mut self, q: usize, buffers: &[Buffer]) -> Result<u16, FrontendError> {
        let queue = self.queues.get_mut(q).ok_or_else(|| FrontendError::Queue(q, "no such queue".into()))?;
        if buffers.is_empty() || buffers.len() > queue.free.len() {
            return Err(FrontendError::Queue(
                q,
                format!("{} buffers, {} descriptors free", buffers.len(), queue.free.len()),
            ));
        }
        let ids: Vec<u16> = (0..buffers.len()).filter_map(|_| queue.free.pop()).collect();
        for (i, (buf, id)) in buffers.iter().zip(&ids).enumerate() {
            let mut flags = if buf.device_writes { desc_flags::WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= desc_flags::NEXT;
            }
            let mut raw = [0u8; ring::DESCRIPTOR_SIZE];
            let repr = ring::DescriptorRepr { addr: buf.addr, len: buf.len, flags, next };
            repr.emit(
                &mut ring::Descriptor::new_checked(&mut raw[..]).map_err(|e| FrontendError::Setup(e.to_string()))?,
            );
            let at = queue.layout.desc + u64::from(*id) * ring::DESCRIPTOR_SIZE as u64;
            self.ram.memory().write_slice(&raw, GuestAddress(at)).map_err(|e| FrontendError::Setup(e.to_string()))?;
        }
        let size = queue.layout.size;
        let slot = queue.layout.avail + 4 + 2 * u64::from(queue.next_avail % size);
        self.ram.memory().write_obj(ids[0], GuestAddress(slot)).map_err(|e| FrontendError::Setup(e.to_string()))?;
        queue.next_avail = queue.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.ram
            .memory()
            .write_obj(queue.next_avail, GuestAddress(queue.layout.avail + 2))
            .map_err(|e| FrontendError::Setup(e.to_string()))?;
        fence(Ordering::SeqCst);
        // With RING_EVENT_IDX, kick only when the backend asked for this entry (its
        // `avail_event`), as a driver following the specification does: a backend that
        // forgets to re-arm is then noticed as a request that never completes.
        let kick = if self.features & (1 << RING_EVENT_IDX) != 0 {
            let at = queue.layout.used + ring::avail_event_offset(size);
            let avail_event: u16 =
                self.ram.memory().read_obj(GuestAddress(at)).map_err(|e| FrontendError::Setup(e.to_string()))?;
            ring::need_event(avail_event, queue.next_avail, queue.next_avail.wrapping_sub(1))
        } else {
            true
        };
        if kick {
            queue.kick.write(1).map_err(|e| FrontendError::Setup(e.to_string()))?;
        }
        Ok(ids[0])
    }

    /// Waits for the next used element on queue `q`; returns (head id, length written) and
    /// frees the chain's descriptors.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<(u16, u32), FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let queue = self.queues.get_mut(q).ok_or_else(|| FrontendError::Queue(q, "no such queue".into()))?;
            let used_idx: u16 = self
                .ram
                .memory()
                .read_obj(GuestAddress(queue.layout.used + 2))
                .map_err(|e| FrontendError::Setup(e.to_string()))?;
            if used_idx != queue.last_used {
                fence(Ordering::SeqCst);
                let size = queue.layout.size;
                let at = queue.layout.used + 4 + 8 * u64::from(queue.last_used % size);
                let mut raw = [0u8; ring::USED_ELEM_SIZE];
                self.ram
                    .memory()
                    .read_slice(&mut raw, GuestAddress(at))
                    .map_err(|e| FrontendError::Setup(e.to_string()))?;
                let elem = ring::UsedElemRepr::parse(&raw).map_err(|e| FrontendError::Setup(e.to_string()))?;
                queue.last_used = queue.last_used.wrapping_add(1);
                if self.features & (1 << RING_EVENT_IDX) != 0 {
                    // Ask for a call at the next completion.
                    let at = queue.layout.avail + ring::used_event_offset(size);
                    self.ram
                        .memory()
                        .write_obj(queue.last_used, GuestAddress(at))
                        .map_err(|e| FrontendError::Setup(e.to_string()))?;
                }
                let head =
                    u16::try_from(elem.id).map_err(|_| FrontendError::Queue(q, format!("used id {}", elem.id)))?;
                // Walk the chain to free its descriptors.
                let mut id = head;
                loop {
                    queue.free.push(id);
                    let at = queue.layout.desc + u64::from(id) * ring::DESCRIPTOR_SIZE as u64;
                    let mut raw = [0u8; ring::DESCRIPTOR_SIZE];
                    self.ram
                        .memory()
                        .read_slice(&mut raw, GuestAddress(at))
                        .map_err(|e| FrontendError::Setup(e.to_string()))?;
                    let d = ring::Descriptor::new_checked(&raw[..]).map_err(|e| FrontendError::Setup(e.to_string()))?;
                    if d.flags() & desc_flags::NEXT == 0 || queue.free.len() > usize::from(size) {
                        break;
                    }
                    id = d.next();
                }
                return Ok((head, elem.len));
            }
            if Instant::now() > deadline {
                return Err(FrontendError::Timeout(q, timeout));
            }
            // Wait for the call eventfd (or poll again shortly).
            let mut pfd = libc::pollfd { fd: queue.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            let _ = queue.call.read();
        }
    }
}
