//! The virtio-net device behind the vhost-user protocol: features, configuration space, and
//! the service of each queue pair. Every queue pair has its own worker thread, which serves
//! both of its queues (receive `2i`, transmit `2i + 1`) and its part of the network side (tap
//! queue `i`, or inbox `i`); pairs share no lock on the data path.

use super::frame::complete_checksum;
use super::rings::{self, FrameFormat, Refused, RxOutcome, UsedBatch};
use super::side::{Frame, INBOX_CAPACITY, Inbox, NetworkSide};
use super::stats::{DropReason, NetStats};
use log::warn;
use pvkit_protocol::net::{self, ConfigRepr, GsoType, NetHeaderRepr, feature as netf, hdr_flags};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Most transmit chains taken in one pass before the receive side gets its turn.
const TX_BATCH: usize = 256;
/// Largest frame read from a tap: header plus the largest GSO frame.
const TAP_BUFFER: usize = net::HEADER_SIZE + net::MAX_GSO_FRAME;

/// What the device is configured with.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Number of queue pairs.
    pub pairs: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// The MAC address in the configuration space.
    pub mac: [u8; 6],
    /// The MTU in the configuration space; longer frames without GSO are dropped.
    pub mtu: u16,
    /// Microseconds to keep polling a pair after its last frame (0: never poll).
    pub poll_us: u64,
}

/// One queue pair's worker state (locked by its worker for a pass; nobody else takes it but
/// `stop_workers`).
struct PairState {
    /// A transmitted frame, copied out of the guest.
    tx_frame: Vec<u8>,
    /// A frame read from the tap.
    tap_buffer: Vec<u8>,
    /// Loopback frames on their way back.
    loopback: VecDeque<Frame>,
    /// A frame that found the receive queue without buffers, first in line.
    held: Option<Frame>,
}

struct Shared {
    options: NetOptions,
    side: NetworkSide,
    stats: Arc<NetStats>,
    memory: RwLock<Option<Memory>>,
    acked: AtomicU64,
    exits: Vec<(EventConsumer, EventNotifier)>,
    inboxes: Arc<Vec<Inbox>>,
    pairs: Vec<Mutex<PairState>>,
    stopped: AtomicBool,
}

/// The net device of one frontend connection; cheap to clone (all state is shared).
#[derive(Clone)]
pub struct NetDevice {
    shared: Arc<Shared>,
}

/// Where the event of a worker came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Queue,
    Inbox,
    Tap,
}

impl NetDevice {
    /// A device for one frontend connection, sending to and receiving from `side`.
    pub fn new(options: NetOptions, side: NetworkSide, stats: Arc<NetStats>) -> io::Result<NetDevice> {
        let pairs = options.pairs.max(1);
        let exits =
            (0..pairs).map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        let inboxes = Arc::new((0..pairs).map(|_| Inbox::new()).collect::<io::Result<Vec<_>>>()?);
        if let NetworkSide::Switch { hub, port } = &side {
            hub.connect(*port, inboxes.clone());
        }
        let pair_states = (0..pairs)
            .map(|_| {
                Mutex::new(PairState {
                    tx_frame: Vec::with_capacity(2048),
                    tap_buffer: if matches!(side, NetworkSide::Tap(_)) { vec![0; TAP_BUFFER] } else { Vec::new() },
                    loopback: VecDeque::new(),
                    held: None,
                })
            })
            .collect();
        let shared = Shared {
            options,
            side,
            stats,
            memory: RwLock::new(None),
            acked: AtomicU64::new(0),
            exits,
            inboxes,
            pairs: pair_states,
            stopped: AtomicBool::new(false),
        };
        Ok(NetDevice { shared: Arc::new(shared) })
    }

    /// The virtio features offered, which depend on the network side (see the README).
    pub fn device_features(&self) -> Features {
        let mut f = Features::from_bits(&[
            vf::VERSION_1,
            vf::RING_EVENT_IDX,
            vf::RING_INDIRECT_DESC,
            vf::VHOST_USER_PROTOCOL_FEATURES,
            netf::MAC,
            netf::STATUS,
            netf::MTU,
            netf::MRG_RXBUF,
            netf::CSUM,
            netf::GUEST_CSUM,
            netf::HOST_TSO4,
            netf::HOST_TSO6,
            netf::GUEST_TSO4,
            netf::GUEST_TSO6,
        ]);
        if self.shared.options.pairs > 1 {
            f = f.with(netf::MQ);
        }
        f
    }

    /// The features the driver acknowledged.
    pub fn acked(&self) -> Features {
        Features(self.shared.acked.load(Ordering::Relaxed))
    }

