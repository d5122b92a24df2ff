//! The vhost-user frontend of one device: the VMM's side of the control channel to an
//! out-of-process backend. Feature negotiation, the memory table (the guest's memfd), ring
//! setup on DRIVER_OK, the configuration space, and ring teardown on reset. The data path never
//! comes here: kicks are ioeventfds and calls irqfds, wired by the VM.

use crate::backend_requests::BackendRequests;
use crate::memory::GuestRam;
use crate::mmio::QueueConfig;
use pvkit_protocol::virtio::{Features, feature as vf};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Errors from the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// An eventfd for a queue's kicks or calls could not be made.
    #[error("cannot create an eventfd for a queue: {0}")]
    Eventfd(std::io::Error),
    /// A vhost-user request failed.
    #[error("vhost-user {request} to {socket}: {source}")]
    Request {
        /// The request.
        request: &'static str,
        /// The backend's socket.
        socket: String,
        /// Why.
        source: vhost::Error,
    },
    /// The backend does not offer what the transport needs.
    #[error("the backend at {socket} {what}")]
    Unsuitable {
        /// The backend's socket.
        socket: String,
        /// What is missing.
        what: String,
    },
}

/// VHOST_USER_F_PROTOCOL_FEATURES (not a virtio feature; never shown to the guest).
const PROTOCOL_FEATURES_BIT: u64 = Features::from_bits(&[vf::VHOST_USER_PROTOCOL_FEATURES]).0;
/// Features the virtio-mmio transport cannot pass on: the packed ring, NOTIFICATION_DATA
/// (notifies carrying data would miss the ioeventfds' match), RING_RESET, ACCESS_PLATFORM
/// (there is no IOMMU), and VHOST_F_LOG_ALL (the backend's, for a migrating frontend).
const TRANSPORT_MASK: u64 = !(PROTOCOL_FEATURES_BIT
    | Features::from_bits(&[
        vf::ACCESS_PLATFORM,
        vf::RING_PACKED,
        vf::NOTIFICATION_DATA,
        vf::RING_RESET,
        vf::VHOST_LOG_ALL,
    ])
    .0);
/// VHOST_F_LOG_ALL: the backend logs the pages it writes.
const LOG_ALL_BIT: u64 = Features::from_bits(&[vf::VHOST_LOG_ALL]).0;
/// Largest queue size offered to the guest.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// The shared area where a backend keeps the requests it has in flight (protocol feature
/// INFLIGHT_SHMFD). The VMM holds it across backend restarts and hands it to each new
/// backend, which resubmits what its predecessor left unfinished.
pub struct InflightArea {
    info: VhostUserInflight,
    file: std::fs::File,
}

impl InflightArea {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.info.mmap_size
    }
}

/// A connected backend.
pub struct BackendLink {
    frontend: Frontend,
    socket: PathBuf,
    offered: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: usize,
    requests: Option<BackendRequests>,
    /// Whether the backend logs the pages it writes (a migration is under way).
    logging: bool,
}

impl BackendLink {
    /// Connects to the backend at `socket`, negotiates protocol features (MQ, CONFIG,
    /// REPLY_ACK, BACKEND_REQ), opens the backend request channel when the backend offers
    /// it, and shares guest memory with it. `default_queues` is the queue count for
    /// a backend that cannot say (no MQ).
    pub fn connect(socket: &Path, ram: &GuestRam, default_queues: usize) -> Result<BackendLink, FrontendError> {
        let name = socket.display().to_string();
        let req = |request: &'static str| {
            let socket = name.clone();
            move |source: vhost::Error| FrontendError::Request { request, socket: socket.clone(), source }
        };
        let mut frontend = Frontend::connect(socket, default_queues as u64).map_err(req("connect"))?;
        frontend.set_owner().map_err(req("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(req("GET_FEATURES"))?;
        if !Features(offered).has(vf::VERSION_1) {
            return Err(FrontendError::Unsuitable { socket: name, what: "does not offer VIRTIO_F_VERSION_1".into() });
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut num_queues = default_queues;
        if offered & PROTOCOL_FEATURES_BIT != 0 {
            let available = frontend.get_protocol_features().map_err(req("GET_PROTOCOL_FEATURES"))?;
            protocol = available
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                    | VhostUserProtocolFeatures::LOG_SHMFD);
            frontend.set_protocol_features(protocol).map_err(req("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                num_queues = frontend.get_queue_num().map_err(req("GET_QUEUE_NUM"))? as usize;
            }
        }
        let requests = if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let reply_ack = protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
            let opened = BackendRequests::open(&mut frontend, reply_ack)
                .map_err(|e| FrontendError::Unsuitable { socket: name.clone(), what: e.to_string() })?;
            Some(opened)
        } else {
            None
        };
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
            mmap_offset: 0,
            mmap_handle: ram.fd(),
        };
        frontend.set_mem_table(&[region]).map_err(req("SET_MEM_TABLE"))?;
        Ok(BackendLink {
            frontend,
            socket: socket.to_path_buf(),
            offered,
            protocol,
            num_queues: num_queues.clamp(1, 64),
            requests,
            logging: false,
        })
    }

