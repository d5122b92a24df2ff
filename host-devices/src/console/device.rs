//! The virtio-console device: port queues, the control queues, EMERG_WRITE and SIZE, with
//! flow control in both directions. One worker thread serves every queue and every port's
//! host-side descriptors.

use super::control::{Control, PortInfo};
use super::port::HostPort;
use crate::backend_channel::BackendChannel;
use log::warn;
use pvkit_protocol::console::{self, ConfigRepr, ConfigWrite, feature as cf, queue as cq};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Largest control message accepted from the guest.
const MAX_CONTROL_MESSAGE: usize = 4096;
/// Largest piece of host input delivered into one receive buffer.
const MAX_RX_CHUNK: usize = 64 * 1024;

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

    fn lock(&self) -> MutexGuard<'_, Vec<HostPort>> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
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
}

/// How often the console's terminal size is checked (stdio and pty ports).
const SIZE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

struct Shared {
    host: Arc<ConsoleHost>,
    port_count: usize,
    num_queues: usize,
    memory: RwLock<Option<Memory>>,
    control: Mutex<Control>,
    handler: Mutex<Option<Weak<VringEpollHandler<ConsoleDevice>>>>,
    watching: Mutex<Vec<[bool; 3]>>,
    exit: (EventConsumer, EventNotifier),
    stopped: AtomicBool,
    size_timer: Mutex<Option<vmm_sys_util::timerfd::TimerFd>>,
    last_size: Mutex<Option<(u16, u16)>>,
    /// Where configuration changes (a new terminal size) are announced to the frontend.
    backend_channel: Arc<BackendChannel>,
}

/// The console device for one frontend connection; cheap to clone.
#[derive(Clone)]
pub struct ConsoleDevice {
    shared: Arc<Shared>,
}

