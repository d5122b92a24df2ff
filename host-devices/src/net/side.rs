//! The network side of a `vhost-user-net` device: where transmitted frames go and received
//! frames come from. Exactly one per process: a tap, a port of the in-process switch, a sink
//! (count and drop) or a loopback (each frame back to the guest that sent it).
//!
//! Frames bound for a guest from inside the process (loopback, switch) wait in that guest's
//! [`Inbox`], one per queue pair, until its receive queue has buffers for them.

use super::switch::{Forward, ForwardingTable};
use super::tap::Tap;
use crate::lock;
use pvkit_protocol::net::NetHeaderRepr;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Frames an inbox holds before it drops new ones.
pub const INBOX_CAPACITY: usize = 1024;
/// Addresses the switch learns at most.
pub const SWITCH_TABLE_CAPACITY: usize = 4096;

/// A frame in flight inside the process.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Its virtio-net header (offloads still to be resolved for the receiver).
    pub header: NetHeaderRepr,
    /// The Ethernet frame.
    pub data: Vec<u8>,
}

/// One queue pair's looped-back frames on their way to its receive queue, with the buffers of
/// frames already delivered kept for the next ones (a loop at millions of frames a second
/// otherwise allocates and frees one buffer per frame).
#[derive(Debug, Default)]
pub struct Loopback {
    frames: VecDeque<Frame>,
    spare: Vec<Vec<u8>>,
}

impl Loopback {
    /// Queues a copy of `data` with `header`; returns false (nothing queued) when
    /// [`INBOX_CAPACITY`] frames wait already.
    pub fn push(&mut self, header: NetHeaderRepr, data: &[u8]) -> bool {
        if self.frames.len() >= INBOX_CAPACITY {
            return false;
        }
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(data);
        self.frames.push_back(Frame { header, data: buffer });
        true
    }

    /// Takes the oldest frame.
    pub fn pop(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }

    /// Whether frames are waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Keeps a delivered frame's buffer for a later frame (as many as can wait at once).
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < INBOX_CAPACITY {
            self.spare.push(buffer);
        }
    }
}

/// Frames waiting for one receive queue, with an eventfd that becomes readable when the inbox
/// goes from empty to non-empty.
#[derive(Debug)]
pub struct Inbox {
    frames: Mutex<VecDeque<Frame>>,
    ready: EventFd,
}

impl Inbox {
    /// An empty inbox.
    pub fn new() -> std::io::Result<Inbox> {
        Ok(Inbox { frames: Mutex::new(VecDeque::new()), ready: EventFd::new(EFD_NONBLOCK)? })
    }

    /// Queues a frame; gives it back when the inbox is full.
    pub fn push(&self, frame: Frame) -> Result<(), Frame> {
        let was_empty = {
            let mut frames = lock(&self.frames);
            if frames.len() >= INBOX_CAPACITY {
                return Err(frame);
            }
            frames.push_back(frame);
            frames.len() == 1
        };
        if was_empty {
            let _ = self.ready.write(1);
        }
        Ok(())
    }

    /// Takes the oldest frame.
    pub fn pop(&self) -> Option<Frame> {
        lock(&self.frames).pop_front()
    }

    /// Puts a frame back at the front (its receive queue had no room yet).
    pub fn unpop(&self, frame: Frame) {
        lock(&self.frames).push_front(frame);
    }

    /// Whether frames are waiting.
    pub fn is_empty(&self) -> bool {
        lock(&self.frames).is_empty()
    }

    /// Clears the readiness signal (before draining).
    pub fn consume_signal(&self) {
        let _ = self.ready.read();
    }

    /// The eventfd to watch.
    pub fn ready_fd(&self) -> std::os::unix::io::RawFd {
        std::os::unix::io::AsRawFd::as_raw_fd(&self.ready)
    }
}

/// The in-process learning switch: its forwarding table and the inboxes of the connected
/// ports (one slot per `--socket-path`).
pub struct SwitchHub {
    table: Mutex<ForwardingTable>,
    ports: Vec<Mutex<Option<Arc<Vec<Inbox>>>>>,
}

/// Where a switch frame ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// Ports whose inbox took it.
    pub queued: usize,
    /// Ports whose inbox was full.
    pub full: usize,
}

