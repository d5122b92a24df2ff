//! A queue pair's pass: its transmit queue (frames to the network side, through the rate
//! limits and fault rules, delayed frames when their time comes) and its receive queue (the held
//! frame, delayed frames, loopback, the inbox, the tap, into the guest's buffers).

use super::delay::DelayLine;
use super::device::NetDevice;
use super::rings::{self, FrameFormat, RxOutcome};
use super::side::{Frame, Inbox, Loopback, NetworkSide};
use super::stats::DropReason;
use crate::queue::services::{Admission, Verdict, Work, admit, complete, is_served, verdict_of};
use crate::queue::split_ring::SplitRing;
use crate::queue::worker::PassContext;
use crate::queue::{ChainBuffers, Memory, PassError, QueueService, Rearm, UsedBatch, ring};
use log::warn;
use pvkit_protocol::net::{self, NetHeaderRepr};
use std::io;
use std::time::Instant;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::GuestAddressSpace;

/// Most transmit chains taken in one pass before the receive side gets its turn.
const TX_BATCH: usize = 256;
/// Largest frame read from a tap: header plus the largest GSO frame.
const TAP_BUFFER: usize = net::HEADER_SIZE + net::MAX_GSO_FRAME;

/// One queue pair's worker state (locked by its worker only: the stop protocol is the core's
/// gates).
pub(super) struct PairState {
    /// The transmit chain being read (kept to reuse its vectors).
    tx_buffers: ChainBuffers,
    /// A transmitted frame, copied out of the guest.
    tx_frame: Vec<u8>,
    /// The heads of a transmit burst (kept to reuse the vector).
    tx_heads: Vec<u16>,
    /// The receive chains one frame takes (kept to reuse their vectors).
    rx_chains: Vec<ChainBuffers>,
    /// A frame read from the tap.
    tap_buffer: Vec<u8>,
    /// Loopback frames on their way back.
    loopback: Loopback,
    /// A frame that found the receive queue without buffers, first in line.
    held: Option<Held>,
    /// Transmitted frames fault rules delay or reorder, with their lengths.
    tx_delayed: DelayLine<(Frame, u64)>,
    /// Frames for the guest that fault rules delay or reorder, admitted already.
    rx_delayed: DelayLine<(Frame, Option<Admission>)>,
}

impl PairState {
    /// Nothing sent or held yet; `tap`: a tap device, which reads frames into a buffer.
    pub(super) fn new(tap: bool) -> PairState {
        PairState {
            tx_buffers: ChainBuffers::default(),
            tx_frame: Vec::with_capacity(2048),
            tx_heads: Vec::with_capacity(TX_BATCH),
            rx_chains: Vec::new(),
            tap_buffer: if tap { vec![0; TAP_BUFFER] } else { Vec::new() },
            loopback: Loopback::default(),
            held: None,
            tx_delayed: DelayLine::default(),
            rx_delayed: DelayLine::default(),
        }
    }
}

impl PairState {
    /// Whether frames wait for the receive queue: the held one, looped-back ones, the inbox's
    /// (delayed frames and the tap wake the pair by their own events).
    fn frames_waiting(&self, inbox: &Inbox) -> bool {
        self.held.is_some() || !self.loopback.is_empty() || !inbox.is_empty()
    }
}

/// Frames and bytes that went one way in a pass.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    packets: u64,
    bytes: u64,
}

impl Traffic {
    fn count(&mut self, bytes: u64) {
        self.packets += 1;
        self.bytes += bytes;
    }
}

/// A frame waiting for receive buffers, prepared and admitted already.
struct Held {
    frame: Frame,
    admission: Option<Admission>,
    /// The driver's available index when the frame found too few buffers: only buffers added
    /// after it can take the frame.
    blocked_at: Option<u16>,
}