    /// The features the guest is offered: the backend's, minus what the transport cannot do.
    pub fn guest_features(&self) -> u64 {
        self.offered & TRANSPORT_MASK
    }

    /// The features [`BackendLink::activate`] sets for a driver that acknowledges
    /// `driver_features`: those the backend offers, plus PROTOCOL_FEATURES when it offers that.
    pub fn features_for(&self, driver_features: u64) -> u64 {
        let logging = if self.logging { LOG_ALL_BIT } else { 0 };
        (driver_features & self.offered) | (self.offered & PROTOCOL_FEATURES_BIT) | logging
    }

    /// Whether the backend can log the pages it writes into a bitmap the VMM shares
    /// (VHOST_F_LOG_ALL and protocol feature LOG_SHMFD).
    pub fn can_log(&self) -> bool {
        self.offered & LOG_ALL_BIT != 0 && self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
    }

    /// Starts the backend logging the pages it writes into the bitmap in `log_fd` (`size`
    /// bytes): SET_LOG_BASE, then SET_FEATURES with VHOST_F_LOG_ALL added to what the driver
    /// acknowledged.
    pub fn start_logging(&mut self, log_fd: i32, size: u64, driver_features: u64) -> Result<(), FrontendError> {
        let region = vhost::VhostUserDirtyLogRegion { mmap_size: size, mmap_offset: 0, mmap_handle: log_fd };
        self.frontend.set_log_base(0, Some(region)).map_err(self.req("SET_LOG_BASE"))?;
        self.logging = true;
        let features = self.features_for(driver_features);
        self.frontend.set_features(features).map_err(self.req("SET_FEATURES (log all)"))
    }

    /// Stops the logging [`BackendLink::start_logging`] started.
    pub fn stop_logging(&mut self, driver_features: u64) -> Result<(), FrontendError> {
        self.logging = false;
        let features = self.features_for(driver_features);
        self.frontend.set_features(features).map_err(self.req("SET_FEATURES"))
    }

    /// Queues the backend serves.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// Whether configuration-space access works (protocol feature CONFIG).
    pub fn has_config(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
    }

    /// Whether the backend keeps its requests in flight in an area the VMM holds.
    pub fn tracks_inflight(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// A new in-flight area from the backend for `queues` queues of up to `queue_size`
    /// entries (GET_INFLIGHT_FD); `None` when the backend answers without one.
    pub fn new_inflight_area(&mut self, queues: usize, queue_size: u16) -> Result<Option<InflightArea>, FrontendError> {
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: u16::try_from(queues).unwrap_or(u16::MAX),
            queue_size,
        };
        let (info, file) = self.frontend.get_inflight_fd(&ask).map_err(self.req("GET_INFLIGHT_FD"))?;
        Ok((info.mmap_size > 0).then_some(InflightArea { info, file }))
    }

    /// Hands the backend the in-flight area (SET_INFLIGHT_FD), before its rings start.
    pub fn set_inflight_area(&mut self, area: &InflightArea) -> Result<(), FrontendError> {
        self.frontend.set_inflight_fd(&area.info, area.file.as_raw_fd()).map_err(self.req("SET_INFLIGHT_FD"))
    }

    /// The control socket's descriptor (the VM watches it for the backend going away).
    pub fn socket_fd(&self) -> i32 {
        self.frontend.as_raw_fd()
    }

    /// The backend request channel's descriptor, while it is open.
    pub fn backend_requests_fd(&self) -> Option<i32> {
        self.requests.as_ref().map(BackendRequests::fd)
    }

    /// Whether a backend request is waiting (or the channel closed), without blocking.
    pub fn backend_request_waiting(&self) -> bool {
        self.requests.as_ref().is_some_and(|r| r.ready(std::time::Duration::ZERO).unwrap_or(false))
    }

    /// Serves one backend request. Returns whether it announced a configuration change. On
    /// an error the channel is closed (the backend's requests are no longer heard).
    pub fn handle_backend_request(&mut self) -> Result<bool, FrontendError> {
        let Some(requests) = self.requests.as_mut() else { return Ok(false) };
        match requests.handle() {
            Ok(changes) => Ok(changes > 0),
            Err(e) => {
                self.requests = None;
                Err(FrontendError::Unsuitable { socket: self.socket.display().to_string(), what: e.to_string() })
            }
        }
    }