impl SwitchHub {
    /// A switch with `ports` ports, none connected.
    pub fn new(ports: usize) -> SwitchHub {
        SwitchHub {
            table: Mutex::new(ForwardingTable::new(SWITCH_TABLE_CAPACITY)),
            ports: (0..ports).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// Connects `port`'s inboxes (its frontend arrived).
    pub fn connect(&self, port: usize, inboxes: Arc<Vec<Inbox>>) {
        if let Some(slot) = self.ports.get(port) {
            *lock(slot) = Some(inboxes);
        }
    }

    /// Disconnects `port` and forgets what it taught the table.
    pub fn disconnect(&self, port: usize) {
        if let Some(slot) = self.ports.get(port) {
            *lock(slot) = None;
        }
        lock(&self.table).forget_port(port);
    }

    /// Forwards a frame that `port` sent on queue pair `pair`: learns its source, then queues
    /// it for the destination port or, for group and unknown destinations, every other port.
    pub fn forward(&self, port: usize, pair: usize, frame: Frame) -> Delivery {
        let decision = lock(&self.table).forward(port, &frame.data, Instant::now());
        let targets: Vec<usize> = match decision {
            Forward::Drop => Vec::new(),
            Forward::Port(out) => vec![out],
            Forward::Flood => (0..self.ports.len()).filter(|p| *p != port).collect(),
        };
        let mut delivery = Delivery::default();
        let last = targets.len().saturating_sub(1);
        let mut frame = Some(frame);
        for (i, target) in targets.into_iter().enumerate() {
            let inboxes = self.ports.get(target).and_then(|slot| lock(slot).clone());
            let Some(inboxes) = inboxes else { continue };
            let Some(inbox) = inboxes.get(pair % inboxes.len().max(1)) else { continue };
            let copy = if i == last { frame.take() } else { frame.clone() };
            let Some(copy) = copy else { break };
            match inbox.push(copy) {
                Ok(()) => delivery.queued += 1,
                Err(_) => delivery.full += 1,
            }
        }
        delivery
    }
}

/// What a device's transmitted frames go to.
#[derive(Clone)]
pub enum NetworkSide {
    /// A tap, one queue per queue pair.
    Tap(Arc<Tap>),
    /// A port of the in-process switch.
    Switch {
        /// The switch.
        hub: Arc<SwitchHub>,
        /// This device's port.
        port: usize,
    },
    /// Count and drop.
    Sink,
    /// Back to the same guest's receive queue of the same pair.
    Loopback,
}

impl NetworkSide {
    /// A name for logs.
    pub fn describe(&self) -> String {
        match self {
            NetworkSide::Tap(tap) => format!("tap {}", tap.name()),
            NetworkSide::Switch { port, hub } => format!("switch port {port} of {}", hub.port_count()),
            NetworkSide::Sink => "sink".into(),
            NetworkSide::Loopback => "loopback".into(),
        }
    }

    /// Whether frames must be copied out of the guest (everything but the sink).
    pub fn needs_frame_bytes(&self) -> bool {
        !matches!(self, NetworkSide::Sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Frame {
        let mut data = vec![0u8; 60];
        data[..6].copy_from_slice(&dst);
        data[6..12].copy_from_slice(&src);
        Frame { header: NetHeaderRepr::default(), data }
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const BROADCAST: [u8; 6] = [0xff; 6];

    fn connected(hub: &SwitchHub, port: usize) -> Arc<Vec<Inbox>> {
        let inboxes = Arc::new(vec![Inbox::new().unwrap()]);
        hub.connect(port, inboxes.clone());
        inboxes
    }

    #[test]
    fn switch_floods_unknown_then_forwards_learned() {
        let hub = SwitchHub::new(3);
        let ports: Vec<_> = (0..3).map(|p| connected(&hub, p)).collect();
        // A is unknown to everybody: B's broadcast from port 1 floods to 0 and 2.
        assert_eq!(hub.forward(1, 0, frame(BROADCAST, B)).queued, 2);
        assert!(ports[1][0].is_empty());
        assert_eq!(ports[0][0].pop().unwrap().data[6..12], B);
        assert!(ports[2][0].pop().is_some());
        // A answers B from port 0: only port 1 gets it.
        assert_eq!(hub.forward(0, 0, frame(B, A)).queued, 1);
        assert!(ports[1][0].pop().is_some());
        assert!(ports[2][0].is_empty());
        // Port 1 disconnects; frames for B are flooded again, and nobody holds port 1's slot.
        hub.disconnect(1);
        assert_eq!(hub.forward(0, 0, frame(B, A)).queued, 1);
        assert!(ports[2][0].pop().is_some());
    }

    #[test]
    fn full_inbox_refuses_and_signals_once() {
        let inbox = Inbox::new().unwrap();
        for _ in 0..INBOX_CAPACITY {
            inbox.push(frame(A, B)).unwrap();
        }
        assert!(inbox.push(frame(A, B)).is_err());
        // One signal for the empty -> non-empty transition.
        assert_eq!(inbox.ready.read().unwrap(), 1);
        inbox.consume_signal();
        assert!(inbox.pop().is_some());
    }
}
