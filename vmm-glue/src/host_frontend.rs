//! A vhost-user frontend with its own split-ring driver, for host-side tools that drive a
//! backend without a guest (benchmarks, end-to-end tests): memfd-backed shared memory, real
//! vrings, kick and call eventfds, built on the `vhost` crate's `Frontend`. It plays the part
//! of a VMM plus a guest driver, one request at a time or many in flight.

use crate::backend_requests::BackendRequests;
use pvkit_protocol::ring::{self, RingLayout, desc_flags};
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Errors from the test frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A vhost-user request failed.
    #[error("vhost-user {step}: {source}")]
    VhostUser {
        /// Which step.
        step: &'static str,
        /// Why.
        source: vhost::Error,
    },
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

fn vu(step: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::VhostUser { step, source }
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
    frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<DriverQueue>,
    next_free: u64,
    mem_size: u64,
    /// The virtio features negotiated.
    pub features: u64,
}

const VHOST_USER_F_PROTOCOL_FEATURES: u64 =
    pvkit_protocol::virtio::Features::from_bits(&[pvkit_protocol::virtio::feature::VHOST_USER_PROTOCOL_FEATURES]).0;
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
        let mut frontend = Frontend::connect(socket, num_queues as u64).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let protocol = frontend.get_protocol_features().map_err(vu("GET_PROTOCOL_FEATURES"))?;
            let want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::BACKEND_REQ;
            frontend.set_protocol_features(protocol & want).map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request waits for the backend's answer: ordered, and errors visible.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let features = (offered & wanted) | (offered & VHOST_USER_F_PROTOCOL_FEATURES);
        frontend.set_features(features).map_err(vu("SET_FEATURES"))?;

        let file = memfd(mem_size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            mem_size as usize,
            Some(FileOffset::new(file.try_clone().map_err(|e| FrontendError::Setup(e.to_string()))?, 0)),
        )])
        .map_err(|e| FrontendError::Setup(format!("mapping guest memory: {e}")))?;
        let host_base = mem.get_host_address(GuestAddress(0)).map_err(|e| FrontendError::Setup(e.to_string()))? as u64;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        frontend.set_mem_table(&[region]).map_err(vu("SET_MEM_TABLE"))?;

        let mut this = HostFrontend { frontend, mem, queues: Vec::new(), next_free: 0, mem_size, features };
        for index in 0..num_queues {
            let base = this.alloc(RingLayout::contiguous_size(queue_size, 4096), 4096)?;
            let layout = RingLayout::contiguous(base, queue_size, 4096)
                .map_err(|e| FrontendError::Setup(format!("ring layout: {e}")))?;
            let new_eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| FrontendError::Setup(e.to_string()));
            let (kick, call) = (new_eventfd()?, new_eventfd()?);
            let fe = &mut this.frontend;
            fe.set_vring_num(index, queue_size).map_err(vu("SET_VRING_NUM"))?;
            let config = VringConfigData {
                queue_max_size: queue_size,
                queue_size,
                flags: 0,
                desc_table_addr: host_base + layout.desc,
                used_ring_addr: host_base + layout.used,
                avail_ring_addr: host_base + layout.avail,
                log_addr: None,
            };
            fe.set_vring_addr(index, &config).map_err(vu("SET_VRING_ADDR"))?;
            fe.set_vring_base(index, 0).map_err(vu("SET_VRING_BASE"))?;
            fe.set_vring_call(index, &call).map_err(vu("SET_VRING_CALL"))?;
            fe.set_vring_kick(index, &kick).map_err(vu("SET_VRING_KICK"))?;
            if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                fe.set_vring_enable(index, true).map_err(vu("SET_VRING_ENABLE"))?;
            }
            this.queues.push(DriverQueue {
                layout,
                next_avail: 0,
                last_used: 0,
                free: (0..queue_size).rev().collect(),
                kick,
                call,
            });
        }
        Ok(this)
    }

    /// The shared memory, for writing requests and reading results.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
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
        let buf = vec![0u8; size as usize];
        let (_, data) =
            self.frontend.get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf).map_err(vu("GET_CONFIG"))?;
        Ok(data)
    }

    /// Opens the backend request channel (SET_BACKEND_REQ_FD), for a backend that offered
    /// BACKEND_REQ; the caller reads it (configuration changes) with
    /// [`BackendRequests::wait_config_change`].
    pub fn open_backend_requests(&mut self) -> Result<BackendRequests, FrontendError> {
        BackendRequests::open(&mut self.frontend, true).map_err(|e| FrontendError::Setup(e.to_string()))
    }

    /// Writes `data` into the device's configuration space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        self.frontend.set_config(offset, VhostUserConfigFlags::WRITABLE, data).map_err(vu("SET_CONFIG"))
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
            self.mem.write_slice(&raw, GuestAddress(at)).map_err(|e| FrontendError::Setup(e.to_string()))?;
        }
        let size = queue.layout.size;
        let slot = queue.layout.avail + 4 + 2 * u64::from(queue.next_avail % size);
        self.mem.write_obj(ids[0], GuestAddress(slot)).map_err(|e| FrontendError::Setup(e.to_string()))?;
        queue.next_avail = queue.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(queue.next_avail, GuestAddress(queue.layout.avail + 2))
            .map_err(|e| FrontendError::Setup(e.to_string()))?;
        fence(Ordering::SeqCst);
        // With RING_EVENT_IDX, kick only when the backend asked for this entry (its
        // `avail_event`), as a driver following the specification does: a backend that
        // forgets to re-arm is then noticed as a request that never completes.
        let kick = if self.features & (1 << RING_EVENT_IDX) != 0 {
            let at = queue.layout.used + ring::avail_event_offset(size);
            let avail_event: u16 =
                self.mem.read_obj(GuestAddress(at)).map_err(|e| FrontendError::Setup(e.to_string()))?;
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
                .mem
                .read_obj(GuestAddress(queue.layout.used + 2))
                .map_err(|e| FrontendError::Setup(e.to_string()))?;
            if used_idx != queue.last_used {
                fence(Ordering::SeqCst);
                let size = queue.layout.size;
                let at = queue.layout.used + 4 + 8 * u64::from(queue.last_used % size);
                let mut raw = [0u8; ring::USED_ELEM_SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(at)).map_err(|e| FrontendError::Setup(e.to_string()))?;
                let elem = ring::UsedElemRepr::parse(&raw).map_err(|e| FrontendError::Setup(e.to_string()))?;
                queue.last_used = queue.last_used.wrapping_add(1);
                if self.features & (1 << RING_EVENT_IDX) != 0 {
                    // Ask for a call at the next completion.
                    let at = queue.layout.avail + ring::used_event_offset(size);
                    self.mem
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
                    self.mem.read_slice(&mut raw, GuestAddress(at)).map_err(|e| FrontendError::Setup(e.to_string()))?;
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

fn memfd(size: u64) -> Result<File, FrontendError> {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"pvkit-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FrontendError::Setup(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is a descriptor we just created and own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| FrontendError::Setup(format!("sizing the memfd: {e}")))?;
    Ok(file)
}