impl NetDevice {
    /// Takes up to [`TX_BATCH`] frames from the transmit queue and passes them on, after the
    /// delayed frames whose time has come.
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
        let mut sent = Traffic::default();
        let released = self.release_delayed_tx(pair, state, format, &mut sent);
        let mut popper = ring::Popper::new(tx_queue(pair));
        let throttles = &self.shared.throttles;
        let mut heads = std::mem::take(&mut state.tx_heads);
        heads.clear();
        if !throttles.is_waiting(tx_queue(pair)) {
            popper.take_heads(vring.get_queue_mut(), &ring_mem, &mut heads, TX_BATCH);
        }
        // Buffers are looked up in a map loaded after the chains were seen (see DESIGN.md).
        let data_mem = memory.memory();
        let ring = SplitRing::new(vring.get_queue(), &data_mem);
        for (taken, &head) in heads.iter().enumerate() {
            let Some(ring) = &ring else { break };
            used.push(head, 0);
            let PairState { tx_buffers, tx_frame, .. } = state;
            let buffer = if copy { Some(tx_frame) } else { None };
            let walked = ring.walk(head, rings::tx_cap(format), tx_buffers);
            match rings::read_tx_buffers(walked, &*data_mem, format, tx_buffers, buffer) {
                Ok(frame) => {
                    let work = Work::new(tx_queue(pair), "tx", frame.frame_len as u64);
                    if let Some(wait) = self.over_limit(limited, &work) {
                        // This chain and the rest of the burst go back to the ring: sent when
                        // the tokens are back.
                        used.pop_last();
                        popper.put_back(vring.get_queue_mut(), (heads.len() - taken) as u16);
                        throttles.wait(tx_queue(pair), wait)?;
                        break;
                    }
                    let admission = admit(services, work);
                    let went = if is_served(&admission) {
                        let frame = (frame.header, frame.frame_len as u64);
                        self.send(pair, state, frame, verdict_of(&admission), format, &mut sent)
                    } else {
                        self.shared.stats.dropped(DropReason::FailedByService, &"a service failed the frame");
                        false
                    };
                    complete(services, admission, went);
                    self.release_delayed_tx(pair, state, format, &mut sent);
                }
                Err(refused) => self.shared.stats.dropped(refused.reason, &refused),
            }
        }
        state.tx_heads = heads;
        let count = used.len();
        if sent.packets > 0 {
            self.shared.stats.transmitted(sent.packets, sent.bytes);
        }
        if count > 0 {
            used.publish_and_release(vring, tx, tx_queue(pair), &*ring_mem, services)?;
        }
        popper.finish(count).map(|taken| taken + released)
    }

    /// Passes on the frame in `state.tx_frame` (`header`, `len` bytes) as `verdict` says: now
    /// (twice for `Duplicate`, a byte inverted for `Corrupt`) or into the transmit delay line.
    /// Returns whether it went or waits there.
    fn send(
        &self,
        pair: usize,
        state: &mut PairState,
        (header, len): (NetHeaderRepr, u64),
        verdict: Verdict,
        format: &FrameFormat,
        sent: &mut Traffic,
    ) -> bool {
        let held = match verdict {
            Verdict::Delay(delay) => Some(Instant::now() + delay),
            Verdict::Reorder => None,
            Verdict::Corrupt(pick) => {
                corrupt(&mut state.tx_frame, pick);
                return self.send_now(pair, state, header, len, format, sent);
            }
            Verdict::Duplicate => {
                let first = self.send_now(pair, state, header, len, format, sent);
                return self.send_now(pair, state, header, len, format, sent) || first;
            }
            _ => return self.send_now(pair, state, header, len, format, sent),
        };
        let frame = (Frame { header, data: state.tx_frame.clone() }, len);
        let refused = state.tx_delayed.hold(frame, len as usize, held).is_err();
        if refused {
            self.shared.stats.dropped(DropReason::DelayLineFull, &"the transmit delay line is full");
        }
        !refused
    }

    /// Passes on the frame in `state.tx_frame` now; returns whether it went somewhere.
    fn send_now(
        &self,
        pair: usize,
        state: &mut PairState,
        header: NetHeaderRepr,
        len: u64,
        format: &FrameFormat,
        sent: &mut Traffic,
    ) -> bool {
        state.tx_delayed.passed();
        let went = self.pass_on(pair, &mut state.loopback, header, &state.tx_frame, format);
        if went {
            sent.count(len);
        }
        went
    }

    /// Passes on the delayed transmitted frames free to go; returns how many left the line.
    fn release_delayed_tx(
        &self,
        pair: usize,
        state: &mut PairState,
        format: &FrameFormat,
        sent: &mut Traffic,
    ) -> usize {
        if state.tx_delayed.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let mut released = 0;
        while let Some((frame, len)) = state.tx_delayed.pop_ready(now) {
            state.tx_delayed.passed();
            if self.pass_on(pair, &mut state.loopback, frame.header, &frame.data, format) {
                sent.count(len);
            }
            released += 1;
        }
        released
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

    /// Sends the frame `data` (header `header`) to the network side (`loopback`: the pair's
    /// loopback frames); returns whether it went somewhere (drops are counted).
    fn pass_on(
        &self,
        pair: usize,
        loopback: &mut Loopback,
        header: NetHeaderRepr,
        data: &[u8],
        format: &FrameFormat,
    ) -> bool {
        let stats = &self.shared.stats;
        match &self.shared.side {
            NetworkSide::Sink => true,
            NetworkSide::Loopback => {
                let queued = loopback.push(header, data);
                if !queued {
                    stats.dropped(DropReason::RxNoBuffers, &"the loopback queue is full");
                }
                queued
            }
            NetworkSide::Tap(tap) => {
                let mut header_bytes = [0u8; net::HEADER_SIZE];
                let header = NetHeaderRepr { num_buffers: 0, ..header };
                let _ = header.emit(&mut header_bytes, format.header_len);
                match tap.write_frame(pair, &header_bytes[..format.header_len], data) {
                    Ok(()) => true,
                    Err(e) => {
                        stats.dropped(DropReason::TapWrite, &format_args!("tap {}: {e}", tap.name()));
                        false
                    }
                }
            }
            NetworkSide::Switch { hub, port } => {
                let delivery = hub.forward(*port, pair, Frame { header, data: data.to_vec() });
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
        let pending = state.frames_waiting(inbox)
            || !state.rx_delayed.is_empty()
            || matches!(self.shared.side, NetworkSide::Tap(_));
        // A queue starts waiting for its limits only where the loop below ends.
        if !pending || self.shared.throttles.is_waiting(rx_queue(pair)) {
            return Ok(0);
        }
        // One read of the available index per pass; the buffers it announces are looked up in
        // a map loaded after it (see DESIGN.md).
        if let Some(announcing) = SplitRing::new(vring.get_queue(), &ring_mem) {
            popper.refresh(vring.get_queue(), &announcing);
        }
        let data_mem = memory.memory();
        let Some(ring) = SplitRing::new(vring.get_queue(), &data_mem) else { return popper.finish(0) };
        let mut scratch = std::mem::take(&mut state.rx_chains);
        loop {
            // A held frame was prepared and admitted before it waited for buffers or tokens.
            let (frame, admission) = match state.held.take() {
                Some(Held { frame, admission, blocked_at: None }) if self.over_limit_rx(limited, pair, &frame)? => {
                    state.held = Some(Held { frame, admission, blocked_at: None });
                    break;
                }
                Some(Held { frame, admission, .. }) => (frame, admission),
                None => {
                    if !state.rx_delayed.is_empty()
                        && let Some((frame, admission)) = state.rx_delayed.pop_ready(Instant::now())
                    {
                        // Its time has come: it goes on as a held frame (the limits still apply).
                        state.held = Some(Held { frame, admission, blocked_at: None });
                        continue;
                    }
                    let next = state.loopback.pop().or_else(|| inbox.pop());
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
                    match verdict_of(&admission) {
                        Verdict::Corrupt(pick) => corrupt(&mut frame.data, pick),
                        Verdict::Delay(delay) => {
                            self.hold_rx(state, (frame, admission), Some(Instant::now() + delay));
                            continue;
                        }
                        Verdict::Reorder => {
                            self.hold_rx(state, (frame, admission), None);
                            continue;
                        }
                        _ => {}
                    }
                    if self.over_limit_rx(limited, pair, &frame)? {
                        // Waits here, admitted, until the tokens are back.
                        state.held = Some(Held { frame, admission, blocked_at: None });
                        break;
                    }
                    (frame, admission)
                }
            };
            let queue = vring.get_queue_mut();
            let frame_parts = (&frame.header, &frame.data[..]);
            let mut write = |queue: &mut virtio_queue::Queue, used: &mut UsedBatch| {
                rings::write_rx_frame((queue, &ring, &mut popper), format, frame_parts, used, services, &mut scratch)
            };
            match write(queue, &mut used) {
                RxOutcome::Delivered(_) => {
                    state.rx_delayed.passed();
                    packets += 1;
                    bytes += frame.data.len() as u64;
                    // A duplicate goes right after the original when buffers are there for it.
                    let duplicate = verdict_of(&admission) == Verdict::Duplicate;
                    complete(services, admission, true);
                    if duplicate && let RxOutcome::Delivered(_) = write(queue, &mut used) {
                        packets += 1;
                        bytes += frame.data.len() as u64;
                    }
                }
                RxOutcome::NoBuffers => {
                    state.held = Some(Held { frame, admission, blocked_at: popper.seen() });
                    break;
                }
                RxOutcome::Refused(refused) => {
                    self.shared.stats.dropped(refused.reason, &refused);
                    complete(services, admission, false);
                }
            }
            if matches!(self.shared.side, NetworkSide::Loopback) {
                // Only the loopback takes buffers back: kept on another side (a tap's frames,
                // a switch port's), they would be held and never reused.
                state.loopback.recycle(frame.data);
            }
            if used.len() >= TX_BATCH {
                break;
            }
        }
        state.rx_chains = scratch;
        if packets > 0 {
            self.shared.stats.received(packets, bytes);
        }
        let entries = used.len();
        used.publish_and_release(vring, rx, rx_queue(pair), &*ring_mem, services)?;
        popper.finish(entries)
    }

    /// Puts an admitted frame for the guest into the receive delay line: until `due`, or (None)
    /// until the next frame has gone past it. A full line drops it (counted).
    fn hold_rx(&self, state: &mut PairState, frame: (Frame, Option<Admission>), due: Option<Instant>) {
        let bytes = frame.0.data.len();
        if let Err((_, admission)) = state.rx_delayed.hold(frame, bytes, due) {
            self.shared.stats.dropped(DropReason::DelayLineFull, &"the receive delay line is full");
            complete(self.shared.core.services(), admission, false);
        }
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
pub(super) struct PairPass<'a> {
    pub(super) device: &'a NetDevice,
    pub(super) pair: usize,
    pub(super) state: &'a mut PairState,
    pub(super) rx: &'a VringRwLock,
    pub(super) tx: &'a VringRwLock,
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
        // Delayed frames wake the pair when their time comes.
        let throttles = &self.device.shared.throttles;
        for (queue, due) in [(tx, self.state.tx_delayed.next_due()), (rx, self.state.rx_delayed.next_due())] {
            if let Some(at) = due {
                throttles.wake_at(queue, at)?;
            }
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
        if self.state.frames_waiting(self.device.inbox(self.pair)) { Rearm::Work } else { Rearm::Parked }
    }
}

/// The device's index of pair `pair`'s receive queue.
pub(super) fn rx_queue(pair: usize) -> usize {
    usize::from(net::rx_queue_index(pair as u16))
}

/// The device's index of pair `pair`'s transmit queue.
pub(super) fn tx_queue(pair: usize) -> usize {
    usize::from(net::tx_queue_index(pair as u16))
}
