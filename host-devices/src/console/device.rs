//! The virtio-console device: port queues, the control queues, EMERG_WRITE and SIZE, with
//! flow control in both directions. One worker thread serves every queue and every port's
//! host-side descriptors.

use super::control::{Control, PortInfo};
use super::port::HostPort;
use super::pumps::{MAX_RX_CHAIN, transmit_buffers};
use crate::backend_channel::BackendChannel;
use crate::lock;
use crate::queue::throttle::Throttles;
use crate::queue::worker::PassContext;
use crate::queue::{
    ChainBuffers, DeviceCore, Gates, Memory, NoServices, PassError, QueueService, QueueServices, Rearm, UsedBatch,
    WorkerQueue, ring,
};
use log::warn;
use pvkit_protocol::console::{self, ConfigRepr, ConfigWrite, feature as cf, queue as cq};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

/// Largest control message accepted from the guest.
const MAX_CONTROL_MESSAGE: usize = 4096;
/// The ports' host sides, shared by every frontend connection of the process.
pub struct ConsoleHost {
    ports: Mutex<Vec<HostPort>>,
}

impl ConsoleHost {
    /// The host sides of `ports` (port 0 is the console).
    pub fn new(ports: Vec<HostPort>) -> ConsoleHost {
        ConsoleHost { ports: Mutex::new(ports) }
    }

    /// One line per port: what it is, whether the host side is open, output waiting.
    pub fn summary(&self) -> String {
        self.lock()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "port {i} {} {} pending={}",
                    p.spec,
                    if p.is_open() { "open" } else { "closed" },
                    p.pending.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Writes out what the ports still hold, waiting up to a second for slow host sides.
    pub fn flush_all(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let mut ports = self.lock();
            let waiting = ports.iter_mut().map(|p| {
                // Nothing is lost at exit: delayed output goes now.
                p.release_delayed(None);
                p.flush();
                p.is_open() && !p.pending.is_empty()
            });
            if !waiting.fold(false, |a, b| a | b) || std::time::Instant::now() > deadline {
                return;
            }
            drop(ports);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<HostPort>> {
        lock(&self.ports)
    }
}

/// What a queue index stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueRole {
    Rx(usize),
    Tx(usize),
    ControlRx,
    ControlTx,
}

/// What an epoll event stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Queue(usize),
    Listener(usize),
    Input(usize),
    Output(usize),
    /// The periodic check of the console's terminal size.
    SizeCheck,
    /// A queue's rate-limit timer: its tokens are back.
    Timer(usize),
}

/// How often the console's terminal size is checked (stdio and pty ports).
const SIZE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

pub(super) struct Shared {
    pub(super) core: DeviceCore,
    pub(super) host: Arc<ConsoleHost>,
    pub(super) port_count: usize,
    pub(super) num_queues: usize,
    pub(super) control: Mutex<Control>,
    pub(super) handler: Mutex<Option<Weak<VringEpollHandler<ConsoleDevice>>>>,
    pub(super) watching: Mutex<Vec<[bool; 3]>>,
    /// Chains refused on this connection.
    pub(super) refused: AtomicU64,
    pub(super) size_timer: Mutex<Option<vmm_sys_util::timerfd::TimerFd>>,
    pub(super) last_size: Mutex<Option<(u16, u16)>>,
    /// Each queue's wait for the rate limits.
    pub(super) throttles: Throttles,
    /// Per port: its receive queue ran out of buffers while a client was connected, so input
    /// may wait unwatched and new buffers are work.
    pub(super) rx_starved: Vec<std::sync::atomic::AtomicBool>,
    /// Where configuration changes (a new terminal size) are announced to the frontend.
    pub(super) backend_channel: Arc<BackendChannel>,
}

/// The console device for one frontend connection; cheap to clone.
#[derive(Clone)]
pub struct ConsoleDevice {
    pub(super) shared: Arc<Shared>,
}

impl ConsoleDevice {
    /// A device over `host`'s ports; `gates` (one worker) is shared by every connection.
    pub fn new(host: Arc<ConsoleHost>, gates: Arc<Gates>) -> io::Result<ConsoleDevice> {
        ConsoleDevice::with_services(host, gates, Arc::new(NoServices))
    }

