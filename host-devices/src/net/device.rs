//! The virtio-net device behind the vhost-user protocol: features, configuration space, and
//! the service of each queue pair. Every queue pair has its own worker thread, which serves
//! both of its queues (receive `2i`, transmit `2i + 1`) and its part of the network side (tap
//! queue `i`, or inbox `i`); pairs share no lock on the data path.

use super::frame::complete_checksum;
use super::rings::{self, FrameFormat, Refused, RxOutcome};
use super::side::{Frame, INBOX_CAPACITY, Inbox, NetworkSide};
use super::stats::{DropReason, NetStats};
use crate::lock;
use crate::queue::services::{Admission, Verdict, Work, admit, complete, is_served, verdict_of};
use crate::queue::throttle::Throttles;
use crate::queue::worker::PassContext;
use crate::queue::{
    ChainBuffers, DeviceCore, Gates, Memory, NoServices, PassError, QueueService, QueueServices, Rearm, UsedBatch,
    WorkerQueue, ring,
};
use log::warn;
use pvkit_protocol::net::{self, ConfigRepr, GsoType, NetHeaderRepr, feature as netf, hdr_flags};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

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

/// One queue pair's worker state (locked by its worker only: the stop protocol is the core's
/// gates).
struct PairState {
    /// The transmit chain being read (kept to reuse its vectors).
    tx_buffers: ChainBuffers,
    /// A transmitted frame, copied out of the guest.
    tx_frame: Vec<u8>,
    /// A frame read from the tap.
    tap_buffer: Vec<u8>,
    /// Loopback frames on their way back.
    loopback: VecDeque<Frame>,
    /// A frame that found the receive queue without buffers, first in line.
    held: Option<Held>,
}

/// A frame waiting for receive buffers, prepared and admitted already.
struct Held {
    frame: Frame,
    admission: Option<Admission>,
    /// The driver's available index when the frame found too few buffers: only buffers added
    /// after it can take the frame.
    blocked_at: Option<u16>,
}

struct Shared {
    core: DeviceCore,
    options: NetOptions,
    side: NetworkSide,
    stats: Arc<NetStats>,
    acked: AtomicU64,
    inboxes: Arc<Vec<Inbox>>,
    pairs: Vec<Mutex<PairState>>,
    throttles: Throttles,
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
    /// A queue's rate-limit timer: its tokens are back.
    Timer(usize),
}

impl NetDevice {
    /// A device for one frontend connection, sending to and receiving from `side`; `gates`
    /// has one gate per queue pair, shared by every connection.
    pub fn new(
        options: NetOptions,
        side: NetworkSide,
        stats: Arc<NetStats>,
        gates: Arc<Gates>,
    ) -> io::Result<NetDevice> {
        NetDevice::with_services(options, side, stats, gates, Arc::new(NoServices))
    }

    /// As [`NetDevice::new`], with `services` attached to every queue.
    pub fn with_services(
        options: NetOptions,
        side: NetworkSide,
        stats: Arc<NetStats>,
        gates: Arc<Gates>,
        services: Arc<dyn QueueServices>,
    ) -> io::Result<NetDevice> {
        let pairs = options.pairs.max(1);
        let core = DeviceCore::new("vhost-user-net", usize::from(pairs) * 2, pairs.into(), gates, options.poll_us)?
            .with_services(services);
        let inboxes = Arc::new((0..pairs).map(|_| Inbox::new()).collect::<io::Result<Vec<_>>>()?);
        if let NetworkSide::Switch { hub, port } = &side {
            hub.connect(*port, inboxes.clone());
        }
        let pair_states = (0..pairs)
            .map(|_| {
                Mutex::new(PairState {
                    tx_buffers: ChainBuffers::default(),
                    tx_frame: Vec::with_capacity(2048),
                    tap_buffer: if matches!(side, NetworkSide::Tap(_)) { vec![0; TAP_BUFFER] } else { Vec::new() },
                    loopback: VecDeque::new(),
                    held: None,
                })
            })
            .collect();
        let queues = usize::from(pairs) * 2;
        // Each queue's timer event comes after the inbox's and the tap's.
        let throttles = Throttles::new(queues, queues as u64 + 3)?;
        let acked = AtomicU64::new(0);
        let shared = Shared { core, options, side, stats, acked, inboxes, pairs: pair_states, throttles };
        Ok(NetDevice { shared: Arc::new(shared) })
    }

