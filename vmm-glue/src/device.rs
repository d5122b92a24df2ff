//! One virtio-mmio device served by a vhost-user backend: the transport state the guest
//! drives, the backend link, and the kick and call eventfds (registered with KVM by the VM).
//! Guest accesses that reach the VMM come here; so do backend disconnects and reconnects.

use crate::frontend::{BackendLink, FrontendError, InflightArea, MAX_QUEUE_SIZE};
use crate::memory::GuestRam;
use crate::mmio::{Effect, MmioTransportState, QueueConfig};
use crate::snapshot::{DeviceSnapshot, RingIndexes};
use log::{info, warn};
use pvkit_protocol::virtio::DeviceId;
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A device as the VM sees it.
pub struct VirtioDevice {
    /// A short name for logs ("blk", "net", "console" or "virtio-N").
    pub name: String,
    /// Its microvm slot.
    pub slot: u32,
    /// The backend's socket.
    pub socket: PathBuf,
    /// The transport state.
    pub state: MmioTransportState,
    link: Option<BackendLink>,
    /// One kick eventfd per queue (KVM ioeventfds on QueueNotify and the doorbell port).
    pub kicks: Vec<EventFd>,
    /// One call eventfd per queue (KVM irqfds on the device's IOAPIC pin).
    pub calls: Vec<EventFd>,
    default_queues: usize,
    /// Guest protocol violations seen (the first is logged).
    pub violations: u64,
    /// The backend's in-flight area, kept across backend restarts until the driver resets
    /// the device.
    inflight: Option<InflightArea>,
    /// While the VM is paused: each queue's next available index, from GET_VRING_BASE.
    pub paused_bases: Option<Vec<u16>>,
    /// The backend was handed to another VMM (a migration): never reconnect.
    released: bool,
}

/// A human name for a virtio device type.
pub fn device_name(device: DeviceId) -> String {
    match device {
        DeviceId::Block => "blk".into(),
        other => other.name().into(),
    }
}

/// The queue count to assume for a backend that cannot report it (no MQ).
pub fn default_queue_count(device: DeviceId) -> usize {
    match device {
        DeviceId::Block => 1,
        _ => 2,
    }
}

impl VirtioDevice {
    /// Connects to the backend of a `device` at `socket` for slot `slot`.
    pub fn connect(
        device: DeviceId,
        slot: u32,
        socket: PathBuf,
        ram: &GuestRam,
    ) -> Result<VirtioDevice, FrontendError> {
        let default_queues = default_queue_count(device);
        let link = BackendLink::connect(&socket, ram, default_queues)?;
        let queues = link.num_queues();
        let new_eventfds = || -> Result<Vec<EventFd>, FrontendError> {
            (0..queues).map(|_| EventFd::new(EFD_NONBLOCK).map_err(FrontendError::Eventfd)).collect()
        };
        let state =
            MmioTransportState::new(device.raw(), link.guest_features(), &vec![MAX_QUEUE_SIZE; queues], ram.size());
        Ok(VirtioDevice {
            name: device_name(device),
            slot,
            socket,
            state,
            link: Some(link),
            kicks: new_eventfds()?,
            calls: new_eventfds()?,
            default_queues,
            violations: 0,
            inflight: None,
            paused_bases: None,
            released: false,
        })
    }

    /// The backend's control socket, while connected.
    pub fn link_fd(&self) -> Option<i32> {
        self.link.as_ref().map(BackendLink::socket_fd)
    }

    /// The backend request channel, while the backend has one open.
    pub fn backend_requests_fd(&self) -> Option<i32> {
        self.link.as_ref().and_then(BackendLink::backend_requests_fd)
    }

    /// The backend request channel is readable: serve one request. A configuration change
    /// raises CONFIG in the interrupt status, starts a new configuration generation and
    /// signals the device's interrupt.
    pub fn backend_request(&mut self) {
        let Some(link) = self.link.as_mut() else { return };
        match link.handle_backend_request() {
            Ok(true) => {
                info!("{}: the backend changed the configuration space", self.name);
                self.state.config_changed();
                self.signal_config();
            }
            Ok(false) => {}
            Err(e) => warn!("{}: {e}; its requests are no longer heard", self.name),
        }
    }