    /// As [`ConsoleDevice::new`], with `services` attached to every queue.
    pub fn with_services(
        host: Arc<ConsoleHost>,
        gates: Arc<Gates>,
        services: Arc<dyn QueueServices>,
    ) -> io::Result<ConsoleDevice> {
        let (port_count, size) = {
            let ports = host.lock();
            (ports.len(), ports.first().and_then(HostPort::size))
        };
        let num_queues = usize::from(cq::count(port_count as u16, port_count > 1));
        Ok(ConsoleDevice {
            shared: Arc::new(Shared {
                core: DeviceCore::new("vhost-user-console", num_queues, 1, gates, 0)?.with_services(services),
                host,
                port_count,
                num_queues,
                control: Mutex::new(Control::new(port_count as u32, size)),
                handler: Mutex::new(None),
                watching: Mutex::new(vec![[false; 3]; port_count]),
                refused: AtomicU64::new(0),
                size_timer: Mutex::new(None),
                last_size: Mutex::new(size),
                // Timer events come after the ports' events and the size check's.
                throttles: Throttles::new(num_queues, (num_queues + 2 + port_count * 3) as u64)?,
                rx_starved: (0..port_count).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
                backend_channel: Arc::new(BackendChannel::new()),
            }),
        })
    }

    /// Whether port `p`'s receive queue ran out of buffers with a client connected.
    fn rx_starved(&self, p: usize) -> bool {
        self.shared.rx_starved.get(p).is_some_and(|f| f.load(Ordering::Relaxed))
    }

    fn multiport(&self) -> bool {
        self.shared.port_count > 1
    }

    /// The virtio features offered.
    pub fn device_features(&self) -> Features {
        let mut f = Features::from_bits(&[
            vf::VERSION_1,
            vf::RING_EVENT_IDX,
            vf::VHOST_USER_PROTOCOL_FEATURES,
            vf::VHOST_LOG_ALL,
            cf::SIZE,
            cf::EMERG_WRITE,
        ]);
        if self.multiport() {
            f = f.with(cf::MULTIPORT);
        }
        f
    }

    fn config(&self) -> ConfigRepr {
        let size = self.shared.host.lock().first().and_then(HostPort::size);
        let (rows, cols) = size.unwrap_or((0, 0));
        ConfigRepr { cols, rows, max_nr_ports: self.shared.port_count as u32, emerg_wr: 0 }
    }

    fn role(&self, queue: usize) -> Option<QueueRole> {
        if queue >= self.shared.num_queues {
            return None;
        }
        let q = queue as u16;
        match cq::port_of(q) {
            Some((port, false)) => Some(QueueRole::Rx(port.into())),
            Some((port, true)) => Some(QueueRole::Tx(port.into())),
            None if q == cq::CONTROL_RX => Some(QueueRole::ControlRx),
            None => Some(QueueRole::ControlTx),
        }
    }

    fn size_check_id(&self) -> u64 {
        (self.shared.num_queues + 1 + self.shared.port_count * 3) as u64
    }

    /// When the console's terminal changed size since the last look: sends RESIZE on the
    /// control queue (multiport) and tells the frontend the configuration space changed (its
    /// `cols` and `rows`), which it passes on to the guest as a configuration interrupt.
    fn check_size(&self) {
        if let Some(timer) = lock(&self.shared.size_timer).as_mut() {
            let _ = timer.wait();
        }
        let size = self.shared.host.lock().first().and_then(HostPort::size);
        let mut last = lock(&self.shared.last_size);
        if let Some((rows, cols)) = size
            && size != *last
        {
            *last = size;
            lock(&self.shared.control).resize(rows, cols);
            match self.shared.backend_channel.config_changed() {
                Ok(true) => log::debug!("console: resized to {cols}x{rows}; the frontend was told"),
                Ok(false) => {}
                Err(e) => warn!("console: resized to {cols}x{rows}: {e}"),
            }
        }
    }

    fn event_id(&self, port: usize, kind: usize) -> u64 {
        (self.shared.num_queues + 1 + port * 3 + kind) as u64
    }

