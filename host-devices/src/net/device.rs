//! The virtio-net device behind the vhost-user protocol: features, configuration space, and
//! the service of each queue pair. Every queue pair has its own worker thread, which serves
//! both of its queues (receive `2i`, transmit `2i + 1`) and its part of the network side (tap
//! queue `i`, or inbox `i`); pairs share no lock on the data path.

use super::frame::complete_checksum;
use super::pass::{PairPass, PairState, rx_queue, tx_queue};
use super::rings::{self, FrameFormat, Refused};
use super::side::{Frame, Inbox, NetworkSide};
use super::stats::{DropReason, NetStats};
use crate::lock;
use crate::queue::throttle::Throttles;
use crate::queue::{DeviceCore, Gates, NoServices, QueueServices, WorkerQueue};
use log::warn;
use pvkit_protocol::net::{self, ConfigRepr, GsoType, feature as netf, hdr_flags};
use pvkit_protocol::virtio::{Features, feature as vf};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use vmm_sys_util::epoll::EventSet;

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

pub(super) struct Shared {
    pub(super) core: DeviceCore,
    pub(super) options: NetOptions,
    pub(super) side: NetworkSide,
    pub(super) stats: Arc<NetStats>,
    pub(super) acked: AtomicU64,
    pub(super) inboxes: Arc<Vec<Inbox>>,
    pub(super) pairs: Vec<Mutex<PairState>>,
    pub(super) throttles: Throttles,
}

/// The net device of one frontend connection; cheap to clone (all state is shared).
#[derive(Clone)]
pub struct NetDevice {
    pub(super) shared: Arc<Shared>,
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
        let tap = matches!(side, NetworkSide::Tap(_));
        let pair_states = (0..pairs).map(|_| Mutex::new(PairState::new(tap))).collect();
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

    pub(super) fn inbox(&self, pair: usize) -> &Inbox {
        // `pairs` inboxes exist and `pair` comes from the worker's index, below `pairs`.
        &self.shared.inboxes[pair.min(self.shared.inboxes.len() - 1)]
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