impl ConsoleDevice {
    /// A device over `host`'s ports.
    pub fn new(host: Arc<ConsoleHost>) -> io::Result<ConsoleDevice> {
        let (port_count, size) = {
            let ports = host.lock();
            (ports.len(), ports.first().and_then(HostPort::size))
        };
        let num_queues = usize::from(cq::count(port_count as u16, port_count > 1));
        Ok(ConsoleDevice {
            shared: Arc::new(Shared {
                host,
                port_count,
                num_queues,
                memory: RwLock::new(None),
                control: Mutex::new(Control::new(port_count as u32, size)),
                handler: Mutex::new(None),
                watching: Mutex::new(vec![[false; 3]; port_count]),
                exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
                stopped: AtomicBool::new(false),
                size_timer: Mutex::new(None),
                last_size: Mutex::new(size),
                backend_channel: Arc::new(BackendChannel::new()),
            }),
        })
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
        if let Some(timer) = self.shared.size_timer.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = timer.wait();
        }
        let size = self.shared.host.lock().first().and_then(HostPort::size);
        let mut last = self.shared.last_size.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rows, cols)) = size
            && size != *last
        {
            *last = size;
            self.shared.control.lock().unwrap_or_else(|e| e.into_inner()).resize(rows, cols);
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
    fn watch(&self, port: usize, kind: usize, fd: Option<i32>, want: bool) {
        let mut watching = self.shared.watching.lock().unwrap_or_else(|p| p.into_inner());
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

    fn memory(&self) -> Option<Memory> {
        self.shared.memory.read().ok().and_then(|m| m.clone())
    }

    /// Takes guest output from port `p`'s transmit queue while the port has room, and
    /// passes it on to the host side.
    pub(crate) fn pump_tx(&self, p: usize, vring: &VringRwLock, memory: &Memory) -> io::Result<()> {
        let mut ports = self.shared.host.lock();
        let Some(port) = ports.get_mut(p) else { return Ok(()) };
        let mut closed = port.flush();
        let mut used = false;
        {
            let mem = memory.memory();
            let mut state = vring.get_mut();
            let vq = state.get_queue_mut();
            while port.has_room() {
                let Some(chain) = vq.pop_descriptor_chain(&*mem) else { break };
                let head = chain.head_index();
                match read_chain(chain, &mem, usize::MAX) {
                    Ok(bytes) => port.pending.extend(bytes),
                    Err(why) => warn!("console port {p}: transmit chain dropped: {why}"),
                }
                vq.add_used(&*mem, head, 0).map_err(io::Error::other)?;
                used = true;
                closed |= port.flush();
            }
            if used && vq.needs_notification(&*mem).map_err(io::Error::other)? {
                drop(state);
                vring.signal_used_queue()?;
            }
        }
        let (fd, want) = (port.output_fd(), !port.pending.is_empty());
        drop(ports);
        self.watch(p, 2, fd, want);
        if closed {
            self.host_side_closed(p);
        }
        Ok(())
    }

    /// Delivers host input for port `p` into the receive buffers the guest posted; stops
    /// watching the input while the guest has none, so input waits on the host side.
    pub(crate) fn pump_rx(&self, p: usize, vring: &VringRwLock, memory: &Memory) -> io::Result<()> {
        let mut ports = self.shared.host.lock();
        let Some(port) = ports.get_mut(p) else { return Ok(()) };
        let mut closed = false;
        let mut used = false;
        let mut has_buffers = false;
        {
            let mem = memory.memory();
            let mut state = vring.get_mut();
            let vq = state.get_queue_mut();
            while port.input_fd().is_some() {
                let Some(chain) = vq.pop_descriptor_chain(&*mem) else { break };
                let head = chain.head_index();
                let buffers = writable_buffers(chain);
                let room: usize = buffers.iter().map(|b| b.1).sum::<usize>().min(MAX_RX_CHUNK);
                if room == 0 {
                    warn!("console port {p}: receive chain without writable buffers dropped");
                    vq.add_used(&*mem, head, 0).map_err(io::Error::other)?;
                    used = true;
                    continue;
                }
                let mut data = vec![0u8; room];
                match port.read(&mut data) {
                    Ok(Some(n)) => {
                        let written = write_buffers(&mem, &buffers, &data[..n]);
                        vq.add_used(&*mem, head, written as u32).map_err(io::Error::other)?;
                        used = true;
                    }
                    Ok(None) => {
                        vq.go_to_previous_position();
                        has_buffers = true;
                        break;
                    }
                    Err(_) => {
                        vq.go_to_previous_position();
                        closed = true;
                        break;
                    }
                }
            }
            if used && vq.needs_notification(&*mem).map_err(io::Error::other)? {
                drop(state);
                vring.signal_used_queue()?;
            }
        }
        let fd = port.input_fd();
        drop(ports);
        self.watch(p, 1, fd, has_buffers);
        if closed {
            self.host_side_closed(p);
        }
        Ok(())
    }

    fn host_side_closed(&self, p: usize) {
        self.shared.control.lock().unwrap_or_else(|e| e.into_inner()).host_open_changed(p as u32, false);
        self.watch(p, 1, None, false);
        self.watch(p, 2, None, false);
    }

    pub(crate) fn pump_control_tx(&self, vring: &VringRwLock, memory: &Memory) -> io::Result<()> {
        let mem = memory.memory();
        let mut state = vring.get_mut();
        let vq = state.get_queue_mut();
        let mut used = false;
        while let Some(chain) = vq.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            match read_chain(chain, &mem, MAX_CONTROL_MESSAGE) {
                Ok(bytes) => {
                    let (infos, size): (Vec<PortInfo>, _) = {
                        let ports = self.shared.host.lock();
                        let infos = ports
                            .iter()
                            .map(|p| PortInfo { name: p.spec.name.clone(), host_open: p.is_open() })
                            .collect();
                        (infos, ports.first().and_then(HostPort::size))
                    };
                    // The size the guest is told at PORT_READY is the size now.
                    *self.shared.last_size.lock().unwrap_or_else(|p| p.into_inner()) = size;
                    let mut control = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
                    control.note_size(size);
                    if let Err(e) =
                        control.on_guest_message(&bytes, |p| infos.get(p as usize).cloned().unwrap_or_default())
                    {
                        warn!("console: control message ignored: {e}");
                    }
                }
                Err(why) => warn!("console: control chain dropped: {why}"),
            }
            vq.add_used(&*mem, head, 0).map_err(io::Error::other)?;
            used = true;
        }
        if used && vq.needs_notification(&*mem).map_err(io::Error::other)? {
            drop(state);
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn pump_control_rx(&self, vring: &VringRwLock, memory: &Memory) -> io::Result<()> {
        let mut control = self.shared.control.lock().unwrap_or_else(|e| e.into_inner());
        if control.outbox.is_empty() {
            return Ok(());
        }
        let mem = memory.memory();
        let mut state = vring.get_mut();
        let vq = state.get_queue_mut();
        let mut used = false;
        while !control.outbox.is_empty() {
            let Some(chain) = vq.pop_descriptor_chain(&*mem) else { break };
            let head = chain.head_index();
            let buffers = writable_buffers(chain);
            let Some(msg) = control.outbox.pop_front() else { break };
            let room: usize = buffers.iter().map(|b| b.1).sum();
            let written = if room >= msg.len() {
                write_buffers(&mem, &buffers, &msg)
            } else {
                warn!("console: control buffer of {room} bytes too small for a {}-byte message", msg.len());
                0
            };
            vq.add_used(&*mem, head, written as u32).map_err(io::Error::other)?;
            used = true;
        }
        if used && vq.needs_notification(&*mem).map_err(io::Error::other)? {
            drop(state);
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Serves every queue and port once more: used after anything that may unblock work.
    /// Serves every queue, then asks the driver for a kick on the next buffer of each
    /// (RING_EVENT_IDX's `avail_event`, or clearing NO_NOTIFY), and serves again if output
    /// arrived meanwhile: a driver that published it before the request for a kick was visible
    /// will not kick, so stopping here would leave it waiting for good.
    fn pump_all(&self, vrings: &[VringRwLock], memory: &Memory) -> io::Result<()> {
        loop {
            self.pump_once(vrings, memory)?;
            let mut more = false;
            for (q, vring) in vrings.iter().enumerate().filter(|(_, v)| v.get_ref().get_queue().ready()) {
                let pending = vring.enable_notification().map_err(io::Error::other)?;
                // Receive queues keep free buffers on purpose; only new output counts.
                if matches!(self.role(q), Some(QueueRole::Tx(_) | QueueRole::ControlTx)) {
                    more |= pending;
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    fn pump_once(&self, vrings: &[VringRwLock], memory: &Memory) -> io::Result<()> {
        for (q, vring) in vrings.iter().enumerate() {
            if !vring.get_ref().get_queue().ready() {
                continue;
            }
            match self.role(q) {
                Some(QueueRole::Tx(p)) => self.pump_tx(p, vring, memory)?,
                Some(QueueRole::Rx(p)) => self.pump_rx(p, vring, memory)?,
                Some(QueueRole::ControlTx) => self.pump_control_tx(vring, memory)?,
                Some(QueueRole::ControlRx) => self.pump_control_rx(vring, memory)?,
                None => {}
            }
        }
        // Control messages produced above go out now.
        if let Some(ctrl) = vrings.get(usize::from(cq::CONTROL_RX)).filter(|_| self.multiport())
            && ctrl.get_ref().get_queue().ready()
        {
            self.pump_control_rx(ctrl, memory)?;
        }
        Ok(())
    }
}

/// The readable bytes of a chain (at most `limit`); a chain with writable buffers is refused.
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err("a transmit chain with a device-writable buffer".into());
        }
        let len = (desc.len() as usize).min(limit.saturating_sub(out.len()));
        let start = out.len();
        out.resize(start + len, 0);
        mem.read_slice(&mut out[start..], desc.addr()).map_err(|e| format!("buffer at {:#x}: {e}", desc.addr().0))?;
    }
    Ok(out)
}

fn writable_buffers(chain: DescriptorChain<&GuestMemoryMmap>) -> Vec<(vm_memory::GuestAddress, usize)> {
    chain.filter(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect()
}

/// Writes `data` across `buffers`; returns the bytes written (buffers outside memory stop it).
fn write_buffers(mem: &GuestMemoryMmap, buffers: &[(vm_memory::GuestAddress, usize)], data: &[u8]) -> usize {
    let mut done = 0;
    for (addr, len) in buffers {
        if done == data.len() {
            break;
        }
        let n = (*len).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], *addr).is_err() {
            break;
        }
        done += n;
    }
    done
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

    fn set_event_idx(&self, _enabled: bool) {
        // Applied per vring by the library; the notification calls above follow it.
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

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.shared.memory.write().map_err(|_| io::Error::other("memory lock poisoned"))? = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.shared.num_queues) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.shared.exit.0.try_clone().ok()?, self.shared.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        // An error returned from here would end this worker's event loop for good (the
        // library stops on it): log it and keep serving instead.
        let result = (|| -> io::Result<()> {
            if self.shared.stopped.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Host-side events (a client connecting to a port) are handled even before the
            // frontend has sent its memory table: left alone, a listener event would not come
            // back and the client would never be accepted.
            match self.classify(device_event) {
                Some(Event::Listener(p)) => {
                    let accepted = self.shared.host.lock().get_mut(p).map(|port| port.accept()).transpose();
                    if matches!(accepted, Ok(Some(true))) {
                        self.shared.control.lock().unwrap_or_else(|e| e.into_inner()).host_open_changed(p as u32, true);
                    }
                }
                Some(Event::SizeCheck) => self.check_size(),
                Some(Event::Queue(_) | Event::Input(_) | Event::Output(_)) => {}
                None => return Err(io::Error::other(format!("unknown event {device_event}"))),
            }
            let Some(memory) = self.memory() else { return Ok(()) };
            // Console traffic is light: serving everything on any event keeps the flow-control
            // logic in one place (a kick on one queue can unblock another port's host side).
            self.pump_all(vrings, &memory)
        })();
        if let Err(e) = result {
            warn!("console: event {device_event}: {e}");
        }
        Ok(())
    }
}

impl crate::server::ServedDevice for ConsoleDevice {
    fn backend_channel(&self) -> Option<Arc<BackendChannel>> {
        Some(self.shared.backend_channel.clone())
    }
    fn stop_workers(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        let _ = self.shared.exit.1.notify();
        let mut watching = self.shared.watching.lock().unwrap_or_else(|p| p.into_inner());
        for w in watching.iter_mut() {
            *w = [false; 3];
        }
    }

    fn attach(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>) -> io::Result<()> {
        let Some(handler) = handlers.first() else { return Ok(()) };
        *self.shared.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(handler));
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
            *self.shared.size_timer.lock().unwrap_or_else(|p| p.into_inner()) = Some(timer);
        }
        Ok(())
    }
}