    fn classify(&self, id: u16) -> Option<Event> {
        let id = usize::from(id);
        if id < self.shared.num_queues {
            return Some(Event::Queue(id));
        }
        if id as u64 == self.size_check_id() {
            return Some(Event::SizeCheck);
        }
        if let Some(queue) = self.shared.throttles.queue_of(id as u64) {
            return Some(Event::Timer(queue));
        }
        let rel = id.checked_sub(self.shared.num_queues + 1)?;
        let port = rel / 3;
        let event = match rel % 3 {
            0 => Event::Listener(port),
            1 => Event::Input(port),
            _ => Event::Output(port),
        };
        (port < self.shared.port_count).then_some(event)
    }

    /// Starts or stops watching one of a port's descriptors (kind 0 listener, 1 input
    /// readable, 2 output writable).
    pub(super) fn watch(&self, port: usize, kind: usize, fd: Option<i32>, want: bool) {
        let mut watching = lock(&self.shared.watching);
        let Some(slot) = watching.get_mut(port).map(|w| &mut w[kind]) else { return };
        let Some(handler) = self.shared.handler.lock().ok().and_then(|h| h.as_ref().and_then(Weak::upgrade)) else {
            return;
        };
        let events = if kind == 2 { EventSet::OUT } else { EventSet::IN };
        match (fd, want, *slot) {
            (Some(fd), true, false) => {
                *slot = handler.register_listener(fd, events, self.event_id(port, kind)).is_ok();
            }
            (Some(fd), false, true) => {
                let _ = handler.unregister_listener(fd, events, self.event_id(port, kind));
                *slot = false;
            }
            // The descriptor is gone: closing it removed it from epoll.
            (None, _, _) => *slot = false,
            _ => {}
        }
    }

    /// Accepts a waiting client on port `p`, as a listener event would.
    #[cfg(test)]
    pub(crate) fn accept_for_test(&self, p: usize) -> bool {
        matches!(self.shared.host.lock().get_mut(p).map(|port| port.accept()), Some(Ok(true)))
    }

    /// Logs a refused chain (the first of each connection; the rest are counted).
    pub(super) fn refused(&self, what: &dyn std::fmt::Display) {
        if self.shared.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!("console: {what} (further refused chains are only counted)");
        }
    }

    /// Chains refused on this connection (bad direction, too long, outside guest memory).
    pub fn refused_chains(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    pub(super) fn host_side_closed(&self, p: usize) {
        lock(&self.shared.control).host_open_changed(p as u32, false);
        self.watch(p, 1, None, false);
        self.watch(p, 2, None, false);
    }

    pub(crate) fn pump_control_tx(&self, vring: &VringRwLock, memory: &Memory) -> Result<usize, PassError> {
        let mem = memory.memory();
        let mut state = vring.get_mut();
        let vq = state.get_queue_mut();
        let mut used = UsedBatch::default();
        let mut popper = ring::Popper::new(usize::from(cq::CONTROL_TX));
        while let Some(chain) = popper.next(vq, &*mem) {
            used.push(chain.head_index(), 0);
            let mut bytes = Vec::new();
            match transmit_buffers(chain, MAX_CONTROL_MESSAGE as u64).and_then(|b| b.read_all(&*mem, &mut bytes)) {
                Ok(()) => self.on_control_message(&bytes),
                Err(why) => self.refused(&format_args!("control chain dropped: {why}")),
            }
        }
        let count = used.len();
        used.publish_and_release(state, vring, usize::from(cq::CONTROL_TX), &*mem, self.shared.core.services())?;
        popper.finish(count)
    }

    fn on_control_message(&self, bytes: &[u8]) {
        let (infos, size): (Vec<PortInfo>, _) = {
            let ports = self.shared.host.lock();
            let infos = ports.iter().map(|p| PortInfo { name: p.spec.name.clone(), host_open: p.is_open() }).collect();
            (infos, ports.first().and_then(HostPort::size))
        };
        // The size the guest is told at PORT_READY is the size now.
        *lock(&self.shared.last_size) = size;
        let mut control = lock(&self.shared.control);
        control.note_size(size);
        if let Err(e) = control.on_guest_message(bytes, |p| infos.get(p as usize).cloned().unwrap_or_default()) {
            self.refused(&format_args!("control message ignored: {e}"));
        }
    }

    fn pump_control_rx(&self, vring: &VringRwLock, memory: &Memory) -> Result<usize, PassError> {
        let mut control = lock(&self.shared.control);
        if control.outbox.is_empty() {
            return Ok(0);
        }
        let mem = memory.memory();
        let mut state = vring.get_mut();
        let vq = state.get_queue_mut();
        let services = self.shared.core.services();
        let mut used = UsedBatch::default();
        let mut popper = ring::Popper::new(usize::from(cq::CONTROL_RX));
        while !control.outbox.is_empty() {
            let Some(chain) = popper.next(vq, &*mem) else { break };
            let head = chain.head_index();
            let Some(msg) = control.outbox.pop_front() else { break };
            let written = match ChainBuffers::collect(chain, MAX_RX_CHAIN) {
                Ok(buffers) if buffers.writable_len() >= msg.len() as u64 => buffers.write(&*mem, &msg, services),
                other => {
                    let room = other.map_or(0, |b| b.writable_len());
                    self.refused(&format_args!(
                        "control receive chain of {room} bytes refused a {}-byte message",
                        msg.len()
                    ));
                    0
                }
            };
            used.push(head, written as u32);
        }
        let count = used.len();
        used.publish_and_release(state, vring, usize::from(cq::CONTROL_RX), &*mem, services)?;
        popper.finish(count)
    }
}