    /// How frames look with the acknowledged features.
    pub fn frame_format(&self) -> FrameFormat {
        let acked = self.acked();
        let modern = acked.has(vf::VERSION_1) || acked.has(netf::MRG_RXBUF);
        FrameFormat {
            header_len: if modern { net::HEADER_SIZE } else { net::LEGACY_HEADER_SIZE },
            mergeable: acked.has(netf::MRG_RXBUF),
            max_frame: usize::from(self.shared.options.mtu) + net::ETH_HEADER_LEN + rings::VLAN_TAG_LEN,
        }
    }

    fn config_bytes(&self) -> [u8; net::CONFIG_SIZE] {
        let config = ConfigRepr {
            mac: self.shared.options.mac,
            status: net::status::LINK_UP,
            max_virtqueue_pairs: self.shared.options.pairs,
            mtu: self.shared.options.mtu,
        };
        let mut bytes = [0u8; net::CONFIG_SIZE];
        // CONFIG_SIZE bytes always hold the configuration.
        let _ = config.emit(&mut bytes);
        bytes
    }

    /// Ends this connection's workers and leaves the switch, waiting until no worker is inside
    /// a pass.
    pub fn stop_workers(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        for (_, notifier) in &self.shared.exits {
            let _ = notifier.notify();
        }
        if let NetworkSide::Switch { hub, port } = &self.shared.side {
            hub.disconnect(*port);
        }
        for pair in &self.shared.pairs {
            drop(pair.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    fn inbox_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    fn tap_event(&self) -> u64 {
        self.num_queues() as u64 + 2
    }

    fn classify(&self, id: u16) -> Option<Event> {
        match u64::from(id) {
            0 | 1 => Some(Event::Queue),
            id if id == self.inbox_event() => Some(Event::Inbox),
            id if id == self.tap_event() => Some(Event::Tap),
            _ => None,
        }
    }

    /// Serves queue pair `pair` until nothing is left to do with notifications re-enabled;
    /// with `--poll-us`, keeps looking for that long after the last frame first.
    fn serve_pair(&self, pair: usize, rx: &VringRwLock, tx: &VringRwLock, memory: &Memory) -> io::Result<()> {
        let poll = Duration::from_micros(self.shared.options.poll_us);
        let Some(state) = self.shared.pairs.get(pair) else { return Ok(()) };
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let _ = tx.disable_notification();
            let _ = rx.disable_notification();
            let mut last_work = Instant::now();
            loop {
                if self.is_stopped() {
                    return Ok(());
                }
                let work = self.pass(pair, &mut state, rx, tx, memory)?;
                if work > 0 {
                    last_work = Instant::now();
                } else if poll.is_zero() || last_work.elapsed() >= poll {
                    break;
                } else {
                    std::hint::spin_loop();
                }
            }
            // Re-enabling reports whether the driver added buffers meanwhile. The receive
            // queue's kicks are wanted only while frames wait for its buffers.
            let tx_more = is_live(tx) && tx.enable_notification().map_err(io::Error::other)?;
            let waiting = state.held.is_some() || !state.loopback.is_empty() || !self.inbox(pair).is_empty();
            let rx_more = waiting && is_live(rx) && rx.enable_notification().map_err(io::Error::other)?;
            if !tx_more && !rx_more {
                return Ok(());
            }
        }
    }

    fn inbox(&self, pair: usize) -> &Inbox {
        // `pairs` inboxes exist and `pair` comes from the worker's index, below `pairs`.
        &self.shared.inboxes[pair.min(self.shared.inboxes.len() - 1)]
    }

    /// One pass over the pair: a batch of transmitted frames, then whatever waits for the
    /// receive queue. Returns how many frames moved.
    fn pass(
        &self,
        pair: usize,
        state: &mut PairState,
        rx: &VringRwLock,
        tx: &VringRwLock,
        memory: &Memory,
    ) -> io::Result<usize> {
        let format = self.frame_format();
        let mut work = 0;
        if is_live(tx) {
            work += self.transmit(pair, state, tx, memory, &format)?;
        }
        if is_live(rx) {
            work += self.receive(pair, state, rx, memory, &format)?;
        }
        Ok(work)
    }

    /// Takes up to [`TX_BATCH`] frames from the transmit queue and passes them on.
    fn transmit(
        &self,
        pair: usize,
        state: &mut PairState,
        tx: &VringRwLock,
        memory: &Memory,
        format: &FrameFormat,
    ) -> io::Result<usize> {
        let ring_mem = memory.memory();
        let mut vring = tx.get_mut();
        let mut used = UsedBatch::default();
        let copy = self.shared.side.needs_frame_bytes();
        let (mut packets, mut bytes) = (0u64, 0u64);
        while used.len() < TX_BATCH {
            let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(&*ring_mem) else { break };
            used.push(chain.head_index(), 0);
            // Buffers are looked up in a map loaded after the chain was seen (see DESIGN.md).
            let data_mem = memory.memory();
            let buffer = if copy { Some(&mut state.tx_frame) } else { None };
            match rings::read_tx_chain(chain, &*data_mem, format, buffer) {
                Ok(frame) => {
                    if self.pass_on(pair, state, frame.header, format) {
                        packets += 1;
                        bytes += frame.frame_len as u64;
                    }
                }
                Err(refused) => self.shared.stats.dropped(refused.reason, &refused),
            }
        }
        let count = used.len();
        if count == 0 {
            return Ok(0);
        }
        self.shared.stats.transmitted(packets, bytes);
        if used.publish(vring.get_queue_mut(), &*ring_mem).map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(count)
    }

    /// Sends the frame in `state.tx_frame` (header `header`) to the network side; returns
    /// whether it went somewhere (drops are counted).
    fn pass_on(&self, pair: usize, state: &mut PairState, header: NetHeaderRepr, format: &FrameFormat) -> bool {
        let stats = &self.shared.stats;
        match &self.shared.side {
            NetworkSide::Sink => true,
            NetworkSide::Loopback => {
                if state.loopback.len() >= INBOX_CAPACITY {
                    stats.dropped(DropReason::RxNoBuffers, &"the loopback queue is full");
                    return false;
                }
                state.loopback.push_back(Frame { header, data: state.tx_frame.clone() });
                true
            }
            NetworkSide::Tap(tap) => {
                let mut header_bytes = [0u8; net::HEADER_SIZE];
                let header = NetHeaderRepr { num_buffers: 0, ..header };
                let _ = header.emit(&mut header_bytes, format.header_len);
                match tap.write_frame(pair, &header_bytes[..format.header_len], &state.tx_frame) {
                    Ok(()) => true,
                    Err(e) => {
                        stats.dropped(DropReason::TapWrite, &format_args!("tap {}: {e}", tap.name()));
                        false
                    }
                }
            }
            NetworkSide::Switch { hub, port } => {
                let delivery = hub.forward(*port, pair, Frame { header, data: state.tx_frame.clone() });
                if delivery.full > 0 {
                    stats.dropped(DropReason::RxNoBuffers, &"a switch port's inbox is full");
                }
                if delivery.queued == 0 && delivery.full == 0 {
                    stats.dropped(DropReason::NoDestination, &"no other switch port is connected");
                }
                delivery.queued > 0
            }
        }
    }

    /// Fills the receive queue: the held frame, loopback frames, the inbox, then the tap,
    /// until the queue runs out of buffers. Returns how many frames were delivered.
    fn receive(
        &self,
        pair: usize,
        state: &mut PairState,
        rx: &VringRwLock,
        memory: &Memory,
        format: &FrameFormat,
    ) -> io::Result<usize> {
        let ring_mem = memory.memory();
        let mut vring = rx.get_mut();
        let mut used = UsedBatch::default();
        let (mut packets, mut bytes) = (0u64, 0u64);
        let inbox = self.inbox(pair);
        loop {
            let next = state.held.take().or_else(|| state.loopback.pop_front()).or_else(|| inbox.pop());
            let frame = match next {
                Some(frame) => frame,
                None => match self.read_tap(pair, state) {
                    Some(frame) => frame,
                    None => break,
                },
            };
            let mut frame = frame;
            if let Err(refused) = self.prepare_for_guest(&mut frame) {
                self.shared.stats.dropped(refused.reason, &refused);
                continue;
            }
            let data_mem = memory.memory();
            let outcome =
                rings::write_rx_frame(vring.get_queue_mut(), &*data_mem, format, &frame.header, &frame.data, &mut used);
            match outcome {
                RxOutcome::Delivered(_) => {
                    packets += 1;
                    bytes += frame.data.len() as u64;
                }
                RxOutcome::NoBuffers => {
                    state.held = Some(frame);
                    break;
                }
                RxOutcome::Refused(refused) => self.shared.stats.dropped(refused.reason, &refused),
            }
            if used.len() >= TX_BATCH {
                break;
            }
        }
        if packets > 0 {
            self.shared.stats.received(packets, bytes);
        }
        let entries = used.len();
        if used.publish(vring.get_queue_mut(), &*ring_mem).map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(entries)
    }

    /// Reads one frame from the tap queue of `pair`, if this is a tap device and one waits.
    fn read_tap(&self, pair: usize, state: &mut PairState) -> Option<Frame> {
        let NetworkSide::Tap(tap) = &self.shared.side else { return None };
        let header_len = self.frame_format().header_len;
        loop {
            let n = match tap.read_frame(pair, &mut state.tap_buffer) {
                Ok(Some(n)) => n,
                Ok(None) => return None,
                Err(e) => {
                    warn!("vhost-user-net: reading tap {}: {e}", tap.name());
                    return None;
                }
            };
            let bytes = state.tap_buffer.get(..n)?;
            match NetHeaderRepr::parse_bytes(bytes, header_len) {
                Ok(header) => return Some(Frame { header, data: bytes[header_len.min(n)..].to_vec() }),
                Err(e) => self.shared.stats.dropped(DropReason::BadHeader, &format_args!("from tap: {e}")),
            }
        }
    }

    /// Makes a frame acceptable to this guest: completes a partial checksum it cannot take,
    /// refuses segmentation it did not negotiate.
    pub(crate) fn prepare_for_guest(&self, frame: &mut Frame) -> Result<(), Refused> {
        let acked = self.acked();
        let gso_ok = match frame.header.gso_type {
            GsoType::None => true,
            GsoType::TcpV4 { ecn } => acked.has(netf::GUEST_TSO4) && (!ecn || acked.has(netf::GUEST_ECN)),
            GsoType::TcpV6 { ecn } => acked.has(netf::GUEST_TSO6) && (!ecn || acked.has(netf::GUEST_ECN)),
            GsoType::Udp | GsoType::UdpL4 => false,
        };
        if !gso_ok {
            return Err(Refused {
                reason: DropReason::OffloadRefused,
                detail: format!("the guest did not negotiate GSO type {:?}", frame.header.gso_type),
            });
        }
        if !acked.has(netf::GUEST_CSUM) {
            complete_checksum(&mut frame.header, &mut frame.data)
                .map_err(|e| Refused { reason: DropReason::BadHeader, detail: e.to_string() })?;
            frame.header.flags &= !hdr_flags::DATA_VALID;
        }
        Ok(())
    }

    fn handle(&self, device_event: u16, vrings: &[VringRwLock], thread: usize) -> io::Result<()> {
        let Some(event) = self.classify(device_event) else {
            return Err(io::Error::other(format!("unknown event {device_event}")));
        };
        if event == Event::Inbox {
            self.inbox(thread).consume_signal();
        }
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::other(format!("worker {thread} has {} queues, not 2", vrings.len())));
        };
        let Some(memory) = self.shared.memory.read().ok().and_then(|m| m.clone()) else {
            return Ok(());
        };
        if self.is_stopped() {
            return Ok(());
        }
        self.serve_pair(thread, rx, tx, &memory)
    }
}