    /// The virtio features offered, which depend on the network side (see the README).
    pub fn device_features(&self) -> Features {
        let mut f = Features::from_bits(&[
            vf::VERSION_1,
            vf::RING_EVENT_IDX,
            vf::RING_INDIRECT_DESC,
            vf::VHOST_USER_PROTOCOL_FEATURES,
            vf::VHOST_LOG_ALL,
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

    /// Leaves the switch; the core stops the workers.
    fn leave_switch(&self) {
        if let NetworkSide::Switch { hub, port } = &self.shared.side {
            hub.disconnect(*port);
        }
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
            id => self.shared.throttles.queue_of(id).map(Event::Timer),
        }
    }

    fn inbox(&self, pair: usize) -> &Inbox {
        // `pairs` inboxes exist and `pair` comes from the worker's index, below `pairs`.
        &self.shared.inboxes[pair.min(self.shared.inboxes.len() - 1)]
    }

    /// Takes up to [`TX_BATCH`] frames from the transmit queue and passes them on.
    fn transmit(
        &self,
        pair: usize,
        state: &mut PairState,
        tx: &VringRwLock,
        memory: &Memory,
        format: &FrameFormat,
    ) -> Result<usize, PassError> {
        let ring_mem = memory.memory();
        let mut vring = tx.get_mut();
        let mut used = UsedBatch::default();
        let copy = self.shared.side.needs_frame_bytes();
        let services = self.shared.core.services();
        let limited = services.throttles();
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut popper = ring::Popper::new(tx_queue(pair));
        let throttles = &self.shared.throttles;
        while used.len() < TX_BATCH && !throttles.is_waiting(tx_queue(pair)) {
            let Some(chain) = popper.next(vring.get_queue_mut(), &*ring_mem) else { break };
            used.push(chain.head_index(), 0);
            // Buffers are looked up in a map loaded after the chain was seen (see DESIGN.md).
            let data_mem = memory.memory();
            let PairState { tx_buffers, tx_frame, .. } = state;
            let buffer = if copy { Some(tx_frame) } else { None };
            match rings::read_tx_chain(chain, &*data_mem, format, tx_buffers, buffer) {
                Ok(frame) => {
                    let work = Work::new(tx_queue(pair), "tx", frame.frame_len as u64);
                    if let Some(wait) = self.over_limit(limited, &work) {
                        // Back to the ring: sent when the tokens are back.
                        used.pop_last();
                        virtio_queue::QueueOwnedT::go_to_previous_position(vring.get_queue_mut());
                        throttles.wait(tx_queue(pair), wait)?;
                        break;
                    }
                    let admission = admit(services, work);
                    let sent = is_served(&admission) && self.pass_on(pair, state, frame.header, format);
                    if sent {
                        packets += 1;
                        bytes += frame.frame_len as u64;
                    } else if !is_served(&admission) {
                        self.shared.stats.dropped(DropReason::FailedByService, &"a service failed the frame");
                    }
                    complete(services, admission, sent);
                }
                Err(refused) => self.shared.stats.dropped(refused.reason, &refused),
            }
        }
        let count = used.len();
        if count > 0 {
            self.shared.stats.transmitted(packets, bytes);
            used.publish_and_release(vring, tx, tx_queue(pair), &*ring_mem, services)?;
        }
        popper.finish(count)
    }

    /// How long `work` must wait for the rate limits (`None`: it may go, its tokens taken);
    /// `limited` is whether any limit is set (asked once per pass, not per frame).
    fn over_limit(&self, limited: bool, work: &Work) -> Option<std::time::Duration> {
        if !limited {
            return None;
        }
        let services = self.shared.core.services();
        services.throttle(std::slice::from_ref(work), std::time::Instant::now()).map(|(_, wait)| wait)
    }

    /// Whether a frame received for pair `pair` must wait for the rate limits (its queue's
    /// timer is then set).
    fn over_limit_rx(&self, limited: bool, pair: usize, frame: &Frame) -> io::Result<bool> {
        let work = Work::new(rx_queue(pair), "rx", frame.data.len() as u64);
        match self.over_limit(limited, &work) {
            Some(wait) => self.shared.throttles.wait(rx_queue(pair), wait).map(|()| true),
            None => Ok(false),
        }
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
    ) -> Result<usize, PassError> {
        let ring_mem = memory.memory();
        let mut vring = rx.get_mut();
        let mut used = UsedBatch::default();
        let (mut packets, mut bytes) = (0u64, 0u64);
        let inbox = self.inbox(pair);
        let services = self.shared.core.services();
        let limited = services.throttles();
        let mut popper = ring::Popper::new(rx_queue(pair));
        loop {
            if self.shared.throttles.is_waiting(rx_queue(pair)) {
                break;
            }
            // A held frame was prepared and admitted before it waited for buffers or tokens.
            let (frame, admission) = match state.held.take() {
                Some(Held { frame, admission, blocked_at: None }) if self.over_limit_rx(limited, pair, &frame)? => {
                    state.held = Some(Held { frame, admission, blocked_at: None });
                    break;
                }
                Some(Held { frame, admission, .. }) => (frame, admission),
                None => {
                    let next = state.loopback.pop_front().or_else(|| inbox.pop());
                    let Some(mut frame) = next.or_else(|| self.read_tap(pair, state)) else { break };
                    if let Err(refused) = self.prepare_for_guest(&mut frame) {
                        self.shared.stats.dropped(refused.reason, &refused);
                        continue;
                    }
                    let admission = admit(services, Work::new(rx_queue(pair), "rx", frame.data.len() as u64));
                    if !is_served(&admission) {
                        self.shared.stats.dropped(DropReason::FailedByService, &"a service failed the frame");
                        complete(services, admission, false);
                        continue;
                    }
                    if let Verdict::Corrupt(pick) = verdict_of(&admission) {
                        corrupt(&mut frame.data, pick);
                    }
                    if self.over_limit_rx(limited, pair, &frame)? {
                        // Waits here, admitted, until the tokens are back.
                        state.held = Some(Held { frame, admission, blocked_at: None });
                        break;
                    }
                    (frame, admission)
                }
            };
            let data_mem = memory.memory();
            let queue = vring.get_queue_mut();
            let frame_parts = (&frame.header, &frame.data[..]);
            match rings::write_rx_frame((queue, &mut popper), &*data_mem, format, frame_parts, &mut used, services) {
                RxOutcome::Delivered(_) => {
                    packets += 1;
                    bytes += frame.data.len() as u64;
                    // A duplicate goes right after the original when buffers are there for it.
                    let duplicate = verdict_of(&admission) == Verdict::Duplicate;
                    complete(services, admission, true);
                    if duplicate
                        && let RxOutcome::Delivered(_) = rings::write_rx_frame(
                            (queue, &mut popper),
                            &*data_mem,
                            format,
                            frame_parts,
                            &mut used,
                            services,
                        )
                    {
                        packets += 1;
                        bytes += frame.data.len() as u64;
                    }
                }
                RxOutcome::NoBuffers => {
                    let avail = virtio_queue::QueueT::avail_idx(vring.get_queue(), &*ring_mem, Ordering::Acquire);
                    state.held = Some(Held { frame, admission, blocked_at: avail.ok().map(|a| a.0) });
                    break;
                }
                RxOutcome::Refused(refused) => {
                    self.shared.stats.dropped(refused.reason, &refused);
                    complete(services, admission, false);
                }
            }
            if used.len() >= TX_BATCH {
                break;
            }
        }
        if packets > 0 {
            self.shared.stats.received(packets, bytes);
        }
        let entries = used.len();
        used.publish_and_release(vring, rx, rx_queue(pair), &*ring_mem, services)?;
        popper.finish(entries)
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
        if let Event::Timer(queue) = event {
            self.shared.throttles.fired(queue);
        }
        if event == Event::Queue {
            // The pair's receive queue is its worker's event 0, its transmit queue event 1.
            let queue = if device_event == 0 { rx_queue(thread) } else { tx_queue(thread) };
            self.shared.core.services().kicked(queue);
        }
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::other(format!("worker {thread} has {} queues, not 2", vrings.len())));
        };
        let Some(state) = self.shared.pairs.get(thread) else { return Ok(()) };
        let mut state = lock(state);
        let queues =
            [WorkerQueue { index: rx_queue(thread), vring: rx }, WorkerQueue { index: tx_queue(thread), vring: tx }];
        let mut pass = PairPass { device: self, pair: thread, state: &mut state, rx, tx };
        self.shared.core.serve(thread, &queues, &mut pass)
    }
}