    fn req(&self, request: &'static str) -> impl Fn(vhost::Error) -> FrontendError + '_ {
        move |source| FrontendError::Request { request, socket: self.socket.display().to_string(), source }
    }

    /// Starts the rings the driver enabled: SET_FEATURES with what the driver acknowledged,
    /// then for each ready queue its size, addresses (translated into this process's mapping),
    /// base index, kick and call eventfds, and enable.
    pub fn activate(
        &mut self,
        driver_features: u64,
        queues: &[QueueConfig],
        bases: &[u16],
        kicks: &[EventFd],
        calls: &[EventFd],
        ram: &GuestRam,
    ) -> Result<u64, FrontendError> {
        let features = self.features_for(driver_features);
        let socket = self.socket.display().to_string();
        let fail = |request: &'static str| {
            let socket = socket.clone();
            move |source: vhost::Error| FrontendError::Request { request, socket: socket.clone(), source }
        };
        self.frontend.set_features(features).map_err(fail("SET_FEATURES"))?;
        for (index, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let (Some(kick), Some(call)) = (kicks.get(index), calls.get(index)) else { continue };
            let host = |gpa: u64, len: u64| {
                ram.host_address(gpa, len).ok_or_else(|| FrontendError::Unsuitable {
                    socket: socket.clone(),
                    what: format!("was given a ring at {gpa:#x} outside guest memory"),
                })
            };
            let size = u64::from(q.size);
            let config = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc, 16 * size)?,
                used_ring_addr: host(q.used, 6 + 8 * size)?,
                avail_ring_addr: host(q.avail, 6 + 2 * size)?,
                log_addr: None,
            };
            self.frontend.set_vring_num(index, q.size).map_err(fail("SET_VRING_NUM"))?;
            self.frontend.set_vring_addr(index, &config).map_err(fail("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, bases.get(index).copied().unwrap_or(0))
                .map_err(fail("SET_VRING_BASE"))?;
            self.frontend.set_vring_call(index, call).map_err(fail("SET_VRING_CALL"))?;
            self.frontend.set_vring_kick(index, kick).map_err(fail("SET_VRING_KICK"))?;
            if self.offered & PROTOCOL_FEATURES_BIT != 0 {
                self.frontend.set_vring_enable(index, true).map_err(fail("SET_VRING_ENABLE"))?;
            }
        }
        Ok(features)
    }

    /// Hands the backend request channel to the caller (a tool that reads it itself).
    pub fn take_backend_requests(&mut self) -> Option<BackendRequests> {
        self.requests.take()
    }

    /// Stops the rings of the queues in `queues` that were ready (GET_VRING_BASE); returns
    /// each queue's next available index as the backend reports it (0 for queues not ready).
    pub fn reset(&mut self, queues: &[QueueConfig]) -> Result<Vec<u16>, FrontendError> {
        let mut bases = vec![0u16; queues.len()];
        for (index, _) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            if self.offered & PROTOCOL_FEATURES_BIT != 0 {
                let _ = self.frontend.set_vring_enable(index, false);
            }
            let base = self.frontend.get_vring_base(index).map_err(self.req("GET_VRING_BASE"))?;
            bases[index] = base as u16;
        }
        Ok(bases)
    }

    /// `size` configuration bytes at `offset` (zeros when the backend has no config).
    ///
    /// The request always starts at offset 0 and covers everything up to the bytes wanted:
    /// some backends (qemu-storage-daemon's vhost-user-blk export) ignore the offset of
    /// GET_CONFIG and answer from the start, as QEMU's own frontend always asks.
    pub fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        let end = offset.saturating_add(size);
        if !self.has_config() || size == 0 || end > 256 {
            return Ok(vec![0; size as usize]);
        }
        let buf = vec![0u8; end as usize];
        let (_, payload) =
            self.frontend.get_config(0, end, VhostUserConfigFlags::WRITABLE, &buf).map_err(self.req("GET_CONFIG"))?;
        let mut out = payload.get(offset as usize..).map(<[u8]>::to_vec).unwrap_or_default();
        out.resize(size as usize, 0);
        Ok(out)
    }

    /// Writes configuration bytes.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        if !self.has_config() {
            return Ok(());
        }
        self.frontend.set_config(offset, VhostUserConfigFlags::WRITABLE, data).map_err(self.req("SET_CONFIG"))
    }
}