    /// Serves every backend request already waiting, without blocking (for callers without
    /// an event loop, such as the software guest, before they read the interrupt status or
    /// the config generation). Returns how many were served.
    pub fn poll_backend_requests(&mut self) -> usize {
        let mut served = 0;
        // A request that fails closes the channel, which ends the loop.
        while self.link.as_ref().is_some_and(BackendLink::backend_request_waiting) {
            self.backend_request();
            served += 1;
        }
        served
    }

    /// Whether the backend is connected.
    pub fn connected(&self) -> bool {
        self.link.is_some()
    }

    /// Raises the device's interrupt (a configuration change or a broken device).
    fn signal_config(&self) {
        if let Some(call) = self.calls.first() {
            let _ = call.write(1);
        }
    }

    fn note_violation(&mut self, why: &str) {
        self.violations += 1;
        if self.violations == 1 {
            warn!("{} (slot {}): {why}; the device needs a reset", self.name, self.slot);
        }
        self.signal_config();
    }

    /// A guest read in the device's window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        match self.state.read(offset, data) {
            Effect::ConfigRead(config_offset) => {
                let bytes = match self.link.as_mut() {
                    Some(link) => link.read_config(config_offset as u32, data.len() as u32).unwrap_or_else(|e| {
                        warn!("{}: configuration read: {e}", self.name);
                        vec![0; data.len()]
                    }),
                    None => vec![0; data.len()],
                };
                let n = bytes.len().min(data.len());
                data[..n].copy_from_slice(&bytes[..n]);
            }
            Effect::Broken(why) => self.note_violation(&why),
            _ => {}
        }
    }

    /// A guest write in the device's window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], ram: &GuestRam) {
        let before: Vec<QueueConfig> = self.state.queues().to_vec();
        match self.state.write(offset, data) {
            Effect::Activate => {
                if let Err(e) = self.start_rings(ram, false) {
                    warn!("{}: starting the backend's rings: {e}", self.name);
                    self.state.mark_broken();
                    self.signal_config();
                }
            }
            Effect::Reset => {
                if let Some(link) = self.link.as_mut()
                    && let Err(e) = link.reset(&before)
                {
                    warn!("{}: stopping the backend's rings: {e}", self.name);
                }
                // A reset driver starts its rings afresh: nothing of theirs is in flight.
                self.inflight = None;
            }
            Effect::ConfigWrite(config_offset) => {
                if let Some(link) = self.link.as_mut()
                    && let Err(e) = link.write_config(config_offset as u32, data)
                {
                    warn!("{}: configuration write: {e}", self.name);
                }
            }
            Effect::Broken(why) => self.note_violation(&why),
            Effect::None | Effect::ConfigRead(_) => {}
        }
    }

    /// Starts the backend's rings for the queues the driver enabled. After a reconnect
    /// (`restore`), each ring starts where the guest's used index says the old backend got to;
    /// a backend that tracks requests in flight gets the area first and goes on from there
    /// instead (resubmitting what the old one left unfinished).
    fn start_rings(&mut self, ram: &GuestRam, restore: bool) -> Result<(), FrontendError> {
        let bases: Vec<u16> = self
            .state
            .queues()
            .iter()
            .map(|q| {
                if restore && q.ready { ram.memory().read_obj::<u16>(GuestAddress(q.used + 2)).unwrap_or(0) } else { 0 }
            })
            .collect();
        self.start_rings_at(ram, &bases)
    }

    /// Starts the rings the driver enabled at `bases` (each queue's next available index),
    /// after handing over the in-flight area.
    fn start_rings_at(&mut self, ram: &GuestRam, bases: &[u16]) -> Result<(), FrontendError> {
        self.hand_over_inflight_area()?;
        let queues = self.state.queues();
        let features = self.state.driver_features();
        match self.link.as_mut() {
            Some(link) => link.activate(features, queues, bases, &self.kicks, &self.calls, ram).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Whether the driver had started the device's rings (DRIVER_OK, a queue ready).
    fn rings_started(&self) -> bool {
        self.state.status() & pvkit_protocol::virtio::status::DRIVER_OK != 0
            && self.state.queues().iter().any(|q| q.ready)
    }

    /// Gives the backend the in-flight area (asking it for one the first time), when it
    /// tracks requests in flight.
    fn hand_over_inflight_area(&mut self) -> Result<(), FrontendError> {
        let Some(link) = self.link.as_mut().filter(|l| l.tracks_inflight()) else { return Ok(()) };
        if self.inflight.is_none() {
            self.inflight = link.new_inflight_area(self.kicks.len(), MAX_QUEUE_SIZE)?;
            if let Some(area) = &self.inflight {
                info!("{}: the backend keeps requests in flight in a {}-byte area", self.name, area.size());
            }
        }
        match &self.inflight {
            Some(area) => link.set_inflight_area(area),
            None => Ok(()),
        }
    }

    /// Stops the backend's rings (GET_VRING_BASE on each ready queue) so it touches them no
    /// more, keeping their indexes for [`VirtioDevice::resume`]. Nothing to do for a device the
    /// driver has not started, or whose backend is away.
    pub fn quiesce(&mut self) -> Result<(), FrontendError> {
        let started = self.state.status() & pvkit_protocol::virtio::status::DRIVER_OK != 0;
        let Some(link) = self.link.as_mut().filter(|_| started && self.paused_bases.is_none()) else { return Ok(()) };
        let queues = self.state.queues().to_vec();
        self.paused_bases = Some(link.reset(&queues)?);
        Ok(())
    }

    /// Starts the rings [`VirtioDevice::quiesce`] stopped again, at the indexes it kept.
    pub fn resume(&mut self, ram: &GuestRam) -> Result<(), FrontendError> {
        let Some(bases) = self.paused_bases.take() else { return Ok(()) };
        self.start_rings_at(ram, &bases)?;
        // A kick for every started ring: what the driver offered while the backend was
        // stopped is looked at now (a spurious kick costs one empty pass).
        for (kick, _) in self.kicks.iter().zip(self.state.queues()).filter(|(_, q)| q.ready) {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// The device as a snapshot keeps it: its transport state and, per queue, the backend's
    /// next available index (kept by [`VirtioDevice::quiesce`]; the used index when the
    /// backend was away) and the ring indexes in guest memory.
    pub fn snapshot(&self, ram: &GuestRam) -> DeviceSnapshot {
        let read = |gpa: u64| ram.memory().read_obj::<u16>(GuestAddress(gpa)).unwrap_or(0);
        let rings = self
            .state
            .queues()
            .iter()
            .enumerate()
            .map(|(index, q)| {
                if !q.ready {
                    return RingIndexes::default();
                }
                let (used, avail) = (read(q.used + 2), read(q.avail + 2));
                let last_avail = self.paused_bases.as_ref().and_then(|b| b.get(index).copied()).unwrap_or(used);
                RingIndexes { last_avail, used, avail }
            })
            .collect();
        DeviceSnapshot {
            slot: self.slot,
            virtio_id: self.state.device_id(),
            name: self.name.clone(),
            socket: self.socket.clone(),
            transport: self.state.clone(),
            rings,
        }
    }

    /// Takes a snapshot's transport state for this device (just connected to its backend,
    /// not yet seen by the guest); [`VirtioDevice::resume`] then starts the rings the driver
    /// had started at the saved indexes.
    pub fn restore(&mut self, saved: &DeviceSnapshot, ram: &GuestRam) -> Result<(), FrontendError> {
        let offered = self.state.device_features();
        saved.transport.check_restorable(offered, self.kicks.len(), ram.size()).map_err(|what| {
            FrontendError::Unsuitable {
                socket: self.socket.display().to_string(),
                what: format!("cannot take the saved device: {what}"),
            }
        })?;
        self.state = saved.transport.clone();
        self.paused_bases = self.rings_started().then(|| saved.rings.iter().map(|r| r.last_avail).collect());
        Ok(())
    }

    /// Whether the backend can log the pages it writes (`None`: no backend connected).
    pub fn can_log(&self) -> Option<bool> {
        self.link.as_ref().map(BackendLink::can_log)
    }

    /// Starts or stops the backend logging the pages it writes into the bitmap in `log`
    /// (memfd, size), for a live migration.
    pub fn set_logging(&mut self, log: Option<(i32, u64)>) -> Result<(), FrontendError> {
        let features = self.state.driver_features();
        match (self.link.as_mut(), log) {
            (Some(link), Some((fd, size))) => link.start_logging(fd, size, features),
            (Some(link), None) => link.stop_logging(features),
            (None, _) => Ok(()),
        }
    }

    /// Lets go of the backend for good (another VMM takes it over): closes the connection,
    /// and no reconnect is tried.
    pub fn release(&mut self) {
        self.released = true;
        self.link = None;
    }

    /// Whether [`VirtioDevice::release`] let go of the backend.
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// The backend went away: forget the link and tell the guest the device needs a reset.
    pub fn backend_lost(&mut self) {
        if self.link.take().is_some() {
            warn!("{}: backend at {} disconnected; the device needs a reset", self.name, self.socket.display());
            self.state.mark_broken();
            self.signal_config();
        }
    }

    /// Tries to reconnect to the backend; on success restores the rings (if the driver had
    /// started them) and clears DEVICE_NEEDS_RESET. Returns whether the backend is back.
    pub fn try_reconnect(&mut self, ram: &GuestRam) -> bool {
        let Some(target) = self.reconnect_target() else { return true };
        match target.connect(ram) {
            Some(link) => self.adopt_link(link, ram),
            None => false,
        }
    }

    /// Where to reconnect, while the backend is away (`None` when connected). The handshake
    /// itself ([`ReconnectTarget::connect`]) needs no lock on the device, so vCPU exits for
    /// it (and for every other device) go on while a backend is slow to answer.
    pub fn reconnect_target(&self) -> Option<ReconnectTarget> {
        if self.link.is_some() || self.released {
            return None;
        }
        Some(ReconnectTarget { socket: self.socket.clone(), default_queues: self.default_queues })
    }

    /// Takes a link made by [`ReconnectTarget::connect`] and restores the rings the driver had
    /// started; false when the new backend cannot serve them.
    pub fn adopt_link(&mut self, link: BackendLink, ram: &GuestRam) -> bool {
        if self.link.is_some() {
            return true;
        }
        if link.num_queues() < self.kicks.len() {
            warn!("{}: the new backend serves {} queues, fewer than before; not used", self.name, link.num_queues());
            return false;
        }
        self.link = Some(link);
        let was_started = self.rings_started();
        if was_started && let Err(e) = self.start_rings(ram, true) {
            warn!("{}: restoring the rings: {e}", self.name);
            self.link = None;
            return false;
        }
        self.state.clear_broken();
        info!(
            "{}: backend at {} is back{}",
            self.name,
            self.socket.display(),
            if was_started { ", rings restored" } else { "" }
        );
        true
    }
}

/// A backend to reconnect to, taken from a device while it is away.
#[derive(Debug, Clone)]
pub struct ReconnectTarget {
    socket: std::path::PathBuf,
    default_queues: usize,
}

impl ReconnectTarget {
    /// The vhost-user handshake with the backend, if it is back.
    pub fn connect(&self, ram: &GuestRam) -> Option<BackendLink> {
        BackendLink::connect(&self.socket, ram, self.default_queues).ok()
    }
}