/// Whether a queue may be touched: set up and enabled by the frontend.
fn is_live(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.options.pairs.max(1)) * 2
    }

    fn max_queue_size(&self) -> usize {
        self.shared.options.queue_size.into()
    }

    fn features(&self) -> u64 {
        self.device_features().0
    }

    fn acked_features(&self, features: u64) {
        self.shared.acked.store(features, Ordering::Relaxed);
        if let NetworkSide::Tap(tap) = &self.shared.side {
            let acked = Features(features);
            let result = tap.set_header_len(self.frame_format().header_len).and_then(|()| tap.set_offloads(acked));
            if let Err(e) = result {
                warn!("vhost-user-net: {e}");
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        crate::server::protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // virtio-queue applies RING_EVENT_IDX to each vring; `UsedBatch::publish` follows it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::server::config_slice(&self.config_bytes(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The configuration space is read-only; an error here would end the connection.
        warn!("vhost-user-net: ignored a {}-byte configuration write at offset {offset}", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.shared.memory.write().map_err(|_| io::Error::other("memory lock poisoned"))? = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.options.pairs.max(1)).map(|pair| 0b11u64 << (2 * pair)).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.shared.exits.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        // An error returned from here would end this worker's event loop for good: log it
        // and keep serving instead.
        if let Err(e) = self.handle(device_event, vrings, thread) {
            warn!("vhost-user-net: queue pair {thread}, event {device_event}: {e}");
        }
        Ok(())
    }
}

impl crate::server::ServedDevice for NetDevice {
    const RELAY_CONTROL: bool = true;

    fn stop_workers(&self) {
        NetDevice::stop_workers(self);
    }

    fn attach(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>) -> io::Result<()> {
        for (pair, handler) in handlers.iter().enumerate() {
            let inbox = self.inbox(pair);
            handler.register_listener(inbox.ready_fd(), EventSet::IN, self.inbox_event())?;
            if let NetworkSide::Tap(tap) = &self.shared.side
                && let Some(fd) = tap.fd(pair)
            {
                // Edge-triggered: the worker reads the tap until it is empty or the guest has
                // no buffers (then the frame is held and the guest's refill kick resumes it).
                handler.register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, self.tap_event())?;
            }
        }
        Ok(())
    }
}