/// Inverts the byte of `frame` after its Ethernet header that `pick` chooses (fault
/// injection's `corrupt`); a frame with nothing after its header is left alone.
fn corrupt(frame: &mut [u8], pick: u64) {
    const ETHERNET_HEADER: usize = 14;
    let payload = frame.len().saturating_sub(ETHERNET_HEADER);
    if payload > 0 {
        let at = ETHERNET_HEADER + (pick % payload as u64) as usize;
        if let Some(byte) = frame.get_mut(at) {
            *byte = !*byte;
        }
    }
}

/// One queue pair's pass: a batch of transmitted frames, then whatever waits for the receive
/// queue.
struct PairPass<'a> {
    device: &'a NetDevice,
    pair: usize,
    state: &'a mut PairState,
    rx: &'a VringRwLock,
    tx: &'a VringRwLock,
}

impl QueueService for PairPass<'_> {
    fn pass(&mut self, ctx: &PassContext<'_>) -> Result<usize, PassError> {
        let format = self.device.frame_format();
        let (rx, tx) = (rx_queue(self.pair), tx_queue(self.pair));
        let mut work = 0;
        if ctx.serviceable(tx, self.tx) {
            work += self.device.transmit(self.pair, self.state, self.tx, ctx.memory, &format)?;
        }
        if ctx.serviceable(rx, self.rx) {
            work += self.device.receive(self.pair, self.state, self.rx, ctx.memory, &format)?;
        }
        Ok(work)
    }

    /// The receive queue's kicks are wanted only while frames wait for its buffers, and
    /// while the first of them waits for more buffers than the ring holds, only new ones count.
    fn rearm(&self, queue: usize) -> Rearm {
        // Waiting for its limits, a queue takes no kicks: its timer wakes it.
        if self.device.shared.throttles.is_waiting(queue) {
            return Rearm::Parked;
        }
        if queue == tx_queue(self.pair) {
            return Rearm::Work;
        }
        if let Some(Held { blocked_at: Some(seen), .. }) = self.state.held {
            return Rearm::Blocked { seen };
        }
        let waiting =
            self.state.held.is_some() || !self.state.loopback.is_empty() || !self.device.inbox(self.pair).is_empty();
        if waiting { Rearm::Work } else { Rearm::Parked }
    }
}