/// One pass over every queue of the console's one worker.
struct ConsolePass<'a> {
    device: &'a ConsoleDevice,
    vrings: &'a [VringRwLock],
    /// Ports whose host side cannot take their next chain: their transmit queues are parked.
    full: Vec<bool>,
}

impl QueueService for ConsolePass<'_> {
    fn pass(&mut self, ctx: &PassContext<'_>) -> Result<usize, PassError> {
        let device = self.device;
        let mut work = 0;
        for (q, vring) in self.vrings.iter().enumerate().filter(|(q, v)| ctx.serviceable(*q, v)) {
            work += match device.role(q) {
                Some(QueueRole::Tx(p)) => {
                    let (moved, full) = device.pump_tx(p, vring, ctx.memory)?;
                    if let Some(slot) = self.full.get_mut(p) {
                        *slot = full;
                    }
                    moved
                }
                Some(QueueRole::Rx(p)) => device.pump_rx(p, vring, ctx.memory)?,
                Some(QueueRole::ControlTx) => device.pump_control_tx(vring, ctx.memory)?,
                Some(QueueRole::ControlRx) => device.pump_control_rx(vring, ctx.memory)?,
                None => 0,
            };
        }
        // Control messages produced above go out now.
        let control_rx = usize::from(cq::CONTROL_RX);
        if let Some(ctrl) = self.vrings.get(control_rx).filter(|v| device.multiport() && ctx.serviceable(control_rx, v))
        {
            work += device.pump_control_rx(ctrl, ctx.memory)?;
        }
        Ok(work)
    }

    /// Receive queues keep free buffers on purpose: their kicks are wanted, but waiting
    /// buffers are not work, unless the port ran out of them with input perhaps waiting; a
    /// full port's transmit queue waits for the port to drain.
    fn rearm(&self, queue: usize) -> Rearm {
        // Waiting for its limits, a queue takes no kicks: its timer wakes the worker.
        if self.device.shared.throttles.is_waiting(queue) {
            return Rearm::Parked;
        }
        match self.device.role(queue) {
            Some(QueueRole::Tx(p)) if self.full.get(p).copied().unwrap_or(false) => Rearm::Parked,
            Some(QueueRole::Tx(_) | QueueRole::ControlTx) => Rearm::Work,
            // Buffers added while the worker finished its pass come without a kick (the driver
            // saw notifications off); a port whose input waits for them must not miss them.
            Some(QueueRole::Rx(p)) if self.device.rx_starved(p) => Rearm::Work,
            // Likewise control messages waiting for the driver's buffers.
            Some(QueueRole::ControlRx) if !lock(&self.device.shared.control).outbox.is_empty() => Rearm::Work,
            _ => Rearm::KickOnly,
        }
    }
}