/// The device's index of pair `pair`'s receive queue.
fn rx_queue(pair: usize) -> usize {
    usize::from(net::rx_queue_index(pair as u16))
}

/// The device's index of pair `pair`'s transmit queue.
fn tx_queue(pair: usize) -> usize {
    usize::from(net::tx_queue_index(pair as u16))
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

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::server::config_slice(&self.config_bytes(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The configuration space is read-only; an error here would end the connection.
        warn!("vhost-user-net: ignored a {}-byte configuration write at offset {offset}", buf.len());
        Ok(())
    }

    crate::served_by_core!(shared.core);

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.options.pairs.max(1)).map(|pair| 0b11u64 << (2 * pair)).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        self.shared.core.log_errors(device_event, || self.handle(device_event, vrings, thread))
    }
}

impl crate::server::ServedDevice for NetDevice {
    fn core(&self) -> &DeviceCore {
        &self.shared.core
    }

    fn stop_workers(&self) {
        self.shared.core.stop();
        self.leave_switch();
    }

    fn attach(&self, handlers: Vec<Arc<VringEpollHandler<Self>>>) -> io::Result<()> {
        for (pair, handler) in handlers.iter().enumerate() {
            for queue in [rx_queue(pair), tx_queue(pair)] {
                if let Some((fd, event)) = self.shared.throttles.timer(queue) {
                    handler.register_listener(fd, EventSet::IN, event)?;
                }
            }
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