impl VhostUserBackend for ConsoleDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.shared.num_queues
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        self.device_features().0
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: configuration changes (a resized terminal) reach the frontend.
        crate::server::protocol_features() | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut bytes = [0u8; console::CONFIG_SIZE];
        let _ = self.config().emit(&mut bytes);
        crate::server::config_slice(&bytes, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match console::classify_config_write(offset.into(), buf) {
            Ok(ConfigWrite::EmergencyWrite(byte)) => {
                let mut ports = self.shared.host.lock();
                if let Some(port) = ports.first_mut() {
                    port.pending.push_back(byte);
                    port.flush();
                }
                Ok(())
            }
            Ok(ConfigWrite::ReadOnlyField(at)) => {
                warn!("console: write to the read-only config field at {at} ignored");
                Ok(())
            }
            // Refusing with an error would make the library end the whole connection.
            Err(e) => {
                warn!("console: config write ignored: {e}");
                Ok(())
            }
        }
    }

    crate::served_by_core!(shared.core);

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.shared.num_queues) - 1]
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        self.shared.core.log_errors(device_event, || {
            if self.shared.core.is_stopped() {
                return Ok(());
            }
            // Host-side events (a client connecting to a port) are handled even before the
            // frontend has sent its memory table: left alone, a listener event would not come
            // back and the client would never be accepted.
            match self.classify(device_event) {
                Some(Event::Listener(p)) => {
                    let accepted = self.shared.host.lock().get_mut(p).map(|port| port.accept()).transpose();
                    if matches!(accepted, Ok(Some(true))) {
                        lock(&self.shared.control).host_open_changed(p as u32, true);
                    }
                }
                Some(Event::SizeCheck) => self.check_size(),
                Some(Event::Timer(queue)) => self.shared.throttles.fired(queue),
                Some(Event::Queue(queue)) => self.shared.core.services().kicked(queue),
                Some(Event::Input(_) | Event::Output(_)) => {}
                None => return Err(io::Error::other(format!("unknown event {device_event}"))),
            }
            // Console traffic is light: serving everything on any event keeps the flow-control
            // logic in one place (a kick on one queue can unblock another port's host side).
            let queues: Vec<WorkerQueue<'_>> =
                vrings.iter().enumerate().map(|(index, vring)| WorkerQueue { index, vring }).collect();
            let mut pass = ConsolePass { device: self, vrings, full: vec![false; self.shared.port_count] };
            self.shared.core.serve(0, &queues, &mut pass)
        })
    }
}

impl crate::server::ServedDevice for ConsoleDevice {
    fn core(&self) -> &DeviceCore {
        &self.shared.core
    }

    fn backend_channel(&self) -> Option<Arc<BackendChannel>> {
        Some(self.shared.backend_channel.clone())
    }

    fn stop_workers(&self) {
        self.shared.core.stop();
        let mut watching = lock(&self.shared.watching);
        for w in watching.iter_mut() {
            *w = [false; 3];
        }
    }

    fn attach(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>) -> io::Result<()> {
        let Some(handler) = handlers.first() else { return Ok(()) };
        *lock(&self.shared.handler) = Some(Arc::downgrade(handler));
        for queue in 0..self.shared.num_queues {
            if let Some((fd, event)) = self.shared.throttles.timer(queue) {
                handler.register_listener(fd, EventSet::IN, event)?;
            }
        }
        let listeners: Vec<(usize, Option<i32>)> =
            self.shared.host.lock().iter().enumerate().map(|(p, port)| (p, port.listener_fd())).collect();
        for (p, fd) in listeners {
            if fd.is_some() {
                self.watch(p, 0, fd, true);
            }
        }
        // A console on a terminal: watch its size (a SIGWINCH or a pty resize).
        let has_terminal = self.shared.host.lock().first().is_some_and(HostPort::is_terminal);
        if has_terminal {
            let mut timer = vmm_sys_util::timerfd::TimerFd::new()?;
            timer.reset(SIZE_CHECK_INTERVAL, Some(SIZE_CHECK_INTERVAL))?;
            handler.register_listener(
                std::os::unix::io::AsRawFd::as_raw_fd(&timer),
                EventSet::IN,
                self.size_check_id(),
            )?;
            *lock(&self.shared.size_timer) = Some(timer);
        }
        Ok(())
    }
}
